"""Mixture proportion estimation: Best Bin Estimation (BBE; Garg et al., "Mixture Proportion
Estimation and PU Learning: A Modern Approach", NeurIPS 2021, Alg. 1).

A mixture sample (the pool) draws a share alpha from a component (the original data) whose sample
is known, and the rest from anything else. Order both samples by a score for which the component
ranks high (the teacher's low noise value, a P-vs-U classifier's output) and look at the top
bins: q_c(t) and q_m(t), the shares of the component's and of the mixture's sample scoring at
least as well as t. Then q_m(t) >= alpha · q_c(t) for every t, with equality where nothing else
scores that well, so alpha = min_t q_m(t) / q_c(t). BBE takes the t minimising that ratio plus
its concentration term (1 + gamma) · eps / q_c(t), eps = sqrt(log(4/delta) / 2 n_c) +
sqrt(log(4/delta) / 2 n_m) (the paper's Eq. 5 with its code's delta = 0.1, gamma = 0.01), and
returns the plain ratio there. Identifiable only if some images of the component score better
than all of the rest (the paper's "top bin" assumption); foreign images that score as well make
the estimate too high, never too low.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DELTA, GAMMA = 0.1, 0.01


@dataclass(frozen=True)
class MixtureShare:
    """The estimated share ``alpha`` of the mixture drawn from the component, ``low``..``high``
    alpha -/+ the concentration term at the chosen bin, that bin's index and its ``component_share`` q_c."""

    alpha: float
    low: float
    high: float
    bin: int
    component_share: float


def best_bin_estimate(q_component: np.ndarray, q_mixture: np.ndarray, n_component: int,
                      n_mixture: int) -> MixtureShare:
    """BBE (Garg et al. 2021, Alg. 1): alpha = q_m(t*) / q_c(t*), t* = argmin_t q_m(t)/q_c(t) + (1+γ)·eps/q_c(t)."""
    q_c, q_m = np.asarray(q_component, dtype=np.float64), np.asarray(q_mixture, dtype=np.float64)
    usable = q_c > 0
    if not usable.any() or n_component < 1 or n_mixture < 1:
        raise ValueError("best_bin_estimate needs a non-empty bin of both samples")
    eps = math.sqrt(math.log(4 / DELTA) / (2 * n_component)) + math.sqrt(math.log(4 / DELTA) / (2 * n_mixture))
    ratio = np.where(usable, q_m / np.where(usable, q_c, 1), np.inf)
    width = np.where(usable, eps / np.where(usable, q_c, 1), np.inf)
    best = int(np.argmin(ratio + (1 + GAMMA) * width))
    alpha = float(min(1.0, ratio[best]))
    half = float(width[best])
    return MixtureShare(alpha, max(0.0, alpha - half), min(1.0, alpha + half), best, float(q_c[best]))


def top_bins(component: np.ndarray, mixture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q_c, q_m) at every threshold t among the component's scores (higher = more like the
    component): the shares of each sample scoring at least t."""
    c, m = np.sort(np.asarray(component, dtype=np.float64)), np.sort(np.asarray(mixture, dtype=np.float64))
    t = np.unique(c)
    return ((len(c) - np.searchsorted(c, t, side="left")) / len(c),
            (len(m) - np.searchsorted(m, t, side="left")) / len(m))
