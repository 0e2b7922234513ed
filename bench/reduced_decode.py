"""The tolerance of reduced-size JPEG decoding, on real photographs and a trained teacher.

``dfkd select`` decodes a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when that is
still no smaller than the teacher's input, then resizes as always (dfkd/images.py). This script
scores one pool twice, with it and with ``DFKD_REDUCED_DECODE=0`` (every pixel decoded), and
prints what changes: the largest and the median difference of the noise values, how many
images change their teacher class, how many selected images differ, and each run's time.

Offline data: random crops of Debian's wallpapers (gnome-backgrounds, plasma-workspace-wallpapers),
as baseline JPEGs. The teacher is trained here (``dfkd train --arch resnet8 --size S``) to tell
``--classes`` wallpapers apart from 500×375 crops of them, so its scores mean something; the
pool holds ``--num`` other crops of every wallpaper at 500×375, plus ``--large`` at 2000×1500.

    python bench/reduced_decode.py --work runs/bench-reduced-decode
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, photo_pool, wallpapers  # noqa: E402

from dfkd.index import read_index  # noqa: E402
from dfkd.runtime import resolve_device  # noqa: E402


def _class_folders(root: Path, sources: list[Path], per_class: int) -> Path:
    """An ImageFolder: one class per wallpaper, ``per_class`` 500×375 crops of it."""
    from common import _photo_crop

    for c, src in enumerate(sources):
        folder = root / f"{c:02d}-{src.parent.parent.name if src.parent.name == 'images' else src.stem}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _photo_crop(10_000 + i, 500, 375, [src]).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def _select(py: str, card: Path, pool: Path, out: Path, num: int, reduced: bool) -> float:
    env = {**__import__("os").environ, "DFKD_REDUCED_DECODE": "1" if reduced else "0"}
    start = time.perf_counter()
    subprocess.run([py, "-m", "dfkd", "select", "--teacher", str(card), "--pool", str(pool), "--out", str(out),
                    "--num-images", str(num), "--workers", "0"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="the teacher's input size")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--per-class", type=int, default=60)
    p.add_argument("--steps", type=int, default=300, help="teacher training steps")
    p.add_argument("--num", type=int, default=600, help="pool images at 500x375")
    p.add_argument("--large", type=int, default=40, help="pool images at 2000x1500")
    p.add_argument("--select", type=int, default=150, help="--num-images")
    p.add_argument("--work", help="folder (default: temporary, removed)")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="dfkd-bench-reduced-"))
    py = sys.executable
    sources = wallpapers()
    if len(sources) < args.classes:
        sys.exit("too few wallpapers: apt-get install gnome-backgrounds plasma-workspace-wallpapers")
    step = len(sources) // args.classes
    classes = [sources[i * step] for i in range(args.classes)]
    if not (work / "train").is_dir():
        _class_folders(work / "train", classes, args.per_class)
    if not (work / "pool").is_dir():
        photo_pool(work / "pool", args.num, 500, 375)
        if args.large:
            photo_pool(work / "pool", args.large, 2000, 1500, prefix="large")
    card = work / "teacher" / "model.yaml"
    if not card.is_file():
        subprocess.run([py, "-m", "dfkd", "train", "--arch", "resnet8", "--data", str(work / "train"), "--size",
                        str(args.size), "--channels", "3", "--steps", str(args.steps), "--batch-size", "64",
                        "--out", str(work / "teacher")], check=True, stdout=subprocess.DEVNULL)
    header("reduced JPEG decoding against full decoding", resolve_device("auto"), False, {
        "teacher": f"resnet8 at {args.size} px, trained {args.steps} steps on {args.classes} wallpapers"
                   f" x {args.per_class} crops (500x375)",
        "pool": f"{args.num} crops of {len(sources)} wallpapers at 500x375 + {args.large} at 2000x1500",
        "selection": f"dfkd select --num-images {args.select} (per class, near duplicates dropped)"})
    runs = {}
    for reduced in (True, False):
        out = work / f"select-{'reduced' if reduced else 'full'}"
        shutil.rmtree(out, ignore_errors=True)
        wall = _select(py, card, work / "pool", out, args.select, reduced)
        scores = {r["path"]: (float(r["score"]), int(r["label"])) for r in read_index(out / "scores.tsv").rows}
        selected = {r["path"] for r in read_index(out / "selected.tsv").rows}
        runs[reduced] = (wall, scores, selected)
    (w_r, s_r, sel_r), (w_f, s_f, sel_f) = runs[True], runs[False]
    common = sorted(set(s_r) & set(s_f))
    diff = np.array([abs(s_r[k][0] - s_f[k][0]) for k in common])
    full_scores = np.array([s_f[k][0] for k in common])
    large = [k for k in common if Path(k).name.startswith("large")]
    print(f"  images scored                     {len(common)} (both runs)")
    print(f"  noise value, full decoding        median {np.median(full_scores):.4f}, range"
          f" {full_scores.min():.4f} .. {full_scores.max():.4f}")
    print(f"  |difference| of the noise value   largest {diff.max():.4f}, median {np.median(diff):.5f},"
          f" 99th percentile {np.percentile(diff, 99):.4f}")
    print(f"  teacher class changed             {sum(s_r[k][1] != s_f[k][1] for k in common)} of {len(common)}")
    print(f"  selected images that differ       {len(sel_r - sel_f)} of {len(sel_f)}")
    if large:
        d_large = np.array([abs(s_r[k][0] - s_f[k][0]) for k in large])
        print(f"  2000x1500 images: largest diff    {d_large.max():.4f} ({len(large)} images)")
    print(f"  select wall time                  reduced {w_r:.1f} s, full {w_f:.1f} s ({w_f / w_r:.2f}x)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
