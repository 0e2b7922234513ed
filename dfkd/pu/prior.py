"""``pu-train --prior auto``: the share of the pool that is like the positives, from the data.

A positive-vs-unlabeled ("non-traditional", Elkan & Noto 2008) classifier is a logistic regression
on the PU model's pooled multi-scale features before training (the teacher's weights). It is
cross-fitted in FOLDS folds, so every positive and every pool image is scored by a fit that never
saw it, and the pool's share drawn from the positives' distribution is read from those scores by
Best Bin Estimation (Garg et al., NeurIPS 2021; dfkd/mixture.py); the estimate is the mean over
SPLITS different fold splits (one split's estimate has a standard deviation of up to 0.013 over
splits on the demo pools). Not identifiable, and refused,
when there are too few positives, or when no pool image scores like them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import DfkdError
from ..mixture import best_bin_estimate, top_bins

FOLDS = 5
SPLITS = 5  # fold splits, their estimates averaged (pipelines/prior_study.py: a lower error on all 3 demo pools)
MIN_POSITIVES = 10
L2 = 0.1  # ridge penalty (standardised features; 1e-3 overfitted the few positives: test_estimate.py)
FLAG = "--prior auto"


@dataclass(frozen=True)
class PriorEstimate:
    """The estimated prior, its range (BBE's concentration term) and how it was reached."""

    prior: float
    low: float
    high: float
    positives: int
    unlabeled: int
    method: str = "best bin estimation on cross-fitted positive-vs-unlabeled logistic scores, mean of 5 fold splits"

    def to_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def estimate_prior(positive: torch.Tensor, unlabeled: torch.Tensor, seed: int = 0) -> PriorEstimate:
    """The class prior of the pool from features of positives (P×D) and of the pool (U×D): BBE
    (Garg et al. 2021, Alg. 1) on the scores of cross-fitted P-vs-U logistic regressions."""
    n_p, n_u = len(positive), len(unlabeled)
    if n_p < MIN_POSITIVES:
        raise DfkdError(f"{FLAG}: needs at least {MIN_POSITIVES} positives to estimate the prior from (got {n_p});"
                        " give --prior P")
    if n_u < FOLDS:
        raise DfkdError(f"{FLAG}: needs at least {FOLDS} pool images (got {n_u}); give --prior P")
    fits = [best_bin_estimate(*top_bins(*crossfit_scores(positive, unlabeled, seed + i)), n_p, n_u)
            for i in range(SPLITS)]
    alpha, low, high = (float(np.mean([getattr(e, k) for e in fits])) for k in ("alpha", "low", "high"))
    if alpha * n_u < 1:
        raise DfkdError(f"{FLAG}: no pool image looks like the positives (estimated prior {alpha:.3g}),"
                        " so the prior is not identifiable; check --positive and --unlabeled")
    if alpha >= 0.99:
        raise DfkdError(f"{FLAG}: the pool looks like the positives throughout (estimated prior {alpha:.3g});"
                        " nnPU needs some pool images unlike them; give --prior P")
    return PriorEstimate(alpha, low, high, n_p, n_u)


def crossfit_scores(positive: torch.Tensor, unlabeled: torch.Tensor, seed: int = 0,
                    l2: float = L2) -> tuple[np.ndarray, np.ndarray]:
    """Held-out P-vs-U logistic scores (logits, classes weighted equally) of the positives and of
    the pool: each from the fit of the FOLDS - 1 folds it is not in."""
    n_p, n_u = len(positive), len(unlabeled)
    g = torch.Generator().manual_seed(seed)
    fold_p, fold_u = torch.randperm(n_p, generator=g) % FOLDS, torch.randperm(n_u, generator=g) % FOLDS
    x = torch.cat([positive, unlabeled]).double()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    s = torch.cat([torch.ones(n_p), torch.zeros(n_u)]).double()
    fold = torch.cat([fold_p, fold_u])
    score = torch.empty(n_p + n_u, dtype=torch.float64)
    for k in range(FOLDS):
        fit = fold != k
        w = logistic_regression(x[fit], s[fit], l2=l2)
        score[~fit] = x[~fit] @ w[:-1] + w[-1]
    return score[:n_p].numpy(), score[n_p:].numpy()


def logistic_regression(x: torch.Tensor, s: torch.Tensor, iterations: int = 100, l2: float = L2) -> torch.Tensor:
    """Weights (D+1, bias last) of an L2-regularised logistic regression of ``s`` on ``x``, the two
    classes weighted equally (positives are few), fitted by L-BFGS."""
    w = torch.zeros(x.shape[1] + 1, dtype=x.dtype, requires_grad=True)
    weight = torch.where(s > 0, 0.5 / s.sum(), 0.5 / (1 - s).sum())
    opt = torch.optim.LBFGS([w], max_iter=iterations, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        z = x @ w[:-1] + w[-1]
        value = (weight * torch.nn.functional.binary_cross_entropy_with_logits(z, s, reduction="none")).sum() \
            + l2 * (w[:-1] ** 2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    return w.detach()
