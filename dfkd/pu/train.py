"""``pu-train``: a PU classifier g(x) telling pool images that look like the positives.

The model is the multi-scale SE extractor on a backbone (by default the teacher's own
architecture with the teacher's weights), trained with the non-negative PU risk. Positives are
few, so they are repeated in the training set until they make ``positive_share`` of it: every
random batch then holds some (the reference's batches held about 3 positives in 4096).
A share of the positives is held out to report, without any pool labels, how many of them the
classifier accepts, next to the share of the pool it calls positive (compare with the prior).
``prior: auto`` estimates the prior from the positives and the pool before training
(dfkd/pu/prior.py) and records the estimate and its range in the card.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import yaml

from ..cards import CardLike, ModelCard, as_card, build_arch, input_record, load_card, read_state_dict
from ..config import resolve
from ..errors import DfkdError
from ..events import Note, OnEvent
from ..images import pool_paths
from ..io import atomic_write
from ..lifecycle import Command, Input, Run, card_inputs
from ..pool import data_digest
from ..runtime import setup
from ..teacher import card_digest
from ..train.data import decode_images
from ..train.loop import LoopConfig, outputs, run_loop
from ..train.objective import Batch, LoopObjective
from .extractor import MultiScaleSE, default_taps, load_backbone_weights
from .nnpu import nnpu_risk
from .prior import PriorEstimate, estimate_prior


class NnpuObjective(LoopObjective):
    """nnPU risk of the PU classifier's scores g(x) on a batch: labels 1 = positive, 0 = unlabeled
    (Kiryo et al. 2017, Alg. 1)."""

    def __init__(self, prior: float, beta: float = 0.0, gamma: float = 1.0):
        super().__init__()
        self.prior, self.beta, self.gamma = prior, beta, gamma
        nnpu_risk(torch.zeros(1), torch.zeros(1), prior, beta, gamma)  # validates the flags now

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        scores, labels = batch.outputs, batch.labels
        pos, unl = scores[labels == 1], scores[labels == 0]
        if len(pos) == 0 or len(unl) == 0:  # rare with oversampling; skip the step's gradient
            zero = scores.sum() * 0.0
            return {"loss": zero, "risk": zero.detach(), "positive_risk": zero.detach(),
                    "negative_risk": zero.detach(), "clipped": zero.detach()}
        r = nnpu_risk(pos, unl, self.prior, self.beta, self.gamma)
        return {"loss": r.objective, "risk": r.risk, "positive_risk": r.positive_risk.detach(),
                "negative_risk": r.negative_risk.detach(), "clipped": torch.tensor(float(r.clipped))}


def build_pu_model(backbone_arch: str, num_classes: int, card_input, taps: list[str] | None,
                   reduction: int, arch_args: dict | None = None) -> MultiScaleSE:
    backbone = build_arch(backbone_arch, num_classes, card_input.channels, arch_args, "--backbone")
    shape = (card_input.channels, *card_input.size)
    return MultiScaleSE(backbone, taps or default_taps(backbone, shape), reduction, shape)


NNPU_DEFAULTS = {"prior": None, "beta": 0.0, "gamma": 1.0}  # prior None (a number or auto may replace it): auto
MODEL_DEFAULTS = {"backbone": None, "taps": None, "reduction": 16}


def with_prior(nnpu: dict) -> dict:
    """The nnpu section with its prior's default filled in: ``auto``, estimated in the run."""
    return {**nnpu, "prior": "auto" if nnpu.get("prior") is None else nnpu["prior"]}


@dataclass
class PuConfig(LoopConfig):
    """pu-train's settings, layered like distill's (defaults here -> ``--config`` -> ``--set`` ->
    flags): the loop's (Adam at 1e-3 for 10 epochs), the nnPU risk's, the PU classifier's, and
    how the positives are used. ``asdict()`` gives the config the CLI resolves."""

    epochs: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    nnpu: dict = field(default_factory=lambda: dict(NNPU_DEFAULTS))
    model: dict = field(default_factory=lambda: dict(MODEL_DEFAULTS))
    positive_share: float = 0.25  # positives repeated to this share of the training set (0: not repeated)
    holdout: float = 0.2  # share of the positives held out to report their recall

    def __post_init__(self) -> None:  # a section given in part keeps the other defaults
        for name, defaults in (("nnpu", NNPU_DEFAULTS), ("model", MODEL_DEFAULTS)):
            given = dict(getattr(self, name) or {})
            unknown = sorted(set(given) - set(defaults))
            if unknown:
                raise DfkdError(f"config section {name!r} has no key {unknown[0]!r}; known: {', '.join(defaults)}")
            setattr(self, name, {**defaults, **given})

    def check(self) -> None:
        super().check()
        self.nnpu = with_prior(self.nnpu)
        prior = self.nnpu["prior"]
        if prior != "auto" and (isinstance(prior, bool) or not isinstance(prior, (int, float))):
            raise DfkdError(f"--prior {prior!r}: expected a number in (0, 1) or auto")
        nnpu_risk(torch.zeros(1), torch.zeros(1), 0.5 if prior == "auto" else prior, self.nnpu["beta"],
                  self.nnpu["gamma"])  # checks all three
        if not isinstance(self.model["reduction"], int) or self.model["reduction"] < 1:
            raise DfkdError(f"--reduction {self.model['reduction']!r}: must be a whole number of at least 1")
        if not 0 <= self.positive_share < 1:
            raise DfkdError(f"--positive-share {self.positive_share}: must be in [0, 1) (0: positives not repeated)")
        if not 0 <= self.holdout < 1:
            raise DfkdError(f"--set holdout={self.holdout}: must be in [0, 1)")

    def taps(self) -> list[str] | None:
        taps = self.model["taps"]
        return [t.strip() for t in taps.split(",") if t.strip()] if isinstance(taps, str) else taps


def default_config() -> dict:
    return asdict(PuConfig())


PU_TRAIN = Command("pu-train", ("pu.yaml", "pu.pt", "skipped.tsv", "config.yaml", "tensorboard"), PuConfig)


@dataclass
class PuResult:
    card: Path
    steps: int
    teacher_keys_loaded: int | None  # of backbone_keys; None when the backbone starts from random weights
    backbone_keys: int
    heldout_positive_recall: float | None
    pool_positive_share: float
    prior: float
    positives: int
    unlabeled: int
    skipped: int
    resumed_from: int
    prior_estimate: PriorEstimate | None = None  # prior: auto


def pu_train(teacher: CardLike, positive: str | Path, unlabeled: str | Path, out: str | Path,
             config: PuConfig | dict | str | Path | None = None, *, workers: int | None = None, device: str = "auto",
             stop_after: int | None = None, overwrite: bool = False, tensorboard: bool = False,
             cache_dir: str | Path | None = None, on_event: OnEvent | None = None) -> PuResult:
    """Train the PU classifier with ``config`` (a :class:`PuConfig`, a dict of some of its keys,
    or a YAML file: its ``pu-train:`` section); write ``out/pu.yaml`` and its weights. Every
    rank gets the result."""
    teacher = as_card(teacher, "teacher")
    cfg = resolve(PuConfig, config, command="pu-train")
    cfg.check()
    beta, gamma = cfg.nnpu["beta"], cfg.nnpu["gamma"]  # the prior: in the run, where auto is estimated
    rt = setup(device, cfg.amp, workers, training=True)
    cfg = replace(cfg, amp=rt.amp)
    backbone = cfg.model["backbone"]
    if teacher.form != "arch" and not backbone:
        raise DfkdError(f"--teacher {teacher.path}: is {teacher.form_name}, whose stages dfkd cannot tap for"
                        " the PU classifier's backbone; name a --backbone arch (e.g. --backbone resnet18)")
    arch = backbone or teacher.arch
    arch_args = teacher.arch_args if arch == teacher.arch else {}
    torch.manual_seed(cfg.seed)
    model = build_pu_model(arch, teacher.num_classes, teacher.input, cfg.taps(), cfg.model["reduction"], arch_args)
    loaded, keys = None, len(model.backbone.state_dict())
    if arch == teacher.arch and teacher.weights:
        report = load_backbone_weights(model.backbone, read_state_dict(teacher.weights))
        loaded, keys = report.matched, report.total
    positives, pool = pool_paths(positive, "--positive"), pool_paths(unlabeled, "--unlabeled")
    spec = teacher.input
    options = asdict(cfg)
    inputs = [*card_inputs("--teacher", [teacher]), Input("positive", "--positive", positives.source),
              Input("unlabeled", "--unlabeled", pool.source)]
    identity = {"teacher": card_digest(teacher), "positive": data_digest(positive),
                "unlabeled": data_digest(unlabeled), "config": options}

    def body(run: Run) -> PuResult:
        prior = cfg.nnpu["prior"]
        # one decoded set (in memory or the on-disk cache): the positives first, then the pool
        labels = np.concatenate([np.ones(len(positives), np.int64), np.zeros(len(pool), np.int64)])
        both = decode_images(positives.paths + pool.paths, spec, labels, batch_size=cfg.batch_size, workers=rt.workers,
                             what="--positive and --unlabeled", cache_dir=cache_dir, ranks=rt.ranks,
                             on_event=run.on_event)
        is_pos = both.labels == 1
        for flag, listed, decoded in (("--positive", positives, is_pos), ("--unlabeled", pool, ~is_pos)):
            if not bool(decoded.any()):
                raise DfkdError(f"{flag} {listed.source}: none of the {len(listed)} images could be decoded")
        pos_rows, unl_rows = is_pos.nonzero().squeeze(1), (~is_pos).nonzero().squeeze(1)  # positions in both
        estimate = None
        if prior == "auto":  # on the features before training: the teacher's, not ones fitted to this prior
            features = outputs(_Pooled(model), both, spec, rt.device, cfg)
            estimate = estimate_prior(features[pos_rows], features[unl_rows], cfg.seed)
            prior = estimate.prior
            run.event(Note(f"prior estimated: {prior:.4f} (range {estimate.low:.4f}..{estimate.high:.4f})"
                           f" by {estimate.method}"))
        objective = NnpuObjective(prior, beta, gamma)
        skipped = positives.problems + pool.problems + both.skipped
        run.write_index("skipped.tsv", skipped, ["path", "reason"])
        run.write_text("config.yaml", yaml.safe_dump(options, sort_keys=False))  # the resolved config
        n_hold = int(len(pos_rows) * cfg.holdout) if len(pos_rows) >= 5 else 0
        perm = torch.randperm(len(pos_rows), generator=torch.Generator().manual_seed(cfg.seed))
        hold, fit = perm[:n_hold].sort().values, perm[n_hold:].sort().values
        repeat = positive_repeat(cfg.positive_share, len(unl_rows), len(fit))
        fit_rep = fit.repeat(repeat)
        train = both.subset(torch.cat([pos_rows[fit_rep], unl_rows]))
        result = run_loop(model, objective, train, spec, cfg, run.out, rt, stop_after=stop_after,
                          tensorboard=tensorboard, on_event=run.on_event)

        def finish() -> PuResult:
            positive = outputs(model, both, spec, rt.device, cfg) > 0  # one pass; no copy of the pool's images
            recall = float(positive[pos_rows[hold]].float().mean()) if n_hold else None
            share = float(positive[unl_rows].float().mean())
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            weights = run.write("pu.pt", lambda p: atomic_write(p, lambda f: torch.save(state, f), "wb"))
            card = {"kind": "pu", "arch": arch, "num_classes": teacher.num_classes, "weights": weights.name,
                    "input": spec.to_dict(), "arch_args": arch_args or None,
                    "pu": {"taps": model.taps, "reduction": cfg.model["reduction"], "prior": prior,
                           "teacher": str(teacher.path.resolve()), "heldout_positive_recall": recall,
                           "pool_positive_share": share, "teacher_keys_loaded": loaded, "backbone_keys": keys,
                           "prior_estimate": estimate.to_dict() if estimate else None}}
            card_path = run.write_text("pu.yaml", yaml.safe_dump({k: v for k, v in card.items() if v is not None},
                                                                 sort_keys=False))
            run.manifest({**options, "positive_repeat": repeat}, input_record(teacher),
                         summary={"heldout_positive_recall": recall, "pool_positive_share": share,
                                  "teacher_keys_loaded": loaded, "backbone_keys": keys, "prior": prior,
                                  "prior_estimate": estimate.to_dict() if estimate else None})
            return PuResult(card_path, result.steps, loaded, keys, recall, share, prior, len(fit), len(unl_rows),
                            len(skipped), result.resumed_from, estimate)

        return run.on_main(finish)

    return PU_TRAIN.execute(out, rt, inputs, body, identity=identity, overwrite=overwrite, on_event=on_event)


class _Pooled(torch.nn.Module):
    """The PU model's pooled multi-scale features (before the SE gate) as its output."""

    def __init__(self, model: MultiScaleSE):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.pooled(x)


def positive_repeat(share: float, unlabeled: int, positives: int) -> int:
    """How many times the positives are repeated so they make at least ``share`` of the training set."""
    return max(1, math.ceil(share / (1 - share) * unlabeled / max(1, positives)))


def load_pu(path: str | Path, device: torch.device) -> tuple[MultiScaleSE, ModelCard, dict]:
    """The PU classifier of a card written by pu-train, in eval mode."""
    try:
        card = load_card(path)
    except DfkdError as e:
        raise DfkdError(f"--pu {e}") from None
    pu = card.extra.get("pu")
    if card.extra.get("kind") != "pu" or not isinstance(pu, dict) or not card.weights:
        raise DfkdError(f"--pu {path}: not a PU card (write one with dfkd pu-train)")
    model = build_pu_model(card.arch, card.num_classes, card.input, pu["taps"], pu["reduction"], card.arch_args)
    try:
        model.load_state_dict(read_state_dict(card.weights))
    except RuntimeError as e:
        raise DfkdError(f"{card.weights}: does not fit the PU model of {path} ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), card, pu
