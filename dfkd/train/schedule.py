"""The learning-rate schedule of the training loop, as ``torch.optim.lr_scheduler`` objects.

``cosine``, ``multistep`` (milestones are fractions of the run) or ``constant`` over the run's
steps. One :class:`~torch.optim.lr_scheduler.LambdaLR` per optimizer (the model's and each of
the objective's own, whose base lrs differ) scales its optimizer's base lr by the same factor;
it is stepped after every optimizer step, so a checkpoint holds the next step's lrs.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from .loop import LoopConfig


def lr_factor(cfg: LoopConfig, step: int, total: int) -> float:
    """The schedule's factor at ``step`` of a run of ``total`` steps (1 at the start)."""
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / max(1, total)))
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(step >= m * total for m in cfg.milestones)
    return 1.0


def model_lr(cfg: LoopConfig, step: int, total: int) -> float:
    """The model's learning rate at ``step``: what ``metrics.jsonl`` records as ``lr``."""
    return cfg.lr * lr_factor(cfg, step, total)


def lr_schedulers(optimizers: list[torch.optim.Optimizer], cfg: LoopConfig, total: int,
                  step: int = 0) -> list[LambdaLR]:
    """One LambdaLR per optimizer, placed at ``step`` (the next step to train).

    Each scales its base lr by ``model_lr / cfg.lr`` rather than by :func:`lr_factor` itself:
    the two differ in the last bit at some steps, and the ratio is how the loop has always
    scaled its optimizers, so weights stay bit-identical. A ``step`` above 0 is a resume from a
    checkpoint without scheduler state: every param group must then hold its ``initial_lr``."""
    def factor(s: int) -> float:
        return model_lr(cfg, s, total) / cfg.lr

    return [LambdaLR(o, factor, last_epoch=step - 1) for o in optimizers]
