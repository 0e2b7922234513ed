"""The loop's checkpoints: ``out/checkpoints/last.pt`` and ``best.pt``.

A checkpoint holds the model's and the objective's weights, the optimizers and their lr
schedulers, the step, the best validation record and the config. Rank 0 alone writes one,
atomically; on a resume every rank reads ``last.pt``.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..io import atomic_write
from .objective import LoopObjective
from .steps import Optimizers

if TYPE_CHECKING:
    from .loop import LoopConfig


class Checkpoints:
    """Save and restore the training state of one run (``folder`` is ``out/checkpoints``)."""

    def __init__(self, folder: Path, model: nn.Module, objective: LoopObjective, optimizers: Optimizers,
                 cfg: LoopConfig, main: bool):
        self.folder, self.model, self.objective, self.optimizers = folder, model, objective, optimizers
        self.cfg, self.main = cfg, main

    def restore(self) -> tuple[int, dict | None]:
        """Load ``last.pt`` when there is one; returns (the step it was taken at, the best record)."""
        path = self.folder / "last.pt"
        if not path.is_file():
            return 0, None
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"])
        self.optimizers.load_state_dict(state, state["step"])
        return state["step"], state.get("best")

    def save(self, name: str, step: int, best: dict | None) -> None:
        """Write ``name`` (``last.pt`` or ``best.pt``) on rank 0; the other ranks do nothing."""
        if not self.main:
            return
        state = {"model": self.model.state_dict(), "objective": self.objective.state_dict(),
                 **self.optimizers.state_dict(), "step": step, "best": best, "config": asdict(self.cfg)}
        atomic_write(self.folder / name, lambda f: torch.save(state, f), "wb")
