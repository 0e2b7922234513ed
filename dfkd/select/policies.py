"""Selection policies: which scored images to keep, best (smallest score) first.

Contract: a :class:`Policy` is called as ``policy(scores[N], labels[N], num, num_classes) ->
indices`` — unique, at most ``num``, ordered best first, deterministic (ties broken by pool
order). Its ``prune`` (same arguments, returns a mask) keeps every row the policy could still
choose when more rows arrive, and at most a few times ``num`` rows, so :class:`StreamingChoice`
selects from a pool of any size in bounded memory with exactly the in-memory result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..registry import Registry

POLICIES = Registry("selection policy")

Choose = Callable[[np.ndarray, np.ndarray, int, int], np.ndarray]


@dataclass(frozen=True)
class Policy:
    choose: Choose
    prune: Callable[[np.ndarray, np.ndarray, int, int], np.ndarray]

    def __call__(self, scores: np.ndarray, labels: np.ndarray, num: int, num_classes: int) -> np.ndarray:
        return self.choose(scores, labels, num, num_classes)


def policy(key: str, paper: str, prune: Callable) -> Callable[[Choose], Choose]:
    """Register ``choose`` with its ``prune`` under ``key``."""
    def add(choose: Choose) -> Choose:
        POLICIES.register(Policy(choose, prune), key=key, paper=paper,
                          summary=choose.__doc__.strip().splitlines()[0])
        return choose
    return add


def top_mask(scores: np.ndarray, num: int) -> np.ndarray:
    """The ``num`` best rows (smallest score; ties to the earlier row)."""
    mask = np.zeros(len(scores), dtype=bool)
    mask[rank(scores)[:num]] = True
    return mask


def class_top_mask(scores: np.ndarray, labels: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """The ``quota[c]`` best rows of each class ``c``."""
    order = rank(scores)
    by_class = order[np.argsort(labels[order], kind="stable")]
    sorted_labels = labels[by_class]
    within = np.arange(len(by_class)) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    mask = np.zeros(len(scores), dtype=bool)
    mask[by_class[within < quota[sorted_labels]]] = True
    return mask


def quotas(num: int, num_classes: int) -> np.ndarray:
    quota = np.full(num_classes, num // num_classes)
    quota[: num % num_classes] += 1
    return quota


def _prune_per_class(scores: np.ndarray, labels: np.ndarray, num: int, num_classes: int) -> np.ndarray:
    # each class's quota, plus the global top num from which any shortfall is filled
    return class_top_mask(scores, labels, quotas(num, num_classes)) | top_mask(scores, num)


class StreamingChoice:
    """Feed scored rows in pool order, chunk by chunk; keeps only what ``policy.prune`` keeps.

    ``num=None`` keeps (and returns) every row fed, best first.
    """

    CHUNK = 1 << 16

    def __init__(self, policy: Policy, num: int | None, num_classes: int):
        self.policy, self.num, self.num_classes = policy, num, num_classes
        self.scores, self.labels = np.zeros(0), np.zeros(0, dtype=np.int64)
        self.payload: list = []
        self._buf: list[tuple[float, int, object]] = []

    def push(self, score: float, label: int, payload: object) -> None:
        """One row (in pool order); rows are pruned a chunk at a time."""
        self._buf.append((score, label, payload))
        if len(self._buf) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        buf, self._buf = self._buf, []
        scores = np.concatenate([self.scores, np.array([b[0] for b in buf], dtype=np.float64)])
        labels = np.concatenate([self.labels, np.array([b[1] for b in buf], dtype=np.int64)])
        payload = self.payload + [b[2] for b in buf]
        if self.num is not None:
            keep = np.flatnonzero(self.policy.prune(scores, labels, self.num, self.num_classes))
            scores, labels, payload = scores[keep], labels[keep], [payload[i] for i in keep]
        self.scores, self.labels, self.payload = scores, labels, payload

    def result(self) -> list:
        """The chosen rows' payloads, best first."""
        self._flush()
        num = len(self.scores) if self.num is None else min(self.num, len(self.scores))
        return [self.payload[i] for i in self.policy(self.scores, self.labels, num, self.num_classes)]


def rank(scores: np.ndarray) -> np.ndarray:
    """Indices by ascending score; equal scores keep pool order."""
    return np.argsort(scores, kind="stable")


@policy(key="global", paper="Chen et al., CVPR 2021, Sec. 3.2 (top-k of the noise value)",
        prune=lambda scores, labels, num, num_classes: top_mask(scores, num))
def global_top_k(scores: np.ndarray, labels: np.ndarray, num: int, num_classes: int) -> np.ndarray:
    """The paper's global top-k: the ``num`` smallest scores over the whole pool."""
    return rank(scores)[:num]


@policy(key="per-class", paper="class-balanced top-k (dfkd default; global top-k collapses on OOD-heavy pools)",
        prune=_prune_per_class)
def per_class_top_k(scores: np.ndarray, labels: np.ndarray, num: int, num_classes: int) -> np.ndarray:
    """Balanced top-k: num/K best per predicted class; shortfalls go to the global ranking."""
    order = rank(scores)
    taken = class_top_mask(scores, labels, quotas(num, num_classes))
    short = num - int(taken.sum())
    if short > 0:
        taken[order[~taken[order]][:short]] = True
    return order[taken[order]]
