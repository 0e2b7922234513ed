"""The optimizers a config may name: the loop's ``optimizer`` and an objective's own groups."""
from __future__ import annotations

from typing import Iterable

import torch

from ..errors import DfkdError

OPTIMIZERS = ("sgd", "adam")


def check_optimizer(name: str, flag: str) -> None:
    if name not in OPTIMIZERS:
        raise DfkdError(f"{flag} {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: float, *, momentum: float = 0.0,
                   weight_decay: float = 0.0, nesterov: bool = False) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov when asked and momentum > 0) or Adam (momentum unused)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov and momentum > 0)


def extra_optimizers(objective) -> list[torch.optim.Optimizer]:
    """One optimizer per ``objective.extra_param_groups()`` entry, as each group names it."""
    return [make_optimizer(g["optimizer"], g["params"], g["lr"]) for g in objective.extra_param_groups()]
