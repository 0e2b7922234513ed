"""An ONNX file as a teacher: ONNX Runtime behind a module that maps a batch to logits.

Scoring (select, expand, eval) and the teacher side of distillation only need the teacher's
logits, so a deployed ``.onnx`` model serves as a teacher as it is. :class:`OnnxModel` is a
:class:`LogitsOnly` model: it has no parameters, no layers to tap and no gradients; anything
that needs more (pu-train's backbone, feature terms) refuses it by that type.

The file must have one input (N×C×H×W float) and one output (N×classes). ``dfkd export
--format onnx`` writes the input description into the file's ``metadata_props`` (key
:data:`INPUT_KEY`, the JSON of a card's ``input:``; :data:`CLASSES_KEY`, the class names), so
the file alone is fed right.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import DfkdError

INPUT_KEY = "dfkd_input"  # metadata_props: the input description (a card's input:, as JSON)
CLASSES_KEY = "dfkd_classes"  # metadata_props: the class names (a JSON list)


class LogitsOnly(nn.Module):
    """A model known only by its logits: nothing to train, no features to read, no autograd."""


def _runtime(where: Path | str):
    try:
        import onnxruntime
    except ImportError:
        raise DfkdError(f"{where}: an ONNX model needs onnxruntime: pip install 'dfkd[onnx]'") from None
    return onnxruntime


def providers(device: torch.device | str) -> list:
    """ONNX Runtime's providers for ``device``: CUDA (then CPU) on a CUDA device whose runtime has
    it, else CPU (with a warning when CUDA was asked for but onnxruntime has no CUDA provider)."""
    device = torch.device(device)
    if device.type == "cuda":
        if "CUDAExecutionProvider" in _runtime("--device cuda").get_available_providers():
            return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        warnings.warn("onnxruntime has no CUDA provider (pip install onnxruntime-gpu): the ONNX teacher runs on"
                      " the CPU", RuntimeWarning, stacklevel=2)
    return ["CPUExecutionProvider"]


def open_session(path: Path, device: torch.device | str = "cpu"):
    """An ONNX Runtime session of ``path`` with its one input and output checked; one line naming
    the file when it is not an ONNX model dfkd can feed."""
    ort = _runtime(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only: its warnings are not the user's
    try:
        session = ort.InferenceSession(str(path), options, providers=providers(device))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DfkdError(f"{path}: not an ONNX model ONNX Runtime can load ({first})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        shapes = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        raise DfkdError(f"{path}: takes {shapes}; a teacher takes one input, a batch of images (N x C x H x W)")
    if inputs[0].type not in ("tensor(float)", "tensor(float16)"):
        raise DfkdError(f"{path}: its input is {inputs[0].type}; dfkd feeds normalised float images")
    if len(outputs) != 1:
        names = ", ".join(o.name for o in outputs)
        raise DfkdError(f"{path}: has {len(outputs)} outputs ({names}); a teacher has one, the logits"
                        " (N x classes): export the model with the logits as its only output")
    if len(outputs[0].shape) != 2:
        raise DfkdError(f"{path}: its output {outputs[0].name} has shape {outputs[0].shape}; a teacher's"
                        " output is the logits, N x classes")
    return session


def carried(session) -> tuple[dict, list[str] | None]:
    """The input description and class names the file carries (``dfkd export`` writes them)."""
    meta = session.get_modelmeta().custom_metadata_map
    try:
        spec = json.loads(meta.get(INPUT_KEY) or "{}")
        classes = json.loads(meta[CLASSES_KEY]) if CLASSES_KEY in meta else None
    except ValueError:
        return {}, None
    return (spec if isinstance(spec, dict) else {}), (classes if isinstance(classes, list) else None)


def fixed_size(session) -> tuple[int | None, tuple[int, int] | None]:
    """The input's fixed batch size and (H, W), where the file fixes them (None where dynamic)."""
    shape = session.get_inputs()[0].shape
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    hw = tuple(shape[2:]) if all(isinstance(s, int) and s > 0 for s in shape[2:]) else None
    return batch, hw


class OnnxModel(LogitsOnly):
    """``forward(x)``: the ONNX model's logits of the float batch ``x`` (N×C×H×W), on ``x``'s
    device. A file with a fixed batch size is run in chunks of it (the last one padded)."""

    def __init__(self, path: str | Path, session):
        super().__init__()
        self.path, self.session = Path(path), session
        self.input_name = self.session.get_inputs()[0].name
        self.half = self.session.get_inputs()[0].type == "tensor(float16)"
        self.batch, _ = fixed_size(self.session)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().float().cpu().numpy(), dtype=np.float16 if self.half else np.float32)
        if self.batch is None:
            out = self._run(array)
        else:
            pad = -len(array) % self.batch
            if pad:
                array = np.concatenate([array, np.zeros((pad, *array.shape[1:]), array.dtype)])
            out = np.concatenate([self._run(array[i:i + self.batch]) for i in range(0, len(array), self.batch)])
            out = out[:len(x)]
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).to(x.device)

    def _run(self, array: np.ndarray) -> np.ndarray:
        try:
            return self.session.run(None, {self.input_name: array})[0]
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise DfkdError(f"{self.path}: ONNX Runtime could not run it on a {'x'.join(map(str, array.shape))}"
                            f" batch ({first})") from None

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "OnnxModel":
        """The model of the file ``path``, run by ONNX Runtime's provider for ``device``."""
        return cls(path, open_session(Path(path), device))

    def extra_repr(self) -> str:
        return f"{self.path}, providers={self.session.get_providers()}"


def _width(session, path: Path, channels: int, size: tuple[int, int]) -> int:
    """The number of logits the model gives per image (a trial run on zeros)."""
    return int(OnnxModel(path, session)(torch.zeros(1, channels, *size)).shape[-1])


def onnx_card(path: Path, overrides: dict):
    """The card of a bare ``.onnx`` file: its input from the flags, else from the description it
    carries (``dfkd export`` writes one), with size and channels also from the file's fixed input
    shape; mean and std are never guessed. ``num_classes`` is the width of its output."""
    from .cards import ModelCard, source_of
    from .images import InputSpec

    session = open_session(path)
    declared, classes = carried(session)
    _, hw = fixed_size(session)
    channels = session.get_inputs()[0].shape[1]
    shaped = {**({"size": list(hw)} if hw else {}), **({"channels": channels} if isinstance(channels, int) else {})}
    spec = InputSpec.from_dict({**shaped, **declared, **overrides}, f"{path}: input",
                               "this ONNX file does not say how it is fed (files from dfkd export do): give"
                               " --input-size, --input-mean and --input-std (e.g. --input-mean 0.485,0.456,0.406),"
                               " or write a model card with onnx: and input:")
    check_shape(session, path, spec)
    width = _width(session, path, spec.channels, spec.size)
    if width < 2:
        raise DfkdError(f"{path}: gives {width} value per image; a teacher gives one logit per class (2 or more)")
    if classes is not None and len(classes) != width:
        raise DfkdError(f"{path}: carries {len(classes)} class names but gives {width} logits per image")
    return ModelCard(path=path, num_classes=width, input=spec, onnx=path,
                     classes=[str(c) for c in classes] if classes else None,
                     input_source=source_of("ONNX file", {**shaped, **declared}, overrides))


def check_shape(session, path: Path, spec) -> None:
    """The input ``spec`` fits the file's fixed input shape, where it fixes one."""
    _, hw = fixed_size(session)
    channels = session.get_inputs()[0].shape[1]
    if hw and tuple(hw) != tuple(spec.size):
        raise DfkdError(f"{path}: takes {hw[0]}x{hw[1]} images (fixed in the file), but the input says"
                        f" {spec.size[0]}x{spec.size[1]}")
    if isinstance(channels, int) and channels > 0 and channels != spec.channels:
        raise DfkdError(f"{path}: takes {channels}-channel images (fixed in the file), but the input says"
                        f" {spec.channels}")


def check_card(card) -> None:
    """A YAML card's ``onnx:`` file fits the card: its input shape, and one logit per class."""
    session = open_session(card.onnx)
    check_shape(session, card.onnx, card.input)
    width = _width(session, card.onnx, card.input.channels, card.input.size)
    if width != card.num_classes:
        raise DfkdError(f"{card.onnx}: gives {width} logits per image, but {card.path} says num_classes:"
                        f" {card.num_classes}")
