"""Selection on a pool with injected duplicates (issue 13's check).

Every image of ``--pool`` is also stored 3 more times: a 2x upscale (PNG), a JPEG re-encode at
quality 75, and a 3/4-size copy (PNG), under ``--work``. Then ``dfkd select`` picks
``--num-images`` from the 4x pool, and this prints: how many selected images are copies of the
same source picture, exact duplicates (same bytes) among the selected, and the largest thumbnail
cosine between two selected images (the near-duplicate rule's own measure), against the same
selection with ``--dedup off``.

    python bench/injected_duplicates.py --teacher runs/demo/teacher/model.yaml --pool data/demo/wild
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dfkd.cards import load_card
from dfkd.images import image_tensor
from dfkd.index import read_index
from dfkd.select.candidates import thumbnail
from dfkd.select.dedup import NEAR_DUPLICATE_COSINE


def make_pool(src: Path, dst: Path) -> int:
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if (dst / "done").is_file():
        return len(files)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            im = im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()
        for kind, out, save in (("orig", ".png", lambda x, p: x.save(p)),
                                ("up2", ".png", lambda x, p: x.resize((x.width * 2, x.height * 2), Image.BICUBIC).save(p)),
                                ("jpeg75", ".jpg", lambda x, p: x.convert("RGB").save(p, quality=75)),
                                ("down34", ".png", lambda x, p: x.resize((max(1, x.width * 3 // 4), max(1, x.height * 3 // 4)),
                                                                         Image.LANCZOS).save(p))):
            folder = dst / kind / f"{i // 1000:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            save(im, folder / f"{i:06d}{out}")
    (dst / "done").write_text("ok")
    return len(files)


def check(selected: Path, card) -> dict:
    paths = read_index(selected).paths
    stems = collections.Counter(Path(p).stem for p in paths)
    digests = collections.Counter(hashlib.blake2b(Path(p).read_bytes(), digest_size=16).digest() for p in paths)
    x = torch.stack([image_tensor(p, card.input) for p in paths]).float() / 255
    t = thumbnail(x).numpy()
    u = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    c = u @ u.T
    np.fill_diagonal(c, -1)
    return {"selected": len(paths), "pictures": len(stems), "same picture twice or more": sum(n > 1 for n in stems.values()),
            "exact duplicate pairs": sum(n * (n - 1) // 2 for n in digests.values()),
            "pairs at or above the threshold": int((np.triu(c, 1) >= NEAR_DUPLICATE_COSINE).sum()),
            "largest cosine": round(float(c.max()), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--pool", required=True, type=Path)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-duplicates"))
    ap.add_argument("--num-images", type=int, default=2000)
    a = ap.parse_args()
    n = make_pool(a.pool, a.work / "pool")
    print(f"pool: {n} pictures x 4 = {4 * n} images")
    card = load_card(a.teacher)
    for dedup in ("near", "off"):
        out = a.work / f"select-{dedup}"
        subprocess.run([sys.executable, "-m", "dfkd", "select", "--teacher", a.teacher, "--pool", str(a.work / "pool"),
                        "--out", str(out), "--num-images", str(a.num_images), "--dedup", dedup],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"--dedup {dedup}: {check(out / 'selected.tsv', card)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
