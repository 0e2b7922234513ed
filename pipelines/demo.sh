#!/usr/bin/env bash
# The demo: DFND's pipeline on real images, end to end, on a 2-core CPU.
#   Fashion-MNIST (Debian) is the teacher's private data and the test set; the wild pool mixes
#   held-out Fashion-MNIST (21 %) with clip-art, font glyphs and handwritten digits.
# Re-runnable: finished steps are kept, interrupted ones resume.
# Settings: DATA (default data/demo), RUNS (default runs/demo), TEACHER_ARCH (resnet20),
# TEACHER_EPOCHS (12), and those of pipelines/dfnd.sh (NUM, STUDENT, EPOCHS, ...). NUM is pinned to 2000
# here (dfnd.sh's default is auto) so that the figures stay those of the README; NUM=auto make demo estimates it.
# Precision: fp32 on every device (--no-amp), so that the figures are the README's on any CPU (a CPU
# with native bf16 would otherwise train under bf16 autocast); DFKD_DEMO_AMP=1 keeps each command's
# default (bf16 on CUDA and on CPUs with AVX512-BF16 or AMX).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-data/demo}
RUNS=${RUNS:-runs/demo}
start=$(date +%s)
amp=--no-amp
[ "${DFKD_DEMO_AMP:-0}" = 1 ] && amp=

python pipelines/prepare_data.py --out "$DATA" >/dev/null

teacher="$RUNS/teacher/model.yaml"
[ -f "$RUNS/teacher/manifest.json" ] || \
  dfkd train --arch "${TEACHER_ARCH:-resnet20}" --data "$DATA/train" --out "$RUNS/teacher" \
    --epochs "${TEACHER_EPOCHS:-12}" $amp >/dev/null
[ -f "$RUNS/teacher/eval/eval.json" ] || \
  dfkd eval --model "$teacher" --data "$DATA/test" --write-card --out "$RUNS/teacher/eval" $amp >/dev/null

NUM=${NUM:-2000} EPOCHS=${EPOCHS:-20} SELECT_ARGS="$amp ${SELECT_ARGS:-}" DISTILL_ARGS="$amp ${DISTILL_ARGS:-}" pipelines/dfnd.sh "$teacher" "$DATA/wild" "$RUNS/dfnd" "$DATA/test" >/dev/null
dfkd report "$RUNS/dfnd" >/dev/null  # one page: select, distill, eval

python - "$RUNS" "$DATA" "$start" <<'PY'
import json, subprocess, sys, time
runs, data, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
load = lambda p: json.load(open(p))
truth = json.loads(subprocess.run([sys.executable, "pipelines/truth.py", f"{runs}/dfnd/select/selected.tsv",
                                   f"{data}/wild_truth.tsv"], capture_output=True, text=True, check=True).stdout)
rows = [
    ("teacher top-1 (Fashion-MNIST test)", f"{load(f'{runs}/teacher/eval/eval.json')['top1']:.4f}"),
    ("student top-1 (DFND, per-class selection)", f"{load(f'{runs}/dfnd/eval/eval.json')['top1']:.4f}"),
    ("wild pool images", str(load(f"{runs}/dfnd/select/manifest.json")["summary"]["pool"])),
    ("images selected", str(truth["selected"])),
    ("  of them Fashion-MNIST (pool share)",
     f"{truth['in_distribution_share']:.3f} ({truth['pool_in_distribution_share']:.3f})"),
    ("time (s)", str(int(time.time()) - start)),
]
width = max(len(a) for a, _ in rows)
print("\n".join(f"{a:<{width}}  {b}" for a, b in rows))
print(f"report: {runs}/dfnd/report.html")
PY
