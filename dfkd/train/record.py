"""The loop's record of a run, kept by rank 0: ``metrics.jsonl`` (cut back to the step resumed
from), the optional TensorBoard events, the caller's ``on_event``, and the meter that averages
the named losses between records."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..errors import DfkdError
from ..events import Event, Logged, OnEvent


class RunLog:
    """Rank 0's record of the run: ``metrics.jsonl`` (cut back to the step resumed from), the
    optional TensorBoard events, and the caller's ``on_event``."""

    def __init__(self, out: Path, step: int, tensorboard: bool, on_event: OnEvent | None, main: bool):
        self.file, self.board, self.on_event, self.last = None, None, on_event if main else None, {}
        if main:
            out.mkdir(parents=True, exist_ok=True)
            self.last = _truncate_metrics(out / "metrics.jsonl", step)
            self.file = open(out / "metrics.jsonl", "a", encoding="utf-8")
            self.board = _board(out / "tensorboard", step) if tensorboard else None

    def event(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def record(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.board is not None:
            for k, v in record.items():
                if k not in ("step", "epoch"):
                    self.board.add_scalar(k, v, record["step"])
            self.board.flush()
        self.event(Logged(record))

    def close(self) -> None:
        for f in (self.file, self.board):
            if f is not None:
                f.close()


class Meter:
    """The named losses summed on the device since the last record (no host sync per step),
    averaged over the steps and ranks when a record is made."""

    def __init__(self, step: int):
        self.sums: dict[str, torch.Tensor] = {}
        self.names: list[str] = []
        self.since, self.seen, self.tick = step, 0, time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], images: int) -> None:
        self.names = list(losses)
        for k, v in losses.items():
            self.sums[k] = self.sums[k] + v.detach() if k in self.sums else v.detach().float().clone()
        self.seen += images

    def record(self, step: int, per_epoch: int, lr: float, ranks) -> dict:
        now = time.perf_counter()
        keys = sorted(self.sums)
        steps = max(1, step - self.since)
        mean = ranks.all_sum(torch.stack([self.sums[k] for k in keys]).float()) / (steps * ranks.world)
        means = dict(zip(keys, mean.tolist()))
        if not math.isfinite(means["loss"]):  # checked before anything is saved, on every rank
            raise DfkdError(f"loss became {means['loss']} before step {step} (lr {lr:.3g});"
                            " lower --lr, or try --no-amp")
        record = {"step": step, "epoch": round(step / per_epoch, 3), "lr": lr,
                  "images_per_s": round(self.seen / max(1e-9, now - self.tick), 1), **{k: means[k] for k in self.names}}
        self.sums, self.since, self.seen, self.tick = {}, step, 0, now
        return record


def _board(folder: Path, step: int):
    """A TensorBoard writer; on a resume, events after ``step`` are dropped (they will be redone)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DfkdError("--tensorboard needs the tensorboard package: pip install 'dfkd[tensorboard]'") from None
    return SummaryWriter(str(folder), purge_step=step + 1 if step else None)


def _truncate_metrics(path: Path, step: int) -> dict:
    """Drop records written after the checkpoint we resume from (they will be redone); returns
    the last record kept (what a finished run that is started again reports)."""
    if not path.is_file():
        return {}
    keep = []
    for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(ln).get("step", 0) <= step:
                keep.append(ln)
        except ValueError:  # a line torn by a killed run
            continue
    path.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
    return json.loads(keep[-1]) if keep else {}
