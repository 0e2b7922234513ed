"""The contract between the training loop and what it minimises.

:func:`dfkd.train.loop.run_loop` feeds every step's :class:`Batch` to a :class:`LoopObjective`
and back-propagates the ``"loss"`` it returns. Three objectives keep this contract: the
classifier's cross-entropy (``train``), the nnPU risk (``pu-train``) and a KD objective with
its extra terms (``distill``: :class:`dfkd.distill.terms.WithTerms`, which calls the KD
objective of ``dfkd/distill/objectives.py`` on the logits).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class Batch:
    """One training step's tensors, on the training device, float32 where floating."""

    outputs: Tensor  # the trained model's outputs on the augmented batch: class logits, or PU scores g(x)
    labels: Tensor  # LongTensor; −1 where unknown
    teacher_logits: Tensor | None = None  # the frozen teacher's logits on the same batch (no gradient)
    features: tuple[Tensor, Tensor] | None = None  # penultimate features (model's, teacher's), if asked for


class LoopObjective(nn.Module, abc.ABC):
    """What the loop minimises. ``forward(batch)`` returns named 0-d float tensors, the same
    names on every step: ``"loss"`` is back-propagated, the others are logged.

    Declared, not probed: ``needs_features`` makes the loop tap the penultimate features of the
    model and of the (first) teacher; :meth:`rows` picks the rows the model is trained on;
    :meth:`student_params` are trained by the model's
    optimizer and schedule; :meth:`extra_param_groups` get optimizers of their own
    (``{"name", "params", "lr", "optimizer"}``, the optimizer named as in
    :data:`dfkd.train.optim.OPTIMIZERS`), stepped with the model's and scaled by its schedule.
    The objective's ``state_dict()`` is checkpointed, so its parameters and any generator
    state survive a resume."""

    needs_features: bool = False

    @abc.abstractmethod
    def forward(self, batch: Batch) -> dict[str, Tensor]:
        ...

    def rows(self, teacher_logits: Tensor) -> Tensor | None:
        """The rows of the batch to train on, chosen from the teacher's logits before the model
        runs (online selection); None: all of them. The model sees only these rows."""
        return None

    def student_params(self) -> list[nn.Parameter]:
        return []

    def extra_param_groups(self) -> list[dict]:
        return []

    def describe(self) -> str:
        """One line saying what is minimised, for the run log."""
        return type(self).__name__
