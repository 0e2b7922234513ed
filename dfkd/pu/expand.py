"""``expand``: the expanded dataset of PU Compression — positives plus the pool images g(x) accepts.

One pass of the scoring engine scores every pool image with the PU classifier and, beside it,
the teacher (for the per-class summary), with deterministic preprocessing (no random crops).
Like ``select``, it streams: scores go to disk, a run resumes, memory holds the chosen rows;
and like ``select`` it drops duplicates (same bytes, or near: cosine of 8×8 thumbnails) among
the accepted images, and pool images copying a positive, before writing the expanded set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..cards import input_record, load_card
from ..config import resolve
from ..engine import Segment, score_run, stream
from ..errors import DfkdError
from ..images import open_labeled, open_pool
from ..index import Index
from ..lifecycle import Command, Input, Run, card_inputs
from ..runtime import setup
from ..select.candidates import SLACK, Look, check_dedup, drop_duplicates, look_again
from ..select.dedup import NEAR_DUPLICATE_COSINE
from ..select.policies import POLICIES, StreamingChoice
from ..teacher import card_digest, load_teacher
from .train import load_pu


@dataclass
class ExpandResult:
    out: Path
    pool_size: int
    skipped: int
    selected: int
    positives: int
    class_counts: list[int] | None
    classes: list[str]
    files: dict[str, Path] = field(default_factory=dict)
    duplicates: int = 0  # accepted pool images left out as duplicates (listed in files["duplicates"])


def _positives(path: str | Path, classes: list[str] | None) -> Index:
    """Positives with labels where the folder or index has them (else label -1)."""
    p = Path(path)
    if p.is_dir() and any(d.is_dir() for d in p.iterdir()):
        index, _ = open_labeled(p, classes, flag="--positive")
        return index
    index = open_pool(p, "--positive")
    for r in index.rows:
        r.setdefault("label", "-1")
    return index


@dataclass
class Acceptance:
    """Which pool images the expanded set takes: those with g(x) > ``threshold``, or the ``num``
    best; duplicates dropped first (``dedup`` as select's); positives written ``repeat_positive`` times."""
    threshold: float | None = 0.0
    num: int | None = None
    repeat_positive: int = 1
    dedup: str = "near"
    near: float = NEAR_DUPLICATE_COSINE

    def __post_init__(self) -> None:
        if self.num is not None and self.num < 1:
            raise DfkdError(f"--num-images {self.num}: must be at least 1")
        if (self.num is None and self.threshold is None) or (self.threshold is not None
                                                             and not math.isfinite(self.threshold)):
            raise DfkdError(f"--threshold {self.threshold}: must be a finite number")  # NaN too, beside --num-images
        if self.repeat_positive < 1:
            raise DfkdError(f"--repeat-positive {self.repeat_positive}: must be at least 1")
        check_dedup(self.dedup, self.near)

    def options(self) -> dict:
        return {"threshold": None if self.num is not None else self.threshold, "num": self.num,
                "repeat_positive": self.repeat_positive, "dedup": self.dedup, "near": self.near}  # as select's


@dataclass
class ExpandConfig:
    """expand's settings: defaults here -> ``--config`` (its ``expand:`` section) -> ``--set`` -> flags."""

    threshold: float = 0.0  # keep pool images with g(x) > threshold (PU Compression: 0)
    num_images: int | None = None  # the top N instead of a threshold
    repeat_positive: int = 1
    dedup: str = "near"
    near_duplicate: float = NEAR_DUPLICATE_COSINE
    batch_size: int = 256

    def acceptance(self) -> Acceptance:
        return Acceptance(self.threshold, self.num_images, self.repeat_positive, self.dedup, self.near_duplicate)


EXPAND = Command("expand", ("expanded.tsv", "pu_scores.tsv", "skipped.tsv", "duplicates.tsv"), ExpandConfig)


def expand(pu_card: str | Path, positive: str | Path, unlabeled: str | Path, out: str | Path,
           config: ExpandConfig | dict | str | Path | None = None, *, teacher: str | Path | None = None,
           workers: int | None = None, device: str = "auto", amp: bool | None = None, overwrite: bool = False,
           on_progress: Callable[[int, int], None] | None = None, **settings) -> ExpandResult:
    """Write ``out/expanded.tsv`` (positives, then accepted pool images best first) and pu_scores.tsv.
    ``config``: an :class:`ExpandConfig`, a dict or a YAML file (its ``expand:`` section);
    ``settings`` override its keys (``num_images=500``).

    The pool is scored by the engine (sharded under torchrun, resumable); every rank gets the
    result. Unless ``dedup="off"``, rank 0 then reads the accepted images again (at most 4×
    ``num_images``) and drops exact and near duplicates, of each other and of the positives, as
    ``select`` does (listed in duplicates.tsv)."""
    cfg = resolve(ExpandConfig, config, flags=settings, command="expand", api=True)
    accept, batch_size = cfg.acceptance(), cfg.batch_size
    rt = setup(device, amp, workers)
    model, card, pu = load_pu(pu_card, rt.device)
    if teacher is not None and not Path(teacher).is_file():
        raise DfkdError(f"--teacher {teacher}: no such file (the teacher's card, for the per-class summary)")
    teacher_path = teacher or pu.get("teacher")  # the one the PU card records, if it is still there
    t = load_teacher(load_card(teacher_path), rt.device) if teacher_path and Path(teacher_path).is_file() else None
    classes = t.card.class_names if t else [str(i) for i in range(card.num_classes)]
    pos = _positives(positive, t.card.classes if t else None)

    def both(m, x):
        g = m(x).float()[:, None]
        return torch.cat([g, t.model(x).float()], 1) if t is not None else g

    def rows(outputs: torch.Tensor, labels, paths, errors) -> list[tuple]:
        finite = torch.isfinite(outputs).all(1).tolist()
        teacher_labels = outputs[:, 1:].argmax(1).tolist() if t is not None else [-1] * len(paths)
        return [(float("nan"), -1, e or "PU score is not finite") if e or not ok else (float(o[0]), y, "")
                for o, y, ok, e in zip(outputs, teacher_labels, finite, errors)]

    def reader(paths: list[str]) -> Look:
        return look_again(model, card.input, paths, rt, batch_size=batch_size)

    def body(run: Run) -> ExpandResult:
        segment = score_run(run, unlabeled, "--unlabeled", {"pu": card_digest(card), "teacher": t.identity() if t else None},
                            model, card.input, rows, (float, int, str), batch_size=batch_size, forward=both)
        # positives are decoded too, so that a truncated one is recorded, not written as a positive
        checked = [r for got in stream(model, card.input, lambda: iter(pos.rows), len(pos), rows, rt,
                                       batch_size=batch_size, forward=both) for r in got]
        record = {"options": {**accept.options(), **rt.options()}, "prior": pu.get("prior"),
                  "input": input_record(card)}
        return run.on_main(lambda: _write(run, segment, pos, checked, accept, reader, classes if t else None, record))

    inputs = [*card_inputs("--pu", [card], "pu"), Input("positive", "--positive", pos.source),
              Input("unlabeled", "--unlabeled", unlabeled), *(card_inputs("--teacher", t.cards) if t else ())]
    return EXPAND.execute(out, rt, inputs, body, overwrite=overwrite, on_progress=on_progress)


def _write(run: Run, segment: Segment, pos: Index, checked: list[tuple], accept: Acceptance,
           reader: Callable[[list[str]], Look], classes: list[str] | None, record: dict) -> ExpandResult:
    """Choose, write expanded.tsv, pu_scores.tsv, skipped.tsv, duplicates.tsv and the manifest.
    ``classes``: the teacher's (None without a teacher: no per-class counts); ``record``: the
    manifest's options, input spec and the PU card's prior."""
    out = run.out
    skipped = list(segment.listing.problems)
    skipped += [{"path": r["path"], "reason": c[2]} for r, c in zip(pos.rows, checked) if c[2]]
    positives = [{**r, "source": "positive"} for r, c in zip(pos.rows, checked) if not c[2]]
    if not positives:
        raise DfkdError(f"--positive {pos.source}: none of the positive images could be decoded")
    extra = [c for c in segment.listing.columns if c not in ("path", "label", "score", "source", "teacher_label")]
    columns = ["path", "label", "score", "source", "teacher_label", *extra]
    num, dedup = accept.num, accept.dedup != "off"
    choice = StreamingChoice(POLICIES.get("global"), num * SLACK if dedup and num is not None else num,
                             len(classes or [0]))
    scored = 0

    def pool_rows() -> Iterator[dict]:
        nonlocal scored
        for row, (g, y, reason) in segment:
            if reason:
                skipped.append({"path": row["path"], "reason": reason})
                continue
            scored += 1
            row = {**row, "label": -1, "score": g, "source": "pool", "teacher_label": y}
            yield row
            if num is not None or g > accept.threshold:
                choice.push(-g, max(y, 0), row)  # best first = highest g(x); pruned when num is given

    files = {"pu_scores": run.write_index("pu_scores.tsv", pool_rows(), columns)}
    if scored == 0:
        run.write_index("skipped.tsv", skipped, ["path", "reason"])
        raise DfkdError(f"--unlabeled {segment.listing.source}: no image could be scored")
    keep, dropped = None, 0
    if dedup and choice.candidates():
        paths = [r["path"] for r in positives] + [r["path"] for r in choice.candidates()]
        look = reader(paths)
        scores = np.concatenate([np.zeros(len(positives)), choice.scores])
        skipped += [{"path": p, "reason": e} for p, e in zip(paths[len(positives):], look.errors[len(positives):]) if e]
        keep, dropped, files["duplicates"] = drop_duplicates(paths, scores, look, accept.dedup, accept.near, out,
                                                             keep_first=len(positives))
        keep = keep[len(positives):]
    chosen = choice.result(num, keep)
    files["expanded"] = run.write_index("expanded.tsv", positives * accept.repeat_positive + chosen, columns)
    files["skipped"] = run.write_index("skipped.tsv", skipped, ["path", "reason"])
    counts = None
    if classes is not None:
        counts = np.bincount(np.array([r["teacher_label"] for r in chosen], dtype=np.int64),
                             minlength=len(classes)).tolist()
    pool_size = segment.hi - segment.lo
    summary = {"pool": pool_size, "skipped": len(skipped), "selected": len(chosen), "positives": len(positives),
               "class_counts": counts, "prior": record["prior"]}
    if "duplicates" in files:
        summary["duplicates"] = dropped
    files["manifest"] = run.manifest(record["options"], record["input"], summary=summary)
    return ExpandResult(out, pool_size, len(skipped), len(chosen), len(positives), counts,
                        classes or [], files, dropped)
