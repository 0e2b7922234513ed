"""``eval``: top-1/top-5, per-class accuracy and the confusion matrix of a model on labeled images,
and the quantiles of its noise value there; with ``--write-card`` (and features that can be read)
also the Mahalanobis fit of its features and its held-out distances' quantiles. Those are what
``select --num-images auto`` compares a pool with."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .cards import CardLike, ModelCard, as_card, input_record, update_card
from .engine import stream
from .errors import DfkdError
from .images import open_labeled
from .lifecycle import Command, Input, Run, card_inputs
from .models.features import FeatureTap, features_readable
from .pool import data_digest
from .runtime import setup
from .select.estimate import noise_summary
from .select.mahalanobis import ReferenceFit
from .select.scores import noise_value
from .teacher import card_digest, load_teacher

EVAL = Command("eval", ("eval.json",))


@dataclass
class EvalResult:
    num_images: int
    skipped: list[dict]
    top1: float
    top5: float | None
    class_accuracy: list[float | None]
    class_support: list[int]
    confusion: list[list[int]]
    classes: list[str]
    input: dict  # how the model was fed and where that came from (dfkd.cards.input_record)
    model: str = ""  # the evaluated card's absolute path (report matches a student to its eval)
    noise_values: dict | None = None  # noise_summary(): the noise value's quantiles
    mahalanobis: dict | None = None  # with write_card: the held-out distances' quantiles (dfkd.select.mahalanobis)


def evaluate(card: CardLike, data: str | Path, out: str | Path | None = None, *, batch_size: int = 256,
             workers: int | None = None, device: str = "auto", amp: bool | None = None, overwrite: bool = False,
             write_card: bool = False, on_progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Evaluate ``card`` (a card or its path) on an ImageFolder/index (folders matched to the
    card's ``classes``); with ``out``, write ``out/eval.json`` and the run's manifest; with
    ``write_card``, store the accuracies in the card (:func:`write_accuracy_to_card`) and, when
    the model's features can be read, fit the Mahalanobis reference of ``select --num-images auto``.

    Under torchrun the images are sharded over the ranks; every rank gets the result."""
    card = as_card(card, "card")
    if write_card:
        _yaml_card(card)
    rt = setup(device, amp, workers)
    index, _ = open_labeled(data, card.classes)
    labels = index.labels()
    k = card.num_classes
    bad = [y for y in labels if not 0 <= y < k]
    if bad:
        raise DfkdError(f"--data {data}: label {bad[0]} is outside the model's {k} classes")
    teacher = load_teacher(card, rt.device)
    tap = FeatureTap(teacher.model, str(card.path)) if write_card and features_readable(teacher.model) else None
    dim = tap.layer.in_features if tap else 0

    def with_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(x).float(), tap.value.float()], 1)

    def rows(out: torch.Tensor, y: torch.Tensor, paths, errors) -> list[tuple]:
        logits, features = out[:, :out.shape[1] - dim], out[:, out.shape[1] - dim:].numpy()
        if logits.shape[1] != k:
            raise DfkdError(f"{card.path}: model outputs {logits.shape[1]} classes, card says {k}")
        if not torch.isfinite(logits[torch.tensor([not e for e in errors], dtype=torch.bool)]).all():
            raise DfkdError(f"{card.path}: the model produced NaN/inf outputs")
        top5 = (logits.topk(min(5, k), dim=1).indices == y[:, None]).any(1).tolist()
        noise = noise_value(logits.float()).tolist()
        return list(zip(logits.argmax(1).tolist(), top5, y.tolist(), noise, paths, errors, features))

    def body(run: Run) -> EvalResult:
        confusion = torch.zeros(k, k, dtype=torch.long)
        top5_hits, n, done, skipped, noise = 0, 0, 0, list(index.problems), []  # files the listing could not take
        fit = ReferenceFit(k) if tap else None
        for got in stream(teacher.model, card.input, lambda: iter(index.rows), len(index), rows, rt,
                          batch_size=batch_size, forward=with_features if tap else None):
            features, classes = [], []
            for pred, hit, y, v, path, error, f in got:
                if error:
                    skipped.append({"path": path, "reason": error})
                    continue
                confusion[y, pred] += 1
                noise.append(v)
                top5_hits += hit
                n += 1
                features.append(f)
                classes.append(y)
            if fit and classes:
                fit.add(np.stack(features), np.array(classes))
            done += len(got)
            run.progress(done, len(index))

        def result() -> EvalResult:  # from the rows rank 0 gathered
            if n == 0:
                raise DfkdError(f"--data {data}: no image could be decoded")
            support = confusion.sum(1)
            # ratios of integer counts in Python floats (a float32 tensor division printed 0.18666666746139526)
            per_class = [int(confusion[i, i]) / int(support[i]) if support[i] else None for i in range(k)]
            r = EvalResult(n, skipped, int(confusion.diag().sum()) / n, top5_hits / n if k > 5 else None,
                           per_class, support.tolist(), confusion.tolist(), card.class_names,
                           input_record(card), str(card.path.resolve()), noise_summary(np.array(noise)))
            reference = fit.finish() if fit else None
            if reference:  # written beside the card, which then names it
                gaussians, summary = reference
                r.mahalanobis = {"file": gaussians.save(card.path.with_suffix(".mahalanobis.npz")).name, **summary}
            if out is not None:
                run.write_json("eval.json", asdict(r))
                run.manifest({"batch_size": batch_size, "workers": rt.workers, "device": str(rt.device), "amp": rt.amp},
                             r.input, summary={"images": r.num_images, "skipped": len(r.skipped), "top1": r.top1})
            if write_card:
                write_accuracy_to_card(card, r)
            return r

        return run.on_main(result)

    return EVAL.execute(out, rt, [*card_inputs("--model", [card], "model"), Input("data", "--data", data)], body,
                        identity={"model": card_digest(card), "data": data_digest(data)}, overwrite=overwrite,
                        on_progress=on_progress)


def write_accuracy_to_card(card: ModelCard, result: EvalResult) -> Path:
    """Store overall and per-class accuracy in the card (DFND's noise-adaptation matrix uses them)
    and the noise value's and Mahalanobis distance's quantiles (``select --num-images auto``
    compares the pool with them; the Mahalanobis fit's file is already beside the card)."""
    _yaml_card(card)
    per_class = [a if a is not None else result.top1 for a in result.class_accuracy]
    return update_card(card.path, accuracy=round(result.top1, 6), class_accuracy=[round(a, 6) for a in per_class],
                       noise_values=result.noise_values, mahalanobis=result.mahalanobis)


def _yaml_card(card: ModelCard) -> None:
    if card.path.suffix.lower() not in (".yaml", ".yml"):
        raise DfkdError(f"--write-card: {card.path} is not a YAML card")
