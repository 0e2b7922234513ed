"""Selection policies: which scored images to keep, best (smallest score) first.

Contract: a :class:`Policy` is called as ``policy(scores[N], labels[N], num, num_classes,
features=None) -> indices`` — unique, at most ``num``, ordered best first, deterministic (ties
broken by pool order). A policy that declares ``needs_features`` is given the teacher's
penultimate features of the rows (N×D) and must be; the others are not. Its ``prune`` (the
same arguments but the features, returns a mask) keeps every row the policy could still
choose when more rows arrive, and at most a few times ``num`` rows, so :class:`StreamingChoice`
selects from a pool of any size in bounded memory with exactly the in-memory result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..registry import Registry
from .dedup import kmeans

POLICIES = Registry("selection policy")

Choose = Callable[[np.ndarray, np.ndarray, int, int], np.ndarray]


@dataclass(frozen=True)
class Policy:
    choose: Choose
    prune: Callable[[np.ndarray, np.ndarray, int, int], np.ndarray]
    needs_features: bool = False

    def __call__(self, scores: np.ndarray, labels: np.ndarray, num: int, num_classes: int,
                 features: np.ndarray | None = None) -> np.ndarray:
        if not self.needs_features:
            return self.choose(scores, labels, num, num_classes)
        if features is None or len(features) != len(scores):
            raise ValueError("this policy needs the teacher's features of every row")
        return self.choose(scores, labels, num, num_classes, features)


def policy(key: str, paper: str, prune: Callable, needs_features: bool = False) -> Callable[[Choose], Choose]:
    """Register ``choose`` with its ``prune`` under ``key``."""
    def add(choose: Choose) -> Choose:
        POLICIES.register(Policy(choose, prune, needs_features), key=key, paper=paper,
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

    def candidates(self) -> list:
        """The payloads of the rows still in the running, in pool order: what a pass before
        :meth:`result` (duplicates, features) looks at."""
        self._flush()
        return self.payload

    def result(self, num: int | None = None, keep: np.ndarray | None = None,
               features: np.ndarray | None = None) -> list:
        """The chosen rows' payloads, best first. ``num``: fewer than the ``num`` pruned for
        (the rest was slack for rows ``keep`` leaves out: a mask over :meth:`candidates`);
        ``features``: the candidates' (kept or not), for a policy that needs them."""
        self._flush()
        rows = np.arange(len(self.scores)) if keep is None else np.flatnonzero(keep)
        if len(rows) == 0:
            return []
        num = self.num if num is None else num
        num = len(rows) if num is None else min(num, len(rows))
        feats = features[rows] if features is not None else None
        picked = self.policy(self.scores[rows], self.labels[rows], num, self.num_classes, feats)
        return [self.payload[i] for i in rows[picked]]


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


CLUSTERS = 8  # k-means clusters per class for the diverse policy (at most the class's quota)
SPREAD = 4  # the diverse policy chooses a class's quota among its SPREAD × quota best-scored rows


def _prune_diverse(scores: np.ndarray, labels: np.ndarray, num: int, num_classes: int) -> np.ndarray:
    return class_top_mask(scores, labels, SPREAD * quotas(num, num_classes)) | top_mask(scores, num)


def _within_cluster_rank(cluster: np.ndarray) -> np.ndarray:
    """For rows already in best-first order: each row's position among the rows of its cluster."""
    by_cluster = np.argsort(cluster, kind="stable")
    sorted_cluster = cluster[by_cluster]
    within = np.empty(len(cluster), dtype=np.int64)
    within[by_cluster] = np.arange(len(cluster)) - np.searchsorted(sorted_cluster, sorted_cluster, side="left")
    return within


@policy(key="diverse", paper="dfkd: per-class top-k spread over faiss k-means clusters of the teacher's features",
        prune=_prune_diverse, needs_features=True)
def diverse_top_k(scores: np.ndarray, labels: np.ndarray, num: int, num_classes: int,
                  features: np.ndarray) -> np.ndarray:
    """Per-class quota spread over k-means clusters of the teacher's features: each cluster's best in turn."""
    quota = quotas(num, num_classes)
    taken = np.zeros(len(scores), dtype=bool)
    for c in np.flatnonzero(quota):
        rows = np.flatnonzero(labels == c)
        rows = rows[rank(scores[rows])][:SPREAD * quota[c]]  # the class's best-scored rows, best first
        if len(rows) > quota[c]:
            cluster = kmeans(features[rows], min(CLUSTERS, int(quota[c])), seed=0)
            # round robin: every cluster's best (clusters in the order of their best), then every second best, ...
            rows = rows[np.lexsort((np.arange(len(rows)), _within_cluster_rank(cluster)))]
        taken[rows[:quota[c]]] = True
    order = rank(scores)
    short = num - int(taken.sum())
    if short > 0:  # as per-class: shortfalls go to the global ranking
        taken[order[~taken[order]][:short]] = True
    return order[taken[order]]
