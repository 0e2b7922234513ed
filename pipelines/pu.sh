#!/usr/bin/env bash
# PU Compression ("Positive-Unlabeled Compression on the Cloud", NeurIPS 2019):
# pu-train -> expand -> distill (robust KD) -> eval.
#
#   pipelines/pu.sh TEACHER_CARD POSITIVES POOL OUT [TEST_DIR]   (the prior estimated: no number to guess)
#   PRIOR=0.2 pipelines/pu.sh TEACHER_CARD POSITIVES POOL OUT [TEST_DIR]
#
# Environment: PRIOR (the share of the pool that looks like the positives, if you know it; default auto:
# estimated from the positives and the pool, printed and kept in the PU card),
# STUDENT (default resnet8), CONFIG (distill YAML, default pipelines/configs/pu-default.yaml),
# EPOCHS or STEPS (distill epochs or steps, override the config), PU_EPOCHS (default 10), SEED (default 0),
# REPEAT_POSITIVE (default 1), PU_ARGS / EXPAND_ARGS / DISTILL_ARGS (extra flags).
# Re-runnable: every step is run again and resumes where it stopped (a finished one is quick;
# expand selects again from its stored scores). A step whose inputs
# changed since its run (another EXPAND_ARGS changes distill's data) stops with one line naming what
# differs: use another OUT, or add --overwrite to that step's *_ARGS.
# stdout: the student card's path.
set -euo pipefail
[ $# -ge 4 ] || { sed -n '2,17p' "$0" >&2; exit 2; }
PRIOR=${PRIOR:-auto}
teacher=$1 positives=$2 pool=$3 out=$4 test=${5:-}
here=$(cd "$(dirname "$0")" && pwd)
STUDENT=${STUDENT:-resnet8} SEED=${SEED:-0} PU_EPOCHS=${PU_EPOCHS:-10}
CONFIG=${CONFIG:-$here/configs/pu-default.yaml}

dfkd pu-train --teacher "$teacher" --positive "$positives" --unlabeled "$pool" --out "$out/pu" \
    --prior "$PRIOR" --epochs "$PU_EPOCHS" --seed "$SEED" ${PU_ARGS:-} >/dev/null
dfkd expand --pu "$out/pu/pu.yaml" --positive "$positives" --unlabeled "$pool" --out "$out/expand" \
    --repeat-positive "${REPEAT_POSITIVE:-1}" ${EXPAND_ARGS:-} >/dev/null
dfkd distill --teacher "$teacher" --student "$STUDENT" --data "$out/expand/expanded.tsv" \
    --out "$out/distill" --config "$CONFIG" --seed "$SEED" ${EPOCHS:+--epochs "$EPOCHS"} \
    ${STEPS:+--steps "$STEPS"} ${DISTILL_ARGS:-} >/dev/null
if [ -n "$test" ]; then
  dfkd eval --model "$out/distill/student.yaml" --data "$test" --out "$out/eval" >/dev/null
fi
echo "$out/distill/student.yaml"
