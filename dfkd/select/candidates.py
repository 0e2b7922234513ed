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

import hashlib
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import shards
from ..dist import SINGLE
from ..engine import stream
from ..models.features import FeatureTap
from ..runtime import Runtime
from ..teacher import Teacher
from .dedup import exact_duplicates, near_duplicates, unit_rows

SLACK = 4  # candidates kept while streaming, as a multiple of the budget, when some may be dropped
THUMB = 8  # thumbnail side: THUMB × THUMB grey values


def thumbnail(x: torch.Tensor) -> torch.Tensor:
    """A near-duplicate descriptor of a normalised input batch: the channel mean pooled to
    THUMB × THUMB, minus its own mean (so brightness shifts do not count); compared by cosine."""
    t = F.adaptive_avg_pool2d(x.float().mean(1, keepdim=True), THUMB).flatten(1)
    return t - t.mean(1, keepdim=True)


@dataclass
class Look:
    digests: list[bytes]
    thumbs: np.ndarray  # N×THUMB² float32 (near-duplicate descriptors)
    features: np.ndarray | None  # N×D float32; None when the teacher's features cannot be read
    errors: list[str]  # "" where the row was read again


def look_again(teacher: Teacher, paths: Sequence[str], rt: Runtime, *, features: bool,
               batch_size: int = 256) -> Look:
    """Content digests (BLAKE2b of the bytes), thumbnails and, with ``features`` (and a teacher
    that is not TorchScript), the teacher's features."""
    digests, errors = [], []
    for p in paths:
        try:
            digests.append(hashlib.blake2b(shards.read_bytes(p), digest_size=16).digest())
            errors.append("")
        except OSError as e:
            digests.append(b"")
            errors.append(f"not readable when selecting ({e.strerror or e})")
    features = features and not isinstance(teacher.members[0], torch.jit.ScriptModule)
    tap = FeatureTap(teacher.members[0], f"--teacher {teacher.card.path}") if features else None

    def forward(model, x):
        if tap is None:
            return thumbnail(x)
        model(x)
        return torch.cat([thumbnail(x), tap.value.float()], 1)

    def rows(out: torch.Tensor, labels, batch_paths, batch_errors) -> list[tuple]:
        return [(o.numpy(), e) for o, e in zip(out, batch_errors)]

    try:
        got = [r for step in stream(teacher.model, teacher.card.input, lambda: ({"path": p} for p in paths),
                                    len(paths), rows, replace(rt, ranks=SINGLE), batch_size=batch_size,
                                    forward=forward) for r in step]
    finally:
        if tap is not None:
            tap.remove()
    errors = [e or (f"not decodable when selecting ({b})" if b else "") for e, (_, b) in zip(errors, got)]
    out = np.stack([o for o, _ in got]).astype(np.float32)
    return Look(digests, out[:, :THUMB * THUMB], out[:, THUMB * THUMB:] if features else None, errors)


def duplicates(look: Look, scores: np.ndarray, near: float | None,
               device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dup_of, similarity, kind) over the candidates: ``dup_of[i]`` is −1 for a row kept, else
    the kept row it copies (kind "exact" or "near"; near ones only with a ``near`` cosine
    threshold of the thumbnails); rows that could not be read again get −2."""
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
        of = near_duplicates(look.thumbs[rest], np.arange(len(rest)), near, device=device)
        hit = of >= 0
        dup_of[rest[hit]] = rest[of[hit]]
        f = unit_rows(look.thumbs)
        similarity[rest[hit]] = np.einsum("ij,ij->i", f[rest[hit]], f[rest[of[hit]]])
        kind[rest[hit]] = "near"
    return dup_of, similarity, kind
