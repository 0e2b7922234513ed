"""PU Compression's robust KD (Xu et al., NeurIPS 2019): KD under the worst of perturbed class weights.

Class weights w_k = K·(1/y_k)/Σ_j(1/y_j) come from the teacher's soft class counts y on the
training data (``info["class_counts"]``); each sample is weighted by w[ŷ], ŷ = argmax teacher
(the expanded data has no labels, so ``labels`` is unused). The candidates are w itself
(candidate 0) and M perturbed vectors; every batch back-propagates the largest weighted KD loss
Σ_i v[ŷ_i]·kl_i / N over the candidates v (ties go to the lowest index, as in the official loop).

The two perturbation modes:

* ``perturbation="reference"`` (M defaults to 1) is the official script's: M one-sided vectors
  w + eps·u, u ~ U[0,1)^K, drawn ONCE before training and kept fixed for the whole run (the
  official ``perturb()`` runs once, before ``train()``). Here they are drawn when the objective
  is built, from its own generator seeded by ``seed`` (the official draw is numpy's unseeded
  global RNG, so no two official runs share a vector), and kept in the objective's extra state:
  a resumed run loads the stored vectors, which are also what a fresh build with the same seed
  draws, so a run is identical whether or not it was resumed. Every weight only grows and KD
  terms are >= 0, so a perturbed vector always gives the larger loss: the "max" is trivial and
  the method is KD with fixed class weights w + eps·u.
* ``perturbation="box"`` (the default; M defaults to 8) is dfkd's: M signed vectors
  w + eps·U[-1,1)^K, clipped positive and renormalised to sum K, redrawn on EVERY batch from
  the same seeded generator (its state is part of the extra state, so a resumed run draws what
  an uninterrupted one would). The total weight is fixed, so the max genuinely chooses which
  classes to emphasise, as the robust objective intends.

Temperature: dfkd scales KD by T² (Hinton); the official helper (``kdloss`` in the PU code's
loss.py) scales by T. The two agree at T = 1, the official default and the reference recipe's
(``pipelines/configs/pu-reference.yaml``); at another T the official loss is dfkd's divided by T.

Named losses: ``loss`` (the worst-case weighted KD, back-propagated), ``kd`` (the unweighted
KD, for comparison with other objectives; no gradient), ``worst_index`` (which candidate was
the worst, as a float: 0 = w itself, 1..M = a perturbation; no gradient).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import DfkdError
from .losses import kd_loss, perturbed_weights, robust_class_weights, worst_case_kd
from .objectives import Objective, register, require


@register("robust", paper="Xu et al. Positive-Unlabeled Compression on the Cloud. NeurIPS 2019")
class RobustKD(Objective):
    """PU robust KD: class-weighted KD (w_k ∝ 1/y_k) under the worst of M perturbed weight vectors."""

    OPTIONS = {"temperature": (float, 1.0), "eps": (float, 0.1), "M": (int, None),
               "perturbation": (str, "box"), "seed": (int, 0)}

    @classmethod
    def check(cls, opts: dict, num_classes: int, info: dict) -> None:
        require(opts["temperature"] > 0, "temperature", opts["temperature"], "> 0")
        require(opts["eps"] >= 0, "eps", opts["eps"], ">= 0")
        require(opts["perturbation"] in ("box", "reference"), "perturbation", opts["perturbation"],
                "box or reference")
        if opts["M"] is None:
            opts["M"] = 8 if opts["perturbation"] == "box" else 1
        require(opts["M"] >= 1, "M", opts["M"], ">= 1")

    def __init__(self, num_classes: int, cfg: dict | None = None, info: dict | None = None):
        super().__init__(num_classes, cfg, info)
        o = self.opts
        counts = (info or {}).get("class_counts")
        if counts is None or len(counts) != self.num_classes:
            got = "none" if counts is None else f"{len(counts)} of them"
            raise DfkdError(f"objective 'robust' needs the teacher's soft class counts on the "
                            f"training data, one per class ({self.num_classes}); got {got}")
        try:
            w = robust_class_weights(torch.tensor([float(c) for c in counts]))
        except ValueError as e:
            raise DfkdError(f"objective 'robust': {e}") from None
        self.register_buffer("class_weights", w)
        self.generator = torch.Generator().manual_seed(o["seed"])
        # reference: the (M+1)×K candidates, drawn once here and fixed for the run (saved in the
        # extra state, not as a state_dict key, so checkpoints from before this change still load)
        fixed = (perturbed_weights(w, o["eps"], o["M"], "reference", self.generator)
                 if o["perturbation"] == "reference" else None)
        self.register_buffer("fixed_candidates", fixed, persistent=False)

    def candidates(self) -> Tensor:
        """This batch's candidate set, (M+1)×K, row 0 = w: the fixed reference set, or a new box draw."""
        if self.fixed_candidates is not None:
            return self.fixed_candidates
        o = self.opts
        return perturbed_weights(self.class_weights, o["eps"], o["M"], "box", self.generator)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                labels: Tensor | None = None) -> dict[str, Tensor]:
        s, t = student_logits.float(), teacher_logits.detach().float()
        loss, idx = worst_case_kd(s, t, self.opts["temperature"], self.candidates(), t.argmax(dim=1))
        with torch.no_grad():
            kd = kd_loss(s, t, self.opts["temperature"])
        return {"loss": loss, "kd": kd, "worst_index": idx.to(torch.float32)}

    def get_extra_state(self) -> Any:
        state = {"generator": self.generator.get_state()}
        if self.fixed_candidates is not None:
            state["reference_candidates"] = self.fixed_candidates.detach().cpu().clone()
        return state

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state["generator"].cpu())
        stored = state.get("reference_candidates")
        if self.fixed_candidates is not None and stored is not None:
            if stored.shape != self.fixed_candidates.shape:
                raise DfkdError(f"objective 'robust': the checkpoint's reference perturbations have "
                                f"shape {tuple(stored.shape)}, this run needs "
                                f"{tuple(self.fixed_candidates.shape)} (M+1 vectors of K classes)")
            self.fixed_candidates.copy_(stored)

    def describe(self) -> str:
        o = self.opts
        how = ("drawn once, fixed for the run" if o["perturbation"] == "reference"
               else "redrawn every batch")
        return (f"robust: KD T={o['temperature']:g} with class weights from teacher soft counts "
                f"({self.num_classes} classes), worst of w and {o['M']} {o['perturbation']} "
                f"perturbations {how} (eps={o['eps']:g}, seed {o['seed']})")
