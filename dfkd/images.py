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
from .pool import as_source, pool_rows, walk_files

ImageFile.LOAD_TRUNCATED_IMAGES = False
MAX_PIXELS = 64_000_000  # larger images are treated as decompression bombs and skipped
RESIZE_MODES = ("stretch", "crop", "pad")


class BadImage(Exception):
    """A file that cannot be used as an image; ``str(e)`` is the reason recorded in skipped.tsv."""


MAX_INPUT_SIDE = 4096  # px; a larger input size in a card or flag is refused before anything is allocated


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

    REQUIRED = ("size", "mean", "std")  # never assumed: each changes what the model sees

    @classmethod
    def from_dict(cls, d: object, where: str = "input", hint: str = "") -> "InputSpec":
        """Check a description (as in a card's ``input:``): ``size``, ``mean`` and ``std`` are
        required; ``channels`` is the length of ``mean`` unless given; ``resize`` is ``stretch``
        unless given. ``hint`` ends the message when a required key is missing."""
        if not isinstance(d, dict):
            raise DfkdError(f"{where}: expected a mapping such as {{size: 32, mean: [0.5], std: [0.5]}},"
                            f" not {shown(d)}")
        unknown = set(d) - {"size", "channels", "mean", "std", "resize"}
        if unknown:
            raise DfkdError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))};"
                            " expected size, channels, mean, std, resize")
        missing = [k for k in cls.REQUIRED if d.get(k) is None]
        if missing:
            raise DfkdError(f"{where}: no {', '.join(missing)} given, and dfkd assumes none" + (hint and f"; {hint}"))
        size, mean, std = _size(d["size"], where), _numbers(d["mean"], where, "mean"), _numbers(d["std"], where, "std")
        channels = d.get("channels", len(mean))
        if not isinstance(channels, int) or isinstance(channels, bool) or channels not in (1, 3):
            raise DfkdError(f"{where}: channels {shown(channels)}: must be 1 or 3")
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise DfkdError(f"{where}: mean and std need {channels} values each (one per channel; std > 0)")
        resize = d.get("resize", "stretch")
        if resize not in RESIZE_MODES:
            raise DfkdError(f"{where}: resize {resize!r} is not one of {', '.join(RESIZE_MODES)}")
        return cls(size, channels, mean, std, resize)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = list(self.size)
        return d

    def describe(self) -> str:
        """One line: ``3x224x224, mean [..], std [..], resize crop``."""
        def values(v: list[float]) -> str:
            return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
        return (f"{self.channels}x{self.size[0]}x{self.size[1]}, mean {values(self.mean)}, std {values(self.std)},"
                f" resize {self.resize}")


def shown(value: object) -> str:
    """A value as an error message shows it: its repr, or its type when that is long."""
    return repr(value) if len(repr(value)) <= 40 else f"a {type(value).__name__}"


def _size(value: object, where: str) -> tuple[int, int]:
    """``N`` or ``[H, W]``: whole numbers from 1 to MAX_INPUT_SIDE."""
    sides = [value] if not isinstance(value, (list, tuple)) else list(value)
    if len(sides) not in (1, 2) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sides):
        raise DfkdError(f"{where}: size {shown(value)}: expected N or [H, W] in whole pixels")
    if not all(1 <= s <= MAX_INPUT_SIDE for s in sides):
        raise DfkdError(f"{where}: size {shown(value)}: each side must be 1 to {MAX_INPUT_SIDE} px")
    return (sides[0], sides[-1])


def _numbers(value: object, where: str, key: str) -> list[float]:
    """A list of finite numbers (one per channel)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if not (1 <= len(items) <= 3) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             and math.isfinite(v) for v in items):
        raise DfkdError(f"{where}: {key} {shown(value)}: expected one finite number per channel, e.g. [0.5]")
    return [float(v) for v in items]


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
    """A pool: a directory scanned recursively (every file is tried), an index file or tar shards."""
    path, problems = as_source(path), []
    columns, rows = pool_rows(path, flag, problems)
    return _nonempty(Index(columns, list(rows), path, problems), flag)


def pool_paths(path: str | Path, flag: str = "--pool") -> Rows:
    """:func:`open_pool` as compact :class:`Rows` (paths and labels only), for sets of any size."""
    path, problems = as_source(path), []
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
