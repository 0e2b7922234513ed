#!/usr/bin/env bash
# DFND ("Learning Student Networks in the Wild", CVPR 2021): select -> distill (noisy) -> eval.
#
#   pipelines/dfnd.sh TEACHER_CARD[,TEACHER_CARD...] POOL OUT [TEST_DIR]
#   NUM=2000 pipelines/dfnd.sh ...   (a budget of your own instead of the estimated one)
#
# Several comma-separated teacher cards make an ensemble (MEAL V2's averaged softmax).
# Environment: NUM (images to select; default auto: the pool's in-distribution count, estimated from the
# teacher's features against the labeled data `dfkd eval --write-card` fitted into its card, else from the
# noise values, which overestimate: README "Knobs a data-free user cannot know"), STUDENT (arch or card,
# default resnet8),
# CONFIG (distill YAML, default pipelines/configs/dfnd-default.yaml; its select: section, if it has
# one, is select's config too), EPOCHS or STEPS (override the
# config), SEED (default 0), SELECT_ARGS / DISTILL_ARGS (extra flags, e.g. "--global").
# Re-runnable: every step is run again and resumes where it stopped (a finished one is quick;
# select selects again from its stored scores, so another NUM takes effect). A step whose inputs
# changed since its run (another NUM changes distill's data) stops with one line naming what
# differs: use another OUT, or add --overwrite to that step's *_ARGS.
# stdout: the student card's path.
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,19p' "$0" >&2; exit 2; }
pool=$2 out=$3 test=${4:-}
teachers=()
IFS=, read -ra cards <<< "$1"
for c in "${cards[@]}"; do teachers+=(--teacher "$c"); done
here=$(cd "$(dirname "$0")" && pwd)
NUM=${NUM:-auto} STUDENT=${STUDENT:-resnet8} SEED=${SEED:-0}
CONFIG=${CONFIG:-$here/configs/dfnd-default.yaml}

select_config=()
grep -q '^select:' "$CONFIG" && select_config=(--config "$CONFIG")
dfkd select "${teachers[@]}" --pool "$pool" --out "$out/select" --num-images "$NUM" --seed "$SEED" \
  "${select_config[@]}" ${SELECT_ARGS:-} >/dev/null
dfkd distill "${teachers[@]}" --student "$STUDENT" --data "$out/select/selected.tsv" \
    --out "$out/distill" --config "$CONFIG" --seed "$SEED" ${EPOCHS:+--epochs "$EPOCHS"} \
    ${STEPS:+--steps "$STEPS"} ${DISTILL_ARGS:-} >/dev/null
if [ -n "$test" ]; then
  dfkd eval --model "$out/distill/student.yaml" --data "$test" --out "$out/eval" >/dev/null
fi
echo "$out/distill/student.yaml"
