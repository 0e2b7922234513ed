"""Images: robust decoding, the input description of a model card, pools and labeled sets.

Every image goes through :func:`load_image`, which either returns a PIL image in the mode the
model wants or raises :class:`BadImage` with a short reason; datasets turn that into a recorded
skip, never a crash.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from . import shards
from .errors import DfkdError
from .index import Index, Rows, open_index
from .pool import pool_rows, walk_files

ImageFile.LOAD_TRUNCATED_IMAGES = False
MAX_PIXELS = 64_000_000  # larger images are treated as decompression bombs and skipped
RESIZE_MODES = ("stretch", "crop", "pad")


class BadImage(Exception):
    """A file that cannot be used as an image; ``str(e)`` is the reason recorded in skipped.tsv."""


@dataclass
class InputSpec:
    """What a model is fed: ``size`` (H, W), ``channels`` (1 or 3), normalisation and resize mode.

    ``resize``: ``stretch`` resizes to exactly H×W; ``crop`` scales the shorter side then
    centre-crops; ``pad`` fits the whole image inside H×W and pads with black.
    """

    size: tuple[int, int] = (32, 32)
    channels: int = 3
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    resize: str = "stretch"

    @classmethod
    def from_dict(cls, d: dict, where: str = "input") -> "InputSpec":
        d = dict(d or {})
        unknown = set(d) - {"size", "channels", "mean", "std", "resize"}
        if unknown:
            raise DfkdError(f"{where}: unknown key(s) {', '.join(sorted(unknown))};"
                            " expected size, channels, mean, std, resize")
        size = d.get("size", 32)
        size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
        channels = int(d.get("channels", 3))
        if channels not in (1, 3) or len(size) != 2 or min(size) < 1:
            raise DfkdError(f"{where}: size must be N or [H, W] and channels 1 or 3")
        mean = [float(m) for m in d.get("mean", [0.5] * channels)]
        std = [float(s) for s in d.get("std", [0.5] * channels)]
        if len(mean) != channels or len(std) != channels or not all(
                math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
            raise DfkdError(f"{where}: mean and std need {channels} finite values each (std > 0)")
        resize = d.get("resize", "stretch")
        if resize not in RESIZE_MODES:
            raise DfkdError(f"{where}: resize {resize!r} is not one of {', '.join(RESIZE_MODES)}")
        return cls(size, channels, mean, std, resize)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float greyscale to 8-bit, keeping the full range."""
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 255.0)
    if img.mode == "F" and arr.max() <= 1.0:
        top = 1.0
    return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


ORIENTATION = 0x0112  # EXIF tag; values 5 to 8 turn the picture by 90 degrees


def reduced_decoding() -> bool:
    """Whether JPEGs are decoded at a reduced size when the model's input is much smaller
    (``DFKD_REDUCED_DECODE=0`` decodes every pixel; see :func:`load_image`)."""
    return os.environ.get("DFKD_REDUCED_DECODE", "1") != "0"


def _draft(img: Image.Image, size: tuple[int, int]) -> tuple[float, float] | None:
    """Let a JPEG decode at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) while still at least
    ``size`` (W, H) once the EXIF rotation is applied; other formats ignore it. Returns the
    picture's exact extent at that scale, as shown (the decoded size rounds it up), or None."""
    if img.format != "JPEG":
        return None
    w, h = size
    turned = img.getexif().get(ORIENTATION, 1) in (5, 6, 7, 8)
    if turned:
        w, h = h, w
    drafted = img.draft(None, (w, h))
    if drafted is None or tuple(img.size) == tuple(drafted[1][2:]):
        return None
    ew, eh = drafted[1][2:]
    return (eh, ew) if turned else (ew, eh)


def load_image(path: str, channels: int, at_least: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` as an ``L`` (channels=1) or ``RGB`` image; raise BadImage(reason).

    ``at_least`` (W, H): the image will be resized down to about that size, so a JPEG may be
    decoded at a reduced scale no smaller than it (the README's "Real resolution" gives the
    tolerance; ``DFKD_REDUCED_DECODE=0`` turns it off)."""
    return _decode(path, channels, at_least)[0]


def _decode(path: str, channels: int, at_least: tuple[int, int] | None) -> tuple[Image.Image, tuple | None]:
    """:func:`load_image`, and the exact extent (W, H) of a JPEG decoded at a reduced scale."""
    extent = None
    try:
        source = shards.source(path)
        if (os.path.getsize(path) if isinstance(source, str) else source.getbuffer().nbytes) == 0:
            raise BadImage("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise BadImage(f"decompression bomb ({w}x{h} pixels > {MAX_PIXELS})")
                if at_least is not None and reduced_decoding():
                    extent = _draft(img, at_least)
                img.load()
                img = ImageOps.exif_transpose(img)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("file not found") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb ({e})") from None
    except Exception as e:  # truncated data, broken codecs, ...
        raise BadImage(f"cannot decode: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        img = _to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "P", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img.alpha_composite(rgba)
    return img.convert("L" if channels == 1 else "RGB"), extent


def fit_image(img: Image.Image, spec: InputSpec, extent: tuple[float, float] | None = None) -> Image.Image:
    """Resize to the spec's H×W by its resize mode. ``extent``: the picture's exact (W, H) in
    ``img``'s pixels when that is not its size (a reduced JPEG decode rounds its last row and
    column up): geometry follows the picture, not the rounding."""
    h, w = spec.size
    iw, ih = extent or img.size
    box = (0, 0, iw, ih)
    if img.size == (w, h) and extent is None:
        return img
    if spec.resize == "stretch":
        return img.resize((w, h), Image.BILINEAR, box=box)
    scale = max(w / iw, h / ih) if spec.resize == "crop" else min(w / iw, h / ih)
    nw, nh = max(1, round(iw * scale)), max(1, round(ih * scale))
    img = img.resize((nw, nh), Image.BILINEAR, box=box)
    if spec.resize == "crop":
        left, top = (nw - w) // 2, (nh - h) // 2
        return img.crop((left, top, left + w, top + h))
    canvas = Image.new(img.mode, (w, h))
    canvas.paste(img, ((w - nw) // 2, (h - nh) // 2))
    return canvas


def image_tensor(path: str, spec: InputSpec) -> torch.Tensor:
    """uint8 C×H×W tensor of ``path`` as ``spec`` asks (raises BadImage)."""
    h, w = spec.size
    img, extent = _decode(path, spec.channels, (w, h))
    arr = np.asarray(fit_image(img, spec, extent), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class ImageDataset(torch.utils.data.Dataset):
    """Items ``(uint8 C×H×W, label, position, error)``; a bad file gives zeros and its reason."""

    def __init__(self, paths: Sequence[str], spec: InputSpec, labels: Sequence[int] | None = None):
        self.paths = list(paths)
        self.spec = spec
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return image_tensor(self.paths[i], self.spec), self.labels[i], i, ""
        except BadImage as e:
            blank = torch.zeros(self.spec.channels, *self.spec.size, dtype=torch.uint8)
            return blank, self.labels[i], i, str(e)


def normalize(batch: torch.Tensor, spec: InputSpec, device: torch.device,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 N×C×H×W batch to the normalised float input the model was trained on."""
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def open_pool(path: str | Path, flag: str = "--pool") -> Index:
    """A pool: a directory scanned recursively (every file is tried) or an index file."""
    path, problems = Path(path), []
    columns, rows = pool_rows(path, flag, problems)
    return _nonempty(Index(columns, list(rows), path, problems), flag)


def pool_paths(path: str | Path, flag: str = "--pool") -> Rows:
    """:func:`open_pool` as compact :class:`Rows` (paths and labels only), for sets of any size."""
    path, problems = Path(path), []
    columns, rows = pool_rows(path, flag, problems)
    return _nonempty(Rows.collect(columns, rows, path, problems), flag)


def _nonempty(rows, flag: str):
    if not len(rows):
        raise DfkdError(f"{flag} {rows.source}: the pool is empty (no files found)")
    return rows


def open_labeled(path: str | Path, classes: Sequence[str] | None = None,
                 flag: str = "--data") -> tuple[Index, list[str]]:
    """Labeled images: an ImageFolder directory (class = sub-folder) or an index with ``label``.

    Returns the index (with integer labels) and the class names. With ``classes`` given (from a
    model card), folder names are mapped onto them.
    """
    columns, rows, names, problems = _labeled_rows(Path(path), classes, flag)
    index = Index(columns, list(rows), Path(path), problems)
    if not index.rows and not Path(path).is_file():
        raise DfkdError(f"{flag} {path}: no image files in the class folders")
    return index, names


def labeled_paths(path: str | Path, classes: Sequence[str] | None = None,
                  flag: str = "--data") -> tuple[Rows, list[str]]:
    """:func:`open_labeled` as compact :class:`Rows`, for sets of any size."""
    columns, rows, names, problems = _labeled_rows(Path(path), classes, flag)
    found = Rows.collect(columns, rows, Path(path), problems)
    if not len(found) and not Path(path).is_file():
        raise DfkdError(f"{flag} {path}: no image files in the class folders")
    return found, names


def _labeled_rows(path: Path, classes: Sequence[str] | None, flag: str):
    """(columns, streamed rows, class names, problems) of an index with ``label`` or a class-folder tree."""
    if path.is_file():
        columns, rows = open_index(path)
        if "label" not in columns:
            raise DfkdError(f"{flag} {path}: index has no 'label' column")
        return columns, rows, list(classes) if classes else [], []
    if not path.is_dir():
        raise DfkdError(f"{flag} {path}: no such directory or index file")
    folders = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not folders:
        raise DfkdError(f"{flag} {path}: no class sub-folders (expected one folder per class)")
    names = list(classes) if classes else folders
    unknown = [f for f in folders if f not in names]
    if unknown:
        raise DfkdError(f"{flag} {path}: folder(s) {', '.join(unknown)} are not classes of the model"
                        f" ({', '.join(names)})")
    problems: list[dict] = []
    rows = ({"path": p, "label": str(names.index(f))} for f in folders for p in walk_files(path / f, problems))
    return ["path", "label"], rows, names, problems
