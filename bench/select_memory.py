"""How ``dfkd select``'s peak memory grows with the pool: bytes per pool image beyond a fixed cost.

For each pool size N (``--sizes``) it makes a pool of N tiny 8×8 PNGs (bench/make_pool.py,
kept under ``--work`` and reused while its arguments match) and an untrained resnet8 teacher,
then runs, as a child process with a fresh ``--out``,

    python -m dfkd select --teacher CARD --pool POOL --out RUN --num-images 1000 --device cpu

and takes the child's peak resident memory from ``os.wait4`` (``ru_maxrss``: the kernel's exact
high-water mark, not a sample; it is the largest of the child and any decoding worker it reaped,
each on its own, not their sum) and its wall time (interpreter start and imports included).

From the two largest sizes a and b: the slope ``(rss_b - rss_a) / (n_b - n_a)`` in bytes per
pool image, the fixed cost ``rss_a - slope * n_a``, and the peak projected to 10,000,000
images. Goal: under 200 bytes per pool image beyond the fixed cost. The images are tiny, so
decoding and the model cost little and what grows is what select keeps per image (paths, scores,
index rows). Differences between close sizes are noisy (allocator arenas, a few MiB); the
default 20000,200000 keeps that noise to some tens of bytes per image.

    python bench/select_memory.py [--sizes 20000,200000] [--work DIR] [--extra "--global"]
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_pool import make_pool, make_teacher  # noqa: E402

NUM_FLAG = "--num-images"  # the count flag of `dfkd select` (was --num)
NUM_IMAGES = 1000
GOAL_BYTES = 200  # bytes of peak RSS per pool image beyond the fixed cost
PROJECT_TO = 10_000_000
POOL_SIZE = 8  # pixels, width and height
TAIL_LINES = 40


def run_select(card: Path, pool: Path, out: Path, log: Path, extra: list[str]) -> tuple[int, float, int]:
    """Run ``dfkd select`` in a child; return (exit code, wall seconds, peak RSS in bytes)."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "dfkd", "select", "--teacher", str(card), "--pool", str(pool),
           "--out", str(out), NUM_FLAG, str(NUM_IMAGES), "--device", "cpu", *extra]
    with open(log, "wb") as err, open(log.with_suffix(".stdout"), "wb") as stdout:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=err)
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:
            child.kill()
            child.wait()
            raise
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return child.returncode, wall, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no stderr)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty stderr)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="20000,200000", help="comma-separated pool sizes (default 20000,200000)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dfkd-bench"),
                    help="where pools, the teacher and the runs go (default /tmp/dfkd-bench)")
    ap.add_argument("--extra", default="", help="more flags for dfkd select, one shell-quoted string")
    args = ap.parse_args(argv)
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    except ValueError:
        ap.error(f"--sizes {args.sizes!r}: expected integers separated by commas")
    if not sizes or sizes[0] < 1:
        ap.error("--sizes: give at least one size of 1 or more")
    extra = shlex.split(args.extra)
    work = args.work.resolve()
    repo = Path(__file__).resolve().parent.parent
    if work == repo or repo in work.parents:
        ap.error(f"--work {work}: keep generated data outside the repository")
    work.mkdir(parents=True, exist_ok=True)

    card = make_teacher(work / "teacher" / "resnet8-8x8.yaml", POOL_SIZE)
    import torch  # already loaded by make_teacher

    print("== dfkd select: peak memory against pool size ==")
    print(f"  python   {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} cores")
    print(f"  command  python -m dfkd select --teacher {card.name} --pool POOL --out RUN "
          f"{NUM_FLAG} {NUM_IMAGES} --device cpu {' '.join(extra)}".rstrip())
    print(f"  pools    {POOL_SIZE}x{POOL_SIZE} grey PNGs of noise, 1000 a folder, under {work}")
    print("  peak RSS from os.wait4 (ru_maxrss: the child, or its largest reaped worker)")
    sys.stdout.flush()

    results = []
    for n in sizes:
        pool = make_pool(work / f"pool-{n}", n, size=POOL_SIZE)
        log = work / "runs" / f"select-{n}.stderr"
        log.parent.mkdir(parents=True, exist_ok=True)
        code, wall, rss = run_select(card, pool, work / "runs" / f"select-{n}", log, extra)
        if code != 0:
            print(f"\ndfkd select failed on the pool of {n} images (exit {code}); last lines of stderr"
                  f" ({log}):\n{tail(log)}", file=sys.stderr)
            return 1
        results.append((n, rss, wall))

    print()
    print(f"  {'pool images':>11}  {'peak RSS MiB':>12}  {'seconds':>8}  {'img/s':>8}")
    for n, rss, wall in results:
        print(f"  {n:>11}  {rss / 2**20:>12.1f}  {wall:>8.1f}  {n / wall:>8.0f}")
    if len(results) < 2:
        print("\n  (one size only: give two or more with --sizes for the growth per image)")
        return 0
    (n_a, rss_a, _), (n_b, rss_b, _) = results[-2], results[-1]
    slope = (rss_b - rss_a) / (n_b - n_a)
    fixed = rss_a - slope * n_a
    projected = fixed + slope * PROJECT_TO
    met = slope < GOAL_BYTES
    print()
    print(f"  growth between {n_a} and {n_b} images  {slope:8.1f} bytes per pool image")
    print(f"  fixed cost (extrapolated to 0 images)  {fixed / 2**20:8.1f} MiB")
    print(f"  projected peak at {PROJECT_TO:,} images  {projected / 2**20:8.1f} MiB"
          f" ({projected / 2**30:.2f} GiB)")
    print(f"  goal: under {GOAL_BYTES} bytes per pool image beyond the fixed cost: {'met' if met else 'NOT met'}")
    print(f"RATIO select memory: {slope:.1f} bytes/pool image beyond a fixed {fixed / 2**20:.0f} MiB"
          f" (goal < {GOAL_BYTES}: {'met' if met else 'not met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
