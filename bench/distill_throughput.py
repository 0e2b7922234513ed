"""How close ``dfkd distill``'s training steps run to a bare hand-written PyTorch KD loop.

Both sides use the same teacher and student (same initial weights), the same in-memory uint8
images, batch size, autocast dtype and channels_last, the same augmentation
(``dfkd.train.augment.augment_batch``, crop-flip, pad 4) and SGD (momentum 0.9, nesterov,
weight decay 5e-4). What differs, on purpose:

* bare: plain KD written by hand (T²·KL at T=4), a constant lr, no metrics, no checkpoint;
* dfkd: ``dfkd.train.loop.run_loop`` with the ``kd`` objective (and ``noisy`` and ``robust``,
  which do extra work per step: a k×k noise-adaptation matrix and its Adam step; M+1 weighted
  KD candidates), its cosine lr set per step, per-step ``float()`` of every named loss,
  metrics.jsonl records, and its checkpoint at the end.

Timing excludes decoding, start-up and the final checkpoint. The dfkd side is timed through
``on_event`` at its metrics records, the bare loop at its step ends, both after ``--warmup``
steps. On CPU every step is timed (run_loop then logs a record every step, a JSON line of
tens of µs) and a rate is batch / the median step time, so that steps stalled by other
processes do not count; on CUDA the whole window is timed, synchronised at both ends, so that
run_loop's per-step host syncs count against it. The bare loop and each objective run
alternately (bare, kd, bare, noisy, bare, robust, bare, ...), ``--rounds`` times or until
``--budget`` seconds; per-round ratios use the bare runs on both sides.

    python bench/distill_throughput.py [--teacher CARD] [--student resnet8] [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CpuShare, fmt_rate, header, pool_index, random_card, sync  # noqa: E402

from dfkd.cards import build_arch, load_card, load_model  # noqa: E402
from dfkd.distill.objectives import build_objective  # noqa: E402
from dfkd.distill.terms import WithTerms  # noqa: E402
from dfkd.events import Logged  # noqa: E402
from dfkd.teacher import Teacher  # noqa: E402
from dfkd.images import open_pool  # noqa: E402
from dfkd.dist import SINGLE  # noqa: E402
from dfkd.runtime import Runtime, autocast, default_workers, fast_bf16, resolve_device  # noqa: E402
from dfkd.train.augment import augment_batch  # noqa: E402
from dfkd.train.data import decode_images  # noqa: E402
from dfkd.train.loop import LoopConfig, outputs, run_loop  # noqa: E402

T = 4.0
PAD = 4


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", help="model card (default: random-weight --arch card at 28x28x1)")
    p.add_argument("--arch", default="resnet20", help="arch of the random teacher (e.g. resnet8x4)")
    p.add_argument("--student", default="resnet8", help="student arch")
    p.add_argument("--pool", help="images (default: data/demo/wild, else generated PNGs)")
    p.add_argument("--num", type=int, default=4000, help="training images (decoded once, untimed)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default as dfkd distill: on for CUDA and CPUs with native bf16)")
    p.add_argument("--steps", type=int, default=25, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the window, per run")
    p.add_argument("--rounds", type=int, default=3, help="bare/dfkd alternations per objective")
    p.add_argument("--objectives", default="kd,noisy,robust")
    p.add_argument("--budget", type=float, default=90.0,
                   help="seconds; no new round starts after this (a busy machine still ends in time)")
    return p.parse_args(argv)


def rate(runs: list[list[float]], batch_size: int, per_step: bool) -> float:
    """Images/s from the step-end timestamps of one or more runs.

    ``per_step``: batch / the median step time over all the runs' steps (a step slowed by
    another process is an outlier, not a shift); else steps / time, summed over the runs.
    """
    if per_step:
        return batch_size / statistics.median(b - a for m in runs for a, b in zip(m, m[1:]))
    return sum(len(m) - 1 for m in runs) * batch_size / sum(m[-1] - m[0] for m in runs)


def bare_loop(teacher, student, images, mean, std, dev, batch_size, amp, steps, warmup,
              per_step: bool) -> list[float]:
    """Step-end timestamps of a hand-written KD loop after ``warmup`` steps (same data path)."""
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    teacher.eval()
    student.train()
    per_epoch = len(images) // batch_size
    perm = torch.randperm(len(images), generator=gen)
    marks = []
    for step in range(warmup + steps):
        if step == warmup:
            sync(dev)
            marks.append(time.perf_counter())
        i = step % per_epoch
        batch = images[perm[i * batch_size:(i + 1) * batch_size]]
        if dev.type == "cuda":
            batch = batch.pin_memory()
        x = augment_batch(batch.to(dev, non_blocking=True), "crop-flip", PAD, gen)
        x = ((x.float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)
        with autocast(dev, amp):
            with torch.no_grad():
                t = teacher(x).float()
            s = student(x).float()
        loss = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean",
                        log_target=True) * (T * T)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if per_step and step >= warmup:
            marks.append(time.perf_counter())
    sync(dev)
    if not per_step:
        marks.append(time.perf_counter())
    return marks


def dfkd_loop(method, teacher: Teacher, student, data, spec, dev, args, info, out: Path, per_step: bool) -> list[float]:
    """Step-end timestamps of ``run_loop`` from the metrics record at ``warmup`` on.

    Per-step timing logs a record every step (a JSON line, tens of µs); otherwise every
    ``warmup`` steps, and only the first and last timestamps are used.
    """
    cfg = LoopConfig(steps=args.warmup + args.steps, batch_size=args.batch_size, amp=args.amp,
                     log_every=1 if per_step else max(1, args.warmup), checkpoint_every=10**9,
                     augment="crop-flip", pad=PAD)
    objective = WithTerms(build_objective(method, len(info["class_counts"]), {}, info), len(info["class_counts"]))
    marks: list[tuple[int, float]] = []

    def on_event(event) -> None:
        if isinstance(event, Logged):
            sync(dev)
            marks.append((event.record["step"], time.perf_counter()))

    shutil.rmtree(out, ignore_errors=True)
    run_loop(student, objective, data, spec, cfg, out, Runtime(dev, cfg.amp, 0, SINGLE), teacher=teacher,
             on_event=on_event)
    window = [t for step, t in marks if step >= args.warmup]
    return window if per_step else [window[0], window[-1]]


def main(argv=None) -> None:
    args = parse(argv)
    dev = resolve_device(args.device)
    args.amp = fast_bf16(dev) if args.amp is None else args.amp
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.objectives.split(",") if m.strip()]
    tmp = Path(tempfile.mkdtemp(prefix="dfkd-bench-distill-"))
    try:
        card_path = Path(args.teacher) if args.teacher else random_card(tmp, args.arch)
        card = load_card(card_path)
        index, source = pool_index(args.pool, args.num, tmp)
        data = decode_images(open_pool(index).paths, card.input, workers=default_workers(dev))
        header("distill throughput (training steps)", dev, args.amp, {
            "teacher": f"{card.arch or card.torchscript} "
                       f"{'(random weights)' if not args.teacher else card_path}, input "
                       f"{card.input.channels}x{card.input.size[0]}x{card.input.size[1]}",
            "student": f"{args.student} (random init)", "data": source,
            "batch": args.batch_size, "channels_last": "yes",
            "timed": f"{args.steps} steps after {args.warmup} warm-up, {args.rounds} rounds",
            "estimator": ("median step time (robust to other processes)" if dev.type == "cpu" else
                          "whole window, synchronised at both ends")})

        teacher = load_model(card, dev)
        torch.manual_seed(0)
        student0 = build_arch(args.student, card.num_classes, card.input.channels).to(dev)
        images = data.images.pin_memory() if dev.type == "cuda" else data.images
        mean = torch.tensor(card.input.mean, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(card.input.std, device=dev).view(1, -1, 1, 1)
        info = {"accuracy": card.accuracy or 0.9, "class_accuracy": card.class_accuracy,
                "class_counts": [1.0] * card.num_classes}
        if "robust" in methods:
            logits = outputs(teacher, data, card.input, dev, LoopConfig(amp=args.amp))
            info["class_counts"] = torch.softmax(logits, 1).sum(0).tolist()  # robust KD's soft counts, as distill's
        if not isinstance(teacher, torch.jit.ScriptModule):
            teacher = teacher.to(memory_format=torch.channels_last)

        per_step = dev.type == "cpu"

        def bare() -> list[float]:
            student = copy.deepcopy(student0).to(memory_format=torch.channels_last)
            return bare_loop(teacher, student, images, mean, std, dev, args.batch_size, args.amp,
                             args.steps, args.warmup, per_step)

        # bare, m1, bare, m2, bare, ... : each dfkd run is compared with the bare runs on both
        # sides of it, so a machine that gets busier or quieter shifts both alike.
        share = CpuShare()
        start = time.perf_counter()
        bare_runs = [bare()]
        runs: dict[str, list[list[float]]] = {m: [] for m in methods}
        ratios: dict[str, list[float]] = {m: [] for m in methods}
        for r, m in enumerate(m for _ in range(args.rounds) for m in methods):
            if m == methods[0] and r and time.perf_counter() - start > args.budget:
                print(f"  (stopped after {r // len(methods)} of {args.rounds} rounds: --budget {args.budget:g}s)")
                break
            frozen = Teacher([card], teacher)
            runs[m].append(dfkd_loop(m, frozen, copy.deepcopy(student0), data, card.input, dev, args, info,
                                     tmp / f"run-{r}", per_step))
            bare_runs.append(bare())
            near = rate(bare_runs[-2:], args.batch_size, per_step)
            ratios[m].append(rate(runs[m][-1:], args.batch_size, per_step) / near)
        base = rate(bare_runs, args.batch_size, per_step)
        rates = {m: rate(runs[m], args.batch_size, per_step) for m in methods}
        notes = {"kd": "", "noisy": " (+ Q, Adam on θ)", "robust": " (+ M+1 weighted KDs)"}
        names = {m: f"dfkd run_loop, {m}{notes.get(m, '')}" for m in methods}
        width = max(map(len, [*names.values(), "bare KD loop (baseline)"]))
        print(f"  {'':<{width}}  {'throughput':>16}  {'ratio to bare KD':>16}")
        print(f"  {'bare KD loop (baseline)':<{width}}  {fmt_rate(base):>16}  {1.0:16.2f}")
        for m in methods:
            print(f"  {names[m]:<{width}}  {fmt_rate(rates[m]):>16}  {rates[m] / base:16.2f}")
        for m in methods:
            print(f"RATIO dfkd {m} / bare kd = {rates[m] / base:.2f}"
                  f"  (per round, against the bare runs beside it: {', '.join(f'{x:.2f}' for x in ratios[m])})")
        print(f"  contention: {share.report()}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
