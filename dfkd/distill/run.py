"""``distill``: train a student on index files with a KD objective against a frozen teacher.

The student is fed exactly what the teacher is (the teacher card's input), on the same
augmented batch. Settings come in layers (defaults here -> ``--config`` -> ``--set`` -> flags);
the resolved config is saved as ``OUT/config.yaml`` and a resumed run must match it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import yaml

from ..cards import CardLike, ModelCard, as_cards, build_arch, input_record, load_card, load_model, save_card
from ..config import resolve_config
from ..errors import DfkdError
from ..events import Note, OnEvent, TeacherPass
from ..images import labeled_paths, pool_paths
from ..index import Rows
from ..models.features import classifier_layer
from ..pool import data_digest
from ..lifecycle import Command, Input, Run, card_inputs
from ..runtime import setup
from ..teacher import card_digest, check_compatible, ensemble_accuracy, load_teacher
from ..train.data import ImageSet, decode_images
from ..train.loop import LoopConfig, accuracy, batch_outputs, run_loop
from .objectives import OBJECTIVES, build_objective, objective_options
from .terms import TERM_DEFAULTS, WithTerms, check_terms

# Config keys newer than some run directories, at the value that trains as those runs did: such a
# run, finished or killed, is still the same run (rundir's ``added``).
ADDED = {("config", "online", "policy"): "global"}


def _online_identity(online: dict) -> dict:
    """What of ``online`` changes the training: without online selection (keep 1) no policy does,
    so the run is recorded as the versions before ``online.policy`` implied (global)."""
    return {**online, "policy": online["policy"] if online["keep"] < 1 else "global"}


@dataclass
class DistillConfig(LoopConfig):
    """A distillation's settings, typed: the loop's, the method, its objective's options
    (``dfkd list objectives``) and the extra terms. ``asdict()`` gives the config the CLI resolves."""

    method: str = "noisy"
    objective: dict = field(default_factory=dict)
    align: dict = field(default_factory=lambda: dict(TERM_DEFAULTS["align"]))
    correlation: dict = field(default_factory=lambda: dict(TERM_DEFAULTS["correlation"]))
    discriminator: dict = field(default_factory=lambda: dict(TERM_DEFAULTS["discriminator"]))
    online: dict = field(default_factory=lambda: dict(TERM_DEFAULTS["online"]))


def default_config() -> dict:
    """Defaults in code: the loop's settings, the method, its objective's options, extra terms."""
    return asdict(DistillConfig())


DISTILL = Command("distill", ("student.yaml", "student.pt", "skipped.tsv", "config.yaml", "class_counts.json",
                              "tensorboard"), DistillConfig)


@dataclass
class DistillResult:
    card: Path
    steps: int
    last: dict
    best: dict | None
    val_top1: float | None
    description: str
    resumed_from: int
    images: int
    skipped: int


def read_data(paths: Sequence[str | Path]) -> Rows:
    """The paths and labels of one or more index files (or pools), concatenated, compact."""
    rows = [pool_paths(p, flag="--data") for p in paths]
    return sum(rows[1:], rows[0])


def _finite_teacher(teacher: torch.nn.Module, data: ImageSet, card: ModelCard, device: torch.device,
                    cfg: LoopConfig, on_event: OnEvent | None) -> tuple[ImageSet, torch.Tensor, dict]:
    """One unaugmented teacher pass: images on which the teacher outputs NaN/inf are left out and
    recorded (as select does), never trained on. Returns the rest, the teacher's soft class
    counts on them (robust KD's y_k), summed batch by batch (the logits are not kept), and its
    mean confidence max_k p_k on them, in all and per predicted class (noisy KD's estimate_accuracy)."""
    k = card.num_classes
    finite, counts = [], torch.zeros(k, dtype=torch.float64)
    conf_sum, conf_n = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)
    done = 0
    for logits in batch_outputs(teacher, data, card.input, device, cfg):
        ok = torch.isfinite(logits).all(1)
        finite.append(ok)
        done += len(ok)
        if on_event:
            on_event(TeacherPass(done, len(data)))
        p = torch.softmax(logits[ok], 1).double()
        counts += p.sum(0)
        top, arg = p.max(1)
        conf_sum.index_add_(0, arg, top)
        conf_n.index_add_(0, arg, torch.ones_like(top))
    mean = float(conf_sum.sum() / conf_n.sum().clamp_min(1))
    confidence = {"mean": mean, "class_mean": torch.where(conf_n > 0, conf_sum / conf_n.clamp_min(1), mean).tolist()}
    ok = torch.cat(finite)
    if bool(ok.all()):
        return data, counts, confidence
    bad = [{"path": data.paths[i], "reason": "teacher output is not finite (NaN/inf)"}
           for i in (~ok).nonzero().squeeze(1).tolist()]
    keep = ok.nonzero().squeeze(1)
    if len(keep) == 0:
        raise DfkdError(f"--teacher {card.path}: outputs NaN/inf on every one of the {len(data)} training images")
    return data.subset(keep, data.skipped + bad), counts, confidence


def _student(student: str, teacher: ModelCard, device: torch.device) -> tuple[torch.nn.Module, str, dict]:
    """``student`` is an arch name or a card (whose weights, if any, initialise the student)."""
    if student.endswith((".yaml", ".yml")):
        card = load_card(student)
        if card.torchscript or not card.arch:
            raise DfkdError(f"--student {student}: a student card needs 'arch' (TorchScript cannot be trained)")
        if card.num_classes != teacher.num_classes:
            raise DfkdError(f"--student {student}: has {card.num_classes} classes, the teacher"
                            f" {teacher.num_classes}")
        return load_model(card, device), card.arch, card.arch_args
    return build_arch(student, teacher.num_classes, teacher.input.channels, where="--student"), student, {}


@dataclass
class Plan:
    """A distill config taken apart and checked: what :func:`check_config` returns."""
    config: dict
    method: str
    objective: dict
    terms: dict
    loop: LoopConfig
    info: dict  # what the objective is told: the teachers' accuracies (class counts come later)
    options: dict  # the objective's resolved options


def check_config(teachers: Sequence[ModelCard], config: DistillConfig | dict | str | Path | None) -> Plan:
    """Everything :func:`distill` checks before it decodes an image: the teachers agree, and the
    loop keys, the terms and the objective's options are valid (else one DfkdError naming the key)."""
    check_compatible(teachers)
    config = resolve_config(default_config(), asdict(config) if isinstance(config, DistillConfig) else config,
                            command="distill")
    method, obj_cfg = config["method"], dict(config.get("objective") or {})
    if method not in OBJECTIVES:
        raise DfkdError(f"--method {method!r}: expected one of {', '.join(OBJECTIVES.keys())}")
    terms = check_terms({k: config[k] for k in TERM_DEFAULTS})
    loop = LoopConfig(**{k: v for k, v in config.items() if k not in ("method", "objective", *TERM_DEFAULTS)})
    loop.check()
    info = {**ensemble_accuracy(teachers), "class_counts": None, "teacher_card": str(teachers[0].path)}
    return Plan(config, method, obj_cfg, terms, loop, info, objective_options(method, teachers[0].num_classes,
                                                                             obj_cfg, info))


def distill(teachers: CardLike | Sequence[CardLike], student: str, data: str | Path | Sequence[str | Path],
            out: str | Path, config: DistillConfig | dict | str | Path | None = None, *,
            eval_data: str | Path | None = None, workers: int | None = None, device: str = "auto",
            stop_after: int | None = None, overwrite: bool = False, tensorboard: bool = False,
            cache_dir: str | Path | None = None, on_event: OnEvent | None = None) -> DistillResult:
    """Distill the teacher (or an ensemble of teachers; cards or their paths) into ``student`` on
    the images of ``data`` (an index file or folder, or a list of them), with ``config`` a
    :class:`DistillConfig`, a dict of some of its keys, or a YAML file (its ``distill:`` section).

    Under torchrun: DistributedDataParallel on the student (never the teacher), the batch size
    global; rank 0 writes, every rank gets the result."""
    teachers = as_cards(teachers, "teachers")
    data = [data] if isinstance(data, (str, Path)) else list(data)
    plan = check_config(teachers, config)
    card, config, method, obj_cfg, terms, loop, info = (teachers[0], plan.config, plan.method, plan.objective,
                                                        plan.terms, plan.loop, plan.info)
    out = Path(out)
    rt = setup(device, loop.amp, workers, training=True)
    loop.amp = rt.amp
    rows = read_data(data)
    options = plan.options
    teacher = load_teacher(teachers, rt.device, options.get("temperature", 1.0))
    torch.manual_seed(loop.seed)
    s_model, arch, arch_args = _student(student, card, rt.device)
    dims = {}
    if terms["align"]["weight"] > 0 or terms["correlation"]["weight"] > 0:
        dims = {"student_dim": classifier_layer(s_model, "the student").in_features,
                "teacher_dim": classifier_layer(teacher.members[0], f"--teacher {card.path}").in_features}
    student_init = load_card(student) if Path(student).is_file() else None
    identity = {"teacher": teacher.identity(), "student": card_digest(student_init) if student_init else student,
                "data": [data_digest(p) for p in data],
                "eval_data": data_digest(eval_data) if eval_data is not None else None,
                "config": {**json.loads(json.dumps(config)), "online": _online_identity(terms["online"])}}
    v_rows = labeled_paths(eval_data, card.classes, flag="--eval-data")[0] if eval_data is not None else None
    inputs = [*card_inputs("--teacher", teachers), *(card_inputs("--student", [student_init], "student")
                                                       if student_init else ()),
              *(Input(f"data{i}", "--data", p) for i, p in enumerate(data)), Input("eval_data", "--eval-data", eval_data)]

    def body(run: Run) -> DistillResult:
        val = None
        if v_rows is not None:
            val = decode_images(v_rows.paths, card.input, v_rows.labels, batch_size=loop.batch_size,
                                workers=rt.workers, what="--eval-data", cache_dir=cache_dir, ranks=rt.ranks)
        train = decode_images(rows.paths, card.input, rows.labels, batch_size=loop.batch_size, workers=rt.workers,
                              what="--data", cache_dir=cache_dir, ranks=rt.ranks, on_event=run.on_event)
        train.skipped = rows.problems + train.skipped
        train, counts, info["confidence"] = _finite_teacher(teacher.model, train, card, rt.device, loop, run.on_event)
        info["class_counts"] = counts.tolist()
        run.write_json("class_counts.json", {"class_counts": info["class_counts"], "images": len(train)})
        objective = WithTerms(build_objective(method, card.num_classes, obj_cfg, info), card.num_classes,
                              terms, **dims)
        run.write_text("config.yaml", yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=False))
        run.write_index("skipped.tsv", train.skipped, ["path", "reason"])
        run.event(Note(objective.describe()))
        result = run_loop(s_model, objective, train, card.input, loop, run.out, rt, teacher=teacher, val=val,
                          stop_after=stop_after, tensorboard=tensorboard, on_event=run.on_event)

        def finish() -> DistillResult:
            val_top1 = accuracy(s_model, val, card.input, rt.device, loop) if val is not None else None
            student_card = save_card(run.out / "student.yaml", arch, card.num_classes, card.input,
                                     s_model.state_dict(), arch_args, keep=result.finished_before,
                                     classes=card.classes, kind="student",
                                     notes=f"dfkd distill --method {method} from {card.path}")
            run.manifest(config, input_record(card), objective=objective.describe(), student=student,
                         ranks=rt.ranks.world, summary={"steps": result.steps, "last": result.last,
                                                        "best": result.best, "val_top1": val_top1})
            return DistillResult(student_card, result.steps, result.last, result.best, val_top1,
                                 objective.describe(), result.resumed_from, len(train), len(train.skipped))

        return run.on_main(finish)

    return DISTILL.execute(out, rt, inputs, body, identity=identity, overwrite=overwrite, added=ADDED,
                           on_event=on_event)
