"""The Mahalanobis distance of an image to the teacher's classes (Lee, Lee, Lee & Shin, "A Simple
Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS
2018, Eq. 2): one Gaussian per class over the penultimate features f(x), with a shared (tied)
covariance Σ, and M(x) = min_c (f(x) − μ_c)ᵀ Σ⁻¹ (f(x) − μ_c). Smaller = more like the labeled data.

What ``select --num-images auto`` compares a pool with (dfkd/select/estimate.py): the noise value
cannot tell the originals from foreign images the teacher is just as sure of (clip-art among
Fashion-MNIST: the README's Results), the features can. ``eval --write-card`` fits the Gaussians
on the labeled images' features, streaming (class sums and one D×D scatter), from every other
image; the rest (at most HELD_OUT, their features kept meanwhile) are held out, and their
distances' quantiles at LEVELS go to the card, beside the fit's file (``<card>.mahalanobis.npz``:
the class means and the whitening matrix W, Σ⁻¹ = W Wᵀ, float32). Σ is shrunk by SHRINK towards
its mean variance (a 2,048-d feature from a few thousand images is otherwise singular).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DfkdError
from ..io import atomic_write
from .estimate import noise_summary

SHRINK = 0.01
HELD_OUT = 4096  # held-out images at most (their features are kept until the fit is done)
MIN_FITTED = 2  # images per class, at least, for a mean the held-out images are measured against


class ClassGaussians:
    """The fitted class means (K×D) and whitening ``w`` (D×D); a class without images has NaN means."""

    def __init__(self, means: np.ndarray, w: np.ndarray):
        self.means, self.w = np.asarray(means), np.asarray(w)
        self._cache: dict = {}

    @property
    def dim(self) -> int:
        return self.w.shape[0]

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """M(x) of each row of ``features`` (N×D, any device), float64 on that device."""
        key = str(features.device)
        if key not in self._cache:
            w = torch.from_numpy(self.w).double().to(features.device)
            present = torch.from_numpy(np.isfinite(self.means).all(1)).to(features.device)
            m = torch.from_numpy(np.nan_to_num(self.means)).double().to(features.device) @ w
            self._cache[key] = (w, m, present)
        w, m, present = self._cache[key]
        if features.shape[1] != self.dim:
            raise DfkdError(f"the teacher's features have {features.shape[1]} dimensions, its Mahalanobis fit"
                            f" {self.dim}: write the card again (dfkd eval --write-card)")
        g = features.double() @ w
        d = (g * g).sum(1, keepdim=True) - 2 * g @ m.T + (m * m).sum(1)
        return d.masked_fill(~present, float("inf")).min(1).values.clamp_min(0)

    def save(self, path: Path) -> Path:
        return atomic_write(path, lambda f: np.savez(f, means=self.means.astype(np.float32),
                                                     w=self.w.astype(np.float32)), "wb")

    @classmethod
    def load(cls, path: Path, num_classes: int, source: str) -> "ClassGaussians":
        try:
            with np.load(path, allow_pickle=False) as z:
                means, w = z["means"], z["w"]
        except (OSError, ValueError, KeyError) as e:
            raise DfkdError(f"{source}: mahalanobis file {path} cannot be read ({e}); write the card again"
                            " (dfkd eval --write-card)") from None
        if means.ndim != 2 or means.shape[0] != num_classes or w.shape != (means.shape[1],) * 2 \
                or not np.isfinite(w).all():
            raise DfkdError(f"{source}: mahalanobis file {path} does not fit the card's {num_classes} classes;"
                            " write the card again (dfkd eval --write-card)")
        return cls(means, w)


class ReferenceFit:
    """Streams labeled features in row order: every other image (and every one after HELD_OUT
    are held out) goes into the class sums and scatter, the others are held out."""

    def __init__(self, num_classes: int):
        self.k, self.seen = num_classes, 0
        self.sums = self.outer = None
        self.counts = np.zeros(num_classes, dtype=np.int64)
        self.held: list[np.ndarray] = []

    def add(self, features: np.ndarray, labels: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        if self.sums is None:
            self.sums = np.zeros((self.k, features.shape[1]))
            self.outer = np.zeros((features.shape[1], features.shape[1]))
        position = self.seen + np.arange(len(labels))
        held = (position % 2 == 1) & (len(self.held) + np.cumsum(position % 2 == 1) <= HELD_OUT)
        self.seen += len(labels)
        self.held += [f.astype(np.float32) for f in features[held]]
        fit, y = features[~held], labels[~held]
        np.add.at(self.sums, y, fit)
        self.counts += np.bincount(y, minlength=self.k)
        self.outer += fit.T @ fit

    def finish(self) -> tuple[ClassGaussians, dict] | None:
        """The fit and the held-out distances' summary (``images``, ``fitted``, ``levels``,
        ``quantiles``); None with too few images (fewer than MIN_FITTED in every class, or none held out)."""
        usable = self.counts >= MIN_FITTED
        if self.sums is None or not usable.any() or not self.held:
            return None
        n, d = int(self.counts.sum()), self.sums.shape[1]
        means = np.where(usable[:, None], self.sums / np.maximum(self.counts, 1)[:, None], np.nan)
        scatter = self.outer - (self.sums.T / np.maximum(self.counts, 1)) @ self.sums  # Σ_i (f_i − μ_y)(f_i − μ_y)ᵀ
        cov = scatter / n
        cov = (1 - SHRINK) * cov + SHRINK * max(np.trace(cov) / d, 1e-12) * np.eye(d)
        w = np.linalg.cholesky(np.linalg.inv((cov + cov.T) / 2))
        fit = ClassGaussians(means, w)
        held = fit.distance(torch.from_numpy(np.stack(self.held))).numpy()
        return fit, {**noise_summary(held), "fitted": n}
