"""A large pool of tiny greyscale PNGs, fast, for benchmarks that need many files (memory, scanning).

    python bench/make_pool.py OUT_DIR --images N [--size 8] [--per-dir 1000] [--seed 0] [--teacher CARD]

Writes ``OUT_DIR/d00000/i0000000.png`` … (``--per-dir`` files a folder, numbered across the
pool), each a ``size``×``size`` 8-bit greyscale (or, ``channels=3``, RGB) image of uniform noise drawn from
``numpy.random.default_rng(seed)``: the same arguments give the same bytes. The PNGs are
encoded here (signature, IHDR, one zlib IDAT, IEND) rather than by PIL, which is about 3x
slower a file; what is left is mostly the file system's cost of creating a file (about
30-40 µs an image on a 2-core VM: 200,000 images in about 10 s when the disk is not busy).

Idempotent: a finished pool holds ``OUT_DIR/.complete`` (JSON of images, size, seed,
per_dir); with the same arguments the script does nothing. Otherwise it deletes the
``dNNNNN`` folders it may have written before, writes the pool and stamps it last, so an
interrupted run is redone in full next time.

``--teacher CARD`` also writes an untrained (``torch.manual_seed(0)``) resnet8 teacher card for
1-channel ``size``×``size`` input and 10 classes (mean 0.5, std 0.5) at CARD, weights beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

STAMP = ".complete"
_DIR_RE = re.compile(r"^d\d{5,}$")
_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_grey(pixels: np.ndarray) -> bytes:
    """The PNG file of one 2-D uint8 array (8-bit greyscale, no filter, no interlace)."""
    h, w = pixels.shape
    raw = np.zeros((h, w + 1), np.uint8)  # each scanline starts with its filter byte (0: none)
    raw[:, 1:] = pixels
    return _png(h, w, raw.tobytes())


def _png(h: int, w: int, scanlines: bytes) -> bytes:
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
    return _SIGNATURE + ihdr + _chunk(b"IDAT", zlib.compress(scanlines, 1)) + _chunk(b"IEND", b"")


def image_path(out_dir: Path, i: int, per_dir: int = 1000) -> Path:
    return Path(out_dir) / f"d{i // per_dir:05d}" / f"i{i:07d}.png"


def _stamp(n: int, size: int, per_dir: int, seed: int, channels: int = 1) -> dict:
    stamp = {"images": int(n), "size": int(size), "seed": int(seed), "per_dir": int(per_dir)}
    return stamp if channels == 1 else {**stamp, "channels": int(channels)}


def is_complete(out_dir: Path, n: int, size: int = 8, per_dir: int = 1000, seed: int = 0, channels: int = 1) -> bool:
    try:
        return json.loads((Path(out_dir) / STAMP).read_text()) == _stamp(n, size, per_dir, seed, channels)
    except (OSError, ValueError):
        return False


def make_pool(out_dir: str | Path, n: int, size: int = 8, per_dir: int = 1000, seed: int = 0,
              verbose: bool = True, channels: int = 1) -> Path:
    """Write the pool (unless already complete with these arguments); return ``out_dir``."""
    out_dir = Path(out_dir)
    if n < 1 or size < 1 or per_dir < 1:
        raise ValueError("images, size and per-dir must be at least 1")
    if is_complete(out_dir, n, size, per_dir, seed, channels):
        if verbose:
            print(f"{out_dir}: pool of {n} images already complete", file=sys.stderr)
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP).unlink(missing_ok=True)
    for entry in os.scandir(out_dir):  # an earlier or interrupted pool: only our own folders go
        if entry.is_dir(follow_symlinks=False) and _DIR_RE.match(entry.name):
            shutil.rmtree(entry.path)
    others = [e.name for e in os.scandir(out_dir) if e.name != STAMP]
    if others and verbose:
        print(f"{out_dir}: note: also holds {', '.join(sorted(others)[:5])}"
              f"{' …' if len(others) > 5 else ''} (a recursive pool scan will see them)", file=sys.stderr)

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    colour = 0 if channels == 1 else 2  # PNG colour type: greyscale or RGB
    ihdr = _SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, colour, 0, 0, 0))
    iend = _chunk(b"IEND", b"")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    raw = np.zeros((per_dir, size, size * channels + 1), np.uint8)  # column 0: the scanline filter byte
    for first in range(0, n, per_dir):
        count = min(per_dir, n - first)
        raw[:count, :, 1:] = rng.integers(0, 256, (count, size, size * channels), dtype=np.uint8)
        folder = out_dir / f"d{first // per_dir:05d}"
        folder.mkdir(exist_ok=True)
        base = os.fspath(folder)
        for j in range(count):
            data = zlib.compress(raw[j].tobytes(), 1)
            body = b"IDAT" + data
            png = ihdr + struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body)) + iend
            fd = os.open(f"{base}/i{first + j:07d}.png", flags, 0o644)
            try:
                os.write(fd, png)
            finally:
                os.close(fd)
    tmp = out_dir / (STAMP + ".tmp")
    tmp.write_text(json.dumps(_stamp(n, size, per_dir, seed, channels)) + "\n")
    os.replace(tmp, out_dir / STAMP)
    if verbose:
        took = time.perf_counter() - start
        print(f"{out_dir}: wrote {n} {size}x{size} PNGs in {took:.1f} s ({n / max(took, 1e-9):.0f} img/s)",
              file=sys.stderr)
    return out_dir


def make_teacher(card_path: str | Path, size: int = 8, channels: int = 1) -> Path:
    """An untrained resnet8 teacher card (seed 0) for ``channels``×``size``×``size`` input, 10 classes."""
    import torch

    from dfkd.cards import save_card
    from dfkd.images import InputSpec
    from dfkd.models import ARCHS

    card_path = Path(card_path)
    card_path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = ARCHS.get("resnet8")(num_classes=10, in_channels=channels)
    spec = InputSpec(size=(size, size), channels=channels, mean=[0.5] * channels, std=[0.5] * channels)
    return save_card(card_path, "resnet8", 10, spec, model.state_dict(), kind="teacher",
                     notes="untrained (torch.manual_seed(0)), for benchmarks only")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--images", type=int, required=True, help="how many PNGs")
    ap.add_argument("--size", type=int, default=8, help="width and height in pixels (default 8)")
    ap.add_argument("--per-dir", type=int, default=1000, help="files a folder (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", type=Path, help="also write an untrained resnet8 teacher card here")
    args = ap.parse_args(argv)
    try:
        make_pool(args.out_dir, args.images, args.size, args.per_dir, args.seed)
    except ValueError as e:
        ap.error(str(e))
    if args.teacher:
        print(f"teacher card: {make_teacher(args.teacher, args.size)}", file=sys.stderr)
    print(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
