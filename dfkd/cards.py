"""Model cards: a small YAML file that says how to build, load and feed a model.

Keys: ``arch`` (registry name, ``torchvision:<name>``, ``timm:<name>`` or
``python:<module>:<callable>``),
``arch_args`` (optional keyword arguments), ``num_classes``, ``weights`` (state_dict file,
relative to the card), ``torchscript`` or ``onnx`` (a file), ``input`` (see :class:`InputSpec`), and
optionally ``classes``, ``accuracy``, ``class_accuracy``, ``noise_values`` (the noise value's
quantiles on labeled data: :func:`dfkd.select.estimate.noise_summary`) and ``mahalanobis`` (the
same for the distance of the features to the classes, with the fit's ``file``:
:mod:`dfkd.select.mahalanobis`). A TorchScript or ONNX file
alone is accepted wherever a card is (its input from the file or flags), and so is a Hugging Face
model folder (:mod:`dfkd.hf_model`: its input from its preprocessor config).

How a model is fed is never assumed: ``input`` must give size, mean and std (flags may give or
override them); a card without them is refused with a line to copy. Every field is checked for
type and range when the card is read, before anything is built.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .errors import DfkdError
from .images import InputSpec, shown
from .io import atomic_write, write_text
from .models import ARCHS

TRUST_CODE = "DFKD_TRUST_CODE"  # "1": python:<module>:<callable> arches may be imported and called
CARD_KEYS = {"arch", "arch_args", "num_classes", "weights", "torchscript", "onnx", "input", "classes",
             "accuracy", "class_accuracy", "kind", "notes", "pu", "noise_values", "mahalanobis"}


MAX_CLASSES = 100_000  # a larger num_classes is refused before a model is built (ImageNet-21k has 21,843)


@dataclass
class ModelCard:
    path: Path
    num_classes: int
    input: InputSpec
    arch: str | None = None
    arch_args: dict = field(default_factory=dict)
    weights: Path | None = None
    torchscript: Path | None = None
    onnx: Path | None = None  # an ONNX file, run by ONNX Runtime (dfkd/onnx_model.py)
    hf: Path | None = None  # a Hugging Face model folder (dfkd/hf_model.py); then ``weights`` is its safetensors
    mahalanobis: Path | None = None  # the class Gaussians of its features (dfkd/select/mahalanobis.py)
    classes: list[str] | None = None
    accuracy: float | None = None
    class_accuracy: list[float] | None = None
    extra: dict = field(default_factory=dict)
    input_source: str = "card"  # where ``input`` came from: card, flags, "card, flags for size", ...

    @property
    def class_names(self) -> list[str]:
        return self.classes or [str(i) for i in range(self.num_classes)]

    @property
    def form(self) -> str:
        """How the model is built: ``arch`` (an architecture and a state_dict, a PyTorch module
        dfkd can tap and train), ``torchscript``, ``onnx`` (logits only) or ``huggingface``."""
        return "torchscript" if self.torchscript else "onnx" if self.onnx else "huggingface" if self.hf else "arch"

    @property
    def form_name(self) -> str:
        """The form as a message says it: "a TorchScript model", "an ONNX model", ..."""
        return {"arch": f"an {self.arch} model", "torchscript": "a TorchScript model", "onnx": "an ONNX model",
                "huggingface": "a Hugging Face model"}[self.form]

    @property
    def files(self) -> list[Path]:
        """Every file the model is read from: the card, its weights, its TorchScript or ONNX file,
        a Hugging Face folder's files."""
        from .hf_model import folder_files

        own = [self.path] if self.path.is_file() else []
        extra = folder_files(self.hf) if self.hf else []
        return list(dict.fromkeys([*own, *(f for f in (self.weights, self.torchscript, self.onnx, self.mahalanobis)
                                           if f), *extra]))


def input_record(card: ModelCard) -> dict:
    """The input a command feeds, as its manifest records it: the spec and where it came from."""
    return {**card.input.to_dict(), "source": card.input_source}


def _file(card: Path, value: Any, key: str) -> Path:
    if not isinstance(value, str):
        raise DfkdError(f"{card}: {key}: {shown(value)} is not a file name")
    p = Path(value)
    p = p if p.is_absolute() else card.parent / p
    if not p.is_file():
        raise DfkdError(f"{card}: {key} file {p} not found")
    return p


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


CardLike = ModelCard | str | Path  # what the API takes where a card is expected: a loaded card or its path


def as_cards(given: CardLike | list[CardLike], what: str) -> list[ModelCard]:
    """``given`` (a card, a card's path, or a list of either) as loaded cards, for the library's
    calls; errors name the parameter ``what``."""
    out = []
    for c in given if isinstance(given, (list, tuple)) else [given]:
        if isinstance(c, ModelCard):
            out.append(c)
            continue
        if not isinstance(c, (str, Path)):
            raise DfkdError(f"{what}: expected a model card (dfkd.load_card) or the path of one, got {type(c).__name__}")
        try:
            out.append(load_card(c))
        except DfkdError as e:
            raise DfkdError(f"{what}: {e}") from None
    if not out:
        raise DfkdError(f"{what}: no model card given")
    return out


def load_card(path: str | Path, input_overrides: dict | None = None) -> ModelCard:
    """Read and check a card (or a bare TorchScript file); no weights are loaded yet.
    ``input_overrides``: input keys given by flags, over the card's ``input:``."""
    path = Path(path)
    if path.is_dir():
        from .hf_model import hf_card

        return hf_card(path, input_overrides or {})
    if not path.is_file():
        raise DfkdError(f"{path}: model card not found")
    if path.suffix.lower() == ".onnx":
        from .onnx_model import onnx_card

        return onnx_card(path, input_overrides or {})
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
        raise DfkdError(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    built = [k for k in ("arch", "torchscript", "onnx") if data.get(k)]
    if len(built) != 1:
        raise DfkdError(f"{path}: needs one of 'arch' (with 'weights'), 'torchscript' or 'onnx'"
                        + (f", not {' and '.join(built)}" if built else ""))
    arch = data.get("arch")
    if arch is not None and not isinstance(arch, str):
        raise DfkdError(f"{path}: arch: {shown(arch)} is not an architecture name (a registry name,"
                        " torchvision:<name>, timm:<name> or python:<module>:<callable>)")
    num_classes = _num_classes(path, data.get("num_classes"))
    arch_args = data.get("arch_args") or {}
    if not isinstance(arch_args, dict) or not all(isinstance(k, str) for k in arch_args):
        raise DfkdError(f"{path}: arch_args: {shown(arch_args)} is not a mapping of keyword arguments")
    if arch:
        arch_builder(arch, path)  # unknown (or untrusted) arch fails here, before any work
    spec, source = card_input(path, data.get("input"), input_overrides or {}, _input_example(arch, path))
    card = ModelCard(path=path, num_classes=num_classes, input=spec, input_source=source, arch=arch,
                     arch_args=dict(arch_args), classes=_classes(path, data.get("classes"), num_classes),
                     accuracy=_accuracy(path, "accuracy", data.get("accuracy")),
                     class_accuracy=_class_accuracy(path, data.get("class_accuracy"), num_classes),
                     extra={k: data[k] for k in ("kind", "notes", "pu", "noise_values", "mahalanobis")
                            if data.get(k) is not None})
    if isinstance(data.get("weights"), str) and data["weights"].lower() == "none":  # on purpose: untrained
        card.extra["untrained"] = True
    elif data.get("weights"):
        card.weights = _file(path, data["weights"], "weights")
    if data.get("torchscript"):
        card.torchscript = _file(path, data["torchscript"], "torchscript")
    if data.get("onnx"):
        from .onnx_model import check_card

        card.onnx = _file(path, data["onnx"], "onnx")
        check_card(card)
    if data.get("mahalanobis") is not None:
        fit = data["mahalanobis"]
        if not isinstance(fit, dict) or not isinstance(fit.get("file"), str):
            raise DfkdError(f"{path}: mahalanobis: {shown(fit)} is not what dfkd eval --write-card writes (a mapping"
                            " with the fit's file); write it again")
        card.mahalanobis = _file(path, fit["file"], "mahalanobis")
    return card


def _num_classes(path: Path, value: Any) -> int:
    if value is None:
        raise DfkdError(f"{path}: num_classes: missing (the number of classes, e.g. num_classes: 10)")
    if not isinstance(value, int) or isinstance(value, bool):
        raise DfkdError(f"{path}: num_classes: {shown(value)} is not a whole number of classes")
    if not 2 <= value <= MAX_CLASSES:
        raise DfkdError(f"{path}: num_classes: {value} is out of range (2 to {MAX_CLASSES})")
    return value


def _classes(path: Path, value: Any, num_classes: int) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise DfkdError(f"{path}: classes: expected a list of class names, not {shown(value)}")
    if len(value) != num_classes:
        raise DfkdError(f"{path}: lists {len(value)} classes but num_classes is {num_classes}")
    return [str(v) for v in value]


def _accuracy(path: Path, key: str, value: Any) -> float | None:
    if value is not None and not (_is_number(value) and 0 <= value <= 1):
        raise DfkdError(f"{path}: {key}: {shown(value)} is not an accuracy from 0 to 1")
    return None if value is None else float(value)


def _class_accuracy(path: Path, value: Any, num_classes: int) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise DfkdError(f"{path}: class_accuracy: expected a list of accuracies, not {shown(value)}")
    if len(value) != num_classes:
        raise DfkdError(f"{path}: class_accuracy has {len(value)} values, expected {num_classes}")
    return [_accuracy(path, "class_accuracy", v) for v in value]


def card_input(path: Path, declared: Any, overrides: dict, example: str) -> tuple[InputSpec, str]:
    """How the card's model is fed, and where that came from: the card's ``input:`` with the
    ``--input-*`` flags over it. Size, mean and std are never assumed; ``example``, a card line,
    ends the message when they are missing."""
    if declared is not None and not isinstance(declared, dict):
        InputSpec.from_dict(declared, f"{path}: input")  # refuses it, naming what it is
    declared = declared or {}
    hint = f"write the input its weights were trained with into the card, e.g. {example}"
    spec = InputSpec.from_dict({**declared, **overrides}, f"{path}: input", hint)
    return spec, source_of("card", declared, overrides)


def source_of(own: str, declared: dict, overrides: dict) -> str:
    """``own`` (card, TorchScript file), ``flags``, or ``own, flags for KEYS``."""
    if not overrides:
        return own
    if set(declared) <= set(overrides):
        return "flags"
    return f"{own}, flags for {', '.join(sorted(overrides))}"


def _input_example(arch: str | None, where: Path) -> str:
    """A card line to copy when ``input:`` is missing: timm's pretrained config for a timm arch
    (stated as such, never assumed), an ImageNet recipe for torchvision, a CIFAR one otherwise."""
    if arch and arch.startswith("timm:"):
        cfg = timm_input(arch, where)
        if cfg:
            return (f"input: {{size: {cfg['size'][0]}, mean: {cfg['mean']}, std: {cfg['std']}, resize: crop}}"
                    f" if they were trained as timm's pretrained {arch[5:]} (its pretrained_cfg)")
    if arch and arch.startswith(("timm:", "torchvision:")):
        return ("input: {size: 224, mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225], resize: crop}"
                " (the ImageNet recipe)")
    return "input: {size: 32, mean: [0.4914, 0.4822, 0.4465], std: [0.247, 0.2435, 0.2616]} (CIFAR-10)"


INPUT_FILE = "dfkd_input.json"  # the input description dfkd export writes into a TorchScript file
CLASSES_FILE = "dfkd_classes.json"  # and the class names (a JSON list)


def _torchscript_card(path: Path, overrides: dict) -> ModelCard:
    """A bare TorchScript file: its input comes from the flags, else from the description it
    carries (``dfkd export`` writes one); never guessed."""
    carried = {INPUT_FILE: "", CLASSES_FILE: ""}
    try:
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=carried)
    except Exception:
        if zipfile.is_zipfile(path) and not _is_torchscript(path):
            read_state_dict(path)  # a whole pickled model: refused there, with how to save its weights
            raise DfkdError(f"{path}: is a state_dict, not a model card: write a card that names it (arch,"
                            " num_classes, weights, input)") from None
        raise DfkdError(f"{path}: neither a YAML model card (.yaml), a TorchScript file, an ONNX file (.onnx)"
                        " nor a Hugging Face model folder") from None
    try:
        declared = json.loads(carried[INPUT_FILE]) if carried[INPUT_FILE] else {}
    except ValueError:
        declared = {}
    declared = declared if isinstance(declared, dict) else {}
    spec = InputSpec.from_dict({**declared, **overrides}, f"{path}: input",
                               "a bare TorchScript file does not say its input (files from dfkd export do): give"
                               " --input-size, --input-mean and --input-std (e.g. --input-mean 0.485,0.456,0.406),"
                               " or write a model card")
    try:
        with torch.inference_mode():
            out = module(torch.zeros(1, spec.channels, *spec.size))
    except Exception as e:
        raise DfkdError(f"{path}: the TorchScript model does not take a 1x{spec.channels}x{spec.size[0]}x"
                        f"{spec.size[1]} input ({str(e).strip().splitlines()[-1][:160]}); give its input with"
                        " --input-size and --input-channels") from None
    try:
        classes = json.loads(carried[CLASSES_FILE]) if carried[CLASSES_FILE] else None
    except ValueError:
        classes = None
    width = int(out.shape[-1])
    classes = [str(c) for c in classes] if isinstance(classes, list) and len(classes) == width else None
    return ModelCard(path=path, num_classes=width, input=spec, torchscript=path, classes=classes,
                     input_source=source_of("TorchScript file", declared, overrides))


def _is_torchscript(path: Path) -> bool:
    """torch.save's zip holds ``data.pkl``; TorchScript's holds ``constants.pkl`` and ``code/`` too."""
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())


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
    """The input timm's pretrained weights for ``arch`` were made for (its default pretrained_cfg):
    size, channels, mean, std; only ever offered as an example, since a card's weights are its own."""
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
    try:
        model = builder(num_classes=num_classes, in_channels=in_channels, **dict(arch_args or {}))
    except TypeError as e:  # an argument the builder does not take (arch_args: {bogus: 1})
        given = ", ".join(["num_classes", "in_channels", *(arch_args or {})])
        raise DfkdError(f"{where}: arch {arch} cannot be built with {given} (check arch_args):"
                        f" {str(e).splitlines()[0][:200]}") from None
    if not isinstance(model, nn.Module):
        raise DfkdError(f"{where}: arch {arch} returned {shown(model)}, not a torch.nn.Module")
    return model


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
            raise DfkdError(f"{path}: {_pickled(text)}") from None
        raise DfkdError(f"{path}: cannot read weights ({text.splitlines()[0][:200]})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DfkdError(f"{path}: not a state_dict (a mapping of parameter names to tensors)")
    return obj


def as_card(card: CardLike, what: str = "card") -> ModelCard:
    """One loaded card, or the card (or TorchScript file) at a path, loaded (:func:`as_cards`)."""
    return as_cards(card, what)[0]


def _pickled(text: str) -> str:
    """What to do with a file that holds pickled objects (``text``: torch.load's weights-only error)."""
    found = re.search(r"GLOBAL ([\w.]+)", text)
    what = f"a pickled {found.group(1)}" if found else "pickled code or objects"
    return (f"holds {what} (a whole model saved with torch.save(model)?), not just weights; dfkd unpickles no code:"
            " save the weights with torch.save(model.state_dict(), 'weights.pt') and name them in a card"
            " (arch, num_classes, weights, input), or export the model as TorchScript"
            " (torch.jit.script(model).save('model.ts')) or ONNX")


def load_model(card: CardLike, device: str | torch.device = "cpu") -> nn.Module:
    """Build the card's model with its weights, in eval mode, on ``device`` (``card``: a loaded card
    or its path, e.g. ``dfkd.load_model(run.card)`` for a trained student)."""
    card = as_card(card)
    if card.onnx:
        from .onnx_model import OnnxModel

        return OnnxModel.load(card.onnx, device).eval()
    if card.hf:
        from .hf_model import load_hf

        return load_hf(card, device)
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
        misfit = state_misfit(expected, state)
        if misfit:
            raise DfkdError(f"{card.weights}: does not fit arch {card.arch} with {card.num_classes} classes and"
                            f" {card.input.channels} input channels (the card's input:): {misfit}")
        model.load_state_dict(state)
    return model.to(device).eval()


def state_misfit(expected: dict, state: dict) -> str:
    """How ``state`` fails to fit a model whose state_dict is ``expected`` ("" when it fits):
    the keys missing, unexpected and of another shape, a few of each."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    parts = [f"missing {few(missing)}" if missing else "",
             f"unexpected {few(unexpected)}" if unexpected else "",
             "other shape: " + few([f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
                                    for k in shapes]) if shapes else ""]
    return "; ".join(p for p in parts if p)


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
    """Set top-level fields of an existing YAML card in place (atomically), keeping the rest of
    the file as its author wrote it (comments, order, layout): a field's entry is replaced where
    it stands, or added at the end. Should the file's layout defeat that (the result would not
    read back as the fields set), the card is written out whole instead."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    data.update(fields)
    lines = text.splitlines(keepends=True)
    for key, value in fields.items():
        entry = f"{key}: {json.dumps(value)}\n"  # JSON is YAML's flow style: one line
        start = next((i for i, line in enumerate(lines) if re.match(rf"{re.escape(key)}\s*:", line)), None)
        if start is None:
            if lines and not lines[-1].endswith("\n"):
                lines[-1] += "\n"
            lines.append(entry)
            continue
        end = start + 1
        while end < len(lines) and (lines[end][:1] in (" ", "\t", "-") and lines[end].strip()):
            end += 1  # the entry's block: indented lines, or a block list at column 0
        lines[start:end] = [entry]
    kept = "".join(lines)
    try:
        same = yaml.safe_load(kept) == data
    except yaml.YAMLError:
        same = False
    return write_text(path, kept if same else yaml.safe_dump(data, sort_keys=False))
