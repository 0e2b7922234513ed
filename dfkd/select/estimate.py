"""``select --num-images auto``: how many pool images the teacher treats as in-distribution.

Read from the pool's scored rows in one streaming pass (O(classes × bins) memory), per predicted
class and in all, by the first of three estimators the teacher card allows:

* ``mahalanobis`` — the card holds the quantiles, on held-out labeled images, of the Mahalanobis
  distance of the teacher's features to its classes (dfkd/select/mahalanobis.py; ``eval
  --write-card`` writes them and the fit for a teacher whose features can be read). The labeled
  images are the in-distribution component, known, and the pool's share drawn from it is a
  mixture proportion, estimated by Best Bin Estimation (dfkd/mixture.py) with the stored
  quantiles as the bins. A class's count is its pool images in the chosen bin over the bin's
  level (as if every class's distances were distributed as all classes' together). Range: the
  estimate -/+ BBE's concentration term.
* ``card`` — the same against the quantiles of the noise value V on the labeled images (the
  card's ``noise_values``): for an ONNX or TorchScript teacher, whose features cannot be read, or
  an ensemble. Foreign images the teacher is sure of score like the originals, so this is an
  upper bound (the README's Results).
* ``mixture`` — with neither: a two-component Gaussian mixture of log V over the pool (EM on a
  histogram; Dempster, Laird & Rubin 1977), the component of smaller mean taken as
  in-distribution; a class's count is the sum of its images' posteriors. Range: the images whose
  posterior is at least 0.9 .. at least 0.1.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import numpy as np

from ..errors import DfkdError
from ..mixture import best_bin_estimate

LEVELS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
FLOOR = 1e-30  # V below this (float32 underflows to 0 for very confident images) counts as this
BINS = 512  # histogram bins of log V for the mixture
CHUNK = 1 << 16
FLAG = "--num-images auto"


def noise_summary(values: np.ndarray) -> dict | None:
    """What ``eval --write-card`` stores as ``noise_values``: V's quantiles at LEVELS on labeled
    data (None without any)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return None
    return {"images": int(len(values)), "levels": list(LEVELS),
            "quantiles": [float(f"{x:.6g}") for x in np.quantile(values, LEVELS)]}


@dataclass(frozen=True)
class Measure:
    """What the pool's rows are compared by: its ``name`` in messages, the card ``key`` holding its
    quantiles on labeled data, and the ``method`` an estimate against them is reported as."""

    name: str
    key: str
    method: str


NOISE_VALUE = Measure("noise value", "noise_values", "card")
MAHALANOBIS = Measure("Mahalanobis distance", "mahalanobis", "mahalanobis")


@dataclass
class InDistribution:
    """The estimate: ``count`` pool images in-distribution (``low``..``high``) of ``scored``,
    ``class_counts`` per predicted class, by ``method`` (card or mixture)."""

    count: int
    low: int
    high: int
    scored: int
    method: str
    class_counts: list[int] = field(default_factory=list)
    detail: str = ""

    @property
    def share(self) -> float:
        return self.count / self.scored

    def to_dict(self) -> dict:
        return {**asdict(self), "share": round(self.share, 6)}


def estimate_in_distribution(rows: Iterable[tuple[int, float]], num_classes: int,
                             reference: dict | None = None, source: str = "the teacher card",
                             measure: Measure = NOISE_VALUE) -> InDistribution:
    """The in-distribution count of the pool's (predicted class, value) ``rows``: by BBE against
    ``reference`` (the quantiles of the same ``measure`` on labeled data: a card's ``noise_values``,
    or its ``mahalanobis`` with the rows' distances) when given, else by the two-component mixture
    of the noise values."""
    if reference is not None:
        _check_reference(reference, source, measure.key)
    n = np.zeros(num_classes, dtype=np.int64)
    below = np.zeros((num_classes, len(LEVELS)), dtype=np.int64)  # pool images with V <= each quantile
    hist = np.zeros((num_classes, BINS), dtype=np.int64)
    lo, hi = math.inf, -math.inf
    thresholds = np.asarray(reference["quantiles"], dtype=np.float64) if reference is not None else None
    for labels, values in _chunks(rows):
        if ((labels < 0) | (labels >= num_classes)).any():
            raise DfkdError(f"{FLAG}: a scored row's class is outside the teacher's {num_classes} classes")
        lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
        n += np.bincount(labels, minlength=num_classes)
        if thresholds is not None:
            np.add.at(below, labels, values[:, None] <= thresholds)
        else:
            np.add.at(hist, (labels, _bin(values, num_classes)), 1)
    total = int(n.sum())
    if total == 0:
        raise DfkdError(f"{FLAG}: the pool has no scored image to estimate from")
    if hi - lo <= 0:
        raise DfkdError(f"{FLAG}: every pool image has the same {measure.name} ({lo:.4g}), so nothing tells"
                        " in-distribution images from the others; give --num-images N")
    if thresholds is not None:
        return _by_card(n, below, reference, source, measure)
    if (hist.sum(0) > 0).sum() < 2:  # one histogram bin: EM has no second component to find
        raise DfkdError(f"{FLAG}: every pool image has nearly the same noise value ({lo:.4g}..{hi:.4g}), so nothing"
                        " tells in-distribution images from the others; give --num-images N")
    return _by_mixture(n, hist, num_classes)


def _chunks(rows: Iterable[tuple[int, float]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    buf: list[tuple[int, float]] = []
    for r in rows:
        buf.append(r)
        if len(buf) >= CHUNK:
            yield _arrays(buf)
            buf = []
    if buf:
        yield _arrays(buf)


def _arrays(buf: list[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    labels, values = zip(*buf)
    return np.asarray(labels, dtype=np.int64), np.maximum(np.asarray(values, dtype=np.float64), 0.0)


def _check_reference(ref: dict, source: str, key: str) -> None:
    ok = isinstance(ref, dict) and list(ref.get("levels") or []) == list(LEVELS) \
        and isinstance(ref.get("quantiles"), list) and len(ref["quantiles"]) == len(LEVELS) \
        and isinstance(ref.get("images"), int) and ref["images"] > 0
    if not ok:
        raise DfkdError(f"{source}: {key} is not what dfkd eval --write-card writes; write it again")


def _by_card(n: np.ndarray, below: np.ndarray, ref: dict, source: str, measure: Measure) -> InDistribution:
    total = int(n.sum())
    est = best_bin_estimate(np.array(LEVELS), below.sum(0) / total, int(ref["images"]), total)
    counts = np.minimum(np.round(below[:, est.bin] / est.component_share), n).astype(np.int64)
    count = int(counts.sum())  # = alpha · total, but for rounding
    return InDistribution(count, min(count, math.floor(est.low * total)), max(count, math.ceil(est.high * total)),
                          total, measure.method, counts.tolist(),
                          f"best bin estimation against the {measure.name}s of {ref['images']} labeled images in"
                          f" {source} (bin: the {est.component_share:g} quantile)")


def _edges(num_classes: int) -> tuple[float, float]:
    return math.log(FLOOR), math.log(math.log(max(num_classes, 2))) + 1e-3  # V <= log K


def _bin(values: np.ndarray, num_classes: int) -> np.ndarray:
    a, b = _edges(num_classes)
    x = np.log(np.maximum(values, FLOOR))
    return np.clip(((x - a) / (b - a) * BINS).astype(np.int64), 0, BINS - 1)


def _by_mixture(n: np.ndarray, hist: np.ndarray, num_classes: int) -> InDistribution:
    a, b = _edges(num_classes)
    centres = a + (np.arange(BINS) + 0.5) * (b - a) / BINS
    posterior = gaussian_mixture_posterior(centres, hist.sum(0))
    counts = [round(float(h @ posterior)) for h in hist]
    low = int(hist[:, posterior >= 0.9].sum())
    high = int(hist[:, posterior >= 0.1].sum())
    return InDistribution(sum(counts), low, high, int(n.sum()), "mixture", counts,
                          "two-component Gaussian mixture of log noise value over the pool")


def gaussian_mixture_posterior(x: np.ndarray, weight: np.ndarray, iterations: int = 500) -> np.ndarray:
    """EM for a two-component 1-d Gaussian mixture of points ``x`` with multiplicities ``weight``
    (Dempster et al. 1977); returns each point's posterior of the component with the smaller mean."""
    w = weight / weight.sum()
    order = np.argsort(x)
    cdf = np.cumsum(w[order])
    mu = np.array([x[order][np.searchsorted(cdf, 0.25)], x[order][np.searchsorted(cdf, 0.75)]], dtype=np.float64)
    spread = float(w @ (x - w @ x) ** 2)
    floor = (x[1] - x[0]) ** 2 if len(x) > 1 else 1e-6
    var = np.full(2, max(spread / 4, floor))
    pi = np.array([0.5, 0.5])
    for _ in range(iterations):
        dens = pi * np.exp(-0.5 * (x[:, None] - mu) ** 2 / var) / np.sqrt(2 * np.pi * var)
        resp = dens / np.maximum(dens.sum(1, keepdims=True), 1e-300)
        mass = w @ resp
        if (mass <= 1e-12).any():  # one component took everything: no second one to find
            break
        new_mu = (w[:, None] * resp * x[:, None]).sum(0) / mass
        var = np.maximum((w[:, None] * resp * (x[:, None] - new_mu) ** 2).sum(0) / mass, floor)
        done = np.abs(new_mu - mu).max() < 1e-9
        pi, mu = mass, new_mu
        if done:
            break
    return resp[:, int(np.argmin(mu))]
