#!/usr/bin/env bash
# Issue 24's budget study: students trained on `select --num-images auto` against fixed budgets,
# at equal steps.
#
#   pipelines/budget_study.sh TEACHER_CARD TEST_DIR OUT NAME=POOL [NAME=POOL ...]
#
# For every pool (a folder or an index) and every budget in BUDGETS (default "auto 1000 2000
# 4000"), select into OUT/NAME/select-N (per-class, the default near-duplicate removal), then for
# every seed in SEEDS (default "0 1") distill a resnet8 with pipelines/configs/dfnd-default.yaml
# for STEPS (default 150) steps into OUT/NAME/student-N-sS and evaluate it on TEST_DIR. Runs that
# finished are kept, so the script resumes. Then `python pipelines/budget_table.py OUT TRUTH.tsv`
# prints the table. DEVICE (default cpu).
set -euo pipefail
[[ $# -ge 4 ]] || { sed -n 4,6p "$0" | cut -c3- >&2; exit 2; }
teacher=$1 test=$2 out=$3
shift 3
BUDGETS=${BUDGETS:-auto 1000 2000 4000} SEEDS=${SEEDS:-0 1} STEPS=${STEPS:-150} DEVICE=${DEVICE:-cpu}
config="$(dirname "$0")/configs/dfnd-default.yaml"
for spec in "$@"; do
  name=${spec%%=*} pool=${spec#*=}
  mkdir -p "$out/$name"
  for n in $BUDGETS; do
    sel="$out/$name/select-$n"
    [[ -f $sel/selected.tsv ]] || dfkd select --teacher "$teacher" --pool "$pool" --out "$sel" --num-images "$n" \
      --device "$DEVICE" >/dev/null 2>"$sel.log"
    for s in $SEEDS; do
      st="$out/$name/student-$n-s$s"
      [[ -f $st/eval/eval.json ]] && continue
      rm -rf "$st"
      dfkd distill --teacher "$teacher" --student resnet8 --data "$sel/selected.tsv" --out "$st" --config "$config" \
        --steps "$STEPS" --seed "$s" --device "$DEVICE" >/dev/null 2>"$st.log"
      dfkd eval --model "$st/student.yaml" --data "$test" --out "$st/eval" --device "$DEVICE" >/dev/null 2>>"$st.log"
      echo "$st: $(python -c 'import json,sys; print(json.load(open(sys.argv[1]))["top1"])' "$st/eval/eval.json")"
    done
  done
done
