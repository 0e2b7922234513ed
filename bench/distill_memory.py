"""Peak private memory of ``dfkd distill`` at a user's resolution, against ``--batch-size``.

A training set of ``--num`` RGB JPEGs at ``--size`` px (default 12,500 at 480 px: 8.0 GiB
decoded, over the 2 GiB kept in memory, so it goes to the on-disk decoded cache) and a teacher
card at the same input (a torchvision model with random weights: memory needs no training).
``dfkd distill --method kd --steps N`` runs once per ``--batch-sizes`` value, as a whole process;
the first run builds the decoded cache, the later ones reuse it. Peak private memory is sampled
every 20 ms from ``/proc/PID/status`` (``RssAnon``: the process's own memory; the page cache
that holds the cache file is not counted), over the process and its children.

    python bench/distill_memory.py --work runs/bench-distill-memory
    python bench/distill_memory.py --num 2000 --batch-sizes 8,64   # a quicker look
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, jpeg_pool, measure, photo_pool, random_card  # noqa: E402

from dfkd.images import InputSpec  # noqa: E402
from dfkd.index import write_index  # noqa: E402
from dfkd.runtime import resolve_device  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=12_500)
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--photos", action="store_true", help="crops of Debian wallpapers instead of smooth noise")
    p.add_argument("--teacher", default="torchvision:mobilenet_v3_small")
    p.add_argument("--student", default="torchvision:mobilenet_v3_small")
    p.add_argument("--batch-sizes", default="8,32,128")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--work", help="folder for the images, cache and runs (default: temporary, removed)")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="dfkd-bench-distill-memory-"))
    images = work / f"images-{args.num}-{args.size}"
    if not images.is_dir():
        (photo_pool if args.photos else jpeg_pool)(images, args.num, args.size, args.size)
    index = write_index(work / "train.tsv", [{"path": str(f.resolve())} for f in sorted(images.iterdir())], ["path"])
    spec = InputSpec(size=(args.size, args.size), channels=3, mean=[0.485, 0.456, 0.406],
                     std=[0.229, 0.224, 0.225], resize="crop")
    card = random_card(work, args.teacher, spec=spec, classes=10)
    decoded = args.num * 3 * args.size * args.size
    header("distill peak private memory", resolve_device("auto"), False, {
        "training set": f"{args.num} {'photo' if args.photos else 'smooth-noise'} JPEGs of {args.size}x{args.size}"
                        f" ({decoded / 2**30:.1f} GiB decoded)",
        "teacher / student": f"{args.teacher} / {args.student}, random weights, input 3x{args.size}x{args.size}",
        "run": f"dfkd distill --method kd --steps {args.steps}"})
    print(f"  {'--batch-size':>12} {'cache':>7} {'wall s':>7} {'peak private':>13}")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        out, built = work / f"distill-b{bs}", not (work / "cache").is_dir()
        shutil.rmtree(out, ignore_errors=True)
        wall, peak = measure([sys.executable, "-m", "dfkd", "distill", "--teacher", str(card), "--student",
                              args.student, "--data", str(index), "--method", "kd", "--steps", str(args.steps),
                              "--batch-size", str(bs), "--cache-dir", str(work / "cache"), "--out", str(out)])
        print(f"  {bs:12d} {'built' if built else 'reused':>7} {wall:7.0f} {peak / 2**30:10.2f} GiB", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
