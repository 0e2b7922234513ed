"""The ``dfkd`` command line: parses, prints with rich on stderr, calls the library.

stdout carries only what a shell pipeline should read (the path of the main file written).
"""
from __future__ import annotations

import enum
import functools
import json
import math
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .console import MAIN, emit, err, progress, table
from .errors import DfkdError, PeerError, out_of_memory, peer_gone
from .io import disk_full

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Data-free model compression: select stand-in data from a wild pool, distill a student.")

DEVICE = typer.Option("auto", metavar="auto|cpu|cuda[:N]", help="Device to run on.")
WORKERS = typer.Option(None, help="Decoding worker processes (default: by device and cores).")
AMP = typer.Option(None, "--amp/--no-amp", help="bf16 autocast (default: on for CUDA; off on CPUs, where bf16"
                                                  " changes scores in the last bits).")
INPUT_SIZE = typer.Option(None, "--input-size", help="Input size for a bare TorchScript or ONNX teacher.")
INPUT_CHANNELS = typer.Option(None, "--input-channels", help="Input channels for a bare TorchScript or ONNX teacher.")
INPUT_MEAN = typer.Option(None, "--input-mean", help="Normalisation mean per channel for a bare TorchScript or"
                                                     " ONNX teacher, comma-separated (e.g. 0.485,0.456,0.406).")
INPUT_STD = typer.Option(None, "--input-std", help="Normalisation std per channel for a bare TorchScript or ONNX"
                                                   " teacher.")
# Training commands share their loop flags (each overrides the config key of the same name).
EPOCHS = typer.Option(None, help="Epochs (overrides the config).")
STEPS = typer.Option(None, help="Train for this many steps instead of epochs.")
DEDUP = typer.Option(None, metavar="near|exact|off",
                     help="Before the budget is spent, drop duplicates: near (the same bytes, or thumbnails with"
                          " cosine >= --near-duplicate), exact (the same bytes), off. Dropped rows are listed in"
                          " duplicates.tsv. Default near.")
NEAR_DUPLICATE = typer.Option(None, "--near-duplicate", help="Cosine of two images' 8x8 thumbnails from which they"
                                                            " count as near duplicates (default 0.995).")
BATCH_SIZE = typer.Option(None, help="Global batch size (overrides the config); under torchrun each of N ranks"
                                      " trains on 1/N of every batch.")
TENSORBOARD = typer.Option(False, "--tensorboard", help="Also log the training metrics for TensorBoard in"
                                                          " OUT/tensorboard (metrics.jsonl stays).")
CACHE_DIR = typer.Option(None, "--cache-dir", help="Where a training set too large for memory is decoded to"
                                                   " (default $DFKD_CACHE_DIR or ~/.cache/dfkd); reused by later runs.")
OVERWRITE = typer.Option(False, "--overwrite", help="Start afresh in an --out that holds a run with other inputs.")
CONFIG = typer.Option(None, help="YAML file of settings (e.g. pipelines/configs/*.yaml); a file with sections"
                                 " per command (select:, distill:, ...) gives this command its section.")
SELECT_CONFIG, EXPAND_CONFIG = (
    typer.Option(None, "--config", help=f"YAML file of {name}'s settings ({keys}, ...), or a recipe with a {name}:"
                                        " section.")
    for name, keys in (("select", "num_images, policy, score, dedup"), ("expand", "threshold, num_images, dedup")))
SET = typer.Option([], "--set", help="Override a setting: key=value (repeatable; objective.<opt>=value).")
TRAIN_AMP = typer.Option(None, "--amp/--no-amp", help="bf16 autocast (default: on for CUDA and for CPUs with"
                                                        " native bf16, AVX512-BF16 or AMX; off on others).")
SEED = typer.Option(None, help="Seed (default 0).")
POSITIVE = typer.Option(..., help="A few original images: directory (class folders keep their labels) or index.")
UNLABELED = typer.Option(..., help="The wild pool: directory or index.")


def _version(value: bool) -> None:
    if value:
        from . import __version__

        emit(f"dfkd {__version__}")
        raise typer.Exit()


@app.callback()
def _options(trust_code: bool = typer.Option(
        False, "--trust-code", help="Allow python:<module>:<callable> arches, which import and run code named by"
                                    " a card or flag (as DFKD_TRUST_CODE=1 does). Only for cards you trust."),
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                     help="Print dfkd's version and exit.")) -> None:
    if trust_code:
        from .cards import TRUST_CODE

        os.environ[TRUST_CODE] = "1"


# TorchScript is dfkd's own choice of format: torch's notices that it is deprecated are not for its users.
QUIET = r"`torch\.jit\.\w+` is deprecated"


def command(fn):
    """Register ``fn`` as a subcommand; bad input (or a full disk) ends with one line on stderr and
    exit 2. Warnings are held while the command runs and shown once it ends, one line each; a
    command that fails on bad input shows its error line alone (not torch's warnings about the
    file it could not load before it)."""
    name = fn.__name__.rstrip("_").replace("_", "-")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings(record=True) as held:
            warnings.filterwarnings("ignore", QUIET, FutureWarning)
            try:
                fn(*args, **kwargs)
            except DfkdError as e:
                _fail(name, str(e), own=not isinstance(e, PeerError))
            except KeyboardInterrupt:
                _show(held)
                err.print("[yellow]interrupted[/]: run the same command again to resume")
                raise typer.Exit(130)
            except Exception as e:
                full, oom = disk_full(e), out_of_memory(e)
                if peer_gone(e):  # another rank ended on its error, shown on its own line
                    _fail(name, "another rank stopped on an error (its line is above); every rank stops", own=False)
                if full is None and oom is None:
                    _show(held)
                    raise
                _fail(name, str(oom) if oom else f"{full.filename or 'a file of the run'}: cannot write it"
                                                 f" ({full.strerror}); free some space and run the same command"
                                                 " again to resume")
            _show(held)
        from .dist import leave

        leave()

    return app.command(name)(wrapper)


def _fail(name: str, message: str, own: bool = True) -> None:
    """One line and exit 2. Under torchrun rank 0 prints; another rank prints only an error of its
    own (``own``), which rank 0 never heard of; one it was told (a PeerError) rank 0 shows."""
    line = f"[bold red]dfkd {name}: error:[/] {escape(message)}"
    if MAIN:
        err.print(line, soft_wrap=True)
    elif own:
        Console(stderr=True, highlight=False).print(f"{line} [dim](rank {os.environ.get('RANK')})[/]", soft_wrap=True)
    raise typer.Exit(2)


def _show(held: list[warnings.WarningMessage]) -> None:
    for w in held:
        text = (str(w.message).strip().splitlines() or [""])[0]
        err.print(f"[yellow]warning:[/] {w.category.__name__}: {escape(text)}", soft_wrap=True, highlight=False)


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise DfkdError(f"{flag} {text!r}: expected comma-separated finite numbers, one per channel")
    return values


def _card(path: Path, size: int | None = None, channels: int | None = None, mean: str | None = None,
          std: str | None = None, flag: str = "--teacher"):
    from .cards import load_card

    given = (("size", size), ("channels", channels), ("mean", _floats(mean, "--input-mean")),
             ("std", _floats(std, "--input-std")))
    overrides = {k: v for k, v in given if v is not None}
    try:
        return load_card(path, overrides)
    except DfkdError as e:
        raise DfkdError(f"{flag} {e}") from None


def _input_row(record: dict) -> tuple[str, str]:
    """The table row of the input a command feeds: a manifest's ``input`` (dfkd.cards.input_record)."""
    from .images import InputSpec

    spec = InputSpec(**{k: v for k, v in record.items() if k != "source"})
    return "input", f"{spec.describe()} (from {record['source']})"


def _manifest_input(out: Path) -> tuple[str, str]:
    """The input row from the manifest rank 0 wrote (the other ranks print nothing, and on
    another node may not see the file)."""
    if not MAIN:
        return "input", ""
    return _input_row(json.loads((out / "manifest.json").read_text(encoding="utf-8"))["input"])


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise DfkdError(f"--shard {text!r}: expected I/N, e.g. 0/4 for the first of four slices") from None
    return i, n


@command
def select(
    teacher: List[Path] = typer.Option([], help="Teacher: a card, a TorchScript or ONNX file, or a Hugging Face"
                                                " model folder; repeat for an ensemble."
                                                " Required unless --merge."),
    pool: Optional[str] = typer.Option(None, help="Wild pool: a directory (scanned recursively), an index file or"
                                                  " tar shards (a .tar, a {000..099} pattern, http(s):// or pipe:CMD)."
                                                  " Required unless --merge."),
    out: Path = typer.Option(..., help="Run directory to write scores/selected/skipped.tsv into."),
    num_images: Optional[str] = typer.Option(None, help="Select this many images (without it or --ratio:"
                                                        " every scored image, best first); auto: as many as"
                                                        " the pool holds in-distribution, estimated from the"
                                                        " teacher's features against the labeled data eval"
                                                        " --write-card fitted (else from the noise values)."),
    ratio: Optional[float] = typer.Option(None, help="Select this share of the scored pool."),
    max_score: Optional[float] = typer.Option(None, "--max-score",
                                              help="Keep only images whose score (of any --score) is <= this."),
    per_class: Optional[bool] = typer.Option(None, "--per-class/--global",
                                             help="Balanced quota per predicted class (default) or the paper's"
                                                  " global top-k."),
    score: Optional[str] = typer.Option(None, metavar="noise|entropy|energy|random",
                                        help="Scorer: noise (DFND, default), entropy, energy, random."),
    policy: Optional[str] = typer.Option(None, metavar="per-class|global|diverse",
                                         help="Policy (dfkd list policies); overrides --per-class/--global:"
                                                    " e.g. diverse (per-class, spread over k-means clusters)."),
    dedup: Optional[str] = DEDUP,
    near_duplicate: Optional[float] = NEAR_DUPLICATE,
    batch_size: Optional[int] = typer.Option(None, help="Images per batch (per rank under torchrun; default 256)."),
    shard: Optional[str] = typer.Option(None, help="Score only slice I of N of the pool (I/N, from 0): for cluster"
                                                   " jobs without torchrun; then select with --merge."),
    merge: List[Path] = typer.Option([], help="Select from finished --shard runs (repeatable; a folder holding"
                                              " them all will do) instead of scoring."),
    config: Optional[Path] = SELECT_CONFIG,
    set_: List[str] = SET,
    overwrite: bool = OVERWRITE,
    workers: Optional[int] = WORKERS,
    device: str = DEVICE,
    amp: Optional[bool] = AMP,
    seed: Optional[int] = typer.Option(None, help="Seed (random scorer; default 0)."),
    input_size: Optional[int] = INPUT_SIZE,
    input_channels: Optional[int] = INPUT_CHANNELS,
    input_mean: Optional[str] = INPUT_MEAN,
    input_std: Optional[str] = INPUT_STD,
) -> None:
    """Score every pool image with the teacher and select the most useful ones (DFND)."""
    from .config import resolve
    from .select import SelectConfig, merge_shards, select_pool

    cfg = resolve(SelectConfig, config, set_, dict(
        num_images=_num_images(num_images), ratio=ratio, max_score=max_score, score=score, dedup=dedup,
        near_duplicate=near_duplicate, batch_size=batch_size, seed=seed,
        policy=policy or (None if per_class is None else "per-class" if per_class else "global")), command="select")
    if merge:
        if teacher or pool or shard:
            raise DfkdError("--merge takes the teacher and pool from the shard runs: drop --teacher, --pool, --shard")
        result = merge_shards(merge, out, cfg, workers=workers, device=device, amp=amp, overwrite=overwrite)
    else:
        if not teacher or pool is None:
            raise DfkdError("--teacher and --pool are required (or --merge SHARD_RUNS)")
        cards = [_card(t, input_size, input_channels, input_mean, input_std) for t in teacher]
        with progress("scoring") as update:
            result = select_pool(cards, pool, out, cfg, shard=_shard(shard), workers=workers, device=device, amp=amp,
                                 overwrite=overwrite, on_progress=lambda d, t: update(d, t))
    err.print(table("select", ["", "images"], [("pool", result.pool_size), ("skipped", result.skipped),
                                              ("scored", result.scored), ("selected", result.selected)]))
    err.print("teacher %s: %s" % _manifest_input(out))
    if result.estimate is not None:
        e = result.estimate
        err.print(f"in-distribution estimate ({e.method}): {e.count} of {e.scored} images ({e.share:.3f}),"
                  f" range {e.low}..{e.high}; selected that many")
    if "selected" in result.files:
        err.print(table("selected per teacher class", ["class", "count"],
                        [(result.classes[c], n) for c, n in enumerate(result.class_counts)]))
    qs = result.score_quantiles
    chosen = [("selected", *result.selected_quantiles.values())] if result.selected_quantiles else []  # a --shard: none
    err.print(table(f"{cfg.score} score", ["", *qs], [("pool", *qs.values()), *chosen]))
    if result.skipped:
        err.print(f"[yellow]{result.skipped} file(s) skipped[/]: see {result.files['skipped']}")
    _left_out(result.duplicates, result.files)
    emit(result.files.get("selected", result.files["scores"]))


def _or_auto(text: str | None, kind: type, flag: str, expected: str) -> int | float | str | None:
    """A flag that takes a number of ``kind`` or ``auto`` (an estimate)."""
    if text is None or text == "auto":
        return text
    try:
        return kind(text)
    except ValueError:
        raise DfkdError(f"{flag} {text!r}: expected {expected} or auto") from None


def _num_images(text: str | None) -> int | str | None:
    return _or_auto(text, int, "--num-images", "a whole number")


def _prior(text: str | None) -> float | str | None:
    return _or_auto(text, float, "--prior", "a number in (0, 1)")


def _loop_flags(**flags) -> dict:
    return {k: v for k, v in flags.items() if v is not None}


@command
def train(
    arch: str = typer.Option(..., help="Architecture: registry name, torchvision:<name> or python:<mod>:<fn>."),
    data: Path = typer.Option(..., help="Labeled images: ImageFolder directory or index with a label column."),
    out: Path = typer.Option(..., help="Run directory (model.yaml, metrics.jsonl, checkpoints/)."),
    epochs: Optional[int] = EPOCHS,
    steps: Optional[int] = STEPS,
    batch_size: Optional[int] = BATCH_SIZE,
    lr: Optional[float] = typer.Option(None, help="Learning rate of the config's optimizer (default: SGD, 0.1)."),
    size: Optional[int] = typer.Option(None, "--size", "--input-size",
                                       help="Input size (default: the first image's)."),
    channels: Optional[int] = typer.Option(None, "--channels", "--input-channels",
                                           help="Input channels, 1 or 3 (default: the first image's)."),
    val_split: float = typer.Option(0.1, help="Share of the data held out for validation (0: none)."),
    config: Optional[Path] = CONFIG,
    set_: List[str] = SET,
    amp: Optional[bool] = TRAIN_AMP,
    workers: Optional[int] = WORKERS,
    device: str = DEVICE,
    seed: Optional[int] = SEED,
    overwrite: bool = OVERWRITE,
    tensorboard: bool = TENSORBOARD,
    cache_dir: Optional[Path] = CACHE_DIR,
) -> None:
    """Train a classifier with cross-entropy (a teacher for the demo, or a baseline)."""
    from .config import resolve
    from .train.classifier import train_classifier
    from .train.loop import LoopConfig

    loop = resolve(LoopConfig, config, set_, _loop_flags(
        epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, amp=amp, seed=seed), command="train")
    with _training_progress(table("config", ["key", "value"], asdict(loop).items())) as on_event:
        result = train_classifier(arch, data, out, loop, size=size, channels=channels, val_split=val_split,
                                  workers=workers, device=device, overwrite=overwrite, tensorboard=tensorboard,
                                  cache_dir=cache_dir, on_event=on_event)
    rows = [("steps", result.steps), ("validation top-1 (last)", result.val_top1),
            ("validation top-1 (best)", result.best["val_top1"] if result.best else None),
            ("skipped images", result.skipped), _manifest_input(out)]
    if result.resumed_from:
        rows.insert(0, ("resumed from step", result.resumed_from))
    err.print(table("train", ["", "value"], rows))
    emit(result.card)


class _training_progress:
    """Progress for decode + training steps, showing the latest named losses. ``config`` (the
    resolved config's table) is printed once the run is opened, so that a bad input fails with
    its one error line alone."""

    def __init__(self, config: Table):
        self.config = config

    def __enter__(self):
        self._ctx = progress("training", unit="step")
        self._update = self._ctx.__enter__()
        self._total = None
        return self.on_event

    def on_event(self, ev) -> None:
        from .events import Decoded, Logged, Note, Opened, Started, TeacherPass

        if isinstance(ev, Opened):
            self._update(0, None, log=self.config)
        elif isinstance(ev, Decoded):
            self._update(ev.done, ev.total, info="decoding images")
        elif isinstance(ev, TeacherPass):
            self._update(ev.done, ev.total, info="the teacher reads the training set")
        elif isinstance(ev, Note):
            self._update(0, None, log=ev.text)
        elif isinstance(ev, Started):
            self._total = ev.total
            self._update(ev.step, ev.total, info="")
        elif isinstance(ev, Logged):
            r = ev.record
            losses = " ".join(f"{k} {v:.4g}" for k, v in r.items()
                              if k not in ("step", "epoch", "images_per_s") and isinstance(v, float))
            line = f"epoch {r['epoch']:g} step {r['step']} {losses}" if "val_top1" in r or \
                float(r["epoch"]).is_integer() else None
            self._update(r["step"], self._total, info=f"loss {r['loss']:.4g}", log=line)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


@command
def distill(
    teacher: List[Path] = typer.Option(..., help="Teacher: a card, a TorchScript or ONNX file, or a Hugging Face"
                                                     " model folder; repeat for an ensemble (MEAL V2)."),
    student: str = typer.Option(..., help="Student architecture name, or a card whose weights initialise it."),
    data: List[Path] = typer.Option(..., help="Training images: index file(s) or directories (repeatable)."),
    out: Path = typer.Option(..., help="Run directory (student.yaml, metrics.jsonl, checkpoints/)."),
    method: Optional[str] = typer.Option(None, metavar="kd|noisy|robust",
                                         help="Objective: kd, noisy (DFND) or robust (PU). Default noisy."),
    config: Optional[Path] = CONFIG,
    set_: List[str] = SET,
    epochs: Optional[int] = EPOCHS,
    steps: Optional[int] = STEPS,
    batch_size: Optional[int] = BATCH_SIZE,
    lr: Optional[float] = typer.Option(None, help="Student learning rate (default: SGD, 0.1)."),
    temperature: Optional[float] = typer.Option(None, help="KD temperature (objective.temperature)."),
    eval_data: Optional[Path] = typer.Option(None, help="Labeled VALIDATION images: val top-1 per epoch, best.pt."),
    amp: Optional[bool] = TRAIN_AMP,
    workers: Optional[int] = WORKERS,
    device: str = DEVICE,
    seed: Optional[int] = SEED,
    input_size: Optional[int] = INPUT_SIZE,
    input_channels: Optional[int] = INPUT_CHANNELS,
    input_mean: Optional[str] = INPUT_MEAN,
    input_std: Optional[str] = INPUT_STD,
    overwrite: bool = OVERWRITE,
    tensorboard: bool = TENSORBOARD,
    cache_dir: Optional[Path] = CACHE_DIR,
) -> None:
    """Distill the teacher into a student on selected/expanded images (kd, noisy, robust)."""
    from .config import resolve_config
    from .distill.run import default_config, distill as run_distill

    cfg = resolve_config(default_config(), config, set_, _loop_flags(
        method=method, epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, amp=amp, seed=seed,
        **{"objective.temperature": temperature}), command="distill")
    cards = [_card(t, input_size, input_channels, input_mean, input_std) for t in teacher]
    from .cards import input_record

    rows = [*cfg.items(), _input_row(input_record(cards[0]))]
    with _training_progress(table("config", ["key", "value"], rows)) as on_event:
        result = run_distill(cards, student, data, out, cfg, eval_data=eval_data, workers=workers,
                             device=device, overwrite=overwrite, tensorboard=tensorboard, cache_dir=cache_dir,
                             on_event=on_event)
    rows = [("objective", result.description), ("images", result.images), ("skipped images", result.skipped),
            ("steps", result.steps), *[(f"last {k}", v) for k, v in result.last.items()
                                       if k not in ("step", "epoch", "lr")]]
    if result.best:
        rows.append(("best val top-1 (step)", f"{result.best['val_top1']:.4f} ({result.best['step']})"))
    if result.resumed_from:
        rows.insert(0, ("resumed from step", result.resumed_from))
    err.print(table("distill", ["", "value"], rows))
    emit(result.card)


@command
def pu_train(
    teacher: Path = typer.Option(..., help="Teacher model card: its architecture and weights are the backbone."),
    positive: Path = POSITIVE,
    unlabeled: Path = UNLABELED,
    out: Path = typer.Option(..., help="Run directory (pu.yaml, metrics.jsonl, checkpoints/)."),
    prior: Optional[str] = typer.Option(None, help="Class prior: the share of the pool that is positive"
                                                   " (nnpu.prior), if you know it; default auto: estimated"
                                                   " from the positives and the pool (best bin estimation)."),
    backbone: Optional[str] = typer.Option(None, help="Backbone arch instead of the teacher's (random init;"
                                                      " model.backbone)."),
    taps: Optional[str] = typer.Option(None, help="Comma-separated backbone modules to tap (default: the stages;"
                                                  " model.taps)."),
    reduction: Optional[int] = typer.Option(None, help="Squeeze-excitation reduction r (model.reduction, default 16)."),
    beta: Optional[float] = typer.Option(None, help="nnPU beta (nnpu.beta, default 0)."),
    gamma: Optional[float] = typer.Option(None, help="nnPU gamma (nnpu.gamma, default 1)."),
    positive_share: Optional[float] = typer.Option(None, help="Oversample positives to this share of the training"
                                                              " set (default 0.25; 0: not repeated)."),
    epochs: Optional[int] = EPOCHS,
    steps: Optional[int] = STEPS,
    batch_size: Optional[int] = BATCH_SIZE,
    lr: Optional[float] = typer.Option(None, help="Learning rate (default: Adam, 1e-3)."),
    config: Optional[Path] = CONFIG,
    set_: List[str] = SET,
    amp: Optional[bool] = TRAIN_AMP,
    workers: Optional[int] = WORKERS,
    device: str = DEVICE,
    seed: Optional[int] = SEED,
    overwrite: bool = OVERWRITE,
    tensorboard: bool = TENSORBOARD,
    cache_dir: Optional[Path] = CACHE_DIR,
) -> None:
    """Train the PU classifier (nnPU risk, multi-scale SE features) of PU Compression."""
    from .config import resolve_config
    from .pu.train import default_config, pu_train as run_pu, with_prior

    cfg = resolve_config(default_config(), config, set_, _loop_flags(
        epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, amp=amp, seed=seed, positive_share=positive_share,
        **{"nnpu.prior": _prior(prior), "nnpu.beta": beta, "nnpu.gamma": gamma, "model.backbone": backbone,
           "model.taps": taps, "model.reduction": reduction}), command="pu-train")
    cfg["nnpu"] = with_prior(cfg["nnpu"])  # shown as it runs
    card = _card(teacher)
    from .cards import input_record

    rows = [*cfg.items(), _input_row(input_record(card))]
    with _training_progress(table("config", ["key", "value"], rows)) as on_event:
        r = run_pu(card, positive, unlabeled, out, cfg, workers=workers, device=device, overwrite=overwrite,
                   tensorboard=tensorboard, cache_dir=cache_dir, on_event=on_event)
    loaded = "none (random init)" if r.teacher_keys_loaded is None else f"{r.teacher_keys_loaded} of {r.backbone_keys}"
    err.print(table("pu-train", ["", "value"], [
        ("teacher weights loaded into the backbone", loaded), ("positives (training)", r.positives),
        ("unlabeled", r.unlabeled), ("skipped images", r.skipped), ("steps", r.steps),
        ("held-out positives scored positive", r.heldout_positive_recall),
        ("pool scored positive", r.pool_positive_share), ("prior", r.prior),
        *([("prior range (estimate)", f"{r.prior_estimate.low:.4f}..{r.prior_estimate.high:.4f}")]
          if r.prior_estimate else [])]))
    emit(r.card)


@command
def expand(
    pu: Path = typer.Option(..., help="PU card written by dfkd pu-train."),
    positive: Path = POSITIVE,
    unlabeled: Path = UNLABELED,
    out: Path = typer.Option(..., help="Run directory (expanded.tsv, pu_scores.tsv, duplicates.tsv, skipped.tsv)."),
    threshold: Optional[float] = typer.Option(None, help="Keep pool images with g(x) > threshold (default and"
                                                         " reference: 0)."),
    num_images: Optional[int] = typer.Option(None, help="Keep the top N pool images instead of a threshold."),
    config: Optional[Path] = EXPAND_CONFIG,
    set_: List[str] = SET,
    overwrite: bool = OVERWRITE,
    repeat_positive: Optional[int] = typer.Option(None, help="Write the positives this many times (default 1)."),
    teacher: Optional[Path] = typer.Option(None, help="Teacher card for per-class counts (default: the PU card's)."),
    dedup: Optional[str] = DEDUP,
    near_duplicate: Optional[float] = NEAR_DUPLICATE,
    batch_size: Optional[int] = typer.Option(None, help="Images per batch (per rank under torchrun; default 256)."),
    workers: Optional[int] = WORKERS,
    device: str = DEVICE,
    amp: Optional[bool] = AMP,
) -> None:
    """Build PU Compression's expanded dataset: positives plus the pool images the PU classifier accepts."""
    from .config import resolve
    from .pu.expand import ExpandConfig, expand as run_expand

    cfg = resolve(ExpandConfig, config, set_, dict(
        threshold=threshold, num_images=num_images, repeat_positive=repeat_positive, dedup=dedup,
        near_duplicate=near_duplicate, batch_size=batch_size), command="expand")
    with progress("scoring") as update:
        r = run_expand(pu, positive, unlabeled, out, cfg, teacher=teacher, workers=workers, device=device, amp=amp,
                       overwrite=overwrite, on_progress=update)
    err.print(table("expand", ["", "images"], [("pool", r.pool_size), ("skipped", r.skipped),
                                              ("selected from the pool", r.selected),
                                              ("share of the pool", round(r.selected / max(1, r.pool_size), 4)),
                                              ("positives", r.positives)]))
    if r.class_counts is not None:
        err.print(table("selected per teacher class", ["class", "count"], zip(r.classes, r.class_counts)))
    err.print("PU classifier %s: %s" % _manifest_input(out))
    _left_out(r.duplicates, r.files)
    emit(r.files["expanded"])


def _left_out(duplicates: int, files: dict[str, Path]) -> None:
    """select's and expand's line on the duplicates they dropped (none when --dedup off)."""
    if "duplicates" in files:
        err.print(f"{duplicates} duplicate(s) left out before choosing: see {files['duplicates']}")


@command
def export(
    model: Path = typer.Option(..., help="Model card (YAML)."),
    format: str = typer.Option("torchscript", metavar="torchscript|onnx", help="Format of the file."),
    out: Path = typer.Option(..., help="File to write."),
) -> None:
    """Export a model to TorchScript or ONNX and check the outputs match the original."""
    from .cards import input_record
    from .export import export_model

    card = _card(model, flag="--model")
    result = export_model(card, format, out)
    err.print(table("export", ["", "value"], [("format", result.format), ("samples compared", result.samples),
                                             ("max |difference| of logits", result.max_abs_diff),
                                             _input_row(input_record(card))]))
    emit(result.path)


@command
def report(
    run_dir: Path = typer.Argument(..., help="Run directory (--out of select, expand, distill, train or eval)."),
    out: Optional[Path] = typer.Option(None, help="HTML file to write (default: RUN_DIR/report.html)."),
) -> None:
    """A self-contained HTML page of a run: score histograms, class counts, image grids, curves, accuracy."""
    from .report import write_report

    emit(write_report(run_dir, out))


@command
def eval_(
    model: Path = typer.Option(..., help="Model: a card, a TorchScript or ONNX file, or a Hugging Face model folder."),
    data: Path = typer.Option(..., help="Labeled images: ImageFolder directory or index with a label column."),
    out: Optional[Path] = typer.Option(None, help="Directory to write eval.json into."),
    write_card: bool = typer.Option(False, "--write-card", help="Store accuracy, class_accuracy and the noise"
                                    " values' quantiles in the card, and fit the features' Mahalanobis reference"
                                    " beside it (what select --num-images auto compares a pool with)."),
    overwrite: bool = OVERWRITE,
    batch_size: int = typer.Option(256),
    workers: Optional[int] = WORKERS,
    device: str = DEVICE,
    amp: Optional[bool] = AMP,
    input_size: Optional[int] = INPUT_SIZE,
    input_channels: Optional[int] = INPUT_CHANNELS,
    input_mean: Optional[str] = INPUT_MEAN,
    input_std: Optional[str] = INPUT_STD,
) -> None:
    """Top-1/top-5, per-class accuracy and confusion matrix of a model on labeled images."""
    from .evaluate import evaluate

    card = _card(model, input_size, input_channels, input_mean, input_std, flag="--model")
    with progress("evaluating") as update:
        result = evaluate(card, data, out, batch_size=batch_size, workers=workers, device=device, amp=amp,
                          overwrite=overwrite, write_card=write_card, on_progress=update)
    if out:
        emit(out / "eval.json")
    names = result.classes
    err.print(table("per class", ["class", "images", "top-1"],
                    [(names[i], result.class_support[i], result.class_accuracy[i]) for i in range(len(names))]))
    if len(names) <= 20:
        err.print(table("confusion (rows: true, columns: predicted)", ["", *[str(i) for i in range(len(names))]],
                        [(f"{i} {names[i]}", *row) for i, row in enumerate(result.confusion)]))
    summary = [("images", result.num_images), ("skipped", len(result.skipped)), ("top-1", result.top1),
               _input_row(result.input)]
    if result.top5 is not None:
        summary.append(("top-5", result.top5))
    err.print(table(f"eval {model.name}", ["", "value"], summary))
    if write_card:
        fit = result.mahalanobis
        err.print(f"accuracy and noise values written to {card.path}" + (
            f"; Mahalanobis fit of the features ({fit['fitted']} images, {fit['images']} held out) to {fit['file']}"
            if fit else "; no Mahalanobis fit (the model's features cannot be read), so select --num-images auto"
            " will estimate from the noise values"))
    if not out:
        emit(json.dumps({"top1": result.top1, "top5": result.top5}))


Registry = enum.Enum("Registry", {k: k for k in ("archs", "scorers", "policies", "objectives", "extractors", "all")},
                     type=str)  # dfkd list's argument: its values shown in the help


@command
def list_(what: Registry = typer.Argument("all", help="The registry to list.")) -> None:
    """List the registries: architectures, scorers, selection policies, objectives, PU extractors.

    The list is the command's output, so it goes to stdout: tables on a terminal, tab-separated
    lines (registry, key, summary, paper) in a pipe."""
    registries, what = _registries(), Registry(what).value
    if what != "all" and what not in registries:
        raise DfkdError(f"unknown registry {what!r}; known: {', '.join(registries)}")
    from rich.console import Console

    out = Console(highlight=False)
    for name, reg in registries.items():
        if what in ("all", name):
            if out.is_terminal:
                out.print(table(name, ["key", "summary", "paper"], [(e.key, e.summary, e.paper) for e in reg]))
            else:
                for e in reg:
                    emit("\t".join((name, e.key, e.summary, e.paper)))


def _registries() -> dict:
    from .models import ARCHS
    from .select import POLICIES, SCORERS

    from .distill import OBJECTIVES
    from .pu import EXTRACTORS

    return {"archs": ARCHS, "scorers": SCORERS, "policies": POLICIES, "objectives": OBJECTIVES,
            "extractors": EXTRACTORS}


def _click_errors():
    """The module of click's exceptions that typer raises: its own copy of click since typer
    0.2x, click itself before."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def main() -> None:
    """The console script. A usage error (an unknown or misspelt flag, a missing or bad value)
    ends as every other error does: one line, exit 2, with the flag meant when one fits; ``-h``
    is ``--help``."""
    import sys

    errors = _click_errors()
    try:
        code = app(args=_renamed(sys.argv[1:]), prog_name="dfkd", standalone_mode=False,
                   help_option_names=["-h", "--help"])
    except errors.NoArgsIsHelpError as e:  # bare `dfkd`: the help and exit 2, as before
        e.show()
        code = e.exit_code
    except errors.UsageError as e:
        where = e.ctx.command_path if e.ctx else "dfkd"
        err.print(f"[bold red]{where}: error:[/] {_usage_line(e, errors)}", soft_wrap=True)
        code = 2
    except typer.Abort:
        code = 130
    sys.exit(code or 0)


# Flags renamed in a release, still taken for one more (0.3) with a note on stderr. They are not
# click options, so that torchrun's parser, which takes abbreviations, never meets them as dfkd's
# (--num would be --numa-binding's: tests/test_distributed.py).
RENAMED = {"select": {"--num": "--num-images", "--max-noise": "--max-score"}, "expand": {"--num": "--num-images"}}


def _renamed(argv: list[str]) -> list[str]:
    """``argv`` with the renamed flags of its subcommand given their new names, each noted once."""
    command = next((a for a in argv if not a.startswith("-")), None)
    renamed, out = RENAMED.get(command, {}), []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        flag, eq, value = arg.partition("=")
        if flag in renamed:
            err.print(f"[yellow]warning:[/] dfkd {command} {flag} is deprecated and goes in the next release;"
                      f" use {renamed[flag]}", soft_wrap=True, highlight=False)
            arg = renamed[flag] + eq + value
        out.append(arg)
    return out


def _usage_line(e, errors) -> str:
    """click's message in one line; for an unknown flag, the flags it may stand for: those it
    begins (``--num``: ``--num-images``), else the close spellings."""
    import difflib

    if not isinstance(e, errors.NoSuchOption) or e.ctx is None:
        return " ".join(e.format_message().split())
    flags = sorted({o for p in e.ctx.command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")})
    meant = [f for f in flags if f.startswith(e.option_name)] or difflib.get_close_matches(e.option_name, flags, 3, 0.7)
    hint = f"did you mean {' or '.join(meant[:3])}?" if meant else f"see {e.ctx.command_path} --help"
    return f"no such option {e.option_name}; {hint}"
