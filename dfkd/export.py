"""``export``: write a model as TorchScript or ONNX and check the exported outputs match."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .cards import INPUT_FILE, ModelCard, as_card, load_model
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
    for source in (card.path, card.weights, card.torchscript):
        if source is not None and out.exists() and os.path.samefile(out, source):
            raise DfkdError(f"--out {out}: is the model's own file {source}, which the export would write"
                            " over; give another file")
    model = load_model(card, "cpu")
    x = torch.randn(samples, card.input.channels, *card.input.size, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        expected = model(x)
    if fmt == "torchscript":
        traced = torch.jit.trace(model, x[:1])
        carried = {INPUT_FILE: json.dumps(card.input.to_dict())}  # so the file alone feeds it right
        atomic_write(out, lambda f: torch.jit.save(traced, f, _extra_files=carried), "wb")
        with torch.inference_mode():
            got = torch.jit.load(str(out))(x)
    else:
        try:
            import onnxruntime
        except ImportError:
            raise DfkdError("--format onnx needs onnx and onnxruntime: pip install 'dfkd[onnx]'") from None
        atomic_write(out, lambda f: torch.onnx.export(model, (x[:1],), f, input_names=["input"],
                                                      output_names=["logits"], dynamo=False,
                                                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}),
                     "wb")
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    return ExportResult(out, fmt, float((got - expected).abs().max()), samples)
