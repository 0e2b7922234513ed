"""A Hugging Face image classifier saved locally (``save_pretrained``'s folder) as a model.

The folder holds ``config.json`` (architecture, ``id2label``), ``model.safetensors`` (or its
shards with ``model.safetensors.index.json``) and ``preprocessor_config.json`` (how images are
fed). The card is read from the JSON files alone; the model is built from ``config.json`` with
``AutoModelForImageClassification.from_config`` (no code from the folder, nothing downloaded)
and its safetensors are loaded strictly: every key, every shape, or one line naming the file.

The input comes from the preprocessor config: the centre crop (``crop_size``) or the resize
(``size``), and ``image_mean``/``image_std`` on the rescaled pixels. A pixel p in 0..255 is fed as
(p·r − mean)/std with ``rescale_factor`` r, which is ((p/255) − mean/(255r))/(std/(255r)): what
dfkd's input spec (on 0..1 pixels) holds. dfkd's ``crop`` scales the shorter side to the crop
size; a processor that first resizes to a larger ``shortest_edge`` (256 before a 224 crop) sees
a little more border, as with timm's crop_pct (README, "The teacher you already have").
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DfkdError
from .images import InputSpec

CONFIG, PREPROCESSOR = "config.json", "preprocessor_config.json"
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


def _json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DfkdError(f"{path}: not found; {what}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DfkdError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DfkdError(f"{path}: expected a JSON object")
    return data


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors: ``model.safetensors``, or the shards its index lists."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if (folder / WEIGHTS_INDEX).is_file():
        index = _json(folder / WEIGHTS_INDEX, "")
        shards = sorted(set((index.get("weight_map") or {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not shards or missing:
            raise DfkdError(f"{folder / WEIGHTS_INDEX}: lists shard(s) not in the folder:"
                            f" {', '.join(missing) or '(none)'}")
        return [folder / s for s in shards]
    raise DfkdError(f"{folder}: no {WEIGHTS}; dfkd loads a Hugging Face model's weights from safetensors only"
                    " (model.save_pretrained(folder) writes them)")


def folder_files(folder: Path) -> list[Path]:
    """Every file the model is read from (what a run is bound to)."""
    files = [folder / CONFIG, folder / PREPROCESSOR, folder / WEIGHTS_INDEX, *weight_files(folder)]
    return [f for f in files if f.is_file()]


def preprocessor_input(pp: dict, where: Path) -> dict:
    """The input description (a card's ``input:``) of a preprocessor config; keys it cannot give
    are left out (flags may give them; else the card is refused)."""
    out: dict[str, Any] = {}

    def side(value: Any) -> list[int] | None:
        if isinstance(value, int):
            return [value, value]
        if isinstance(value, dict) and "height" in value and "width" in value:
            return [value["height"], value["width"]]
        return None

    size = pp.get("size")
    if pp.get("do_center_crop") and side(pp.get("crop_size")):
        out.update(size=side(pp["crop_size"]), resize="crop")
    elif pp.get("do_resize", True) and side(size):
        out.update(size=side(size), resize="stretch")
    elif pp.get("do_resize", True) and isinstance(size, dict) and "shortest_edge" in size and "crop_pct" in pp:
        edge = size["shortest_edge"]  # ConvNeXt's processor: crop below 384 px, a plain resize from it
        out.update(size=[edge, edge], resize="crop" if edge < 384 else "stretch")
    rescale = pp.get("rescale_factor", 1 / 255) if pp.get("do_rescale", True) else 1.0
    if not isinstance(rescale, (int, float)) or rescale <= 0:
        raise DfkdError(f"{where}: rescale_factor {rescale!r} is not a positive number")
    if pp.get("do_normalize", True):
        mean, std = pp.get("image_mean"), pp.get("image_std")
    else:
        mean, std = [0.0] * 3, [1.0] * 3
    if isinstance(mean, list) and isinstance(std, list) and all(isinstance(v, (int, float)) for v in mean + std):
        scale = 255 * rescale
        out.update(mean=[m / scale for m in mean], std=[s / scale for s in std])
    return out


def hf_card(folder: Path, overrides: dict):
    """The card of a Hugging Face model folder, from its JSON files (no model is built)."""
    from .cards import MAX_CLASSES, ModelCard, source_of

    config = _json(folder / CONFIG, "a model given as a folder is a Hugging Face model folder, which holds"
                                    " config.json, model.safetensors and preprocessor_config.json"
                                    " (save_pretrained writes them)")
    labels = config.get("id2label")
    if not isinstance(labels, dict) or not labels:
        raise DfkdError(f"{folder / CONFIG}: no id2label, so the number of classes is unknown")
    try:
        ids = sorted(int(k) for k in labels)
    except ValueError:
        raise DfkdError(f"{folder / CONFIG}: id2label keys are not class ids") from None
    if ids != list(range(len(ids))) or not 2 <= len(ids) <= MAX_CLASSES:
        raise DfkdError(f"{folder / CONFIG}: id2label must number 2 to {MAX_CLASSES} classes from 0")
    names = [str(labels[str(i)] if str(i) in labels else labels[i]) for i in ids]
    generic = all(n == f"LABEL_{i}" for i, n in enumerate(names))
    pp_path = folder / PREPROCESSOR
    if pp_path.is_file():
        declared = preprocessor_input(_json(pp_path, ""), pp_path)
    elif {"size", "mean", "std"} <= set(overrides):
        declared = {}
    else:
        raise DfkdError(f"{pp_path}: not found, and it says how the model is fed (size, crop, mean, std): save"
                        " the image processor too (processor.save_pretrained(folder)), or give --input-size,"
                        " --input-mean and --input-std")
    spec = InputSpec.from_dict({**declared, **overrides}, f"{pp_path}: input",
                               "give --input-size (and --input-mean, --input-std) for what the processor leaves open")
    channels = config.get("num_channels", 3)
    if channels != spec.channels:
        raise DfkdError(f"{folder / CONFIG}: num_channels {channels!r}, but the input has {spec.channels} channel(s)")
    weights = weight_files(folder)
    if importlib.util.find_spec("transformers") is None:
        raise DfkdError(f"{folder}: a Hugging Face model needs transformers: pip install 'dfkd[hf]'")
    return ModelCard(path=folder, num_classes=len(ids), input=spec, weights=weights[0], hf=folder,
                     classes=None if generic else names,
                     input_source=source_of(PREPROCESSOR, declared, overrides))


class HfClassifier(nn.Module):
    """A transformers image classifier as a plain module: ``forward(x)`` gives the logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def load_hf(card, device: torch.device | str = "cpu") -> nn.Module:
    """The folder's classifier with its safetensors loaded strictly, in eval mode, on ``device``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .cards import state_misfit

    folder = card.hf
    try:
        import transformers
    except ImportError:
        raise DfkdError(f"{folder}: a Hugging Face model needs transformers: pip install 'dfkd[hf]'") from None
    transformers.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        model = transformers.AutoModelForImageClassification.from_config(config)
    except (ValueError, KeyError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DfkdError(f"{folder / CONFIG}: transformers cannot build an image classifier from it ({first})") from None
    except ImportError as e:  # e.g. transformers 5 with PyTorch older than 2.6
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)[:200]
        raise DfkdError(f"{folder}: transformers {transformers.__version__} cannot build its model with PyTorch"
                        f" {torch.__version__} ({first})") from None
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise DfkdError(f"{f}: not a readable safetensors file ({str(e)[:200]})") from None
    misfit = state_misfit(model.state_dict(), state)
    if misfit:
        raise DfkdError(f"{card.weights}: does not fit {type(model).__name__} of {folder / CONFIG}: {misfit}")
    model.load_state_dict(state)
    return HfClassifier(model).to(device).eval()
