"""``export``: write a model as TorchScript or ONNX and check the exported outputs match.

Both files carry the input description and the class names (TorchScript: extra files
:data:`dfkd.cards.INPUT_FILE` and :data:`dfkd.cards.CLASSES_FILE`; ONNX: ``metadata_props``
:data:`dfkd.onnx_model.INPUT_KEY` and :data:`dfkd.onnx_model.CLASSES_KEY`), so that the file
alone is fed right wherever a card is accepted."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .cards import CLASSES_FILE, INPUT_FILE, ModelCard, as_card, load_model
from .errors import DfkdError
from .io import atomic_write

FORMATS = ("torchscript", "onnx")


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float
    samples: int


def export_model(card: ModelCard, fmt: str, out: str | Path, samples: int = 8, seed: int = 0) -> ExportResult:
    """Export ``card``'s model; compare its outputs with the original on random inputs."""
    card = as_card(card)
    if fmt not in FORMATS:
        raise DfkdError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise DfkdError(f"--out {out}: is a directory; give the file to write")
    for source in card.files:
        if out.exists() and os.path.samefile(out, source):
            raise DfkdError(f"--out {out}: is the model's own file {source}, which the export would write"
                            " over; give another file")
    model = load_model(card, "cpu")
    x = torch.randn(samples, card.input.channels, *card.input.size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        expected = model(x)
    if fmt == "torchscript":
        traced = torch.jit.trace(model, x[:1])
        carried = {INPUT_FILE: json.dumps(card.input.to_dict())}  # so the file alone feeds it right
        if card.classes:
            carried[CLASSES_FILE] = json.dumps(card.classes)
        atomic_write(out, lambda f: torch.jit.save(traced, f, _extra_files=carried), "wb")
        with torch.inference_mode():
            got = torch.jit.load(str(out))(x)
    else:
        from .onnx_model import OnnxModel

        try:
            import onnx
            import onnxruntime  # noqa: F401
        except ImportError:
            raise DfkdError("--format onnx needs onnx and onnxruntime: pip install 'dfkd[onnx]'") from None
        buffer = io.BytesIO()
        torch.onnx.export(model, (x[:1],), buffer, input_names=["input"], output_names=["logits"], dynamo=False,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        proto = onnx.load_from_string(buffer.getvalue())
        onnx.helper.set_model_props(proto, onnx_metadata(card))  # so the file alone feeds it right
        atomic_write(out, lambda f: f.write(proto.SerializeToString()), "wb")
        got = OnnxModel.load(out, "cpu")(x)
    return ExportResult(out, fmt, float((got - expected).abs().max()), samples)


def onnx_metadata(card: ModelCard) -> dict[str, str]:
    """The ONNX file's ``metadata_props``: the input description and the class names."""
    from .onnx_model import CLASSES_KEY, INPUT_KEY

    meta = {INPUT_KEY: json.dumps(card.input.to_dict())}
    if card.classes:
        meta[CLASSES_KEY] = json.dumps(card.classes)
    return meta
