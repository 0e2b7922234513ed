#!/usr/bin/env python3
"""Prepare the dfkd demo data: ordinary folders of 28x28 grayscale PNGs.

Everything comes from offline Debian packages (and, optionally, scikit-learn's
bundled digits), so the demo needs no network:

    apt-get install -y dataset-fashion-mnist openclipart-png fonts-dejavu-core

Layout written under --out (all images 28x28, mode "L", PNG):

    train/<class>/*.png      the teacher's "private" data: Fashion-MNIST train,
                             --train-per-class images per class
    test/<class>/*.png       Fashion-MNIST t10k, --test-per-class per class
    positives/<class>/*.png  a small labeled share for PU learning: the first
                             --positives-per-class images of each train/<class>
                             (copies of files that are also in train/)
    wild/fashion/*.png       held-out Fashion-MNIST train images that are NOT in
                             train/ (--pool-in), unlabeled, flat
    wild/clipart/*.png       openclipart PNGs (--pool-clipart), converted below
    wild/glyphs/*.png        DejaVu font glyphs (--pool-glyphs), white on black
    wild/digits/*.png        sklearn 8x8 digits upscaled to 28x28 (--pool-digits)
    wild_truth.tsv           header "path<TAB>source<TAB>label", one row per wild
                             image; path is relative to this file's folder
                             ("wild/fashion/....png"); source is one of
                             fashion|clipart|glyphs|digits; label is the true
                             Fashion-MNIST class id for fashion, -1 otherwise
    classes.txt              the 10 class folder names in class-id order
    .complete                JSON record of the arguments (written last)

Class folder names start with the class id, so a sorted listing (what
torchvision's ImageFolder does) gives the Fashion-MNIST ids 0..9.

Clip-art conversion mimics how Fashion-MNIST itself was made from product
photos on white: composite the (often RGBA) image on white, convert to
grayscale, invert (white paper -> black background, dark ink -> bright),
trim to the drawing's bounding box, scale the longer side to 28 keeping the
aspect ratio, and centre it on a black 28x28 canvas.

Deterministic for a given --seed: inputs are listed in sorted order and every
source draws from its own numpy Generator seeded by (seed, source), so
changing one size does not reshuffle the other sources.

Re-running with the same arguments is a no-op ("already prepared"). A run
builds everything in a hidden temporary folder next to --out and renames it
into place at the end, so an interrupted run leaves no half-written --out.

Exit status: 0 on success, 2 on bad arguments or when the required
Fashion-MNIST files are missing. Missing optional sources (clip-art, fonts,
scikit-learn) only print a warning; the wild pool then lacks that source.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import signal
import string
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, features

FORMAT_VERSION = 1
SIZE = 28

CLASS_NAMES = [
    "0_tshirt", "1_trouser", "2_pullover", "3_dress", "4_coat",
    "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_boot",
]

DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
DEFAULT_CLIPART_DIR = "/usr/share/openclipart/png"
DEFAULT_FONTS_DIR = "/usr/share/fonts/truetype/dejavu"

# Clip-art larger than this (about 1400x1400) is skipped unread: a few dozen
# huge posters would otherwise take most of the decoding time.
CLIPART_MAX_PIXELS = 2_000_000

# Each source gets its own random stream: default_rng([seed, STREAM[name]]).
STREAM = {"split": 1, "test": 2, "clipart": 3, "glyphs": 4, "digits": 5}

GLYPH_CHARS = (
    string.ascii_letters
    + string.digits
    + "!#$%&*+/<=>?@[]{}~^|\\"
    + "\u00a7\u00a9\u00ae\u00b1\u00b6\u00d7\u00f7\u00a3\u00a5\u20ac"  # section, (c), (r), +-, pilcrow, x, /, pound, yen, euro
    + "\u03b1\u03b2\u03b3\u03b4\u03bb\u03c0\u03a3\u03a9\u0416\u042f"  # greek, cyrillic
    + "\u2190\u2191\u2192\u2193\u221a\u221e\u2248\u2260\u2211\u222b"  # arrows, maths
    + "\u2605\u2606\u2660\u2663\u2665\u2666\u263a\u266a\u2713\u2717"  # stars, suits, misc
)


class PrepareError(Exception):
    """A problem the user can act on; printed as one line, exit status 2."""


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- #
# Fashion-MNIST (IDX files, gzip)
# --------------------------------------------------------------------------- #

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx_gz(path: Path) -> np.ndarray:
    """Parse a gzip-compressed IDX file (the MNIST container format)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise PrepareError(f"{path}: not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(dims)) if dims else 1
    if len(data) < header + count * dtype.itemsize:
        raise PrepareError(f"{path}: truncated IDX file")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def load_fashion(fashion_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    names = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    missing = [n for pair in names.values() for n in pair if not (fashion_dir / n).is_file()]
    if missing:
        raise PrepareError(
            f"Fashion-MNIST not found ({fashion_dir}/{missing[0]} is missing); "
            "install it with: apt-get install -y dataset-fashion-mnist"
        )
    out = {}
    for split, (img_name, lab_name) in names.items():
        try:
            images = read_idx_gz(fashion_dir / img_name)
            labels = read_idx_gz(fashion_dir / lab_name)
        except (OSError, EOFError, ValueError) as e:
            raise PrepareError(f"cannot read Fashion-MNIST {split} files in {fashion_dir}: {e}") from None
        if images.ndim != 3 or images.shape[1:] != (SIZE, SIZE) or labels.shape != images.shape[:1]:
            raise PrepareError(f"unexpected Fashion-MNIST {split} shapes {images.shape} / {labels.shape}")
        out[split] = (images, labels.astype(np.int64))
    return out


# --------------------------------------------------------------------------- #
# Clip-art
# --------------------------------------------------------------------------- #

def list_clipart(clipart_dir: Path) -> list[Path]:
    """Sorted PNG files, with symlinked duplicates collapsed to one entry."""
    seen: set[str] = set()
    files = []
    for p in sorted(clipart_dir.rglob("*.png")):
        try:
            real = os.path.realpath(p)
        except OSError:
            continue
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        files.append(p)
    return files


def clipart_to_28(path: Path) -> Image.Image | str:
    """Convert one clip-art file, or say why it was skipped ("large", "undecodable", "blank")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                if im.size[0] * im.size[1] > CLIPART_MAX_PIXELS:  # header only: skip before decoding
                    return "large"
                im.load()
                rgba = im.convert("RGBA")
    except Exception:  # any decode failure: skip the file
        return "undecodable"
    factor = max(rgba.size) // 256
    if factor >= 2:  # fast box pre-shrink; the final resize is done on the cropped drawing
        rgba = rgba.reduce(factor)
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    gray = ImageOps.invert(canvas.convert("L"))
    bbox = gray.point(lambda v: 255 if v > 12 else 0).getbbox()
    if bbox is None:
        return "blank"
    gray = gray.crop(bbox)
    w, h = gray.size
    scale = SIZE / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    gray = gray.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = Image.new("L", (SIZE, SIZE), 0)
    out.paste(gray, ((SIZE - nw) // 2, (SIZE - nh) // 2))
    return out


# --------------------------------------------------------------------------- #
# Font glyphs
# --------------------------------------------------------------------------- #

class GlyphRenderer:
    def __init__(self, font_paths: list[Path]):
        self.font_paths = font_paths
        self._fonts: dict[tuple[int, int], ImageFont.FreeTypeFont] = {}
        self._notdef: dict[tuple[int, int], bytes] = {}

    def font(self, fi: int, size: int) -> ImageFont.FreeTypeFont:
        key = (fi, size)
        if key not in self._fonts:
            self._fonts[key] = ImageFont.truetype(str(self.font_paths[fi]), size)
        return self._fonts[key]

    def _mask_bytes(self, font: ImageFont.FreeTypeFont, ch: str) -> bytes:
        img = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(img).text((12, 8), ch, fill=255, font=font)
        return img.tobytes()

    def has_glyph(self, fi: int, size: int, ch: str) -> bool:
        """False when the font would draw its 'missing glyph' box for ch."""
        key = (fi, size)
        if key not in self._notdef:
            self._notdef[key] = self._mask_bytes(self.font(fi, size), "\ue000")  # private use: never in DejaVu
        return self._mask_bytes(self.font(fi, size), ch) != self._notdef[key]

    def render(self, rng: np.random.Generator) -> Image.Image | None:
        fi = int(rng.integers(len(self.font_paths)))
        ch = GLYPH_CHARS[int(rng.integers(len(GLYPH_CHARS)))]
        size = int(rng.integers(12, 31))
        fill = int(rng.integers(180, 256))
        # draw every random number before any early return, so the stream stays aligned
        u = rng.random(2)
        font = self.font(fi, size)
        if not self.has_glyph(fi, size, ch):
            return None
        img = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(img).text((12, 8), ch, fill=fill, font=font)
        bbox = img.getbbox()
        if bbox is None:
            return None
        img = img.crop(bbox)
        w, h = img.size
        limit = SIZE - 2
        if max(w, h) > limit:
            scale = limit / max(w, h)
            w, h = max(1, round(w * scale)), max(1, round(h * scale))
            img = img.resize((w, h), Image.Resampling.LANCZOS)
        x = int(u[0] * (SIZE - w + 1))
        y = int(u[1] * (SIZE - h + 1))
        out = Image.new("L", (SIZE, SIZE), 0)
        out.paste(img, (x, y))
        return out


# --------------------------------------------------------------------------- #
# Writing
# --------------------------------------------------------------------------- #

def inject_copies(root: Path, rows: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Store every listed image 3 more times beside it (NAME.up2.png: 2x bicubic upscale,
    NAME.q75.jpg: JPEG at quality 75, NAME.s34.png: 3/4 size): a pool with injected duplicates.
    Returns their truth rows (same source and label as the original)."""
    made = []
    for rel, source, label in rows:
        path = root / rel
        with Image.open(path) as im:
            im = im.copy()
        w, h = im.size
        for suffix, copy in ((".up2.png", im.resize((2 * w, 2 * h), Image.Resampling.BICUBIC)),
                             (".q75.jpg", im),
                             (".s34.png", im.resize((max(1, 3 * w // 4), max(1, 3 * h // 4)), Image.Resampling.LANCZOS))):
            out = path.with_name(path.stem + suffix)
            copy.save(out, quality=75) if suffix.endswith(".jpg") else copy.save(out)
            made.append((str(Path(rel).with_name(out.name)), source, label))
    return made


def save_png(arr_or_img, path: Path) -> None:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(np.ascontiguousarray(arr_or_img, dtype=np.uint8))
    img.save(path, format="PNG", optimize=False, compress_level=6)


def args_record(args: argparse.Namespace) -> dict:
    return {
        "format": FORMAT_VERSION,
        "seed": args.seed,
        "train_per_class": args.train_per_class,
        "test_per_class": args.test_per_class,
        "positives_per_class": args.positives_per_class,
        "pool_in": args.pool_in,
        "pool_clipart": args.pool_clipart,
        "pool_glyphs": args.pool_glyphs,
        "pool_digits": args.pool_digits,
        "fashion_dir": str(Path(args.fashion_dir).resolve()),
        "clipart_dir": str(Path(args.clipart_dir).resolve()),
        "fonts_dir": str(Path(args.fonts_dir).resolve()),
        **({"copies": True} if args.copies else {}),  # absent when off: sets prepared before it stay valid
    }


def build(args: argparse.Namespace, root: Path) -> list[str]:
    """Write the whole layout under root (an empty folder); return summary lines."""
    summary: list[str] = []
    truth: list[tuple[str, str, int]] = []

    def line(folder: str, n: int, note: str) -> None:
        summary.append(f"{folder:<13} {n:>6} images  {note}")

    # ---- Fashion-MNIST: train / positives / wild-fashion / test ----
    fm = load_fashion(Path(args.fashion_dir))
    tr_x, tr_y = fm["train"]
    te_x, te_y = fm["t10k"]
    n_cls = len(CLASS_NAMES)
    rng = np.random.default_rng([args.seed, STREAM["split"]])
    perm = rng.permutation(len(tr_y))  # one shuffle of the whole train set
    per_class = [perm[tr_y[perm] == c] for c in range(n_cls)]
    smallest = min(len(p) for p in per_class)
    if args.train_per_class > smallest:
        raise PrepareError(f"--train-per-class {args.train_per_class} exceeds the {smallest} train images per class")
    train_idx = [p[: args.train_per_class] for p in per_class]
    used = np.zeros(len(tr_y), dtype=bool)
    for idx in train_idx:
        used[idx] = True
    rest = perm[~used[perm]]  # held-out train images, in shuffled order
    if args.pool_in > len(rest):
        raise PrepareError(f"--pool-in {args.pool_in} exceeds the {len(rest)} train images left after --train-per-class")

    for split in ("train", "positives", "test"):
        for name in CLASS_NAMES:
            (root / split / name).mkdir(parents=True)
    for c, name in enumerate(CLASS_NAMES):
        for k, i in enumerate(train_idx[c]):
            fn = f"fmnist-train-{i:05d}.png"
            save_png(tr_x[i], root / "train" / name / fn)
            if k < args.positives_per_class:
                shutil.copyfile(root / "train" / name / fn, root / "positives" / name / fn)
    line("train", n_cls * args.train_per_class, f"({n_cls} classes x {args.train_per_class}, Fashion-MNIST train)")
    line("positives", n_cls * args.positives_per_class,
         f"({n_cls} classes x {args.positives_per_class}, labeled subset of train/)")

    rng_te = np.random.default_rng([args.seed, STREAM["test"]])
    te_perm = rng_te.permutation(len(te_y))
    n_test = 0
    for c, name in enumerate(CLASS_NAMES):
        idx = te_perm[te_y[te_perm] == c]
        if args.test_per_class > len(idx):
            raise PrepareError(f"--test-per-class {args.test_per_class} exceeds the {len(idx)} test images per class")
        for i in idx[: args.test_per_class]:
            save_png(te_x[i], root / "test" / name / f"fmnist-t10k-{i:05d}.png")
            n_test += 1
    line("test", n_test, f"({n_cls} classes x {args.test_per_class}, Fashion-MNIST t10k)")

    wild = root / "wild"
    d = wild / "fashion"
    d.mkdir(parents=True)
    for i in np.sort(rest[: args.pool_in]):
        fn = f"fmnist-train-{i:05d}.png"
        save_png(tr_x[i], d / fn)
        truth.append((f"wild/fashion/{fn}", "fashion", int(tr_y[i])))
    line("wild/fashion", args.pool_in, "(held-out Fashion-MNIST train, not in train/)")

    # ---- clip-art ----
    d = wild / "clipart"
    d.mkdir()
    clip_dir = Path(args.clipart_dir)
    if args.pool_clipart > 0:
        files = list_clipart(clip_dir) if clip_dir.is_dir() else []
        if not files:
            warn(f"no clip-art PNGs under {clip_dir}; wild pool has no clipart "
                 "(install: apt-get install -y openclipart-png)")
            line("wild/clipart", 0, "(skipped: source missing)")
        else:
            rng_c = np.random.default_rng([args.seed, STREAM["clipart"]])
            order = rng_c.permutation(len(files))
            n = 0
            skipped = {"large": 0, "undecodable": 0, "blank": 0}
            for j in order:
                if n >= args.pool_clipart:
                    break
                img = clipart_to_28(files[j])
                if isinstance(img, str):
                    skipped[img] += 1
                    continue
                fn = f"clipart-{n:05d}.png"
                save_png(img, d / fn)
                truth.append((f"wild/clipart/{fn}", "clipart", -1))
                n += 1
            if n < args.pool_clipart:
                warn(f"only {n} usable clip-art images (asked for {args.pool_clipart})")
            why = ", ".join(f"{v} {k}" for k, v in skipped.items())
            line("wild/clipart", n, f"(openclipart, {len(files)} files; skipped {why})")
    else:
        line("wild/clipart", 0, "(--pool-clipart 0)")

    # ---- font glyphs ----
    d = wild / "glyphs"
    d.mkdir()
    fonts_dir = Path(args.fonts_dir)
    if args.pool_glyphs > 0:
        fonts = sorted(fonts_dir.glob("*.ttf")) if fonts_dir.is_dir() else []
        if not features.check("freetype2"):
            warn("this Pillow has no FreeType support; wild pool has no glyphs")
            line("wild/glyphs", 0, "(skipped: Pillow without FreeType)")
        elif not fonts:
            warn(f"no .ttf fonts under {fonts_dir}; wild pool has no glyphs "
                 "(install: apt-get install -y fonts-dejavu-core)")
            line("wild/glyphs", 0, "(skipped: source missing)")
        else:
            rng_g = np.random.default_rng([args.seed, STREAM["glyphs"]])
            renderer = GlyphRenderer(fonts)
            n = tries = 0
            while n < args.pool_glyphs and tries < 20 * args.pool_glyphs:
                tries += 1
                img = renderer.render(rng_g)
                if img is None:
                    continue
                fn = f"glyph-{n:05d}.png"
                save_png(img, d / fn)
                truth.append((f"wild/glyphs/{fn}", "glyphs", -1))
                n += 1
            line("wild/glyphs", n, f"({len(fonts)} fonts, {len(GLYPH_CHARS)} characters)")
    else:
        line("wild/glyphs", 0, "(--pool-glyphs 0)")

    # ---- sklearn digits ----
    d = wild / "digits"
    d.mkdir()
    if args.pool_digits > 0:
        try:
            from sklearn.datasets import load_digits  # optional dependency
        except ImportError:
            load_digits = None
        if load_digits is None:
            warn("scikit-learn is not installed; wild pool has no digits (pip install scikit-learn)")
            line("wild/digits", 0, "(skipped: scikit-learn missing)")
        else:
            digits = load_digits().images  # (1797, 8, 8), values 0..16
            if args.pool_digits > len(digits):
                warn(f"--pool-digits {args.pool_digits} > {len(digits)} available; using all")
            rng_d = np.random.default_rng([args.seed, STREAM["digits"]])
            pick = np.sort(rng_d.permutation(len(digits))[: args.pool_digits])
            for i in pick:
                small = Image.fromarray(np.clip(digits[i] * (255.0 / 16.0), 0, 255).round().astype(np.uint8))
                fn = f"digits-{i:04d}.png"
                save_png(small.resize((SIZE, SIZE), Image.Resampling.BILINEAR), d / fn)
                truth.append((f"wild/digits/{fn}", "digits", -1))
            line("wild/digits", len(pick), "(scikit-learn 8x8 digits, upscaled)")
    else:
        line("wild/digits", 0, "(--pool-digits 0)")

    if args.copies:
        copies = inject_copies(root, truth)
        truth += copies
        line("wild copies", len(copies), "(every wild image again: 2x upscale, JPEG-75, 3/4 size)")

    with open(root / "wild_truth.tsv", "w", encoding="utf-8", newline="\n") as f:
        f.write("path\tsource\tlabel\n")
        for path, source, label in truth:
            f.write(f"{path}\t{source}\t{label}\n")
    (root / "classes.txt").write_text("".join(n + "\n" for n in CLASS_NAMES), encoding="utf-8")
    return summary


# --------------------------------------------------------------------------- #
# CLI
# --------------------------------------------------------------------------- #

def nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Prepare the dfkd demo data (28x28 grayscale PNG folders) from offline Debian packages.",
    )
    p.add_argument("--out", required=True, help="output folder (created; replaced only if it holds an older prepared set)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--train-per-class", type=nonneg_int, default=1000, help="teacher training images per class (default 1000)")
    p.add_argument("--test-per-class", type=nonneg_int, default=500, help="test images per class (default 500)")
    p.add_argument("--positives-per-class", type=nonneg_int, default=12,
                   help="labeled positives per class, taken from train/ (default 12)")
    p.add_argument("--pool-in", type=nonneg_int, default=2000,
                   help="held-out Fashion-MNIST images in the wild pool (default 2000)")
    p.add_argument("--pool-clipart", type=nonneg_int, default=4000, help="clip-art images in the wild pool (default 4000)")
    p.add_argument("--pool-glyphs", type=nonneg_int, default=2000, help="font glyph images in the wild pool (default 2000)")
    p.add_argument("--pool-digits", type=nonneg_int, default=1500, help="sklearn digit images in the wild pool (default 1500)")
    p.add_argument("--fashion-dir", default=DEFAULT_FASHION_DIR, help=f"Fashion-MNIST .gz files (default {DEFAULT_FASHION_DIR})")
    p.add_argument("--clipart-dir", default=DEFAULT_CLIPART_DIR, help=f"clip-art PNG tree (default {DEFAULT_CLIPART_DIR})")
    p.add_argument("--fonts-dir", default=DEFAULT_FONTS_DIR, help=f".ttf fonts (default {DEFAULT_FONTS_DIR})")
    p.add_argument("--copies", action="store_true",
                   help="also store every wild image 3 more times: a 2x upscale, a JPEG-75 re-encode and a"
                        " 3/4-size copy (a pool with injected duplicates)")
    args = p.parse_args(argv)
    if args.positives_per_class > args.train_per_class:
        p.error(f"--positives-per-class ({args.positives_per_class}) cannot exceed --train-per-class ({args.train_per_class})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    record = args_record(args)
    marker = out / ".complete"

    if out.exists() and not out.is_dir():
        print(f"error: --out {out} exists and is not a folder", file=sys.stderr)
        return 2
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous == record:
            print(f"already prepared: {out}", file=sys.stderr)
            print(out)
            return 0
    elif out.is_dir() and any(out.iterdir()):
        print(f"error: --out {out} exists, is not empty and was not made by this script; "
              "pick another folder or remove it", file=sys.stderr)
        return 2

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    t0 = time.perf_counter()
    try:
        summary = build(args, tmp)
        (tmp / ".complete").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if out.exists():  # an older prepared set (or an empty folder): swap it out
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for s in summary:
        print(s, file=sys.stderr)
    print(f"prepared in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    print(out)
    return 0


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # unwind through main's cleanup of the temporary folder


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; nothing written", file=sys.stderr)
        sys.exit(130)
