"""Terms added to any KD objective: MLKD's feature alignment and correlation, MEAL V2's
discriminator; and online selection. ``WithTerms`` wraps an objective and adds the weighted
terms to its loss.

* align (MLKD, Eq. 3): ‖ĥ(f_S) − f̂_T‖² averaged over the batch, ĥ = L2-normalised h(f_S),
  h a two-layer MLP (its hidden width matters, says the paper), f̂_T the normalised teacher
  feature.
* correlation (MLKD, Eq. 5): A_ij = softmax_j(cos(f_i, f_j)/τ) for each network (student side
  through h); KL(A_T rows ‖ A_S rows), averaged over the rows.
* discriminator (MEAL V2, Sec. 3.3): a 3-layer MLP D on the softmax vectors learns teacher = 1,
  student = 0 (its own Adam); the student adds BCE(D(p_S), 1) to fool it.
* online selection (DFND's selection done per batch, as MMRazor's DFND implementation does):
  with ``online.keep`` = f < 1, :meth:`WithTerms.rows` gives the loop ⌈f·B⌉ images of the
  batch, chosen by their teacher noise value V(x) (the ``noise`` scorer of ``dfkd select``) with
  ``online.policy``: ``per-class`` (the default: the predicted classes of the batch take turns,
  each giving its lowest V, then its second lowest, ...; the global rule collapses onto a few
  classes, README Results) or ``global`` (the paper's and MMRazor's: the lowest V of the batch).
  Turns rather than ``select``'s quota of ⌈f·B⌉/K per class, because a batch may keep fewer
  rows than there are classes: a quota would then go to the classes of lowest index. Only the
  kept rows go through the student and into the losses; the others cost a teacher forward. A
  whole pool can then be distilled on, filtered batch by batch. Under torchrun each rank chooses
  from its own part of the batch (as MMRazor does on each GPU).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import DfkdError
from ..select.scores import noise_value
from ..train.objective import Batch, LoopObjective
from .objectives import Objective


def align_loss(student_proj: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the squared distance of the L2-normalised vectors (= 2 − 2·cos)."""
    a, b = F.normalize(student_proj.float(), dim=1), F.normalize(teacher_feat.float(), dim=1)
    return (a - b).pow(2).sum(1).mean()


def relation_matrix(feat: torch.Tensor, tau: float) -> torch.Tensor:
    """A_ij = softmax_j(cos(f_i, f_j) / τ), as log-probabilities (N×N)."""
    f = F.normalize(feat.float(), dim=1)
    return F.log_softmax(f @ f.t() / tau, dim=1)


def correlation_loss(student_proj: torch.Tensor, teacher_feat: torch.Tensor, tau: float) -> torch.Tensor:
    """KL(A_T ‖ A_S) per row, averaged over the rows of the batch."""
    log_t, log_s = relation_matrix(teacher_feat, tau), relation_matrix(student_proj, tau)
    return (log_t.exp() * (log_t - log_s)).sum(1).mean()


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def discriminator_losses(disc: nn.Module, student_logits: torch.Tensor,
                         teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D's own loss, the student's fooling loss). D's loss reaches D only; the fooling loss
    reaches the student only (D's parameters are read detached)."""
    p_s, p_t = F.softmax(student_logits.float(), 1), F.softmax(teacher_logits.float().detach(), 1)
    real, fake = disc(p_t), disc(p_s.detach())
    d_loss = F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + \
        F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    frozen = {k: v.detach() for k, v in disc.named_parameters()}
    fool = functional_call(disc, frozen, (p_s,))
    return d_loss, F.binary_cross_entropy_with_logits(fool, torch.ones_like(fool))


TERM_DEFAULTS = {
    "align": {"weight": 0.0, "hidden": 256},
    "correlation": {"weight": 0.0, "tau": 0.5},
    "discriminator": {"weight": 0.0, "hidden": 256, "lr": 1e-4},
    "online": {"keep": 1.0, "policy": "per-class"},
}
ONLINE_POLICIES = ("per-class", "global")


def online_keep(teacher_logits: torch.Tensor, keep: float, policy: str) -> torch.Tensor:
    """Positions of the ⌈keep·B⌉ images kept by ``policy`` (:data:`ONLINE_POLICIES`), lowest
    noise value first (ties: the earlier image). On the logits' device, without a sync."""
    logits = teacher_logits.float().detach()
    n = max(1, math.ceil(keep * len(logits)))
    best = torch.sort(noise_value(logits), stable=True).indices  # positions, best first
    if policy == "global":
        return best[:n]
    # per-class: each row's turn is its rank among the rows of its predicted class
    label = logits.argmax(1)[best]
    by_class = torch.sort(label, stable=True).indices  # best first within each class
    grouped = label[by_class]
    turn = torch.empty_like(by_class)
    turn[by_class] = torch.arange(len(label), device=label.device) - torch.searchsorted(grouped, grouped)
    taken = torch.sort(turn, stable=True).indices[:n]  # turn by turn, best first within a turn
    return best[torch.sort(taken).values]


def check_terms(terms: dict | None) -> dict:
    """The terms with their defaults, checked (a bad value: DfkdError naming its --set key)."""
    terms = {k: {**v, **(terms or {}).get(k, {})} for k, v in TERM_DEFAULTS.items()}
    keep, policy = terms["online"]["keep"], terms["online"]["policy"]
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise DfkdError(f"--set online.keep={keep!r}: must be in (0, 1] (the share of every batch trained on)")
    if policy not in ONLINE_POLICIES:
        raise DfkdError(f"--set online.policy={policy!r}: must be one of {', '.join(ONLINE_POLICIES)}")
    return terms


class WithTerms(LoopObjective):
    """What ``distill`` minimises: the KD objective ``base`` (the contract of ``objectives.py``) on
    the batch's logits, plus the enabled terms; needs features when align/correlation are on.
    ``terms`` is shaped as :data:`TERM_DEFAULTS` (all weights 0: the KD objective alone)."""

    def __init__(self, base: Objective, num_classes: int, terms: dict | None = None, student_dim: int | None = None,
                 teacher_dim: int | None = None):
        super().__init__()
        terms = check_terms(terms)
        self.base, self.terms = base, terms
        self.needs_features = terms["align"]["weight"] > 0 or terms["correlation"]["weight"] > 0
        self.h = mlp([student_dim, int(terms["align"]["hidden"]), teacher_dim]) if self.needs_features else None
        d = terms["discriminator"]
        self.disc = mlp([num_classes, int(d["hidden"]), int(d["hidden"]), 1]) if d["weight"] > 0 else None

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        s_logits, t_logits, labels, features = batch.outputs, batch.teacher_logits, batch.labels, batch.features
        out = dict(self.base(s_logits, t_logits, labels))
        loss = out["loss"]
        if self.h is not None:
            s_feat, t_feat = features
            proj, t_feat = self.h(s_feat.float()), t_feat.float().detach()
            for name, fn in (("align", lambda: align_loss(proj, t_feat)),
                             ("correlation", lambda: correlation_loss(proj, t_feat, self.terms["correlation"]["tau"]))):
                if self.terms[name]["weight"] > 0:
                    out[name] = fn()
                    loss = loss + self.terms[name]["weight"] * out[name]
        if self.disc is not None:
            out["disc"], out["fool"] = discriminator_losses(self.disc, s_logits, t_logits)
            loss = loss + self.terms["discriminator"]["weight"] * out["fool"] + out["disc"]
        out["loss"] = loss
        return out

    def rows(self, teacher_logits: torch.Tensor) -> torch.Tensor | None:
        """Online selection: the ⌈keep·B⌉ rows chosen by noise value (None: keep = 1)."""
        online = self.terms["online"]
        return online_keep(teacher_logits, online["keep"], online["policy"]) if online["keep"] < 1 else None

    def student_params(self) -> list[nn.Parameter]:
        """h trains with the student (same optimizer and schedule)."""
        return list(self.h.parameters()) if self.h is not None else []

    def extra_param_groups(self) -> list[dict]:
        groups = list(self.base.extra_param_groups())
        if self.disc is not None:
            groups.append({"name": "discriminator", "params": list(self.disc.parameters()),
                           "lr": float(self.terms["discriminator"]["lr"]), "optimizer": "adam"})
        return groups

    def describe(self) -> str:
        on = [f"{k} ×{v['weight']:g}" for k, v in self.terms.items() if v.get("weight", 0) > 0]
        keep, policy = self.terms["online"]["keep"], self.terms["online"]["policy"]
        rule = "per predicted class" if policy == "per-class" else "over the batch"
        online = (f"; on the {keep:.0%} of each batch with the lowest noise value {rule} (online selection)"
                  if keep < 1 else "")
        return self.base.describe() + (f"; plus {', '.join(on)}" if on else "") + online
