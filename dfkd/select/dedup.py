"""Duplicate removal and clustering for wild image pools.

Wild pools repeat pictures: crawls fetch one image many times, icon sets ship one picture at
several sizes. Selection keeps the best-scored images, so every copy of a well-scored picture
would be kept, spending the budget on one picture. Both functions below take the rows'
``order`` (best first, e.g. the order a selection policy ranks them in) and keep the first row
of each group of duplicates:

* :func:`exact_duplicates` — same content digest (e.g. SHA-256 of the file or of the decoded
  pixels): one pass with a hash table, O(N).
* :func:`near_duplicates` — the greedy "leader" rule of near-duplicate detection (as in
  SemDeDup, Abbas et al. 2023, and the dataset-deduplication recipes built on faiss): rows are
  visited best first and a row is dropped when its cosine similarity to a row already *kept*
  reaches ``threshold``. Any descriptor compared by cosine will do; :data:`NEAR_DUPLICATE_COSINE`
  is measured for small thumbnails (a classifier's features gather each class together and do
  not tell a copy from another picture of the class; bench/near_duplicates.py).

:func:`kmeans` clusters features (spherical k-means: on the unit sphere, by cosine) for policies
that spread a budget over clusters.

Both results use one convention: ``dup_of[i] == -1`` keeps row ``i``; otherwise ``dup_of[i]`` is
the kept row that ``i`` duplicates (always a kept row, earlier in ``order``).

faiss is imported only when needed (:func:`require_faiss`), so importing this module does not
need it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import DfkdError

# Cosine at and above which two 8×8 mean-centred thumbnails (what dfkd select compares, see
# dfkd.select.candidates.thumbnail) count as near-duplicates. Measured by bench/near_duplicates.py
# on the 19,500 demo images (data/demo/wild and data/demo/train), 2,000 of them copied 7 ways:
# at 0.995 it catches 99.0 % of 2× upscales, 98.7 % of JPEG-75 re-encodes, 95.4 % of 3/4-size and
# 80 % of half-size copies (1-2 px crops hardly ever: no threshold catches them without taking
# distinct pictures); greedy removal drops 6.5 % of the demo images, 1.8 % being visibly other
# pictures (mean pixel difference > 10/255). At 0.99 that is 15 % and 9.5 %; at 0.998, 4.0 % and
# 0.4 %, but only 47-92 % of resized copies. The teacher's penultimate features separate nothing:
# at every threshold they drop as large a share of the distinct images as they catch of copies
# (0.99: 51 % of copies, 63 % of the images), so they are not what this threshold is for.
NEAR_DUPLICATE_COSINE = 0.995

# Rows compared per step in near_duplicates: the B×B in-batch similarity matrix (B² floats) and
# faiss's query block; the result does not depend on it (up to float rounding).
BATCH = 2048


def require_faiss():
    """The ``faiss`` module; a DfkdError saying how to install it when it is missing."""
    try:
        import faiss
    except ImportError:
        raise DfkdError("duplicate detection needs faiss, which is not installed:"
                        " pip install faiss-cpu (or faiss-gpu on GPU machines)") from None
    return faiss


def _check_order(order: np.ndarray, n: int) -> np.ndarray:
    order = np.asarray(order, dtype=np.int64).reshape(-1)
    if len(order) != n or (n and not np.array_equal(np.sort(order), np.arange(n))):
        raise ValueError(f"order must be a permutation of the {n} rows")
    return order


def exact_duplicates(digests: Sequence[bytes], order: np.ndarray) -> np.ndarray:
    """``dup_of[N]`` (int64): -1 for the first row of each digest in ``order``, else that row.

    Rows are visited in ``order`` (best first); a row whose digest was already seen duplicates
    the row that first had it. O(N) time and memory.
    """
    order = _check_order(order, len(digests))
    dup_of = np.full(len(digests), -1, dtype=np.int64)
    first: dict[bytes, int] = {}
    for i in order.tolist():
        j = first.setdefault(digests[i], i)
        if j != i:
            dup_of[i] = j
    return dup_of


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Float32 rows scaled to unit L2 norm (an all-zero row stays zero: similarity 0 to all)."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be N×D, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1).astype(np.float32))


def _use_gpu(faiss, device: str) -> int | None:
    """The GPU number for a "cuda[:n]" device when this faiss build has GPUs; else None (CPU)."""
    device = str(device)
    if not device.startswith("cuda") or faiss.get_num_gpus() == 0:
        return None
    return int(device.partition(":")[2] or 0)


def near_duplicates(features: np.ndarray, order: np.ndarray, threshold: float = NEAR_DUPLICATE_COSINE,
                    *, device: str = "cpu") -> np.ndarray:
    """``dup_of[N]`` (int64) by greedy cosine near-duplicate removal in ``order``.

    Rows are visited in ``order`` (best first). A row is dropped when its cosine similarity to
    some already *kept* row is ``>= threshold``; ``dup_of`` is then the kept row it is most
    similar to. Otherwise the row is kept (-1). Only kept rows count: with A~B and B~C but not
    A~C, A is kept, B dropped as A's duplicate, and C kept. An all-zero row (no direction) has
    similarity 0 to every row.

    How: the kept rows live in a faiss ``IndexFlatIP`` of L2-normalised features (on the GPU
    for ``device="cuda[:n]"`` when faiss has GPU support, else on the CPU: the same rule and
    result up to float rounding). Rows go in batches of :data:`BATCH` in ``order``: one k=1
    search gives each row its most similar kept row from earlier batches; the batch's own
    similarity matrix settles, row by row, which earlier rows of the batch are kept; the kept
    ones are added to the index. Time O(N·K·D) for K kept rows (at worst N²·D, dense BLAS,
    exact); memory O(K·D + BATCH²) whatever the number of duplicate pairs.
    """
    faiss = require_faiss()
    x_all = np.asarray(features)
    if x_all.ndim != 2:
        raise ValueError(f"features must be N×D, got shape {x_all.shape}")
    n, d = x_all.shape
    order = _check_order(order, n)
    dup_of = np.full(n, -1, dtype=np.int64)
    index = faiss.IndexFlatIP(d)
    gpu = _use_gpu(faiss, device)
    if gpu is not None:
        resources = faiss.StandardGpuResources()  # must outlive the index
        index = faiss.index_cpu_to_gpu(resources, gpu, index)
    kept_rows = np.zeros(0, dtype=np.int64)  # index position -> row
    for start in range(0, n, BATCH):
        rows = order[start:start + BATCH]
        x = unit_rows(x_all[rows])
        # the most similar kept row of the earlier batches
        if index.ntotal:
            sim, pos = index.search(x, 1)
            prev_sim, prev_row = sim[:, 0], kept_rows[pos[:, 0]]
        else:
            prev_sim, prev_row = np.full(len(rows), -np.inf, dtype=np.float32), np.full(len(rows), -1)
        dup_of[rows] = np.where(prev_sim >= threshold, prev_row, -1)
        # rows of this batch near an earlier row of the batch: decided in order, against kept ones
        gram = x @ x.T
        close = np.tril(gram, -1) >= threshold
        for b in np.flatnonzero(close.any(axis=1)):
            near = np.flatnonzero(close[b, :b])
            near = near[dup_of[rows[near]] == -1]
            if len(near):
                sims = gram[b, near]
                j = int(np.argmax(sims))
                if dup_of[rows[b]] == -1 or sims[j] > prev_sim[b]:
                    dup_of[rows[b]] = rows[near[j]]
        keep = dup_of[rows] == -1
        if keep.any():
            index.add(x[keep])
            kept_rows = np.concatenate([kept_rows, rows[keep]])
    return dup_of


def kmeans(features: np.ndarray, k: int, *, seed: int = 0, niter: int = 20, device: str = "cpu") -> np.ndarray:
    """Cluster id (int64, 0..k-1) of each row: spherical k-means (faiss.Kmeans) on the
    L2-normalised features, so that clusters follow cosine similarity.

    ``k`` is clipped to N. The same features, ``k``, ``seed`` and ``niter`` give the same
    clusters (faiss samples the initial centroids, and at most 256 rows per centroid, from
    ``seed``). ``device="cuda[:n]"`` runs on the GPUs when faiss has GPU support, else on the
    CPU; the two may differ by float rounding. Time O(niter·N·k·D).
    """
    faiss = require_faiss()
    x = unit_rows(features)
    n, d = x.shape
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(int(k), n)
    if k <= 1:
        return np.zeros(n, dtype=np.int64)
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, min_points_per_centroid=1,
                      gpu=_use_gpu(faiss, device) is not None)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int64)
