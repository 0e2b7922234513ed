"""Training data, decoded once: in memory when small, else in the on-disk cache (train/cache.py).

Either way an :class:`ImageSet` gives uint8 N×C×H×W batches by position (``read``), and bad
files are left out and recorded, never fatal. Which store a set lives in is chosen by its
decoded size (``DFKD_IN_MEMORY_BYTES``, default 2 GiB), not by a flag.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..dist import SINGLE, Ranks
from ..errors import DfkdError
from ..events import Decoded, Note, OnEvent
from ..images import ImageDataset, InputSpec
from ..index import PathArray
from ..runtime import loader
from .cache import DiskImages, cached_images

IN_MEMORY_BYTES = 2 << 30


def in_memory_bytes() -> int:
    """The decoded size up to which a set stays in memory (``DFKD_IN_MEMORY_BYTES``)."""
    value = os.environ.get("DFKD_IN_MEMORY_BYTES", "")
    try:
        return int(value) if value else IN_MEMORY_BYTES
    except ValueError:
        raise DfkdError(f"DFKD_IN_MEMORY_BYTES={value!r}: expected a number of bytes") from None


@dataclass
class ImageSet:
    """Decoded images (a uint8 N×C×H×W tensor, or :class:`DiskImages`), labels (-1 = unknown)
    and the paths they came from."""

    images: torch.Tensor | DiskImages
    labels: torch.Tensor
    paths: PathArray
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def on_disk(self) -> bool:
        return isinstance(self.images, DiskImages)

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 images at positions ``idx`` (a CPU tensor unless the set lives on a GPU)."""
        return self.images.read(idx) if self.on_disk else self.images[idx.to(self.images.device)]

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Every image in order, ``batch_size`` at a time."""
        for i in range(0, len(self), batch_size):
            yield self.read(torch.arange(i, min(i + batch_size, len(self))))

    def subset(self, idx: torch.Tensor, skipped: list[dict] | None = None) -> "ImageSet":
        """The images at positions ``idx`` (repeats allowed); on disk, nothing is copied."""
        images = self.images.subset(idx) if self.on_disk else self.images[idx]
        return ImageSet(images, self.labels[idx], self.paths.take(idx.cpu().numpy()),
                        self.skipped if skipped is None else skipped)


def decode_images(paths: Sequence[str], spec: InputSpec, labels: Sequence[int] | None = None, *,
                  batch_size: int = 64, workers: int = 0, what: str = "--data", cache_dir: str | Path | None = None,
                  ranks: Ranks = SINGLE, on_event: OnEvent | None = None) -> ImageSet:
    """Decode every file once; bad files are left out and listed in ``skipped``.

    A set larger than :func:`in_memory_bytes` goes to the on-disk cache under ``cache_dir``
    (built in parallel by the ranks, reused by later runs). ``on_event`` receives the training
    commands' events (:mod:`dfkd.events`): :class:`Decoded` and, for the cache, a :class:`Note` naming it.
    Images are decoded ``batch_size`` at a time (the commands pass ``--batch-size``): with
    ``workers`` processes, at most ``workers × 4`` batches are in flight (runtime.loader)."""
    paths = PathArray.of(paths)
    labels = torch.as_tensor(np.asarray(labels, dtype=np.int64)) if labels is not None else \
        torch.full((len(paths),), -1, dtype=torch.long)
    size = len(paths) * spec.channels * spec.size[0] * spec.size[1]
    on_progress = (lambda d, t: on_event(Decoded(d, t))) if on_event else None
    if size > in_memory_bytes():
        images, failed = cached_images(paths, spec, cache_dir, batch_size=batch_size, workers=workers, ranks=ranks,
                                       on_progress=on_progress)
        if on_event:
            on_event(Note(f"{what}: {len(paths)} images in the decoded cache {images.file.parent}"
                          f" ({size / 2**20:,.0f} MiB, over the {in_memory_bytes() / 2**20:,.0f} MiB kept in memory;"
                          " later runs reuse it)"))
    else:
        images, failed = _decode_in_memory(paths, spec, batch_size, workers, on_progress)
    ok = torch.ones(len(paths), dtype=torch.bool)
    ok[[row for row, _ in failed]] = False
    skipped = [{"path": paths[row], "reason": reason} for row, reason in failed]
    keep = ok.nonzero().squeeze(1)
    if len(keep) == 0:
        raise DfkdError(f"{what}: none of the {len(paths)} images could be decoded"
                        f" (first: {skipped[0]['path']}: {skipped[0]['reason']})")
    full = ImageSet(images, labels, paths)
    return full if len(keep) == len(paths) else full.subset(keep, skipped)


def _decode_in_memory(paths: Sequence[str], spec: InputSpec, batch_size: int, workers: int,
                      on_progress: Callable[[int, int], None] | None) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    images = torch.empty(len(paths), spec.channels, *spec.size, dtype=torch.uint8)
    failed, done = [], 0
    for x, _, pos, errors in loader(ImageDataset(paths, spec), batch_size, workers, torch.device("cpu")):
        images[pos] = x
        failed += [(p, err) for p, err in zip(pos.tolist(), errors) if err]
        done += len(pos)
        if on_progress:
            on_progress(done, len(paths))
    return images, failed


def channel_stats(data: ImageSet, batch_size: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the decoded images (in [0, 1] units), one batch at a time."""
    total = sq = None
    for x in data.batches(batch_size):
        x = x.double().div_(255.0)
        s, s2 = x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))
        total, sq = (s, s2) if total is None else (total + s, sq + s2)
    n = len(data) * data.images.shape[2] * data.images.shape[3]
    mean = total / n
    var = (sq - n * mean.square()) / max(1, n - 1)
    return mean.tolist(), var.clamp_min(0).sqrt().clamp_min(1e-3).tolist()


def split(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A deterministic random hold-out of ``fraction`` of the images (the validation split)."""
    n_val = int(round(len(data) * fraction))
    if n_val < 1 or n_val >= len(data):
        raise DfkdError(f"--val-split {fraction}: leaves no images on one side ({len(data)} images)")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    train, val = (data.subset(idx.sort().values) for idx in (perm[n_val:], perm[:n_val]))
    val.skipped = []
    return train, val
