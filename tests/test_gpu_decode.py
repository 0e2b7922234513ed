"""The batched JPEG path of the scoring engine (dfkd/gpu_decode.py).

On CPU-only machines it runs with torchvision's CPU decoder (the same calls, device "cpu"), so
the routing, the resize, the fallback and the bad-file rules are tested everywhere; the CUDA
run itself is behind the gpu marker."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from dfkd import gpu_decode
from dfkd.cards import load_card
from dfkd.images import InputSpec, fit_image
from dfkd.index import read_index
from dfkd.select import select_pool


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def jpeg_pool(pool, folder, n):
    """The first ``n`` images of an ImageFolder, re-encoded as greyscale JPEGs in one folder."""
    pool.mkdir()
    for p in sorted(folder.rglob("*.png"))[:n]:
        with Image.open(p) as im:
            (pool / f"{p.parent.name}_{p.stem}.jpg").write_bytes(jpeg(im.convert("L")))
    return pool


def photo(w=37, h=23, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((w, h), Image.BILINEAR)


def test_only_plain_jpegs_take_the_batched_path():
    assert gpu_decode.raw_jpeg(jpeg(photo())) is not None
    assert gpu_decode.raw_jpeg(jpeg(photo().convert("L"))) is not None
    png = io.BytesIO()
    photo().save(png, "PNG")
    assert gpu_decode.raw_jpeg(png.getvalue()) is None
    assert gpu_decode.raw_jpeg(jpeg(photo().convert("CMYK"))) is None
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90°: PIL's path applies it, the GPU decoder would not
    assert gpu_decode.raw_jpeg(jpeg(photo(), exif=exif.tobytes())) is None
    assert gpu_decode.raw_jpeg(b"\xff\xd8\xff" + b"\0" * 50) is None


@pytest.mark.parametrize("resize", ["stretch", "crop", "pad"])
def test_resize_matches_the_cpu_path(resize):
    spec = InputSpec(size=(16, 20), channels=3, resize=resize)
    img = photo(61, 33)
    want = torch.from_numpy(np.array(fit_image(img, spec))).permute(2, 0, 1)
    got = gpu_decode.fit(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), spec)
    assert got.shape == want.shape
    assert (got.float() - want.float()).abs().mean() < 2.0  # of 255: antialiased bilinear on both sides


@pytest.mark.slow
def test_select_on_a_jpeg_pool_through_the_batched_path(tmp_path, digits_folders, digits_teacher, monkeypatch):
    pool = jpeg_pool(tmp_path / "pool", digits_folders[1], 120)
    good = jpeg(photo().convert("L"))
    (pool / "zz_cut.jpg").write_bytes(good[:len(good) * 9 // 10])  # a valid header, cut-off data
    (pool / "zz_bad.jpg").write_bytes(good[:-40] + b"\0" * 38 + b"\xff\xd9")  # whole, but corrupt
    card = load_card(digits_teacher)
    # dedup off: only the scoring pass decodes (the second look at the candidates would decode again)
    cpu = select_pool(card, pool, tmp_path / "cpu", num_images=30, dedup="off", workers=0, device="cpu")
    calls = []
    real = gpu_decode.decode
    monkeypatch.setattr(gpu_decode, "enabled", lambda device: True)
    monkeypatch.setattr(gpu_decode, "decode", lambda raw, spec, device: calls.append(len(raw)) or real(raw, spec, device))
    batched = select_pool(card, pool, tmp_path / "batched", num_images=30, dedup="off", workers=0, device="cpu")
    assert sum(calls) == 121  # every whole JPEG (the corrupt one too) went the batched way; not the cut one
    assert read_index(tmp_path / "batched" / "skipped.tsv").paths == read_index(tmp_path / "cpu" / "skipped.tsv").paths
    assert batched.skipped == cpu.skipped
    a = {r["path"]: float(r["score"]) for r in read_index(tmp_path / "cpu" / "scores.tsv").rows}
    b = {r["path"]: float(r["score"]) for r in read_index(tmp_path / "batched" / "scores.tsv").rows}
    assert a.keys() == b.keys()
    assert np.corrcoef(list(a.values()), [b[k] for k in a])[0, 1] > 0.99  # same JPEG decoder family, same resize


@pytest.mark.gpu
@pytest.mark.slow
def test_select_on_cuda_decodes_jpegs_on_the_gpu(tmp_path, digits_folders, digits_teacher, monkeypatch):
    pool = jpeg_pool(tmp_path / "pool", digits_folders[1], 200)
    card = load_card(digits_teacher)
    devices = []
    real = gpu_decode.decode
    monkeypatch.setattr(gpu_decode, "decode", lambda raw, spec, device: devices.append(device) or real(raw, spec, device))
    gpu = select_pool(card, pool, tmp_path / "gpu", num_images=50, device="cuda", amp=False, workers=2)
    cpu = select_pool(card, pool, tmp_path / "cpu", num_images=50, device="cpu", amp=False, workers=0)
    assert devices and all(d.type == "cuda" for d in devices)
    assert gpu.scored == cpu.scored == 200
    a = [float(r["score"]) for r in read_index(tmp_path / "cpu" / "scores.tsv").rows]
    b = [float(r["score"]) for r in read_index(tmp_path / "gpu" / "scores.tsv").rows]
    assert np.corrcoef(a, b)[0, 1] > 0.99
