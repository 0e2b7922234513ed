"""A second look at the rows a selection could still choose, before the budget is spent.

After the pool is scored, :class:`~dfkd.select.policies.StreamingChoice` holds the candidates:
the rows the policy could choose at ``SLACK`` times the budget. Only they are read again, by
rank 0 alone (a small share of the pool): each file's bytes give its content digest, the
teacher's input gives a thumbnail (:func:`thumbnail`), and the teacher's penultimate features
(the input of the first teacher's last linear layer) feed the policies that need features.
:func:`duplicates` then marks exact copies (same bytes) and near copies (cosine of the
thumbnails at least ``near``), keeping the best-scored row of each group; the rows dropped are
listed with the row they duplicate.

Why thumbnails and not the teacher's features for near copies: a classifier's penultimate
features gather the images of a class together, so they do not tell a resized or re-encoded
copy from another picture of the same class. Measured on 60 digits, each also stored as a 2×
upscale and as a JPEG (the test of this in tests/test_select.py): teacher features gave copies
a cosine of 0.985 and more, and distinct digits up to 0.997; 8×8 thumbnails gave copies 0.997
and more, and distinct digits at most 0.980.
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import shards
from ..dist import SINGLE
from ..engine import stream
from ..errors import DfkdError
from ..index import write_index
from ..models.features import FeatureTap, features_readable
from ..images import InputSpec
from ..runtime import Runtime
from ..teacher import Teacher
from .dedup import exact_duplicates, near_duplicates, unit_rows

DEDUP = ("near", "exact", "off")  # what --dedup may say
SLACK = 4  # candidates kept while streaming, as a multiple of the budget, when some may be dropped
THUMB = 8  # thumbnail side: THUMB × THUMB grey values


def thumbnail(x: torch.Tensor) -> torch.Tensor:
    """A near-duplicate descriptor of a normalised input batch: the channel mean pooled to
    THUMB × THUMB, minus its own mean (so brightness shifts do not count); compared by cosine."""
    t = F.adaptive_avg_pool2d(x.float().mean(1, keepdim=True), THUMB).flatten(1)
    return t - t.mean(1, keepdim=True)


def thumb_text(t: torch.Tensor) -> str:
    """One row's thumbnail as text for a row file (base64 of its float32 bytes, exact)."""
    return base64.b64encode(t.numpy().astype("<f4").tobytes()).decode("ascii")


def thumb_array(texts: Sequence[str]) -> np.ndarray:
    """N×THUMB² float32 of :func:`thumb_text` strings."""
    return np.stack([np.frombuffer(base64.b64decode(t), dtype="<f4") for t in texts]).astype(np.float32)


def digests_of(paths: Sequence[str]) -> tuple[list[bytes], list[str]]:
    """BLAKE2b digests of the files' bytes, and "" or why a file could not be read."""
    digests, errors = [], []
    for p in paths:
        try:
            digests.append(hashlib.blake2b(shards.read_bytes(p), digest_size=16).digest())
            errors.append("")
        except OSError as e:
            digests.append(b"")
            errors.append(f"not readable when selecting ({e.strerror or e})")
    return digests, errors


@dataclass
class Look:
    digests: list[bytes]
    thumbs: np.ndarray  # N×THUMB² float32 (near-duplicate descriptors)
    features: np.ndarray | None  # N×D float32; None when the teacher's features cannot be read
    errors: list[str]  # "" where the row was read again
    device: str = "cpu"  # where the rows were read: duplicates are searched there too (faiss's GPU index on CUDA)


def look_again(model: nn.Module, spec: InputSpec, paths: Sequence[str], rt: Runtime, *,
               features_of: nn.Module | None = None, what: str = "model", batch_size: int = 256) -> Look:
    """Content digests (BLAKE2b of the bytes) and thumbnails of ``paths``, decoded as ``spec``
    says; with ``features_of`` (a model, not TorchScript), also the input of its last linear
    layer (``what`` names it in errors). ``model`` runs only for the features."""
    digests, errors = digests_of(paths)
    tap = FeatureTap(features_of, what) if features_of is not None else None

    def forward(m, x):
        if tap is None:
            return thumbnail(x)
        m(x)
        return torch.cat([thumbnail(x), tap.value.float()], 1)

    def rows(out: torch.Tensor, labels, batch_paths, batch_errors) -> list[tuple]:
        return [(o.numpy(), e) for o, e in zip(out, batch_errors)]

    try:
        got = [r for step in stream(model, spec, lambda: ({"path": p} for p in paths), len(paths), rows,
                                    replace(rt, ranks=SINGLE), batch_size=batch_size, forward=forward)
               for r in step]
    finally:
        if tap is not None:
            tap.remove()
    errors = [e or (f"not decodable when selecting ({b})" if b else "") for e, (_, b) in zip(errors, got)]
    out = np.stack([o for o, _ in got]).astype(np.float32) if got else np.zeros((0, THUMB * THUMB), np.float32)
    return Look(digests, out[:, :THUMB * THUMB], out[:, THUMB * THUMB:] if tap is not None else None, errors,
                str(rt.device))


def teacher_look(teacher: Teacher, paths: Sequence[str], rt: Runtime, *, features: bool,
                 batch_size: int = 256) -> Look:
    """:func:`look_again` with the teacher's input; ``features``: the first teacher's (none for
    a TorchScript or ONNX teacher, whose layers cannot be tapped)."""
    tapped = features and features_readable(teacher.members[0])
    return look_again(teacher.model, teacher.card.input, paths, rt,
                      features_of=teacher.members[0] if tapped else None,
                      what=f"--teacher {teacher.card.path}", batch_size=batch_size)


def duplicates(look: Look, scores: np.ndarray, near: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dup_of, similarity, kind) over the candidates: ``dup_of[i]`` is −1 for a row kept, else
    the kept row it copies (kind "exact" or "near"; near ones only with a ``near`` cosine
    threshold of the thumbnails, searched on ``look.device``); rows that could not be read again
    get −2."""
    order = np.argsort(scores, kind="stable")
    ok = np.array([not e for e in look.errors], dtype=bool)
    dup_of = np.full(len(scores), -1, dtype=np.int64)
    similarity = np.full(len(scores), np.nan)
    kind = np.full(len(scores), "", dtype=object)
    dup_of[~ok] = -2
    readable = order[ok[order]]  # best first
    exact = exact_duplicates([look.digests[i] for i in readable], np.arange(len(readable)))
    hit = exact >= 0
    dup_of[readable[hit]] = readable[exact[hit]]
    similarity[readable[hit]], kind[readable[hit]] = 1.0, "exact"
    if near is not None:
        rest = readable[~hit]
        of = near_duplicates(look.thumbs[rest], np.arange(len(rest)), near, device=look.device)
        hit = of >= 0
        dup_of[rest[hit]] = rest[of[hit]]
        f = unit_rows(look.thumbs)
        similarity[rest[hit]] = np.einsum("ij,ij->i", f[rest[hit]], f[rest[of[hit]]])
        kind[rest[hit]] = "near"
    return dup_of, similarity, kind


def check_dedup(dedup: str, near: float) -> None:
    """--dedup and --near-duplicate, checked before any work."""
    if dedup not in DEDUP:
        raise DfkdError(f"--dedup {dedup!r}: expected one of {', '.join(DEDUP)}")
    if not -1 <= near <= 1:
        raise DfkdError(f"--near-duplicate {near}: a cosine similarity, in [-1, 1]")


def drop_duplicates(paths: Sequence[str], scores: np.ndarray, look: Look, dedup: str, near: float,
                    out: Path, keep_first: int = 0) -> tuple[np.ndarray, int, Path]:
    """Mark the duplicates among read-again rows and list them in ``out/duplicates.tsv``
    (path, duplicate_of, kind, cosine): (mask of the rows kept — readable, not duplicates —,
    how many were dropped, the file). ``dedup`` is "near" or "exact". The first ``keep_first``
    rows are kept whatever they copy and come first in the order (rows that must stay, e.g. PU's
    positives: rows copying them are dropped); the rest go by ascending ``scores``."""
    scores = np.asarray(scores, dtype=np.float64).copy()
    scores[:keep_first] = -np.inf
    dup_of, similarity, kind = duplicates(look, scores, near if dedup == "near" else None)
    dup_of[:keep_first] = np.minimum(dup_of[:keep_first], -1)
    dropped = np.flatnonzero(dup_of >= 0)
    path = write_index(out / "duplicates.tsv",
                       ({"path": paths[i], "duplicate_of": paths[dup_of[i]], "kind": kind[i],
                         "cosine": round(float(similarity[i]), 6)} for i in dropped),
                       ["path", "duplicate_of", "kind", "cosine"])
    return dup_of == -1, len(dropped), path
