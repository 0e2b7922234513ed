"""Model cards: a small YAML file that says how to build, load and feed a model.

Keys: ``arch`` (registry name, ``torchvision:<name>``, ``timm:<name>`` or
``python:<module>:<callable>``),
``arch_args`` (optional keyword arguments), ``num_classes``, ``weights`` (state_dict file,
relative to the card) or ``torchscript`` (file), ``input`` (see :class:`InputSpec`), and
optionally ``classes``, ``accuracy``, ``class_accuracy``, ``noise_values`` (the noise value's
quantiles on labeled data: :func:`dfkd.select.estimate.noise_summary`). A TorchScript file alone is
accepted wherever a card is, with its input described by flags.
"""
from __future__ import annotations

import importlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .errors import DfkdError
from .images import InputSpec
from .io import atomic_write, write_text
from .models import ARCHS

TRUST_CODE = "DFKD_TRUST_CODE"  # "1": python:<module>:<callable> arches may be imported and called
CARD_KEYS = {"arch", "arch_args", "num_classes", "weights", "torchscript", "input", "classes",
             "accuracy", "class_accuracy", "kind", "notes", "pu", "noise_values"}


@dataclass
class ModelCard:
    path: Path
    num_classes: int
    input: InputSpec
    arch: str | None = None
    arch_args: dict = field(default_factory=dict)
    weights: Path | None = None
    torchscript: Path | None = None
    classes: list[str] | None = None
    accuracy: float | None = None
    class_accuracy: list[float] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return self.classes or [str(i) for i in range(self.num_classes)]


def _file(card: Path, value: Any, key: str) -> Path:
    p = Path(str(value))
    p = p if p.is_absolute() else card.parent / p
    if not p.is_file():
        raise DfkdError(f"{card}: {key} file {p} not found")
    return p


def load_card(path: str | Path, input_overrides: dict | None = None) -> ModelCard:
    """Read and check a card (or a bare TorchScript file); no weights are loaded yet."""
    path = Path(path)
    if not path.is_file():
        raise DfkdError(f"{path}: model card not found")
    if path.suffix.lower() not in (".yaml", ".yml"):
        return _torchscript_card(path, input_overrides or {})
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DfkdError(f"{path}: not a valid YAML model card ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise DfkdError(f"{path}: a model card is a YAML mapping (arch, num_classes, weights, input)")
    unknown = set(data) - CARD_KEYS
    if unknown:
        raise DfkdError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    if not data.get("arch") and not data.get("torchscript"):
        raise DfkdError(f"{path}: needs 'arch' (with optional 'weights') or 'torchscript'")
    try:
        num_classes = int(data["num_classes"])
    except (KeyError, TypeError, ValueError):
        raise DfkdError(f"{path}: 'num_classes' missing or not an integer") from None
    spec = dict(data.get("input") or {})
    if str(data.get("arch", "")).startswith("timm:"):  # timm's own input config fills what the card leaves out
        base = timm_input(data["arch"], path)
        if spec.get("channels", base.get("channels")) != base.get("channels"):
            base = {k: v for k, v in base.items() if k not in ("mean", "std")}  # made for other channels
        spec = {**base, **spec}
    spec.update(input_overrides or {})
    card = ModelCard(path=path, num_classes=num_classes, input=InputSpec.from_dict(spec, f"{path}: input"),
                     arch=data.get("arch"), arch_args=dict(data.get("arch_args") or {}),
                     classes=data.get("classes"), accuracy=data.get("accuracy"),
                     class_accuracy=data.get("class_accuracy"),
                     extra={k: data[k] for k in ("kind", "notes", "pu", "noise_values") if k in data})
    if isinstance(data.get("weights"), str) and data["weights"].lower() == "none":  # on purpose: untrained
        card.extra["untrained"] = True
    elif data.get("weights"):
        card.weights = _file(path, data["weights"], "weights")
    if data.get("torchscript"):
        card.torchscript = _file(path, data["torchscript"], "torchscript")
    if card.arch and not card.torchscript:
        arch_builder(card.arch, path)  # unknown arch fails here, before any work
    if card.classes is not None and len(card.classes) != num_classes:
        raise DfkdError(f"{path}: lists {len(card.classes)} classes but num_classes is {num_classes}")
    if card.class_accuracy is not None and len(card.class_accuracy) != num_classes:
        raise DfkdError(f"{path}: class_accuracy has {len(card.class_accuracy)} values, expected {num_classes}")
    return card


INPUT_FILE = "dfkd_input.json"  # the input description dfkd export writes into a TorchScript file


def _torchscript_card(path: Path, overrides: dict) -> ModelCard:
    """A bare TorchScript file: its input comes from the flags, else from the description it
    carries (``dfkd export`` writes one); never guessed."""
    carried = {INPUT_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=carried)
    except Exception:
        raise DfkdError(f"{path}: neither a YAML model card (.yaml) nor a TorchScript file") from None
    try:
        spec = json.loads(carried[INPUT_FILE]) if carried[INPUT_FILE] else {}
    except ValueError:
        spec = {}
    spec.update(overrides)
    unknown = [k for k in ("size", "channels", "mean", "std") if k not in spec]
    if unknown:
        raise DfkdError(f"{path}: a bare TorchScript file does not say its input's "
                        + ", ".join(unknown) + ": give --input-size, --input-channels, --input-mean and"
                        " --input-std (e.g. --input-mean 0.485,0.456,0.406), or write a model card")
    spec = InputSpec.from_dict(spec, f"{path}: input flags")
    try:
        with torch.inference_mode():
            out = module(torch.zeros(1, spec.channels, *spec.size))
    except Exception as e:
        raise DfkdError(f"{path}: the TorchScript model does not take a 1x{spec.channels}x{spec.size[0]}x"
                        f"{spec.size[1]} input ({str(e).strip().splitlines()[-1][:160]}); give its input with"
                        " --input-size and --input-channels") from None
    return ModelCard(path=path, num_classes=int(out.shape[-1]), input=spec, torchscript=path)


def arch_builder(arch: str, where: Path | str = "--arch"):
    """The callable that builds ``arch`` (registry, torchvision:<name>, python:<mod>:<fn>)."""
    if arch.startswith("torchvision:"):
        import torchvision

        name = arch.split(":", 1)[1]
        if name not in torchvision.models.list_models():
            raise DfkdError(f"{where}: unknown torchvision model {name!r}")
        return lambda num_classes, in_channels=3, **kw: adapt_stem(torchvision.models.get_model(
            name, weights=None, num_classes=num_classes, **kw), in_channels, where)
    if arch.startswith("timm:"):
        timm, name = _timm(where), arch.split(":", 1)[1]
        if not timm.is_model(name):
            raise DfkdError(f"{where}: unknown timm model {name!r} (timm.list_models() lists them)")
        return lambda num_classes, in_channels=3, **kw: timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kw)
    if arch.startswith("python:"):
        if os.environ.get(TRUST_CODE) != "1":
            raise DfkdError(f"{where}: arch {arch!r} imports and runs code named by the card; dfkd runs no such"
                            f" code unless told to: add --trust-code (dfkd --trust-code COMMAND ...) or set"
                            f" {TRUST_CODE}=1, if you trust where it comes from")
        try:
            _, module, fn = arch.split(":", 2)
            return getattr(importlib.import_module(module), fn)
        except (ValueError, ImportError, AttributeError) as e:
            raise DfkdError(f"{where}: cannot import {arch!r} ({e})") from None
    if arch not in ARCHS:
        raise DfkdError(f"{where}: unknown arch {arch!r}; known: {', '.join(ARCHS.keys())},"
                        " torchvision:<name>, timm:<name>, python:<module>:<callable>")
    return ARCHS.get(arch)


def _timm(where: Path | str):
    try:
        import timm
    except ImportError:
        raise DfkdError(f"{where}: timm: arches need the timm package: pip install 'dfkd[timm]'") from None
    return timm


def timm_input(arch: str, where: Path | str) -> dict:
    """The input a timm model was made for (its default pretrained config): size, mean, std."""
    cfg = _timm(where).get_pretrained_cfg(arch.split(":", 1)[1])
    if cfg is None:
        return {}
    return {"size": list(cfg.input_size[1:]), "channels": cfg.input_size[0], "mean": list(cfg.mean),
            "std": list(cfg.std), "resize": "crop"}


def adapt_stem(model: nn.Module, in_channels: int, where: Path | str) -> nn.Module:
    """A torchvision model (built for RGB) fed ``in_channels``: its first convolution is replaced
    by one of the same shape that takes ``in_channels`` (freshly initialised)."""
    if in_channels == 3:
        return model
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            conv = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                             module.dilation, module.groups if module.groups == 1 else in_channels,
                             module.bias is not None, module.padding_mode)
            setattr(parent, name.rsplit(".", 1)[-1], conv)
            return model
    raise DfkdError(f"{where}: cannot adapt this torchvision model to {in_channels}-channel input (no Conv2d)")


def build_arch(arch: str, num_classes: int, in_channels: int, arch_args: dict | None = None,
               where: Path | str = "--arch") -> nn.Module:
    builder = arch_builder(arch, where)
    return builder(num_classes=num_classes, in_channels=in_channels, **dict(arch_args or {}))


def read_state_dict(path: Path) -> dict:
    """Weights-only load (never unpickles code); accepts a bare state_dict or {'model': ...}."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        try:
            with open(path, "rb") as f:
                head = f.read(2)
            zipped = zipfile.is_zipfile(path)
        except OSError as os_error:
            raise DfkdError(f"{path}: cannot read weights ({os_error.strerror})") from None
        if head == b"PK" and not zipped:
            raise DfkdError(f"{path}: a damaged or cut-off weights file (torch.save's zip format)") from None
        if not zipped and head[:1] != b"\x80":  # neither torch.save's zip nor a pickle
            raise DfkdError(f"{path}: not a PyTorch weights file (torch.save writes one)") from None
        if "weights_only" in text or "Weights only load failed" in text:
            raise DfkdError(f"{path}: holds pickled code or objects, not just weights; dfkd loads weights only"
                            " (save a state_dict: torch.save(model.state_dict(), path))") from None
        raise DfkdError(f"{path}: cannot read weights ({text.splitlines()[0][:200]})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DfkdError(f"{path}: not a state_dict (a mapping of parameter names to tensors)")
    return obj


def load_model(card: ModelCard, device: str | torch.device = "cpu") -> nn.Module:
    """Build the card's model with its weights, in eval mode, on ``device``."""
    if card.torchscript:
        try:
            model = torch.jit.load(str(card.torchscript), map_location=device)
        except Exception as e:
            raise DfkdError(f"{card.torchscript}: cannot load TorchScript ({str(e).splitlines()[0]})") from None
        return model.eval()
    model = build_arch(card.arch, card.num_classes, card.input.channels, card.arch_args, card.path)
    if card.weights:
        expected = model.state_dict()
        state = unwrap_keys(read_state_dict(card.weights), set(expected))
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or shapes:
            def few(keys: list[str]) -> str:
                return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
            parts = [f"missing {few(missing)}" if missing else "",
                     f"unexpected {few(unexpected)}" if unexpected else "",
                     "other shape: " + few([f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                                            for k in shapes]) if shapes else ""]
            raise DfkdError(f"{card.weights}: does not fit arch {card.arch} with {card.num_classes} classes and"
                            f" {card.input.channels} input channels (the card's input:): "
                            + "; ".join(p for p in parts if p))
        model.load_state_dict(state)
    return model.to(device).eval()


def unwrap_keys(state: dict, expected: set[str]) -> dict:
    """Strip the prefixes that wrappers add to parameter names (DDP's ``module.``, Lightning's
    ``model.``/``net.``, torch.compile's ``_orig_mod.``) while the keys do not fit ``expected``."""
    for _ in range(4):
        if set(state) <= expected or not state:
            return state
        heads = {k.split(".", 1)[0] for k in state}
        if len(heads) != 1 or not all("." in k for k in state):
            return state
        stripped = {k.split(".", 1)[1]: v for k, v in state.items()}
        if len(set(stripped) & expected) < len(set(state) & expected):
            return state
        state = stripped
    return state


def save_card(path: str | Path, arch: str, num_classes: int, spec: InputSpec, state_dict: dict,
              arch_args: dict | None = None, *, keep: bool = False, **fields: Any) -> Path:
    """Write ``<path>`` and its weights ``<stem>.pt`` beside it, both atomically. ``keep``: an
    existing card stays as it is (a finished run started again: what ``eval --write-card``
    added to the card stays)."""
    path = Path(path)
    if keep and path.is_file():
        return path
    weights = path.with_suffix(".pt")
    atomic_write(weights, lambda f: torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, f), "wb")
    data = {"arch": arch, "num_classes": num_classes, "weights": weights.name, "input": spec.to_dict()}
    if arch_args:
        data["arch_args"] = arch_args
    data.update({k: v for k, v in fields.items() if v is not None})
    write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def update_card(path: str | Path, **fields: Any) -> Path:
    """Set fields of an existing YAML card in place (atomically)."""
    path = Path(path)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data.update(fields)
    return write_text(path, yaml.safe_dump(data, sort_keys=False))
