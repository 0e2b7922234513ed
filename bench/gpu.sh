#!/usr/bin/env bash
# The GPU checks of issue 11 in one call, for a session that is lent a GPU machine (about 6
# minutes on one H200 after the start): the CUDA tests (`pytest -m gpu`), select on a JPEG pool
# at 224 px with JPEGs decoded on the GPU against decoded by PIL in the workers (img/s and the
# ratio to the teacher's bare forward on pre-decoded tensors; issue 11's goal: >= 0.8), select
# at 224 px as whole processes against the raw forward and a torchvision DataLoader loop
# (bench/resolution.py, issue 21), and distill's training step against a bare loop. Each part runs even when one before it fails;
# everything is printed and kept in $OUT/gpu.log (runs/gpu/gpu.log without $OUT).
#
# On the lent machine (Python 3.12, torch and the rest already there, faiss missing), from here:
#   echo /.whl/ >> .git/info/exclude   # once; then the faiss-cpu wheel for cp312:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 -d .whl faiss-cpu==1.15.1
#   run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=570)   # the parts: at most 150+180+150+60 s
# DEVICE=cpu NUM=128 bash bench/gpu.sh tries the script's own plumbing here, on the CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu}
mkdir -p "$out"
exec > >(tee "$out/gpu.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
status=0
part() {  # part NAME SECONDS CMD...: run one part under a time limit, note a failure, go on
  local name=$1 limit=$2; shift 2
  echo; echo "===== $name ($(date -u +%T), at most ${limit}s) ====="
  timeout "$limit" "$@"; local rc=$?
  (( rc == 0 )) || { echo "===== $name FAILED: exit $rc ====="; status=1; }
}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # dfkd from this checkout, installed or not
$PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "(dfkd not pip-installed: no dfkd command; the library is on PYTHONPATH)"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY - <<'PY'
import importlib, torch, torchvision
print("python", __import__("sys").version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__,
      "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
for m in ("yaml", "PIL", "numpy", "faiss", "sklearn", "timm", "pytest", "webdataset"):
    try:
        importlib.import_module(m); print("  have", m)
    except ImportError:
        print("  MISSING", m)
PY

part "pytest -m gpu" 150 $PY -m pytest -q -p no:cacheprovider -m gpu -rs tests
part "select: GPU against CPU JPEG decoding, resnet50 at 224" 180 \
  $PY bench/select_throughput.py --device "$DEVICE" --arch torchvision:resnet50 --input 3x224x224 --classes 1000 \
    --jpeg 500x375 --num "${NUM:-8192}" --batch-size 256 --workers 8,15 --repeats 1 --budget 60
part "select at 224 px as whole processes: raw forward, DataLoader loop, dfkd select (issue 21)" 150 \
  $PY bench/resolution.py --arch torchvision:resnet50 --sizes 224 --num "${NUM:-4096}" --large 64 \
    --batch-size 256 --workers 8 --repeats 1
part "distill: training steps against a bare loop" 60 $PY bench/distill_throughput.py --device "$DEVICE"
echo
echo "===== ratios ====="
grep '^RATIO' "$out/gpu.log" | sed 's/^RATIO /  /'
exit $status
