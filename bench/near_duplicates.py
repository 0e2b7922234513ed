"""Where to put the near-duplicate threshold: the cosine of true near-duplicates against the
cosine of distinct images of the same predicted class, for two descriptors of an image.

Descriptors, both L2-normalised and compared by cosine:

* ``teacher``: the teacher's penultimate features (the input of its last ``nn.Linear``, FeatureTap);
* ``thumb``: the 8×8 mean-centred thumbnail of the teacher's input that ``dfkd select``
  compares (dfkd.select.candidates.thumbnail).

Images: every file under ``--images`` (default: the demo's wild pool and train set), decoded and
resized as ``dfkd select`` does. For ``--copies`` of them, chosen at random (seed 0), it makes
near-duplicates the way wild pools hold them, each then fed through the card's resize:

    down-0.5    resized to half size and back up      down-0.75   to three quarters and back
    up-2        stored at twice the size              jpeg-75     re-encoded as JPEG quality 75
    crop-1      1 px cut off the left and top         crop-2      2 px cut off the right and bottom
    combined    down-0.75, then crop-1, then jpeg-75

Distinct pairs: every pair of images with the same predicted class whose decoded pixels differ
(exact pixel copies, found with dfkd.select.dedup.exact_duplicates, are left out). Printed per
descriptor: quantiles of both distributions (and of each image's most similar distinct image);
then per threshold t the share of copies caught (cosine to their original >= t), the distinct
pairs >= t, and what near_duplicates() drops from the images themselves (no copies; random
order), split by the mean |pixel difference| (of 255) between a dropped image and the kept image
it is charged to: <= 3 is a copy at the level of JPEG noise, > 10 is, by eye, another picture.
Last, near_duplicates() at NEAR_DUPLICATE_COSINE on the copied images mixed with their copies.

    python bench/near_duplicates.py [--teacher CARD] [--images DIR ...] [--copies 2000]

Measured (2 busy cores, about 3 minutes; the demo teacher, resnet20 with 64-d features; 19,500
images: the 9,500 of data/demo/wild and the 10,000 of data/demo/train, 30 of them exact copies;
2,000 copied 7 ways):

* teacher features separate nothing: copies median 0.9905, 5 % of them below 0.919; distinct
  same-class pairs median 0.907, 1 % above 0.995, and each image's most similar distinct image
  median 0.9954. At every threshold greedy removal drops about as large a share of the distinct
  images as it catches of the copies (0.99: 51 % of copies caught, 63 % of the images dropped;
  0.999: 6.6 % and 7.1 %; 0.9999: 0.16 % and 1.2 %).
* 8×8 thumbnails separate resized and re-encoded copies but not 1-2 px crops (crop-1 median
  0.976, crop-2 0.903, below many distinct pairs). Distinct same-class pairs: median 0.42, 99.9 %
  below 0.9914; each image's most similar one median 0.9724, 10 % above 0.9945.

      t       half  3/4-size  2x   JPEG-75  | images dropped  of which visibly other (diff > 10/255)
      0.99    94 %   99 %    99.8 %  99.4 %  |   15.0 %          9.5 %
      0.995   80 %   95 %    99.0 %  98.7 %  |    6.5 %          1.8 %
      0.998   47 %   79 %    91.6 %  96.9 %  |    4.0 %          0.4 %

  NEAR_DUPLICATE_COSINE = 0.995 for thumbnails: most resized or re-encoded copies go, and one
  image in 55 is lost to a look-alike (by eye: another garment of the same cut, a texture of
  the same layout). Crops need another descriptor.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dfkd.cards import load_card
from dfkd.images import fit_image, load_image, normalize
from dfkd.models.features import FeatureTap
from dfkd.select.candidates import thumbnail
from dfkd.select.dedup import NEAR_DUPLICATE_COSINE, exact_duplicates, near_duplicates, unit_rows
from dfkd.teacher import load_teacher

REPO = Path(__file__).resolve().parent.parent
EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
THRESHOLDS = [0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999]
DESCRIPTORS = ("teacher", "thumb")


def scaled(img: Image.Image, factor: float) -> Image.Image:
    w, h = img.size
    return img.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.LANCZOS)


def jpeg(img: Image.Image, quality: int = 75) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert(img.mode)


def crop(img: Image.Image, left: int, top: int, right: int, bottom: int) -> Image.Image:
    w, h = img.size
    return img.crop((left, top, w - right, h - bottom))


TRANSFORMS = {
    "down-0.5": lambda im: scaled(scaled(im, 0.5), 2.0),
    "down-0.75": lambda im: scaled(scaled(im, 0.75), 1 / 0.75),
    "up-2": lambda im: scaled(im, 2.0),
    "jpeg-75": jpeg,
    "crop-1": lambda im: crop(im, 1, 1, 0, 0),
    "crop-2": lambda im: crop(im, 0, 0, 2, 2),
    "combined": lambda im: jpeg(crop(scaled(scaled(im, 0.75), 1 / 0.75), 1, 1, 0, 0)),
}


class Describe:
    """Descriptors (unit rows) and predicted classes of PIL images, fed as select feeds them."""

    def __init__(self, card_path: Path, batch: int = 512):
        self.card = load_card(card_path)
        self.spec = self.card.input
        self.model = load_teacher(self.card, torch.device("cpu")).model.eval()
        self.tap = FeatureTap(self.model, "teacher")
        self.batch = batch

    def pixels(self, img: Image.Image) -> np.ndarray:
        arr = np.asarray(fit_image(img, self.spec), dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr

    @torch.inference_mode()
    def __call__(self, images: list[Image.Image]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        out: dict[str, list] = {k: [] for k in DESCRIPTORS}
        labels = []
        for s in range(0, len(images), self.batch):
            arr = np.stack([self.pixels(im) for im in images[s:s + self.batch]])
            x = normalize(torch.from_numpy(arr).permute(0, 3, 1, 2), self.spec, torch.device("cpu"))
            labels.append(self.model(x).argmax(1).numpy())
            out["teacher"].append(self.tap.value.float().numpy())
            out["thumb"].append(thumbnail(x).numpy())
        return {k: unit_rows(np.concatenate(v)) for k, v in out.items()}, np.concatenate(labels)


def quantiles(values: np.ndarray, qs: list[float]) -> str:
    return "  ".join(f"q{q * 100:g}={np.quantile(values, q):.4f}" for q in qs)


def report(name: str, feats: np.ndarray, copies: dict[str, np.ndarray], chosen: np.ndarray,
           labels: np.ndarray, unique: np.ndarray, pixels: np.ndarray, rng: np.random.Generator) -> None:
    near = {k: np.einsum("ij,ij->i", f, feats[chosen]) for k, f in copies.items()}
    all_near = np.concatenate(list(near.values()))
    # distinct pairs: every same-class pair of unique images; and each image's most similar one
    pair_sims, nearest = [], np.full(len(feats), -1.0, dtype=np.float32)
    for c in np.unique(labels[unique]):
        rows = unique[labels[unique] == c]
        gram = feats[rows] @ feats[rows].T
        pair_sims.append(gram[np.triu_indices(len(rows), 1)])
        np.fill_diagonal(gram, -1.0)
        nearest[rows] = gram.max(axis=1)
    distinct, nearest = np.concatenate(pair_sims), nearest[unique]

    print(f"\n-- {name}: {feats.shape[1]}-d --")
    print(f"  cosine of each copied image ({len(chosen)}) with its copy:")
    for k, v in near.items():
        print(f"    {k:<10} {quantiles(v, [0.0, 0.001, 0.01, 0.05, 0.5])}")
    print(f"    {'all':<10} {quantiles(all_near, [0.0, 0.001, 0.01, 0.05, 0.5])}")
    print(f"  cosine of distinct same-class pairs ({len(distinct):,}):")
    qs = [0.5, 0.9, 0.99, 0.999, 0.9999, 1.0]
    print(f"    {'pairs':<10} {quantiles(distinct, qs)}")
    print(f"    {'nearest':<10} {quantiles(nearest, qs)}   (each image's most similar distinct image)")

    pool_order = rng.permutation(unique)
    print(f"\n  {'':9} copies caught" + " " * 70 + f"| distinct pairs >= t | near_duplicates on the {len(unique)}"
          " images: dropped, by |pixel difference| to the kept one")
    print(f"  {'t':<9}" + "".join(f"{k:>10}" for k in near) + f"{'all':>10} |" + " " * 21 +
          f"| {'dropped':>13} {'<=3':>7} {'3-10':>7} {'>10':>7}")
    for t in THRESHOLDS:
        caught = "".join(f"{(v >= t).mean():10.2%}" for v in near.values())
        dup = near_duplicates(feats[pool_order], np.arange(len(pool_order)), t)
        dropped = np.flatnonzero(dup >= 0)
        mad = np.abs(pixels[pool_order[dropped]] - pixels[pool_order[dup[dropped]]]).mean(axis=1)
        print(f"  {t:<9.4f}{caught}{(all_near >= t).mean():10.2%} | {(distinct >= t).sum():>10,} {(distinct >= t).mean():7.3%}"
              f" | {len(dropped):6} {len(dropped) / len(unique):6.1%} {(mad <= 3).sum():7}"
              f" {((mad > 3) & (mad <= 10)).sum():7} {(mad > 10).sum():7}")

    # end to end: the copied images mixed with their copies (all, or resized and re-encoded ones)
    for kinds in (list(copies), [k for k in copies if not k.startswith(("crop", "combined"))]):
        group = np.concatenate([chosen] * (1 + len(kinds)))
        x = np.concatenate([feats[chosen], *(copies[k] for k in kinds)])
        start = time.perf_counter()
        dup = near_duplicates(x, rng.permutation(len(x)), NEAR_DUPLICATE_COSINE)
        took = time.perf_counter() - start
        kept = dup == -1
        kept_per_image = np.bincount(np.searchsorted(chosen, group[kept]), minlength=len(chosen))
        wrong = (~kept) & (group[np.maximum(dup, 0)] != group)
        print(f"\n  near_duplicates(t={NEAR_DUPLICATE_COSINE}) on the {len(chosen)} copied images and their"
              f" {', '.join(kinds)} copies ({len(x) - len(chosen)}), random order, {took:.2f} s: {kept.sum()} kept;"
              f" images kept once {np.mean(kept_per_image == 1):.1%}, more than once {np.mean(kept_per_image > 1):.1%};"
              f" rows charged to another image's row {wrong.sum()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default=str(REPO / "runs/demo/teacher/model.yaml"))
    ap.add_argument("--images", nargs="+", default=[str(REPO / "data/demo/wild"), str(REPO / "data/demo/train")])
    ap.add_argument("--copies", type=int, default=2000, help="images to make near-duplicates of")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    describe = Describe(Path(args.teacher))

    paths = sorted(str(p) for d in args.images for p in Path(d).rglob("*") if p.suffix.lower() in EXTENSIONS)
    images = [load_image(p, describe.spec.channels) for p in paths]
    feats, labels = describe(images)
    pixels = np.stack([describe.pixels(im).reshape(-1) for im in images]).astype(np.float32)
    dup_of = exact_duplicates([hashlib.sha256(row.tobytes()).digest() for row in pixels], np.arange(len(paths)))
    unique = np.flatnonzero(dup_of == -1)
    chosen = np.sort(rng.choice(unique, size=min(args.copies, len(unique)), replace=False))
    copies = {k: {} for k in DESCRIPTORS}
    for name, fn in TRANSFORMS.items():
        made, _ = describe([fn(images[i]) for i in chosen])
        for k in DESCRIPTORS:
            copies[k][name] = made[k]

    print(f"== near-duplicate threshold: {args.teacher} ==")
    print(f"  images  {len(paths)} from {', '.join(args.images)}: {len(paths) - len(unique)} exact pixel copies"
          f" of others, left out; {len(chosen)} copied 7 ways; NEAR_DUPLICATE_COSINE = {NEAR_DUPLICATE_COSINE}")
    for k in DESCRIPTORS:
        report(k, feats[k], copies[k], chosen, labels, unique, pixels, rng)
    print(f"\n  total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
