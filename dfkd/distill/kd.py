"""Plain KD (Hinton et al. 2015), optionally plus cross-entropy on the labels that are known."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .losses import kd_loss
from .objectives import Objective, register, require


def labelled_ce(student_logits: Tensor, labels: Tensor | None) -> Tensor:
    """Cross-entropy averaged over the samples whose label is known (>= 0); 0 when none is."""
    if labels is None or not bool((labels >= 0).any()):
        return student_logits.new_zeros(())
    known = labels >= 0
    return F.cross_entropy(student_logits[known], labels[known])


@register("kd", paper="Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. 2015")
class KD(Objective):
    """Hinton KD: T²·KL(p_T ‖ p_S) at temperature T, plus ce_weight·CE on known labels."""

    OPTIONS = {"temperature": (float, 4.0), "ce_weight": (float, 0.0)}

    @classmethod
    def check(cls, opts: dict, num_classes: int, info: dict) -> None:
        require(opts["temperature"] > 0, "temperature", opts["temperature"], "> 0")
        require(opts["ce_weight"] >= 0, "ce_weight", opts["ce_weight"], ">= 0")

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                labels: Tensor | None = None) -> dict[str, Tensor]:
        s, t = student_logits.float(), teacher_logits.detach().float()
        kd = kd_loss(s, t, self.opts["temperature"])
        out = {"loss": kd, "kd": kd}
        if self.opts["ce_weight"] > 0:
            out["ce"] = labelled_ce(s, labels)
            out["loss"] = kd + self.opts["ce_weight"] * out["ce"]
        return out

    def describe(self) -> str:
        T, w = self.opts["temperature"], self.opts["ce_weight"]
        ce = f"+ {w:g}·CE on known labels" if w > 0 else "labels unused"
        return f"kd: Hinton KD at T={T:g}, {ce} ({self.num_classes} classes)"
