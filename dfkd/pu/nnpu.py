"""Non-negative PU risk (Kiryo et al., NeurIPS 2017) with the sigmoid loss, as PU Compression uses it.

Scores g(x) are real numbers, positive meaning "looks like the original data". With the sigmoid
loss l(z) = sigmoid(-z), the unbiased PU risk splits into

    R_p+ = pi * mean_P l(g)         positives classified as positive
    R_p- = pi * mean_P l(-g)        positives classified as negative
    R_n  = mean_U l(-g) - R_p-      negatives, estimated from the unlabeled pool

and the nnPU risk is R_p+ + max(0, R_n).

What is logged against the official PU Compression code (``PULoss`` in its loss.py). Both step
alike: when R_n < -beta the step ascends on R_n (back-propagates -gamma·R_n), else it descends on
R_p+ + R_n. They log different values. ``risk`` here is always the nnPU risk of Kiryo et al.
eq. 6, R_p+ + max(0, R_n). The official forward returns (and its loop logs) R_p+ - beta when
clipped and R_p+ + R_n otherwise. The official code fixes beta = 0 and gamma = 1, and at beta = 0
the two values are equal. With beta > 0 they differ whenever R_n < 0: clipped, the official
value is R_p+ - beta against R_p+ here; with -beta <= R_n < 0, it is R_p+ + R_n against R_p+
here. The official value is the lower one, by at most beta. dfkd logs eq. 6 because that is
the quantity the paper defines. ``objective`` is what is stepped on, and ``negative_risk`` is the
signed R_n, so the official number is ``positive_risk - beta`` if ``clipped`` else
``positive_risk + negative_risk``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DfkdError


@dataclass(frozen=True)
class NnpuRisk:
    """The pieces of one nnPU step: what to back-propagate and what to log."""

    objective: Tensor       # back-propagate this: -gamma*R_n if clipped, else R_p+ + R_n
    risk: Tensor            # nnPU risk R_p+ + max(0, R_n) (Kiryo et al. eq. 6), detached, for logging
    positive_risk: Tensor   # R_p+ = pi * mean_P sigmoid(-g)
    negative_risk: Tensor   # R_n = mean_U sigmoid(g) - pi * mean_P sigmoid(g); may be negative
    clipped: bool           # True when R_n < -beta and the step ascends on R_n instead


def nnpu_risk(g_pos: Tensor, g_unl: Tensor, prior: float, beta: float = 0.0,
              gamma: float = 1.0) -> NnpuRisk:
    """Non-negative PU risk with sigmoid loss and Kiryo et al.'s Algorithm 1 step rule (beta, gamma)."""
    if not 0.0 < prior < 1.0:
        raise DfkdError(f"--prior must be strictly between 0 and 1: the fraction of the unlabeled "
                        f"pool that is positive (got {prior})")
    if not beta >= 0.0:
        raise DfkdError(f"nnPU beta must be >= 0 (got {beta})")
    if not gamma > 0.0:
        raise DfkdError(f"nnPU gamma must be > 0 (got {gamma})")
    dtype = torch.promote_types(torch.promote_types(g_pos.dtype, g_unl.dtype), torch.float32)
    g_pos, g_unl = g_pos.reshape(-1).to(dtype), g_unl.reshape(-1).to(dtype)  # half -> float32
    if g_pos.numel() == 0 or g_unl.numel() == 0:
        raise DfkdError("nnPU risk needs at least one positive and one unlabeled score per batch "
                        f"(got {g_pos.numel()} positive, {g_unl.numel()} unlabeled)")
    positive_risk = prior * torch.sigmoid(-g_pos).mean()
    negative_risk = torch.sigmoid(g_unl).mean() - prior * torch.sigmoid(g_pos).mean()
    clipped = bool(negative_risk.detach() < -beta)
    objective = -gamma * negative_risk if clipped else positive_risk + negative_risk
    risk = (positive_risk + negative_risk.clamp(min=0.0)).detach()
    return NnpuRisk(objective, risk, positive_risk, negative_risk, clipped)
