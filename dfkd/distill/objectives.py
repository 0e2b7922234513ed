"""KD objectives: the registry, the contract every objective keeps, and option parsing.

Contract (mdistiller-style). An objective is a ``torch.nn.Module`` built as
``Cls(num_classes, cfg, info)``:

* ``cfg``: the objective's options (``--set objective.<name>=...``); defaults live in the
  class's ``OPTIONS``; an unknown name or a bad value raises ``DfkdError``. Strings are
  coerced to the option's type, so raw command-line values are fine.
* ``info``: facts found before training: ``class_accuracy`` (k floats or None), ``accuracy``
  (float or None), ``class_counts`` (k floats: the teacher's soft class counts on the training
  data), ``confidence`` ({"mean", "class_mean"}: the teacher's mean max softmax on the training
  data, in all and per predicted class), ``teacher_card`` (its path, for messages). A missing key
  means None; ``class_counts`` and ``confidence`` are missing when the options are checked.
* ``forward(student_logits, teacher_logits, labels=None)`` returns a dict of named 0-d float
  tensors; ``"loss"`` is the total to back-propagate, the others are for logging only. The
  keys are the same on every batch. ``labels``: LongTensor, −1 where unknown, or None.
  Teacher logits are detached and all losses are computed in float32.
* ``extra_param_groups()``: the objective's own learnable parameters (DFND's θ), as a list
  of dicts ``{"name", "params", "lr", "optimizer"}``; ``[]`` when there are none. They must
  NOT go into the student's optimizer: ``make_extra_optimizers(objective)`` builds one
  optimizer per group (DFND's reference: a separate Adam at lr 1e-3 for θ); step them with
  the student's. The objective's ``state_dict()`` holds θ and any RNG state, for resuming.
* ``check(opts, num_classes, info)`` (classmethod): the options' range checks, run by
  ``objective_options`` before any image is decoded and again when the objective is built.
* ``describe()``: one line saying what the objective uses, for the run log.

Move the objective to the training device with ``.to(device)`` like any module.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..errors import DfkdError
from ..registry import Registry
from ..train.optim import extra_optimizers as make_extra_optimizers

__all__ = ["OBJECTIVES", "Objective", "build_objective", "make_extra_optimizers", "objective_options", "register",
           "require", "resolve_options"]

OBJECTIVES = Registry("objective")

def register(key: str, paper: str) -> Callable[[type], type]:
    """Register an objective class under ``key`` and remember the key on the class."""
    def add(cls: type) -> type:
        cls.key = key
        return OBJECTIVES.register(cls, key=key, paper=paper)
    return add


def _coerce(value: Any, typ: type) -> Any:
    if typ is bool and isinstance(value, str):
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(value)
    if typ is int and isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
    if typ is int and isinstance(value, str):
        return int(value.strip())
    return typ(value)


def resolve_options(key: str, options: dict[str, tuple[type, Any]], cfg: dict | None) -> dict:
    """Defaults from ``options`` ({name: (type, default)}) overlaid with ``cfg``, type-checked."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(options))
    if unknown:
        raise DfkdError(f"objective {key!r} has no option {unknown[0]!r}; "
                        f"its options: {', '.join(sorted(options))}")
    out = {}
    for name, (typ, default) in options.items():
        value = cfg.get(name, default)
        if value is not None:
            try:
                value = _coerce(value, typ)
            except (TypeError, ValueError):
                raise DfkdError(f"--set objective.{name}={cfg[name]!r}: "
                                f"expected a {typ.__name__}") from None
        out[name] = value
    return out


def require(ok: bool, name: str, value: Any, what: str) -> None:
    """Raise a DfkdError naming the flag when an option's value is out of range."""
    if not ok:
        raise DfkdError(f"--set objective.{name}={value!r}: must be {what}")


class Objective(nn.Module):
    """Base class: parses options, stores the class count; subclasses implement ``forward``."""

    key: str = "?"
    OPTIONS: dict[str, tuple[type, Any]] = {}

    def __init__(self, num_classes: int, cfg: dict | None = None, info: dict | None = None):
        super().__init__()
        self.num_classes = int(num_classes)
        self.opts = self.checked_options(num_classes, cfg, info or {})

    @classmethod
    def checked_options(cls, num_classes: int, cfg: dict | None, info: dict) -> dict:
        """The options resolved (defaults, then ``cfg``) and checked against what is known before
        any image is decoded: ``info`` without ``class_counts``. Raises the DfkdError a build would."""
        if int(num_classes) < 2:
            raise DfkdError(f"objective {cls.key!r} needs at least 2 classes, got {num_classes}")
        opts = resolve_options(cls.key, cls.OPTIONS, cfg)
        cls.check(opts, int(num_classes), info)
        return opts

    @classmethod
    def check(cls, opts: dict, num_classes: int, info: dict) -> None:
        """Range checks of the options (``require``); may fill a default that depends on another."""

    def extra_param_groups(self) -> list[dict]:
        return []

    def describe(self) -> str:
        return f"{self.key}: {self.opts}"


def build_objective(key: str, num_classes: int, cfg: dict | None = None,
                    info: dict | None = None) -> Objective:
    """Look up ``key`` in OBJECTIVES (DfkdError listing the keys if unknown) and build it."""
    return OBJECTIVES.get(key)(num_classes, dict(cfg or {}), dict(info or {}))


def objective_options(key: str, num_classes: int, cfg: dict | None = None, info: dict | None = None) -> dict:
    """``key``'s resolved options, checked as a build would check them, without building it (for
    failing before the images are decoded; the data's ``class_counts`` are not needed)."""
    return OBJECTIVES.get(key).checked_options(num_classes, dict(cfg or {}), dict(info or {}))


