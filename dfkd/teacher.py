"""Teachers: the one place a card, a TorchScript or ONNX file, a Hugging Face folder or several
of them become a frozen model.

Every form is a module that maps a normalised batch to logits (:meth:`ModelCard.form`): a
PyTorch module (registry, torchvision, timm, Hugging Face), TorchScript, or ONNX Runtime
(:class:`dfkd.onnx_model.OnnxModel`, a ``LogitsOnly`` model: no features, nothing to train).

:func:`load_teacher` checks the cards agree, loads each on the device and, for several, wraps
them in a :class:`TeacherEnsemble`; nothing else builds teachers.

Teacher ensembles (MEAL V2, Shen & Savvides 2020): the average of the teachers' softmax.

The ensemble returns "logits" ẑ = T·log(mean_i softmax(z_i / T)), so that softmax(ẑ / T) is
exactly the averaged probability at the distillation temperature T, and every KD objective
works unchanged; for scoring (T = 1) ẑ is the log of the averaged softmax. Teachers may differ
in architecture and input: each gets the shared batch re-sized, re-channelled and
re-normalised to what its own card asks.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cards import ModelCard, load_model
from .errors import DfkdError
from .images import InputSpec
from .io import file_sha256


def ensemble_logits(logits: Sequence[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """ẑ = T·log(mean_i softmax(z_i / T)) (MEAL V2's averaged teacher, as logits at temperature T)."""
    logp = torch.stack([F.log_softmax(z.float() / temperature, dim=1) for z in logits])
    return temperature * (torch.logsumexp(logp, dim=0) - math.log(len(logits)))


def adapt_input(x: torch.Tensor, source: InputSpec, target: InputSpec) -> torch.Tensor:
    """A batch normalised for ``source`` as the ``target`` card wants it (size, channels, mean/std)."""
    if source == target:
        return x
    dev = x.device
    raw = x * torch.tensor(source.std, device=dev).view(1, -1, 1, 1) + torch.tensor(source.mean, device=dev).view(1, -1, 1, 1)
    if raw.shape[1] != target.channels:
        raw = raw.mean(1, keepdim=True) if target.channels == 1 else raw.expand(-1, 3, -1, -1)
    if tuple(raw.shape[-2:]) != tuple(target.size):
        raw = F.interpolate(raw, size=tuple(target.size), mode="bilinear", align_corners=False, antialias=True)
    std, mean = torch.tensor(target.std, device=dev).view(1, -1, 1, 1), torch.tensor(target.mean, device=dev).view(1, -1, 1, 1)
    return ((raw - mean) / std).contiguous(memory_format=torch.channels_last)


class TeacherEnsemble(nn.Module):
    """Several frozen teachers behind one forward: ``forward(x)`` takes a batch prepared for
    ``specs[0]`` and returns the ensemble logits at ``temperature``."""

    def __init__(self, models: Sequence[nn.Module], specs: Sequence[InputSpec], temperature: float = 1.0):
        super().__init__()
        self.members = nn.ModuleList(models)
        self.specs = list(specs)
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [m(adapt_input(x, self.specs[0], s)) for m, s in zip(self.members, self.specs)]
        return ensemble_logits(outs, self.temperature)


def check_compatible(cards: Sequence[ModelCard]) -> None:
    """Teachers are classifiers (not PU cards), and those of one ensemble agree on the classes."""
    for c in cards:
        if c.extra.get("kind") == "pu":
            raise DfkdError(f"--teacher {c.path}: is a PU card (pu-train's in/out-of-distribution classifier);"
                            " give the teacher's card")
    first = cards[0]
    for c in cards[1:]:
        if c.num_classes != first.num_classes:
            raise DfkdError(f"--teacher {c.path}: {c.num_classes} classes, but {first.path} has {first.num_classes}")
        if c.classes and first.classes and c.classes != first.classes:
            raise DfkdError(f"--teacher {c.path}: its classes differ from those of {first.path}")


def ensemble_accuracy(cards: Sequence[ModelCard]) -> dict:
    """Accuracies for DFND's Q from one teacher or an ensemble: the mean of the teachers' per-class
    accuracies when all have them, and the mean of their accuracies when all have one (each
    None otherwise; ``per_class_accuracy: false`` uses the second)."""
    per_class = [sum(v) / len(cards) for v in zip(*(c.class_accuracy for c in cards))] \
        if all(c.class_accuracy for c in cards) else None
    scalar = sum(c.accuracy for c in cards) / len(cards) if all(c.accuracy is not None for c in cards) else None
    return {"class_accuracy": per_class, "accuracy": scalar}


@dataclass
class Teacher:
    """A frozen teacher (one model or an ensemble) and the cards it came from; ``cards[0]``'s
    input description is what the teacher (and a student distilled from it) is fed."""

    cards: list[ModelCard]
    model: nn.Module

    @property
    def card(self) -> ModelCard:
        return self.cards[0]

    @property
    def members(self) -> list[nn.Module]:
        return list(self.model.members) if isinstance(self.model, TeacherEnsemble) else [self.model]

    def identity(self) -> list[str]:
        """Content digests of the cards, weights and inputs: what a run directory is bound to."""
        return [card_digest(c) for c in self.cards]


def card_digest(card: ModelCard) -> str:
    h = hashlib.sha256()
    for f in card.files:
        h.update(file_sha256(f).encode())
    h.update(json.dumps(card.input.to_dict()).encode())
    return h.hexdigest()


def load_teacher(cards: ModelCard | Sequence[ModelCard], device: torch.device, temperature: float = 1.0) -> Teacher:
    """The frozen teacher of ``cards`` on ``device``: one model, or MEAL V2's averaged ensemble."""
    cards = [cards] if isinstance(cards, ModelCard) else list(cards)
    check_compatible(cards)
    for c in cards:
        if c.form == "arch" and not (c.weights or c.extra.get("untrained")):
            raise DfkdError(f"{c.path}: has no 'weights', so the model would be randomly initialised; give"
                            " weights: FILE (a state_dict), or weights: none if an untrained model is meant")
    members = [load_model(c, device) for c in cards]
    for m in members:
        for p in m.parameters():
            p.requires_grad_(False)
    model = members[0] if len(members) == 1 else TeacherEnsemble(members, [c.input for c in cards], temperature)
    return Teacher(cards, model)
