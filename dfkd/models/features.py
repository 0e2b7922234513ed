"""The penultimate feature vector of a classifier, read by a hook on its last linear layer.

Works for the registry models and torchvision classifiers alike (the input of the final
``nn.Linear`` is the feature vector); a TorchScript or ONNX model has no such hook.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import DfkdError


def features_readable(model: nn.Module) -> bool:
    """Whether the penultimate features of ``model`` can be tapped (not TorchScript, not ONNX,
    and a final linear layer to tap)."""
    from ..onnx_model import LogitsOnly

    return not isinstance(model, (torch.jit.ScriptModule, LogitsOnly)) \
        and any(isinstance(m, nn.Linear) for m in model.modules())


def classifier_layer(model: nn.Module, what: str = "model") -> nn.Linear:
    if not features_readable(model):
        kind = "TorchScript" if isinstance(model, torch.jit.ScriptModule) else "an ONNX model (its logits only)"
        raise DfkdError(f"{what} is {kind}: its features cannot be read; use a model card with 'arch'")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DfkdError(f"{what} has no final linear layer to read features from")
    return linears[-1]


class FeatureTap:
    """Keeps the latest input of ``model``'s classifier layer in ``.value`` (N×D)."""

    def __init__(self, model: nn.Module, what: str = "model"):
        self.layer = classifier_layer(model, what)
        self.value: torch.Tensor | None = None
        self._handle = self.layer.register_forward_pre_hook(self._keep)

    def _keep(self, module, args) -> None:
        self.value = torch.flatten(args[0], 1)

    def remove(self) -> None:
        self._handle.remove()
