"""One training step, and the optimizers (with their lr schedulers) it steps.

:func:`train_step` is the body of the loop in :mod:`dfkd.train.loop`: augment this rank's part
of the batch on the device, run the frozen teacher (and let the objective pick the rows to train
on), run the model, hand the outputs to the objective as a :class:`~dfkd.train.objective.Batch`,
back-propagate its ``loss`` and step every optimizer and scheduler.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from ..images import InputSpec, normalize
from ..models.features import FeatureTap
from ..runtime import autocast
from .augment import augment_batch
from .objective import Batch, LoopObjective
from .optim import extra_optimizers, make_optimizer
from .schedule import lr_schedulers

if TYPE_CHECKING:
    from .loop import LoopConfig


class RankBatch(NamedTuple):
    """This rank's part of one step's global batch."""

    images: torch.Tensor  # uint8, on the host or the device
    labels: torch.Tensor
    offset: int  # where this rank's part starts in the global batch
    size: int  # the global batch's size


@dataclass
class TrainParts:
    """What a step runs: the trained model and objective (``train_*``: the same, under
    DistributedDataParallel when there are several ranks), the frozen teacher, the feature taps
    (the model's, the teacher's) when the objective asks for features, and the settings."""

    model: nn.Module
    train_model: nn.Module
    objective: LoopObjective
    train_objective: nn.Module
    teacher: nn.Module | None
    taps: tuple[FeatureTap, FeatureTap] | None
    spec: InputSpec
    cfg: LoopConfig
    device: torch.device


class Optimizers:
    """The model's optimizer (with the objective's ``student_params``) and one per extra group of
    the objective, each with its LambdaLR; stepped, saved and restored together."""

    def __init__(self, model: nn.Module, objective: LoopObjective, cfg: LoopConfig, total: int):
        params = [p for p in model.parameters() if p.requires_grad] + objective.student_params()
        self.all = [make_optimizer(cfg.optimizer, params, cfg.lr, momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay, nesterov=cfg.nesterov),
                    *extra_optimizers(objective)]
        self.cfg, self.total = cfg, total
        self.schedulers = lr_schedulers(self.all, cfg, total)

    def step(self, loss: torch.Tensor) -> None:
        for o in self.all:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in self.all:
            o.step()
        for s in self.schedulers:
            s.step()

    def state_dict(self) -> dict:
        return {"optimizer": self.all[0].state_dict(), "extra_optimizers": [o.state_dict() for o in self.all[1:]],
                "schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict, step: int) -> None:
        """Restore a checkpoint taken after ``step`` steps; one written before the schedulers were
        saved gets them placed at ``step``, over the base lrs of this run's optimizers."""
        bases = [s.base_lrs for s in self.schedulers]
        for o, o_state in zip(self.all, [state["optimizer"], *state.get("extra_optimizers", [])]):
            o.load_state_dict(o_state)
        if "schedulers" in state:
            for s, s_state in zip(self.schedulers, state["schedulers"]):
                s.load_state_dict(s_state)
            return
        for o, lrs in zip(self.all, bases):
            for g, lr in zip(o.param_groups, lrs):
                g["initial_lr"] = lr
        self.schedulers = lr_schedulers(self.all, self.cfg, self.total, step)


def train_step(parts: TrainParts, optimizers: Optimizers, batch: RankBatch,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One optimizer step on this rank's part of a batch; returns the objective's named losses.

    ``generator`` draws the whole global batch's augmentation (this rank takes its part's share)."""
    cfg, device, taps = parts.cfg, parts.device, parts.taps
    x = augment_batch(batch.images.to(device, non_blocking=True), cfg.augment, cfg.pad, generator,
                      offset=batch.offset, total=batch.size)
    x = normalize(x, parts.spec, device, cfg.channels_last)
    parts.model.train()
    y = batch.labels.to(device, non_blocking=True)
    with autocast(device, cfg.amp):
        t_logits = t_feat = None
        if parts.teacher is not None:
            with torch.no_grad():
                t_logits = parts.teacher(x).float()
            t_feat = taps[1].value if taps else None
            rows = parts.objective.rows(t_logits)
            if rows is not None:  # online selection: the model sees the chosen rows only
                x, y, t_logits = x[rows], y[rows], t_logits[rows]
                t_feat = t_feat[rows] if t_feat is not None else None
        outputs = parts.train_model(x).float()
    losses = parts.train_objective(Batch(outputs, y, t_logits, (taps[0].value, t_feat) if taps else None))
    optimizers.step(losses["loss"])
    return losses
