"""Every teacher form scores a pool with the noise values of the equivalent PyTorch model.

Builds one small random teacher per form in ``--work`` (a card with a torchvision or timm arch
and a state_dict, the same model exported by ``dfkd export`` as TorchScript and as ONNX, a
Hugging Face model folder), scores a generated pool of ``--num`` colour images with each, from
the CLI (``dfkd select``, 6-digit scores.tsv) and from the API (the one teacher loader), and
prints the largest difference of the noise values from the reference: the PyTorch module fed by
hand (the HF module with its preprocessor's normalisation, applied here).

    python bench/teacher_forms.py --work runs/bench-teacher-forms
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dfkd.cards import build_arch, load_card
from dfkd.images import InputSpec, image_tensor, pool_paths
from dfkd.select.scores import noise_value
from dfkd.teacher import load_teacher

SIZE, CLASSES = 32, 5
SPEC = {"size": SIZE, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": "stretch"}


def make_pool(root: Path, num: int) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:48, 0:40]
    for i in range(num):
        phase, freq, colour = rng.uniform(0, 6), rng.uniform(0.1, 0.8), rng.uniform(0, 255, 3)
        wave = (np.sin(freq * (xx if i % 2 else yy) + phase) + 1) / 2
        img = wave[..., None] * colour + rng.normal(0, 20, (48, 40, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"{i:04d}.png")
    return root


def by_hand(module: torch.nn.Module, pool: Path, mean: list[float], std: list[float], logits=lambda out: out):
    """Reference noise values: the pool's pixels (decoded and resized by dfkd), normalised here."""
    spec = InputSpec.from_dict(SPEC)
    x = torch.stack([image_tensor(p, spec) for p in pool_paths(pool).paths]).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return noise_value(logits(module.eval()(x)))


def api(teacher: Path, pool: Path) -> torch.Tensor:
    t = load_teacher(load_card(teacher), torch.device("cpu"))
    spec = t.card.input
    x = torch.stack([image_tensor(p, spec) for p in pool_paths(pool).paths]).float() / 255
    x = (x - torch.tensor(spec.mean).view(1, -1, 1, 1)) / torch.tensor(spec.std).view(1, -1, 1, 1)
    with torch.inference_mode():
        return noise_value(t.model(x))


def dfkd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dfkd", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def cli(teacher: Path, pool: Path, out: Path, order: list[str]) -> np.ndarray:
    dfkd("select", "--teacher", str(teacher), "--pool", str(pool), "--out", str(out), "--workers", "0",
         "--dedup", "off", "--overwrite")
    with open(out / "scores.tsv", encoding="utf-8") as f:
        got = {r["path"]: float(r["score"]) for r in csv.DictReader(f, delimiter="\t")}
    return np.array([got[p] for p in order])


def card(path: Path, arch: str, module: torch.nn.Module) -> Path:
    torch.save(module.state_dict(), path.with_suffix(".pt"))
    path.write_text(f"arch: {arch}\nnum_classes: {CLASSES}\nweights: {path.with_suffix('.pt').name}\n"
                    f"input: {json.dumps(SPEC)}\n")
    return path


def hf_folder(folder: Path) -> torch.nn.Module:
    import transformers

    config = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                                       id2label={i: f"class{i}" for i in range(CLASSES)})
    model = transformers.ResNetForImageClassification(config).eval()
    model.save_pretrained(str(folder))
    transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=SPEC["mean"],
                                   image_std=SPEC["std"]).save_pretrained(str(folder))
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/bench-teacher-forms"))
    ap.add_argument("--num", type=int, default=64, help="pool images")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit's deprecation notice
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    pool = make_pool(work / "pool", args.num)
    order = [str(p) for p in pool_paths(pool).paths]
    torch.manual_seed(0)
    tv = build_arch("torchvision:resnet18", CLASSES, 3)
    forms = [("card, torchvision:resnet18 + state_dict", card(work / "tv.yaml", "torchvision:resnet18", tv), tv, None)]
    dfkd("export", "--model", str(work / "tv.yaml"), "--format", "torchscript", "--out", str(work / "tv.ts"))
    dfkd("export", "--model", str(work / "tv.yaml"), "--format", "onnx", "--out", str(work / "tv.onnx"))
    forms += [("TorchScript from dfkd export", work / "tv.ts", tv, None),
              ("ONNX from dfkd export", work / "tv.onnx", tv, None)]
    try:
        tm = build_arch("timm:mobilenetv3_small_100", CLASSES, 3)
        forms.append(("card, timm:mobilenetv3_small_100 + state_dict",
                      card(work / "timm.yaml", "timm:mobilenetv3_small_100", tm), tm, None))
    except Exception as e:  # timm not installed
        print(f"timm: skipped ({e})")
    try:
        hf = hf_folder(work / "hf")
        forms.append(("Hugging Face folder (vs its module fed by hand)", work / "hf", hf, lambda out: out.logits))
    except ImportError as e:
        print(f"Hugging Face: skipped ({e})")
    print(f"{len(order)} images, {SIZE} px, {CLASSES} classes, random weights;"
          " largest |noise value − reference| (reference: the PyTorch module fed by hand)")
    print(f"{'form':50s} {'API':>10s} {'CLI (6 digits)':>15s}  noise values")
    for name, teacher, module, logits in forms:
        ref = by_hand(module, pool, SPEC["mean"], SPEC["std"], logits or (lambda out: out))
        got_api = api(teacher, pool)
        got_cli = cli(teacher, pool, work / f"select-{teacher.name}", order)
        print(f"{name:50s} {float((got_api - ref).abs().max()):10.3g}"
              f" {float(np.abs(got_cli - ref.numpy()).max()):15.3g}"
              f"  {float(ref.min()):.4f} .. {float(ref.max()):.4f}")


if __name__ == "__main__":
    main()
