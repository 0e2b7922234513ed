"""What the training commands report while they run (the CLI turns these into a progress bar).

A callback ``on_event(event)`` receives, in order: :class:`Opened` once the inputs are found and
checked and the run directory is bound to them, :class:`Decoded` while the images are decoded,
:class:`TeacherPass` while distill's teacher reads the training set once (unaugmented),
:class:`Note` lines (where the set went, what the objective is), :class:`Started` once the
loop knows its length, then one :class:`Logged` per metrics record (as in ``metrics.jsonl``).
Only rank 0 reports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union


@dataclass(frozen=True)
class Opened:
    """Every input was found and checked, and ``--out`` is bound to them (a bad input fails before)."""


@dataclass(frozen=True)
class Decoded:
    done: int
    total: int


@dataclass(frozen=True)
class TeacherPass:
    done: int
    total: int


@dataclass(frozen=True)
class Note:
    text: str


@dataclass(frozen=True)
class Started:
    step: int  # the step the loop starts at (> 0 on a resume)
    total: int
    per_epoch: int


@dataclass(frozen=True)
class Logged:
    record: dict  # step, epoch, lr, images_per_s, the objective's named losses, val_top1 at epoch ends


Event = Union[Opened, Decoded, TeacherPass, Note, Started, Logged]
OnEvent = Callable[[Event], None]
