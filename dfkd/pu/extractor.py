"""Multi-scale feature extractor with squeeze-excitation, the PU classifier of PU Compression.

Global-average-pooled feature maps of several backbone stages are concatenated, re-weighted by a
squeeze-excitation gate and mapped to one score g(x) per image (Xu et al., NeurIPS 2019, sec. 3.2).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DfkdError
from ..registry import Registry

EXTRACTORS = Registry("PU feature extractor")

PAPER = "Xu et al., Positive-Unlabeled Compression on the Cloud, NeurIPS 2019"


class SqueezeExcitation(nn.Module):
    """Squeeze-excitation gate on a feature vector: x * sigmoid(W2 relu(W1 x)) (Hu et al. 2018)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, channels, bias=False)

    def gate(self, x: Tensor) -> Tensor:
        """The per-channel weights in (0, 1), shape N x C."""
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


def _top_level(backbone: nn.Module) -> str:
    return ", ".join(name for name, _ in backbone.named_children()) or "(none)"


def _pool(name: str, out: object) -> Tensor:
    """Global average pooling of one tapped output: N x C x H x W (or N x C) -> N x C."""
    if isinstance(out, Tensor) and out.dim() == 4:
        return F.adaptive_avg_pool2d(out, 1).flatten(1)
    if isinstance(out, Tensor) and out.dim() == 2:
        return out
    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
    raise DfkdError(f"feature tap {name!r} gives {shape}; a tap must output an N x C x H x W "
                    "feature map (or an N x C vector): choose another module with --taps")


def _capture(backbone: nn.Module, modules: Mapping[str, nn.Module], x: Tensor) -> dict[str, object]:
    """Run the backbone once and return the last output of each named module (hooks are removed after)."""
    seen: dict[str, object] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out))
               for name, m in modules.items()]
    try:
        backbone(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _dummy(backbone: nn.Module, input_shape: Sequence[int]) -> Tensor:
    p = next(backbone.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    return torch.zeros(2, *input_shape, device=device, dtype=dtype)


def _dry_run(backbone: nn.Module, modules: Mapping[str, nn.Module],
             input_shape: Sequence[int]) -> dict[str, object]:
    """Capture on a zero batch in eval mode, restoring the backbone's train/eval mode afterwards."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            return _capture(backbone, modules, _dummy(backbone, input_shape))
    except RuntimeError as e:
        raise DfkdError(f"the backbone failed on a dummy input of shape {tuple(input_shape)} "
                        f"(C, H, W): {e}. Give the model's real input size.") from e
    finally:
        backbone.train(was_training)


@EXTRACTORS.register(key="multiscale-se", paper=PAPER)
class MultiScaleSE(nn.Module):
    """Pooled features of several backbone stages, concatenated, SE-gated, then a linear score g(x)."""

    def __init__(self, backbone: nn.Module, taps: Sequence[str], reduction: int = 16,
                 input_shape: Sequence[int] = (3, 32, 32), freeze_backbone: bool = False):
        super().__init__()
        taps = list(taps)
        if not taps:
            raise DfkdError("the PU feature extractor needs at least one feature tap (--taps)")
        if len(set(taps)) != len(taps):
            raise DfkdError(f"feature taps repeat a name: {taps}")
        named = dict(backbone.named_modules())
        unknown = [t for t in taps if t not in named]
        if unknown:
            raise DfkdError(f"unknown feature tap {', '.join(map(repr, unknown))}; the backbone's "
                            f"top-level modules are: {_top_level(backbone)} (nested names such as "
                            "'layer4.1' also work)")
        self.backbone = backbone
        self.taps = taps
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            backbone.requires_grad_(False)
        seen = _dry_run(backbone, {t: named[t] for t in taps}, input_shape)
        missed = [t for t in taps if t not in seen]
        if missed:
            raise DfkdError(f"feature tap {', '.join(map(repr, missed))} is never run by the "
                            "backbone's forward pass; choose another module with --taps")
        self.widths = [_pool(t, seen[t]).shape[1] for t in taps]
        self.se = SqueezeExcitation(sum(self.widths), reduction)
        self.head = nn.Linear(sum(self.widths), 1)
        self._freeze_unreached(input_shape)

    def _freeze_unreached(self, input_shape: Sequence[int]) -> None:
        """Freeze the backbone's parameters that never reach g(x) (its classifier, layers past the
        last tap): nothing would train them, and DistributedDataParallel wants every trained
        parameter to get a gradient."""
        was_training = self.training
        self.eval()  # leaves the BatchNorm statistics alone
        try:
            with torch.enable_grad():
                self(torch.zeros(2, *input_shape)).sum().backward()
            for p in self.backbone.parameters():
                if p.requires_grad and p.grad is None:
                    p.requires_grad_(False)
        finally:
            self.zero_grad(set_to_none=True)
            self.train(was_training)

    def train(self, mode: bool = True) -> MultiScaleSE:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # a frozen backbone keeps its BatchNorm statistics
        return self

    def pooled(self, x: Tensor) -> Tensor:
        """The concatenation of the pooled tapped feature maps, N x sum(widths), before the SE gate."""
        named = dict(self.backbone.named_modules())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            seen = _capture(self.backbone, {t: named[t] for t in self.taps}, x)
        return torch.cat([_pool(t, seen[t]) for t in self.taps], dim=1)

    def features(self, x: Tensor) -> Tensor:
        """The SE-gated concatenation of the pooled tapped feature maps, N x sum(widths)."""
        return self.se(self.pooled(x))

    def forward(self, x: Tensor) -> Tensor:
        """The PU score g(x), shape N: positive means 'looks like the original data'."""
        return self.head(self.features(x)).squeeze(1)


_STAGE = re.compile(r"layer(\d+)")


def default_taps(backbone: nn.Module, input_shape: Sequence[int] = (3, 32, 32)) -> list[str]:
    """Default feature taps: the residual stages ``layer<N>``, else the last 4 scales' last modules.

    1. Top-level children named ``layer<N>`` (torchvision and CIFAR-style ResNets), in order of N.
    2. Otherwise a dry run on a zero batch of ``input_shape``: among the top-level children that
       have parameters (so activations, pooling and flatten are skipped) and output a 4-D feature
       map, keep for each spatial size the last one to run (the end of that stage) and return
       the last 4 such stage ends, in execution order. If the top level offers fewer than 2
       sizes (VGG, MobileNet, EfficientNet, DenseNet keep everything in one ``features``
       Sequential), the same rule is applied to the children of the child that offers most.
    """
    stages = sorted(((int(m.group(1)), name) for name, _ in backbone.named_children()
                     if (m := _STAGE.fullmatch(name))))
    if stages:
        return [name for _, name in stages]
    taps = _stage_ends(backbone, dict(backbone.named_children()), input_shape)
    if len(taps) < 2:
        for name, child in backbone.named_children():
            inner = {f"{name}.{n}": c for n, c in child.named_children()}
            deeper = _stage_ends(backbone, inner, input_shape) if inner else []
            if len(deeper) > len(taps):
                taps = deeper
    if not taps:
        raise DfkdError("found no module giving a 4-D feature map to tap; name the taps with "
                        f"--taps (top-level modules: {_top_level(backbone)})")
    return taps


def _stage_ends(backbone: nn.Module, modules: dict[str, nn.Module],
                input_shape: Sequence[int]) -> list[str]:
    """The last-run module with parameters for each spatial size, last 4 sizes, in execution order."""
    modules = {n: m for n, m in modules.items() if next(m.parameters(), None) is not None}
    if not modules:
        return []
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_, name=name: order.append(name))
               for name, m in modules.items()]
    try:
        seen = _dry_run(backbone, modules, input_shape)
    finally:
        for h in handles:
            h.remove()
    last_run = {name: i for i, name in enumerate(order)}  # a module run twice counts at its last run
    end_of_size: dict[tuple[int, ...], str] = {}
    for name in sorted(last_run, key=last_run.__getitem__):
        out = seen[name]
        if isinstance(out, Tensor) and out.dim() == 4:
            end_of_size[tuple(out.shape[2:])] = name
    return sorted(end_of_size.values(), key=last_run.__getitem__)[-4:]


class LoadReport(NamedTuple):
    matched: int
    total: int


def load_backbone_weights(backbone: nn.Module, state_dict: Mapping[str, Tensor]) -> LoadReport:
    """Load the entries of ``state_dict`` that match the backbone by name and shape; count them.

    A teacher's state_dict loads into a backbone of the same architecture, its classifier head
    skipped when the shapes differ. A leading ``module.`` (DataParallel) is stripped. Raises
    DfkdError when nothing matched, instead of silently training from random weights.
    """
    if isinstance(backbone, MultiScaleSE):
        backbone = backbone.backbone
    own = backbone.state_dict()
    matched = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key in own and isinstance(value, Tensor) and value.shape == own[key].shape:
            matched[key] = value
    if not matched:
        raise DfkdError(f"teacher weights did not load into the backbone: 0 of {len(own)} keys "
                        "matched by name and shape; check that the backbone's architecture is the "
                        "teacher's")
    backbone.load_state_dict(matched, strict=False)
    return LoadReport(len(matched), len(own))
