"""The training loop shared by ``train``, ``distill`` and ``pu-train``.

:func:`run_loop` reads as the recipe; its pieces are plain: one step (augment, teacher, student,
objective, optimizer and lr-scheduler step) is :func:`~dfkd.train.steps.train_step`, the
objective's contract is in ``objective.py``, the schedule is a ``torch.optim.lr_scheduler`` per
optimizer (``schedule.py``), :func:`accuracy` evaluates, and
:class:`~dfkd.train.checkpoint.Checkpoints` saves and restores. ``last.pt`` is written
atomically every ``checkpoint_every`` steps and at the end; a run started again with the same
command resumes from it and ends with the same weights (batches and augmentation are seeded by
epoch and step, not by history).

Under torchrun the student (and an objective with parameters of its own: DFND's θ, MLKD's h,
MEAL V2's discriminator) is wrapped in DistributedDataParallel; the frozen teacher never is.
``batch_size`` is the global batch: every rank draws the same global batch and trains on its
own contiguous part of it (with that part's share of the batch's augmentation draws), so the
batches, the steps and the schedule are those of one process. Rank 0 alone writes the
checkpoints and metrics; on a resume every rank reads ``last.pt`` (``--out`` on a filesystem
all nodes see).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import DfkdError
from ..events import OnEvent, Started
from ..images import InputSpec, normalize
from ..models.features import FeatureTap
from ..runtime import Runtime, autocast
from ..teacher import Teacher
from .augment import AUGMENTS
from .checkpoint import Checkpoints
from .data import ImageSet
from .objective import LoopObjective
from .optim import check_optimizer
from .record import Meter, RunLog
from .schedule import model_lr
from .steps import Optimizers, RankBatch, TrainParts, train_step


@dataclass
class LoopConfig:
    epochs: int = 30
    steps: int | None = None  # overrides epochs when set
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd (momentum, nesterov) | adam
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    schedule: str = "cosine"  # cosine | multistep | constant
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of the run
    gamma: float = 0.1
    augment: str = "crop-flip"
    pad: int = 4
    seed: int = 0
    amp: bool | None = None  # bf16 autocast; None: where the hardware has it (runtime.fast_bf16)
    channels_last: bool = True
    log_every: int = 50
    checkpoint_every: int = 500

    def check(self) -> None:
        if self.augment not in AUGMENTS:
            raise DfkdError(f"augment {self.augment!r}: expected one of {', '.join(AUGMENTS)}")
        check_optimizer(self.optimizer, "optimizer")
        if self.schedule not in ("cosine", "multistep", "constant"):
            raise DfkdError(f"schedule {self.schedule!r}: expected cosine, multistep or constant")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise DfkdError(f"--steps {self.steps}: must be a whole number of at least 1")
        for name in ("batch_size", "epochs", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise DfkdError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not self.lr > 0:
            raise DfkdError(f"--lr {self.lr}: must be positive")
        if not 0 <= self.momentum < 1:  # NaN too
            raise DfkdError(f"momentum {self.momentum}: must be at least 0 and below 1 (--set momentum=0.9)")
        if not self.weight_decay >= 0:
            raise DfkdError(f"weight_decay {self.weight_decay}: must be at least 0 (--set weight_decay=5e-4)")


def _seed(*parts: int) -> int:
    seed = 0
    for p in parts:
        seed = (seed * 1_000_003 + p) % (2**63)
    return seed


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


@dataclass
class LoopResult:
    steps: int
    epochs: float
    last: dict
    best: dict | None
    resumed_from: int

    @property
    def finished_before(self) -> bool:
        """The run had already ended: this call took no step."""
        return self.resumed_from == self.steps


def outputs(model: nn.Module, data: ImageSet, spec: InputSpec, device: torch.device,
            cfg: LoopConfig) -> torch.Tensor:
    """The model's outputs (float32, CPU) on a decoded set, unaugmented; model left in eval mode."""
    return torch.cat([torch.zeros(0), *batch_outputs(model, data, spec, device, cfg)])


def batch_outputs(model: nn.Module, data: ImageSet, spec: InputSpec, device: torch.device,
                  cfg: LoopConfig) -> Iterator[torch.Tensor]:
    """:func:`outputs` one batch at a time, for a set whose outputs are too large to keep; the
    batch is the run's ``batch_size`` (``--batch-size``), so memory follows the user's setting."""
    model.eval()
    with torch.inference_mode():
        for images in data.batches(cfg.batch_size):
            x = normalize(images, spec, device, cfg.channels_last)
            with autocast(device, cfg.amp):
                yield model(x).float().cpu()


def accuracy(model: nn.Module, data: ImageSet, spec: InputSpec, device: torch.device, cfg: LoopConfig) -> float:
    """Top-1 accuracy on an in-memory labeled set (model left in eval mode)."""
    pred = outputs(model, data, spec, device, cfg).argmax(1)
    return int((pred == data.labels).sum()) / max(1, len(data))


def _distributed(module: nn.Module, rt: Runtime, **kw) -> nn.Module:
    """``module`` under DistributedDataParallel when there are several ranks and it has weights to train."""
    if rt.ranks.world == 1 or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[rt.device] if rt.device.type == "cuda" else None, **kw)


def run_loop(model: nn.Module, objective: LoopObjective, data: ImageSet, spec: InputSpec, cfg: LoopConfig,
             out: Path, rt: Runtime, *, teacher: Teacher | None = None, val: ImageSet | None = None,
             stop_after: int | None = None, tensorboard: bool = False,
             on_event: OnEvent | None = None) -> LoopResult:
    """Train ``model`` on ``data`` with ``objective``; checkpoints in ``out/checkpoints``.

    ``teacher``: the frozen teacher whose logits (and, when the objective asks, first member's
    features) each batch carries. ``tensorboard``: also write every metrics record to
    ``out/tensorboard`` (the JSONL stays)."""
    cfg.check()
    device, ranks = rt.device, rt.ranks
    if cfg.batch_size < ranks.world:
        raise DfkdError(f"--batch-size {cfg.batch_size}: the global batch must give every one of the"
                        f" {ranks.world} ranks at least one image")
    per_epoch = max(1, len(data) // cfg.batch_size)
    total = cfg.steps or cfg.epochs * per_epoch
    frozen, taps = _place(model, objective, teacher, cfg, device)
    optimizers = Optimizers(model, objective, cfg, total)
    checkpoints = Checkpoints(out / "checkpoints", model, objective, optimizers, cfg, ranks.main)
    step, best = checkpoints.restore()
    resumed_from = step
    parts = TrainParts(model, _distributed(model, rt), objective,
                       _distributed(objective, rt, find_unused_parameters=True), frozen, taps, spec, cfg, device)
    log = RunLog(out, step, tensorboard, on_event, ranks.main)
    batches = _Batches(_on_device(data, device), cfg, per_epoch, total, ranks)
    meter, record = Meter(step), {}
    log.event(Started(step, total, per_epoch))
    try:
        while step < total and (stop_after is None or step < stop_after):
            epoch, i = divmod(step, per_epoch)
            batch = batches.get(step)
            losses = train_step(parts, optimizers, batch, _generator(cfg.seed, epoch, i, 1))
            step += 1
            meter.add(losses, batch.size)
            end_of_epoch = step % per_epoch == 0 or step == total
            checkpoint = step % cfg.checkpoint_every == 0 or step == total
            if step % cfg.log_every == 0 or end_of_epoch or checkpoint:
                record = meter.record(step, per_epoch, model_lr(cfg, step - 1, total), ranks)
                if end_of_epoch and val is not None:
                    record["val_top1"] = accuracy(model, val, spec, device, cfg)
                    if best is None or record["val_top1"] > best["val_top1"]:
                        best = {"step": step, "val_top1": record["val_top1"]}
                        checkpoints.save("best.pt", step, best)
                log.record(record)
            if checkpoint:
                checkpoints.save("last.pt", step, best)
    finally:
        batches.close()
        log.close()
        for tap in taps or ():
            tap.remove()
    if step < total:  # stopped early (stop_after); a finished run saved at its last step
        checkpoints.save("last.pt", step, best)
    return LoopResult(step, step / per_epoch, record or log.last, best, resumed_from)


def _place(model: nn.Module, objective: LoopObjective, teacher: Teacher | None, cfg: LoopConfig,
           device: torch.device) -> tuple[nn.Module | None, tuple[FeatureTap, FeatureTap] | None]:
    """Move the model, the objective and the teacher to the device (channels-last when asked; the
    teacher in eval mode); returns the teacher's module and, when the objective needs features,
    the taps on the model's and the teacher's first member's penultimate layers."""
    model.to(device)
    objective.to(device)
    frozen = teacher.model if teacher is not None else None
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
        if frozen is not None and not any(isinstance(m, torch.jit.ScriptModule) for m in frozen.modules()):
            frozen.to(memory_format=torch.channels_last)
    if frozen is not None:
        frozen.eval()
    if not objective.needs_features:
        return frozen, None
    if teacher is None:
        raise ValueError("an objective that needs features needs a teacher")
    return frozen, (FeatureTap(model, "the student"), FeatureTap(teacher.members[0], "--teacher"))


def _part(n: int, rank: int, world: int) -> tuple[int, int]:
    """(offset, size) of this rank's contiguous part of a batch of ``n`` (the first ranks take one more)."""
    size, extra = divmod(n, world)
    return rank * size + min(rank, extra), size + (rank < extra)


GPU_RESIDENT_BYTES = 4 << 30


def _on_device(data: ImageSet, device: torch.device) -> ImageSet:
    """On a GPU, an in-memory uint8 training set lives in GPU memory when it is small, else pinned;
    a set in the on-disk cache stays there."""
    if device.type != "cuda" or data.on_disk:
        return data
    if data.images.numel() <= GPU_RESIDENT_BYTES:
        return ImageSet(data.images.to(device), data.labels.to(device), data.paths)
    return ImageSet(data.images.pin_memory(), data.labels.pin_memory(), data.paths)


class _Batches:
    """This rank's part of every step's global batch, drawn from the epoch's seeded permutation;
    from the on-disk cache, the next step's images are read in a thread while this step runs."""

    def __init__(self, data: ImageSet, cfg: LoopConfig, per_epoch: int, total: int, ranks):
        self.data, self.cfg, self.per_epoch, self.total, self.ranks = data, cfg, per_epoch, total, ranks
        self.perms: dict[int, torch.Tensor] = {}
        self.reader = ThreadPoolExecutor(1) if data.on_disk else None
        self.pending: tuple[int, Future] | None = None

    def _indices(self, step: int) -> tuple[torch.Tensor, int, int]:
        epoch, i = divmod(step, self.per_epoch)
        if epoch not in self.perms:
            self.perms = {e: p for e, p in self.perms.items() if e >= epoch - 1}
            self.perms[epoch] = torch.randperm(len(self.data), generator=_generator(self.cfg.seed, epoch))
        batch = self.perms[epoch][i * self.cfg.batch_size:(i + 1) * self.cfg.batch_size]
        offset, part = _part(len(batch), self.ranks.rank, self.ranks.world)
        return batch[offset:offset + part], offset, len(batch)

    def get(self, step: int) -> RankBatch:
        idx, offset, size = self._indices(step)
        if self.pending is not None and self.pending[0] == step:
            images = self.pending[1].result()
        else:
            images = self.data.read(idx)
        self.pending = None
        if self.reader is not None and step + 1 < self.total:
            self.pending = (step + 1, self.reader.submit(self.data.read, self._indices(step + 1)[0]))
        return RankBatch(images, self.data.labels[idx.to(self.data.labels.device)], offset, size)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.shutdown(wait=True)
