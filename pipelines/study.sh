#!/usr/bin/env bash
# The study behind the README's Results tables: every row at the same training cost (STEPS
# optimizer steps of 128 images), same teacher, same student (resnet8), two seeds each, on
# three wild pools: the demo's (9,500 images, 21 % Fashion-MNIST); a larger one (40,300 images,
# 5 % Fashion-MNIST) where the budget (NUM = 2,000) is 5 % of the pool; and the demo's with
# every image stored 3 more times (38,000: a 2x upscale, a JPEG-75 and a 3/4-size copy).
# Re-runnable (finished runs are kept).
#   pipelines/study.sh            -> runs/study/results.md
# Settings: DATA (data/study), LARGE (data/study-large), COPIES (data/study-copies), RUNS
# (runs/study), SEEDS ("0 1"), STEPS (300 = 20 epochs of 2,000 images), NUM (2000), POOLS
# ("demo large copies"), PU_STEPS (750); EPOCHS_VIEW=1 also trains the whole-set rows for 20
# epochs (the equal-epochs table); EXTRA=1 adds the ensemble and MLKD rows on the demo pool.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/study} LARGE=${LARGE:-data/study-large} COPIES=${COPIES:-data/study-copies}
RUNS=${RUNS:-runs/study} SEEDS=${SEEDS:-0 1} POOLS=${POOLS:-demo large copies} PU_STEPS=${PU_STEPS:-750}
export STEPS=${STEPS:-300} NUM=${NUM:-2000} STUDENT=resnet8
# 20 positives per class = 2 % of the teacher's 10,000 training images. All pools hold the same
# 2,000 held-out Fashion-MNIST images; the larger one adds clip-art and many more font glyphs.
python pipelines/prepare_data.py --out "$DATA" --positives-per-class 20 >/dev/null
[[ " $POOLS " != *" large "* ]] || python pipelines/prepare_data.py --out "$LARGE" --positives-per-class 20 \
  --pool-clipart 6800 --pool-glyphs 30000 >/dev/null
[[ " $POOLS " != *" copies "* ]] || python pipelines/prepare_data.py --out "$COPIES" --positives-per-class 20 \
  --copies >/dev/null
teacher="$RUNS/teacher/model.yaml"
[ -f "$RUNS/teacher/manifest.json" ] || \
  dfkd train --arch resnet20 --data "$DATA/train" --out "$RUNS/teacher" --epochs 12 >/dev/null
[ -f "$RUNS/teacher/eval/eval.json" ] || \
  dfkd eval --model "$teacher" --data "$DATA/test" --write-card --out "$RUNS/teacher/eval" >/dev/null
teacher2="$RUNS/teacher2/model.yaml"  # a second teacher, for the ensemble row
[ -f "$RUNS/teacher2/manifest.json" ] || \
  dfkd train --arch resnet14 --data "$DATA/train" --out "$RUNS/teacher2" --epochs 12 --seed 1 >/dev/null
[ -f "$RUNS/teacher2/eval/eval.json" ] || \
  dfkd eval --model "$teacher2" --data "$DATA/test" --write-card --out "$RUNS/teacher2/eval" >/dev/null
kd="$(dirname "$0")/configs/kd.yaml" noisy="$(dirname "$0")/configs/dfnd-default.yaml"

evaluate() {  # RUN_DIR CARD
  [ -f "$1/eval/eval.json" ] || dfkd eval --model "$2" --data "$DATA/test" --out "$1/eval" >/dev/null
}
whole() {  # OUT DATA_DIR: train (labeled) or KD (any) on a whole set, for LENGTH (steps or epochs)
  local out=$1 data=$2
  case "$out" in
    */original*) [ -f "$out/manifest.json" ] || dfkd train --arch resnet8 --data "$data" --out "$out" \
                     --seed "$SEED" $LENGTH >/dev/null; evaluate "$out" "$out/model.yaml" ;;
    *) [ -f "$out/manifest.json" ] || dfkd distill --teacher "$teacher" --student resnet8 --data "$data" \
           --out "$out" --config "$kd" --seed "$SEED" $LENGTH >/dev/null; evaluate "$out" "$out/student.yaml" ;;
  esac
}

row() {  # POOL_RUNS POOL_DATA ROW: one row of a pool's table (SEED set)
  local p=$1 d=$2 wild=$2/wild
  case $3 in
    kd-wild) whole "$p/kd-wild" "$wild" ;;
    random) SELECT_ARGS="--score random --global" pipelines/dfnd.sh "$teacher" "$wild" "$p/random" "$DATA/test" ;;
    dfnd-global) SELECT_ARGS="--global" pipelines/dfnd.sh "$teacher" "$wild" "$p/dfnd-global" "$DATA/test" ;;
    dfnd-per-class) pipelines/dfnd.sh "$teacher" "$wild" "$p/dfnd-per-class" "$DATA/test" ;;
    dedup-off) SELECT_ARGS="--dedup off" pipelines/dfnd.sh "$teacher" "$wild" "$p/dedup-off" "$DATA/test" ;;
    diverse) SELECT_ARGS="--policy diverse" pipelines/dfnd.sh "$teacher" "$wild" "$p/diverse" "$DATA/test" ;;
    online|online-per-class)  # the whole pool streamed; every batch of 640 keeps the 128 (20 %) images
      # with the lowest noise value (over the batch, or per predicted class), so each step trains on
      # as many images as the other rows
      local policy=global; [ "$3" = online ] || policy=per-class
      [ -f "$p/$3/manifest.json" ] || dfkd distill --teacher "$teacher" --student resnet8 --data "$wild" \
          --out "$p/$3" --config "$noisy" --seed "$SEED" --steps "$STEPS" --batch-size 640 \
          --set online.keep=0.2 --set online.policy=$policy >/dev/null
      evaluate "$p/$3" "$p/$3/student.yaml" ;;
    pu)  # the PU classifier trains for PU_STEPS steps on either pool (750: 10 epochs of the demo's)
      local prior
      prior=$(awk -F'\t' 'NR > 1 { n++; if ($2 == "fashion") f++ } END { printf "%.4f", f / n }' "$d/wild_truth.tsv")
      PRIOR=$prior PU_ARGS="--steps $PU_STEPS" pipelines/pu.sh "$teacher" "$DATA/positives" "$wild" "$p/pu" \
        "$DATA/test" ;;
    ensemble) pipelines/dfnd.sh "$teacher,$teacher2" "$wild" "$p/ensemble" "$DATA/test" ;;
    mlkd) DISTILL_ARGS="--set align.weight=10 --set correlation.weight=20" \
            pipelines/dfnd.sh "$teacher" "$wild" "$p/mlkd" "$DATA/test" ;;
    kd-wild-epochs) LENGTH="--epochs 20" whole "$p/kd-wild-epochs" "$wild" ;;
  esac >/dev/null
}

for seed in $SEEDS; do
  export SEED=$seed
  LENGTH="--steps $STEPS" whole "$RUNS/seed$seed/original" "$DATA/train"
  LENGTH="--steps $STEPS" whole "$RUNS/seed$seed/kd-original" "$DATA/train"
  if [ "${EPOCHS_VIEW:-0}" = 1 ]; then
    LENGTH="--epochs 20" whole "$RUNS/seed$seed/original-epochs" "$DATA/train"
    LENGTH="--epochs 20" whole "$RUNS/seed$seed/kd-original-epochs" "$DATA/train"
  fi
done
# Row by row, both seeds of a row together; the online rows (the costliest) last.
for pass in offline online; do
  for pool in $POOLS; do
    case $pool in
      demo) d=$DATA rows="kd-wild random dfnd-global dfnd-per-class dedup-off diverse pu online online-per-class" ;;
      large) d=$LARGE rows="kd-wild random dfnd-global dfnd-per-class dedup-off diverse pu online online-per-class" ;;
      copies) d=$COPIES rows="dfnd-per-class dedup-off" ;;
      *) echo "POOLS: unknown pool '$pool' (demo, large, copies)" >&2; exit 2 ;;
    esac
    [ "$pool" = demo ] && [ "${EXTRA:-0}" = 1 ] && rows="$rows ensemble mlkd"
    [ "$pool" != copies ] && [ "${EPOCHS_VIEW:-0}" = 1 ] && rows="$rows kd-wild-epochs"
    for name in $rows; do
      [ "${name%%-*}" = online ] && kind=online || kind=offline
      [ $kind = $pass ] || continue
      for seed in $SEEDS; do
        SEED=$seed LENGTH="--steps $STEPS" row "$RUNS/$pool/seed$seed" "$d" "$name"
      done
    done
  done
done
python pipelines/study_table.py "$RUNS" "$DATA" "$LARGE" "$COPIES" > "$RUNS/results.md.tmp" \
  && mv "$RUNS/results.md.tmp" "$RUNS/results.md"
cat "$RUNS/results.md"
