"""Real resolution (issue 21): every model pass and every decoding loader takes its batch from
the user's setting; JPEGs are decoded at a reduced size within a measured tolerance; running out
of memory ends with one line naming the flag."""
from __future__ import annotations

import os
import shutil
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dfkd.train.cache
import dfkd.train.data
from dfkd.cards import save_card
from dfkd.distill.run import default_config, distill
from dfkd.errors import out_of_memory
from dfkd.evaluate import evaluate
from dfkd.images import InputSpec, image_tensor, load_image
from dfkd.models import ARCHS
from dfkd.pu.expand import expand
from dfkd.pu.train import PuConfig, pu_train
from dfkd.select.run import select_pool
from dfkd.train.classifier import train_classifier
from dfkd.train.loop import LoopConfig

from conftest import write_pattern_folder

BATCH = 4


@pytest.fixture
def batches(monkeypatch):
    """The leading dimension of every image batch a model is given, and the batch size of
    every loader that decodes a training set, while the test runs (the scoring engine's loader
    gets blocks already cut to the batch: the model's batches show them)."""
    seen = {"model": [], "loader": []}

    def hook(module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            seen["model"].append(args[0].shape[0])

    for module in (dfkd.train.data, dfkd.train.cache):
        real = module.loader

        def recording(dataset, batch_size, *a, _real=real, **kw):
            seen["loader"].append(batch_size)
            return _real(dataset, batch_size, *a, **kw)

        monkeypatch.setattr(module, "loader", recording)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    yield seen
    handle.remove()


def _check(seen: dict) -> None:
    assert seen["model"], "no model pass was seen"
    assert max(seen["model"]) == BATCH, f"a model pass took a batch of {max(seen['model'])}, not --batch-size"
    assert all(b == BATCH for b in seen["loader"]), seen["loader"]


def test_select_eval_and_train_take_the_batch_from_the_user(tmp_path, pattern_folder, random_teacher, batches):
    from dfkd.cards import load_card

    card = load_card(random_teacher)
    select_pool(card, pattern_folder, tmp_path / "sel", num_images=6, batch_size=BATCH, workers=0, device="cpu")
    evaluate(card, pattern_folder, batch_size=BATCH, workers=0, device="cpu")
    train_classifier("resnet8", pattern_folder, tmp_path / "train", LoopConfig(batch_size=BATCH, steps=2, amp=False),
                     workers=0, device="cpu")
    assert batches["loader"], "no decoding loader was seen"
    _check(batches)


@pytest.mark.parametrize("store", ["memory", "disk cache"])
def test_distill_teacher_pass_takes_the_batch_from_the_user(tmp_path, pattern_folder, random_teacher, batches,
                                                             monkeypatch, store):
    """The teacher's unaugmented pass over the training set used a batch of 512 whatever
    --batch-size said (6.2 GiB at 480 px with --batch-size 8)."""
    from dfkd.cards import load_card

    if store == "disk cache":
        monkeypatch.setenv("DFKD_IN_MEMORY_BYTES", "1")
        monkeypatch.setenv("DFKD_CACHE_DIR", str(tmp_path / "cache"))
    from dfkd.events import TeacherPass

    config = {**default_config(), "method": "kd", "batch_size": BATCH, "steps": 2, "amp": False}
    events = []
    distill(load_card(random_teacher), "resnet8", pattern_folder, tmp_path / "distill", config, workers=0,
            device="cpu", eval_data=pattern_folder, on_event=events.append)
    _check(batches)
    passes = [(e.done, e.total) for e in events if isinstance(e, TeacherPass)]  # its progress, batch by batch
    n = passes[-1][1]
    assert passes == [(min(i, n), n) for i in range(BATCH, n + BATCH, BATCH)] and n == 18


def test_pu_train_and_expand_take_the_batch_from_the_user(tmp_path, pattern_folder, random_teacher, batches):
    from dfkd.cards import load_card

    pool = write_pattern_folder(tmp_path / "pool", per_class=5, seed=1)
    cfg = PuConfig(batch_size=BATCH, steps=2, amp=False, nnpu={"prior": 0.5, "beta": 0.0, "gamma": 1.0})
    result = pu_train(load_card(random_teacher), pattern_folder, pool, tmp_path / "pu", cfg, workers=0, device="cpu")
    expand(result.card, pattern_folder, pool, tmp_path / "expand", batch_size=BATCH, workers=0, device="cpu")
    _check(batches)


def _photo(path: Path, w: int, h: int, seed: int = 0) -> str:
    """A photo-like baseline JPEG: smooth colour noise plus edges, quality 90."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 24 + 1, w // 24 + 1, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small, "RGB").resize((w, h), Image.BICUBIC)).astype(np.int16)
    img[:, ::37] = 255 - img[:, ::37]  # sharp lines: the detail that a reduced decode loses first
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(path, quality=90)
    return str(path)


@pytest.mark.parametrize("source, size, decoded", [((500, 375), 112, (250, 188)), ((2000, 1500), 224, (500, 375)),
                                                    ((500, 375), 224, (500, 375))])
def test_jpegs_are_decoded_at_a_reduced_size_within_the_documented_tolerance(tmp_path, monkeypatch, source, size,
                                                                              decoded):
    """libjpeg's DCT scaling (1/2, 1/4, 1/8) down to no less than the model's input, then the same
    resize: on this image with sharp lines (a worst case) the mean absolute difference stays under
    1.5 grey levels and the largest under 24 (of 255); the README gives real photos' figures."""
    path = _photo(tmp_path / "photo.jpg", *source)
    assert load_image(path, 3, (size, size)).size == decoded
    for resize in ("crop", "stretch", "pad"):
        spec = InputSpec(size=(size, size), channels=3, resize=resize)
        reduced = image_tensor(path, spec).int()
        monkeypatch.setenv("DFKD_REDUCED_DECODE", "0")
        full = image_tensor(path, spec).int()
        monkeypatch.delenv("DFKD_REDUCED_DECODE")
        diff = (reduced - full).abs()
        assert reduced.shape == full.shape == (3, size, size)
        assert diff.float().mean() < 1.5 and diff.max() < 24, (resize, float(diff.float().mean()), int(diff.max()))


def test_a_rotated_photo_is_decoded_no_smaller_than_the_input(tmp_path):
    """A portrait photo stored landscape with EXIF orientation 6: the reduced scale is chosen
    for the picture as shown, not as stored."""
    img = Image.open(_photo(tmp_path / "p.jpg", 2000, 600))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rotated.jpg", quality=90, exif=exif)
    assert load_image(str(tmp_path / "rotated.jpg"), 3, (500, 250)).size == (600, 2000)  # as stored: 1/2 is too small
    assert load_image(str(tmp_path / "rotated.jpg"), 3, (250, 500)).size == (300, 1000)


def test_out_of_memory_errors_become_one_line_naming_the_batch_flag():
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:119] data. DefaultCPUAllocator: can't allocate memory: you"
                       " tried to allocate 9663676416 bytes. Error code 12 (Cannot allocate memory)")
    for e in (cpu, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), MemoryError()):
        line = str(out_of_memory(e))
        assert "--batch-size" in line and "\n" not in line
    assert out_of_memory(RuntimeError("shape mismatch")) is None and out_of_memory(ValueError("x")) is None


@pytest.mark.slow
def test_select_out_of_memory_ends_with_one_line(tmp_path):
    """A real allocation failure (the address space capped at 6 GiB, a 1500-px teacher, a batch of
    64): exit 2 and one line that names --batch-size, no traceback."""
    torch.manual_seed(0)
    spec = InputSpec(size=(1500, 1500), channels=1, mean=[0.5], std=[0.5])
    card = save_card(tmp_path / "t.yaml", "resnet8", 3, spec, ARCHS.get("resnet8")(num_classes=3, in_channels=1).state_dict())
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(64):
        Image.fromarray(np.full((8, 8), i * 3, np.uint8), "L").save(pool / f"{i}.png")

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dfkd", "select", "--teacher", str(card), "--pool", str(pool),
                           "--out", str(tmp_path / "sel"), "--batch-size", "64", "--workers", "0", "--device", "cpu"],
                          capture_output=True, text=True, preexec_fn=cap, env=env, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("dfkd select: error: out of memory") and "--batch-size" in lines[-1], lines


def test_select_decodes_each_pool_image_once(tmp_path, pattern_folder, random_teacher, monkeypatch):
    """Dropping duplicates needs the candidates' thumbnails: they come with the scores (from the
    batch the teacher was given), so the candidates are not decoded a second time; the result is
    the one a second decode gives (rows written before 0.3, without thumbnails, take that path)."""
    import dfkd.engine
    from dfkd.cards import load_card
    shutil.copy(pattern_folder / "blob" / "000.png", pattern_folder / "blob" / "copy.png")
    decoded = []
    real = dfkd.engine.image_tensor
    monkeypatch.setattr(dfkd.engine, "image_tensor", lambda path, spec: decoded.append(path) or real(path, spec))
    card = load_card(random_teacher)
    res = select_pool(card, pattern_folder, tmp_path / "new", num_images=4, batch_size=BATCH, workers=0, device="cpu")
    assert sorted(decoded) == sorted(str(p) for p in pattern_folder.rglob("*.png"))  # once each
    assert res.duplicates >= 1
    rows = tmp_path / "new" / ".scoring" / "rows.tsv"
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "new", old)
    (old / ".scoring" / "rows.tsv").write_text("".join("\t".join(line.split("\t")[:4]) + "\n"
                                                       for line in rows.read_text().splitlines()))
    for f in ("selected.tsv", "duplicates.tsv", "manifest.json"):
        (old / f).unlink()
    decoded.clear()
    again = select_pool(card, pattern_folder, old, num_images=4, batch_size=BATCH, workers=0, device="cpu")
    assert decoded, "rows without thumbnails: the candidates are decoded again"
    assert again.duplicates == res.duplicates
    for f in ("selected.tsv", "duplicates.tsv", "scores.tsv"):
        assert (old / f).read_text() == (tmp_path / "new" / f).read_text()
