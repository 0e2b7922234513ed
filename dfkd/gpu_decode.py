"""JPEG decoding on the GPU for the scoring engine (``torchvision.io.decode_jpeg`` on CUDA).

A decoding worker reads each file's header with PIL (no pixel is decoded there): a whole JPEG
(ending in its EOI marker) in L or RGB, without an EXIF rotation and under the
decompression-bomb limit, travels as its raw bytes; anything else (other formats, CMYK, a
rotated photo) is decoded on the CPU as before. On the GPU the batch is decoded in one call and
each image resized as :func:`dfkd.images.fit_image` does (bilinear, antialiased). A file the
GPU decoder rejects is decoded on the CPU instead, so the bad-file rules are the CPU path's.
``DFKD_GPU_DECODE=0`` turns it off.
"""
from __future__ import annotations

import io
import os

import torch
import torch.nn.functional as F
from PIL import Image

from . import shards
from .images import MAX_PIXELS, ORIENTATION, InputSpec

SOI, EOI = b"\xff\xd8\xff", b"\xff\xd9"  # a JPEG's first bytes, and its end-of-image marker


def enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("DFKD_GPU_DECODE", "1") != "0"


def read_jpeg(path: str) -> torch.Tensor | None:
    """:func:`raw_jpeg` of a row's file or shard member; only a file that starts as a JPEG is
    read whole (the CPU path reads the others)."""
    try:
        src = shards.source(path)
        if not isinstance(src, str):
            return raw_jpeg(src.getvalue())
        with open(src, "rb") as f:
            head = f.read(len(SOI))
            return raw_jpeg(head + f.read()) if head == SOI else None
    except Exception:  # noqa: BLE001 - the CPU path decodes it again and records why it fails
        return None


def raw_jpeg(data: bytes) -> torch.Tensor | None:
    """The file's bytes as a uint8 tensor if the GPU may decode it, else None (CPU path)."""
    if not data.startswith(SOI) or not data.endswith(EOI):
        return None  # not a JPEG, or one cut off (a GPU decoder may not say so): the CPU path
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("L", "RGB") or img.size[0] * img.size[1] > MAX_PIXELS:
                return None
            if img.getexif().get(ORIENTATION, 1) != 1:
                return None
    except Exception:  # noqa: BLE001 - whatever PIL dislikes goes to the CPU path, which records it
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode(raw: list[torch.Tensor], spec: InputSpec, device: torch.device) -> list[torch.Tensor | None]:
    """uint8 C×H×W images on ``device``, fitted to ``spec``; None where the GPU decoder failed."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if spec.channels == 1 else ImageReadMode.RGB
    try:
        images = decode_jpeg(raw, mode=mode, device=device)
    except RuntimeError:  # one bad file fails the batch: decode one by one
        images = []
        for r in raw:
            try:
                images.append(decode_jpeg(r, mode=mode, device=device))
            except RuntimeError:
                images.append(None)
    return [fit(img, spec) if img is not None else None for img in images]


def fit(img: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """Resize a uint8 C×H×W image to the spec's H×W by its resize mode (stretch, crop, pad)."""
    h, w = spec.size
    ih, iw = img.shape[1:]
    if (ih, iw) == (h, w):
        return img
    if spec.resize == "stretch":
        return _resize(img, h, w)
    scale = max(w / iw, h / ih) if spec.resize == "crop" else min(w / iw, h / ih)
    nh, nw = max(1, round(ih * scale)), max(1, round(iw * scale))
    img = _resize(img, nh, nw)
    if spec.resize == "crop":
        top, left = (nh - h) // 2, (nw - w) // 2
        return img[:, top:top + h, left:left + w]
    canvas = torch.zeros(img.shape[0], h, w, dtype=torch.uint8, device=img.device)
    top, left = (h - nh) // 2, (w - nw) // 2
    canvas[:, top:top + nh, left:left + nw] = img
    return canvas


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    out = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)
