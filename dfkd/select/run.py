"""``select``: score every pool image with the teacher, then keep the most useful ones.

The pool is listed to ``OUT/.scoring/pool.tsv`` and scored by the engine into
``OUT/.scoring/rows.tsv`` (flushed every step), so a run that is interrupted and started again
with the same inputs continues where it stopped and ends with the same files. Selection then
reads the rows back in one streaming pass, keeping only the rows the policy could still
choose: memory is O(selected + batch), not O(pool). Each scored row also keeps its image's
near-duplicate thumbnail (computed from the batch the teacher was given), so dropping
duplicates later needs only the candidates' bytes, not a second decode, and, when the teacher's
card holds a Mahalanobis fit (``eval --write-card``), its features' distance to the classes
(what ``--num-images auto`` estimates from). ``shard=(i, n)`` scores the i-th of n
slices of the pool (cluster jobs without torchrun); :func:`merge_shards` selects from the
union of the slices, with the same result as one run.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..cards import CardLike, ModelCard, as_cards, input_record, load_card
from ..config import resolve
from ..engine import RowFile, Segment, score_run
from ..errors import DfkdError
from ..index import open_index
from ..lifecycle import Command, Input, Run, card_inputs
from ..models.features import FeatureTap, features_readable
from ..pool import Listing
from ..runtime import Runtime, setup
from ..teacher import Teacher, load_teacher
from .candidates import (SLACK, THUMB, Look, check_dedup, digests_of, drop_duplicates, teacher_look, thumb_array,
                         thumb_text, thumbnail)
from .dedup import NEAR_DUPLICATE_COSINE
from .estimate import MAHALANOBIS, NOISE_VALUE, InDistribution, Measure, estimate_in_distribution
from .mahalanobis import ClassGaussians
from .policies import POLICIES, StreamingChoice
from .scores import SCORERS

# label, score, confidence, reason ("" = scored), thumbnail (candidates.thumb_text; "" when not scored;
# absent in rows written before 0.3), the Mahalanobis distance (only with a card's fit)
ROW_TYPES = (int, float, float, str, str, float)
THUMB_KEY = "\tthumb"  # a scored row's thumbnail text, under a key no index column can have (a tab)


@dataclass(frozen=True)
class Reference:
    """What ``--num-images auto`` compares the pool with: the quantiles of ``measure`` on labeled
    data from the card at ``source`` (None: the mixture), and the Mahalanobis fit whose distances
    the scoring adds to each row (when ``measure`` is that distance)."""

    quantiles: dict | None
    source: str
    measure: Measure = NOISE_VALUE
    gaussians: ClassGaussians | None = None


@dataclass
class Reader:
    """How the candidates are read again: ``read(paths, features)`` decodes them (digests,
    thumbnails, and the teacher's features when asked); ``device`` is where the duplicates are
    searched (faiss's GPU index on CUDA)."""

    read: Callable[[list[str], bool], Look]
    device: str


@dataclass
class SelectResult:
    out: Path
    pool_size: int
    scored: int
    skipped: int
    selected: int
    class_counts: list[int]
    score_quantiles: dict[str, float]
    selected_quantiles: dict[str, float]
    classes: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)
    duplicates: int = 0  # candidates left out as duplicates (listed in files["duplicates"])
    estimate: InDistribution | None = None  # --num-images auto: the in-distribution count it selected


def quantiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    qs = np.quantile(values, [0, 0.25, 0.5, 0.75, 1.0])
    return dict(zip(["min", "q25", "median", "q75", "max"], map(float, qs)))


@dataclass(frozen=True)
class Budget:
    """What to select from the scored pool: ``num`` images (``"auto"``: as many as the pool holds
    in-distribution, estimated from the noise values) or a ``ratio`` of it (neither: every image),
    only those scoring at most ``max_score``, spent by ``policy``."""

    num: int | str | None = None
    ratio: float | None = None
    max_score: float | None = None
    policy: str = "per-class"
    dedup: str = "near"  # drop duplicates before choosing: near (and exact), exact (same bytes), off
    near: float = NEAR_DUPLICATE_COSINE  # near duplicates: cosine of their thumbnails at least this

    def __post_init__(self) -> None:
        if self.num is not None and self.ratio is not None:
            raise DfkdError("give at most one of --num-images and --ratio")
        if self.num is not None and self.num != "auto" and (isinstance(self.num, bool) or not isinstance(self.num, int)):
            raise DfkdError(f"--num-images {self.num!r}: expected a whole number or auto")
        if isinstance(self.num, int) and self.num < 1:
            raise DfkdError(f"--num-images {self.num}: must be at least 1")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise DfkdError(f"--ratio {self.ratio}: must be in (0, 1]")
        if self.max_score is not None and not np.isfinite(self.max_score):
            raise DfkdError(f"--max-score {self.max_score}: must be a finite number")
        if self.policy not in POLICIES:
            raise DfkdError(f"--policy {self.policy!r}: expected one of {', '.join(POLICIES.keys())}")
        check_dedup(self.dedup, self.near)

    def k(self, scored: int) -> int | None:
        """How many images to keep out of ``scored`` (None: all that pass ``max_score``)."""
        return None if self.num is None and self.ratio is None else (self.num or max(1, round(self.ratio * scored)))

    def options(self) -> dict:
        return asdict(self)


@dataclass
class SelectConfig:
    """select's settings: defaults here -> ``--config`` (its ``select:`` section) -> ``--set`` -> flags."""

    num_images: int | str | None = None  # None: every scored image (or --ratio); auto: estimated
    ratio: float | None = None
    max_score: float | None = None
    policy: str = "per-class"
    score: str = "noise"
    dedup: str = "near"
    near_duplicate: float = NEAR_DUPLICATE_COSINE
    batch_size: int = 256
    seed: int = 0  # the random scorer's

    def budget(self) -> Budget:
        return Budget(self.num_images, self.ratio, self.max_score, self.policy, self.dedup, self.near_duplicate)


SELECT = Command("select", ("scores.tsv", "selected.tsv", "skipped.tsv", "duplicates.tsv"), SelectConfig)


def _score_rows(teacher: Teacher, score: str, seed: int, distance: bool):
    scorer, k, extra = SCORERS.get(score), teacher.card.num_classes, THUMB * THUMB + distance
    nan = float("nan")

    def rows(out: torch.Tensor, labels, paths: list[str], errors: list[str]) -> list[tuple]:
        logits, thumbs = out[:, :-extra], out[:, -THUMB * THUMB:]
        dist = out[:, -extra].tolist() if distance else [nan] * len(out)
        if logits.shape[1] != k:
            raise DfkdError(f"{teacher.card.path}: model outputs {logits.shape[1]} classes, card says {k}")
        conf, label = torch.softmax(logits, 1).max(1)
        values = scorer(logits, paths, seed)
        finite = torch.isfinite(logits).all(1)
        return [(-1, nan, nan, e or "teacher output is not finite (NaN/inf)", "", *[nan] * distance)
                if e or not ok else (y, v, c, "", thumb_text(t), *[d] * distance)
                for y, v, c, ok, e, t, d in zip(label.tolist(), values.tolist(), conf.tolist(), finite.tolist(),
                                                errors, thumbs, dist)]
    return rows


def _scoring_forward(teacher: Teacher, gaussians: ClassGaussians | None):
    """The teacher's logits, then (with a fit) each image's Mahalanobis distance, and in the
    last THUMB² columns the images' thumbnails."""
    tap = FeatureTap(teacher.model, str(teacher.card.path)) if gaussians else None

    def forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        logits = model(x).float()
        distance = [gaussians.distance(tap.value.float()).float()[:, None]] if tap else []
        return torch.cat([logits, *distance, thumbnail(x)], 1)
    return forward


def score_pool(teacher: Teacher, pool: str | Path, run: Run, *, score: str, seed: int, batch_size: int,
               shard: tuple[int, int] | None = None, reference: Reference | None = None) -> Segment:
    """List and score the pool (or one shard of it) into ``run``, resuming."""
    identity = {"teacher": teacher.identity(), "score": score, "seed": seed if score == "random" else None}
    gaussians = reference.gaussians if reference else None
    return score_run(run, pool, "--pool", identity, teacher.model, teacher.card.input,
                     _score_rows(teacher, score, seed, gaussians is not None), ROW_TYPES, batch_size=batch_size,
                     shard=shard, forward=_scoring_forward(teacher, gaussians),
                     info={"teachers": [str(c.path.resolve()) for c in teacher.cards], "distance": bool(gaussians)})


def select_pool(teachers: CardLike | Sequence[CardLike], pool: str | Path, out: str | Path,
                config: SelectConfig | dict | str | Path | None = None, *, shard: tuple[int, int] | None = None,
                workers: int | None = None, device: str = "auto", amp: bool | None = None, overwrite: bool = False,
                on_progress: Callable[[int, int], None] | None = None, **settings) -> SelectResult:
    """Score ``pool`` with the teacher (or the ensemble of ``teachers``, MEAL V2's averaged softmax)
    and write scores/selected/skipped.tsv into ``out``. ``config``: a :class:`SelectConfig`, a dict
    or a YAML file (its ``select:`` section); ``settings`` override its keys (``num_images=2000``).
    Under torchrun every rank scores its share and gets the result; rank 0 writes.

    With ``shard=(i, n)`` only the i-th of n slices is scored (scores.tsv and skipped.tsv, no
    selection); :func:`merge_shards` selects from the shards. ``dedup`` ("near", "exact", "off")
    drops exact duplicates and near ones (cosine of their thumbnails >= ``near_duplicate``)
    before the budget is spent. ``num_images="auto"`` selects the estimated in-distribution
    count (:mod:`dfkd.select.estimate`)."""
    cfg = resolve(SelectConfig, config, flags=settings, command="select", api=True)
    budget = cfg.budget()
    if cfg.score not in SCORERS:
        raise DfkdError(f"--score {cfg.score!r}: expected one of {', '.join(SCORERS.keys())}")
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise DfkdError(f"--shard {shard[0]}/{shard[1]}: expected I/N with 0 <= I < N")
    cards = as_cards(teachers, "teachers")
    _check_auto(budget, cfg.score, len(cards) == 1 and cards[0].mahalanobis is not None)
    rt = setup(device, amp, workers)

    def body(run: Run) -> SelectResult:
        teacher = load_teacher(cards, rt.device)
        reference = _reference(cards, features_readable(teacher.model))
        segment = score_pool(teacher, pool, run, score=cfg.score, seed=cfg.seed, batch_size=cfg.batch_size,
                             shard=shard, reference=reference)
        options = dict(**budget.options(), score=cfg.score, seed=cfg.seed, batch_size=cfg.batch_size,
                       shard=list(shard) if shard else None, **rt.options())
        return run.on_main(lambda: finish(run, [segment], teacher.card, budget if shard is None else None, options,
                                          _reader(teacher, rt, cfg.batch_size), reference))

    return SELECT.execute(out, rt, [*card_inputs("--teacher", cards), Input("pool", "--pool", pool)], body,
                          overwrite=overwrite, on_progress=on_progress)


def merge_shards(shard_dirs: Sequence[str | Path], out: str | Path,
                 config: SelectConfig | dict | str | Path | None = None, *, workers: int | None = None,
                 device: str = "auto", amp: bool | None = None, overwrite: bool = False, **settings) -> SelectResult:
    """Select from the union of ``select --shard I/N`` runs: the same files as one run (the
    candidates are read again with the shards' teacher on ``device``). ``config`` and
    ``settings`` as :func:`select_pool`'s (its score and seed are the shards')."""
    cfg = resolve(SelectConfig, config, flags=settings, command="select", api=True)
    budget = cfg.budget()
    shards = []
    for given in map(Path, shard_dirs):
        found = [given] if _is_shard(given) else sorted(p for p in given.iterdir() if _is_shard(p)) \
            if given.is_dir() else []
        if not found:
            raise DfkdError(f"--merge {given}: neither a run directory of dfkd select --shard nor a folder"
                            " holding some")
        shards += [(json.loads((d / ".scoring" / "shard.json").read_text(encoding="utf-8")), d) for d in found]
    shards.sort(key=lambda s: s[0]["shard"][0])
    first, n = shards[0][0], shards[0][0]["shard"][1]
    same = {k: v for k, v in first["identity"].items() if k != "shard"}
    for meta, d in shards:
        if {k: v for k, v in meta["identity"].items() if k != "shard"} != same:
            raise DfkdError(f"--merge {d}: scored another pool, teacher or score than {shards[0][1]}")
    _check_auto(budget, same["score"], all(m.get("distance") for m, _ in shards))
    found = [m["shard"][0] for m, _ in shards]
    if found != list(range(n)) or any(m["shard"][1] != n for m, _ in shards):
        missing = sorted(set(range(n)) - set(found))
        raise DfkdError(f"--merge: expected shards 0..{n - 1} once each; "
                        + (f"missing {', '.join(map(str, missing))}" if missing else f"got {found}"))
    count = first["count"]
    segments = []
    for meta, d in shards:
        i = meta["shard"][0]
        lo, hi = i * count // n, (i + 1) * count // n
        rows = RowFile(d / ".scoring" / "rows.tsv", ROW_TYPES)
        if rows.done() != hi - lo:
            raise DfkdError(f"--merge {d}: shard {i}/{n} is not finished ({rows.done()} of {hi - lo} rows"
                            " scored); run its command again to resume it")
        listing_path = d / ".scoring" / "pool.tsv"
        columns, _ = open_index(listing_path)
        segments.append(Segment(Listing(listing_path, columns, count, same["pool"], Path(first["pool"]),
                                        first["problems"]), lo, hi, rows))
    cards = [load_card(t) for t in first["teachers"]]
    rt = setup(device, amp, workers)
    options = dict(**budget.options(), merged=[str(d) for _, d in shards])

    def read(paths: list[str], features: bool) -> Look:  # the teacher is loaded only if it is needed
        return _reader(load_teacher(cards, rt.device), rt, cfg.batch_size).read(paths, features)

    def body(run: Run) -> SelectResult:
        return run.on_main(lambda: finish(run, segments, cards[0], budget, options, Reader(read, str(rt.device)),
                                          _reference(cards, all(m.get("distance") for m, _ in shards), False)))

    inputs = [*(Input(f"merge{i}", "--merge", d) for i, (_, d) in enumerate(shards)), *card_inputs("--teacher", cards)]
    return SELECT.execute(out, rt, inputs, body, identity={"merge": [m["identity"] for m, _ in shards]},
                          overwrite=overwrite)


def _reader(teacher: Teacher, rt: Runtime, batch_size: int) -> Reader:
    return Reader(lambda paths, features: teacher_look(teacher, paths, rt, features=features, batch_size=batch_size),
                  str(rt.device))


def _check_auto(budget: Budget, score: str, distances: bool) -> None:
    """Without the distances of a card's Mahalanobis fit, auto estimates from the noise value."""
    if budget.num == "auto" and score != "noise" and not distances:
        raise DfkdError(f"--num-images auto: estimates from the noise value, as the teacher card has no Mahalanobis"
                        f" fit (dfkd eval --write-card); drop --score {score} or give a number")


def _reference(cards: Sequence[ModelCard], distances: bool, load: bool = True) -> Reference:
    """What ``eval --write-card`` stored in a single teacher's card (an ensemble's averaged
    softmax has none): its Mahalanobis fit when ``distances`` can be had (the teacher's features
    can be read, or a merge's shards scored them; loaded if ``load``), else its noise-value quantiles."""
    card, source = cards[0], str(cards[0].path)
    if len(cards) != 1:
        return Reference(None, source)
    if distances and card.mahalanobis:
        fit = ClassGaussians.load(card.mahalanobis, card.num_classes, source) if load else None
        return Reference(card.extra["mahalanobis"], source, MAHALANOBIS, fit)
    return Reference(card.extra.get("noise_values"), source)


def _is_shard(d: Path) -> bool:
    return (d / ".scoring" / "shard.json").is_file()


def finish(run: Run, segments: list[Segment], card: ModelCard, budget: Budget | None, options: dict,
           reader: Reader | None = None, reference: Reference | None = None) -> SelectResult:
    """Write scores.tsv, skipped.tsv and (with a ``budget``; a shard has none) selected.tsv from
    the scored rows, streaming: the pool's scores are held as float32 (4 bytes an image), rows
    only if chosen. When duplicates are dropped or the policy needs features, the candidates are
    read again by ``reader`` (:func:`~dfkd.select.candidates.teacher_look`) and the duplicates are
    listed in duplicates.tsv. ``options`` go to the manifest. A budget of
    ``num="auto"`` is the in-distribution count estimated in one more pass over the rows, against
    ``reference`` (:func:`_reference`) when it holds quantiles."""
    values = np.fromiter((r[1] for s in segments for r in s.rows if not r[3]), dtype=np.float32)
    if len(values) == 0:
        skipped = [{"path": row["path"], "reason": r[3]} for s in segments for row, r in s]
        path = _write_skipped(run, [*segments[0].listing.problems, *skipped])
        raise DfkdError(f"no image of the pool could be scored ({len(skipped)} skipped; see the reasons in {path})")
    select = budget is not None
    budget = budget or Budget()
    estimate = None
    reference = reference or Reference(None, str(card.path))
    distances = reference.measure is MAHALANOBIS
    if budget.num == "auto":
        column = 5 if distances else 1
        estimate = estimate_in_distribution(((r[0], r[column]) for s in segments for r in s.rows if not r[3]),
                                            card.num_classes, reference.quantiles, reference.source, reference.measure)
        if estimate.count < 1:
            raise DfkdError(f"--num-images auto: no pool image looks in-distribution to the teacher"
                            f" ({estimate.method} estimate 0 of {estimate.scored}); give --num-images N")
        budget = replace(budget, num=estimate.count)
    max_score = budget.max_score
    policy, k = POLICIES.get(budget.policy), budget.k(len(values))
    second_look = select and (budget.dedup != "off" or policy.needs_features)
    choice = StreamingChoice(policy, k * SLACK if second_look and k is not None else k, card.num_classes)
    skipped = list(segments[0].listing.problems)
    own = ["path", "label", "score", "confidence", *(["distance"] if distances else [])]
    columns = [*own, *(c for c in segments[0].listing.columns if c not in own)]

    def scored() -> Iterator[dict]:
        for s in segments:
            for row, (label, value, conf, reason, *rest) in s:
                if reason:
                    skipped.append({"path": row["path"], "reason": reason})
                    continue
                row = {**row, "label": label, "score": value, "confidence": conf, THUMB_KEY: rest[0] if rest else "",
                       **({"distance": rest[1]} if distances else {})}
                yield row
                if max_score is None or value <= max_score:
                    choice.push(value, label, row)

    files = {"scores": run.write_index("scores.tsv", scored(), columns)}
    keep = features = None
    dropped = 0
    if second_look and choice.candidates():  # none: --max-score left nothing, said below
        keep, features, dropped = _second_look(choice, budget, policy.needs_features, reader, run.out, skipped, files)
    picked = choice.result(k, keep, features) if select else []
    if select and not picked:
        raise DfkdError(f"--max-score {max_score}: no scored image has a score that low (the smallest is"
                        f" {float(values.min()):.4g}); the scores are in {files['scores']}")
    if select:
        files["selected"] = run.write_index("selected.tsv", picked, columns)
    files["skipped"] = _write_skipped(run, skipped)
    labels = np.array([r["label"] for r in picked], dtype=np.int64)
    counts = np.bincount(labels, minlength=card.num_classes).tolist()
    pool_size = sum(s.hi - s.lo for s in segments)
    summary = {"pool": pool_size, "scored": len(values), "skipped": len(skipped), "selected": len(picked),
               "class_counts": counts}
    if "duplicates" in files:
        summary["duplicates"] = dropped
    if estimate is not None:
        summary["in_distribution"] = estimate.to_dict()
    files["manifest"] = run.manifest(options, input_record(card), summary=summary)
    return SelectResult(run.out, pool_size, len(values), len(skipped), len(picked), counts, quantiles(values),
                        quantiles(np.array([r["score"] for r in picked])), card.class_names, files, dropped,
                        estimate)


def _second_look(choice: StreamingChoice, budget: Budget, needs_features: bool, reader: Reader, out: Path,
                 skipped: list[dict], files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Read the candidates again: (rows kept, their features or None, how many were duplicates);
    the duplicates go to duplicates.tsv (``files["duplicates"]``), unreadable rows to ``skipped``."""
    rows = choice.candidates()
    paths = [r["path"] for r in rows]
    if needs_features or not all(r[THUMB_KEY] for r in rows):
        look = reader.read(paths, needs_features)
    else:  # the thumbnails came with the scores: only the bytes are read again, for their digests
        digests, errors = digests_of(paths)
        look = Look(digests, thumb_array([r[THUMB_KEY] for r in rows]), None, errors, reader.device)
    if needs_features and look.features is None:
        raise DfkdError(f"--policy {budget.policy}: needs the teacher's features, and a TorchScript or ONNX teacher"
                        " has none to read; use a model card with 'arch'")
    skipped += [{"path": r["path"], "reason": e} for r, e in zip(rows, look.errors) if e]
    readable = np.array([not e for e in look.errors], dtype=bool)
    if budget.dedup == "off":  # features only: every readable row stays
        return readable, look.features, 0
    keep, dropped, files["duplicates"] = drop_duplicates([r["path"] for r in rows], choice.scores, look,
                                                         budget.dedup, budget.near, out)
    return keep, look.features, dropped


def _write_skipped(run: Run, skipped: list[dict]) -> Path:
    return run.write_index("skipped.tsv", skipped, ["path", "reason"])
