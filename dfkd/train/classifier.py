"""``train``: a classifier trained with cross-entropy on labeled images (teachers, baselines)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import yaml
from PIL import Image
from torch import nn

from .. import shards
from ..cards import build_arch, save_card
from ..config import as_config
from ..errors import DfkdError
from ..events import OnEvent
from ..images import InputSpec, labeled_paths
from ..index import write_index
from ..io import write_text
from ..pool import data_digest
from ..rundir import open_run, write_manifest
from ..runtime import setup
from .data import channel_stats, decode_images, split
from .loop import LoopConfig, accuracy, run_loop
from .objective import Batch, LoopObjective


class CrossEntropy(LoopObjective):
    """Supervised objective: cross-entropy of the model's logits on the labels."""

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.cross_entropy(batch.outputs, batch.labels)}


@dataclass
class TrainResult:
    card: Path
    val_top1: float
    best: dict | None
    steps: int
    skipped: int
    resumed_from: int


def infer_spec(paths: Sequence[str], size: int | None, channels: int | None) -> InputSpec:
    """Size and channels from the flags, else from the first decodable image (grey -> 1 channel)."""
    if size is not None and size < 1:
        raise DfkdError(f"--size {size}: must be at least 1")
    if channels is not None and channels not in (1, 3):
        raise DfkdError(f"--channels {channels}: must be 1 or 3")
    if size is None or channels is None:
        for p in paths[:50]:
            try:
                with Image.open(shards.source(p)) as img:  # reads the header only
                    w, h, mode = *img.size, img.mode
            except (OSError, ValueError):
                continue
            size = size or max(w, h)
            channels = channels or (1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3)
            break
        else:
            raise DfkdError("cannot infer the input size from the first 50 images: give --size and --channels")
    return InputSpec(size=(size, size), channels=channels, mean=[0.0] * channels, std=[1.0] * channels)


def _source(size: int | None, channels: int | None) -> str:
    """Where train's input spec came from: mean and std are the training images' own."""
    given = [k for k, v in (("size", size), ("channels", channels)) if v is not None]
    return "training images" + (f", flags for {', '.join(given)}" if given else "")


def train_classifier(arch: str, data: str | Path, out: str | Path, cfg: LoopConfig, *, size: int | None = None,
                     channels: int | None = None, val_split: float = 0.1, arch_args: dict | None = None,
                     workers: int | None = None, device: str = "auto", stop_after: int | None = None,
                     overwrite: bool = False, tensorboard: bool = False, cache_dir: str | Path | None = None,
                     on_event: OnEvent | None = None) -> TrainResult | None:
    """Train ``arch`` from scratch on an ImageFolder/index; write ``out/model.yaml``.

    Under torchrun: DistributedDataParallel, ``cfg.batch_size`` global; rank 0 returns the result."""
    out, cfg = Path(out), as_config(LoopConfig, cfg, "cfg")
    cfg.check()
    if not 0 <= val_split < 1:  # NaN too
        raise DfkdError(f"--val-split {val_split}: must be at least 0 and below 1")
    rt = setup(device, cfg.amp, workers, training=True)
    cfg = replace(cfg, amp=rt.amp)
    rows, classes = labeled_paths(data)
    labels = rows.labels
    if not len(rows):
        raise DfkdError(f"--data {data}: the index has no rows")
    if labels.min() < 0:
        raise DfkdError(f"--data {data}: some rows have no label (-1)")
    num_classes = len(classes) or int(labels.max()) + 1
    empty = np.flatnonzero(np.bincount(labels, minlength=num_classes) == 0).tolist()
    if not classes and empty:
        raise DfkdError(f"--data {data}: labels must be 0..K-1; label {labels.max()} leaves class(es)"
                        f" {', '.join(map(str, empty[:5]))}{' ...' if len(empty) > 5 else ''} without images")
    spec = infer_spec(rows.paths[:50], size, channels)
    build_arch(arch, num_classes, spec.channels, arch_args)  # fail on a bad arch before decoding
    with open_run(out, "train", rt.ranks, reads=[("--data", data)]) as run:
        run.claim({"arch": arch, "arch_args": arch_args, "data": data_digest(data), "size": size,
                   "channels": channels, "val_split": val_split, "config": asdict(cfg)}, overwrite,
                  on_event=on_event)
        full = decode_images(rows.paths, spec, labels, batch_size=cfg.batch_size, workers=rt.workers, what="--data", cache_dir=cache_dir,
                             ranks=rt.ranks, on_event=on_event)
        full.skipped = rows.problems + full.skipped
        spec.mean, spec.std = channel_stats(full, cfg.batch_size)
        train, val = split(full, val_split, cfg.seed) if val_split > 0 else (full, None)
        torch.manual_seed(cfg.seed)
        model = build_arch(arch, num_classes, spec.channels, arch_args)
        if rt.ranks.main:
            write_index(out / "skipped.tsv", full.skipped, ["path", "reason"])
            write_text(out / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))  # the resolved config
        result = run_loop(model, CrossEntropy(), train, spec, cfg, out, rt, val=val, stop_after=stop_after,
                          tensorboard=tensorboard, on_event=on_event)
        if not rt.ranks.main:
            return None
        val_top1 = accuracy(model, val, spec, rt.device, cfg) if val is not None else float("nan")
        card = save_card(out / "model.yaml", arch, num_classes, spec, model.state_dict(), arch_args,
                         keep=result.finished_before, classes=classes or None, kind="classifier",
                         notes=f"trained by dfkd train on {data}; {val_split:.0%} validation split top-1 {val_top1:.4f}")
        write_manifest(out, "train", {"arch": arch, "val_split": val_split, "size": list(spec.size),
                                      "channels": spec.channels, **asdict(cfg)},
                       {"data": data}, input_spec={**spec.to_dict(), "source": _source(size, channels)},
                       summary={"val_top1": val_top1, "best": result.best, "steps": result.steps})
        return TrainResult(card, val_top1, result.best, result.steps, len(full.skipped), result.resumed_from)
