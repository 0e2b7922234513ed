"""Training from the on-disk decoded cache: peak memory against set size, speed against memory.

1. **Peak RSS against the training set.** For each size N (``--sizes``, default 10000,40000)
   it makes N 64×64 RGB noise PNGs (bench/make_pool.py, kept under ``--work``) and an untrained
   64×64 RGB resnet8 teacher, then runs in a child process

       python -m dfkd distill --teacher CARD --student resnet8 --data POOL --out RUN \\
           --method kd --steps STEPS --batch-size 128 --device cpu --cache-dir WORK/cache

   once with the set in memory (``DFKD_IN_MEMORY_BYTES`` above its size) and twice from the
   cache (``DFKD_IN_MEMORY_BYTES=0``): a run that decodes into a fresh entry, then trains, and
   a run that reuses it. Peak RSS is the child's ``ru_maxrss`` from ``os.wait4``.
2. **Speed** (``--data``, e.g. the demo's selection): the same distill (``--epochs``) from memory
   and from the cache (already built by a first run); training images/s is the mean of
   metrics.jsonl's ``images_per_s``. Goal: the cache at ≥ 0.9 of memory.

    python bench/train_cache.py [--sizes 10000,40000] [--memory-up-to N] [--work runs/bench-cache] \\
        [--data runs/demo/select/selected.tsv --teacher runs/demo/teacher/model.yaml]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_pool import make_pool, make_teacher  # noqa: E402

SIZE = 64
MIB = 1 << 20


def run(args: list[str], out: Path, env: dict) -> tuple[float, int]:
    """Run ``dfkd distill`` into a fresh ``out``; return (wall seconds, peak RSS bytes)."""
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dfkd", "distill", "--out", str(out), "--device", "cpu", *args]
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "wb") as log:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env={**os.environ, **env})
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n" + (out.parent / f"{out.name}.log").read_text()[-2000:])
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def images_per_s(out: Path) -> float:
    rates = [json.loads(ln)["images_per_s"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return sum(rates[1:] or rates) / len(rates[1:] or rates)  # the first record includes warm-up


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,40000")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--memory-up-to", type=int, default=10**9,
                    help="run the in-memory comparison only for sets up to this many images")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-cache"))
    ap.add_argument("--data", help="a training set for the speed comparison (e.g. the demo's selection)")
    ap.add_argument("--teacher", help="its teacher card")
    ap.add_argument("--epochs", type=int, default=3)
    a = ap.parse_args()
    work, cache = a.work, a.work / "cache"
    memory, disk = {"DFKD_IN_MEMORY_BYTES": str(1 << 40)}, {"DFKD_IN_MEMORY_BYTES": "0"}
    print(f"{'set':>22} {'decoded':>9} {'RSS: memory':>12} {'cache build':>11} {'reuse':>10}"
          f" {'wall mem/build/reuse':>22}")
    if a.sizes:
        card = make_teacher(work / "teacher" / "model.yaml", SIZE, channels=3)
        for n in (int(s) for s in a.sizes.split(",")):
            pool = make_pool(work / f"pool-{n}", n, size=SIZE, channels=3, verbose=False)
            common = ["--teacher", str(card), "--student", "resnet8", "--data", str(pool), "--method", "kd",
                      "--steps", str(a.steps), "--batch-size", "128", "--cache-dir", str(cache)]
            t_mem, rss_mem = run(common, work / f"mem-{n}", memory) if n <= a.memory_up_to else (float("nan"), 0)
            shutil.rmtree(cache, ignore_errors=True)
            t_build, rss_build = run(common, work / f"build-{n}", disk)  # decodes into the cache, then trains
            t_disk, rss_disk = run(common, work / f"disk-{n}", disk)  # reuses it
            decoded = n * 3 * SIZE * SIZE / MIB
            print(f"{f'{n} x 64x64 RGB':>22} {decoded:>7.0f}Mi {rss_mem / MIB:>10.0f}Mi {rss_build / MIB:>9.0f}Mi"
                  f" {rss_disk / MIB:>9.0f}Mi {t_mem:>7.1f}/{t_build:.1f}/{t_disk:.1f}s")
    if a.data:
        common = ["--teacher", a.teacher, "--student", "resnet8", "--data", a.data, "--method", "kd",
                  "--epochs", str(a.epochs), "--cache-dir", str(cache)]
        run(common, work / "speed-disk", disk)  # builds the entry
        rates = {}
        for name, env in (("memory", memory), ("cache", disk)):
            run(common, work / f"speed-{name}", env)
            rates[name] = images_per_s(work / f"speed-{name}")
        print(f"distill kd on {a.data}: memory {rates['memory']:.0f} img/s, cache {rates['cache']:.0f} img/s,"
              f" ratio {rates['cache'] / rates['memory']:.2f} (goal >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
