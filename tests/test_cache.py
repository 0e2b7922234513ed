"""The on-disk decoded-image cache: same pixels and same training as in memory, reused, resumed."""
import json
import os
import shutil

import pytest
import torch

from dfkd.cards import load_card
from dfkd.distill.run import default_config, distill
from dfkd.config import resolve_config
from dfkd.errors import DfkdError
from dfkd.events import Decoded
from dfkd.images import InputSpec
from dfkd.train import cache
from dfkd.train.data import decode_images

SPEC = InputSpec(size=(16, 16), channels=1, mean=[0.5], std=[0.5])


@pytest.fixture
def on_disk(tmp_path, monkeypatch):
    """Every set goes to the cache, in a folder of the test's own."""
    monkeypatch.setenv("DFKD_IN_MEMORY_BYTES", "0")
    monkeypatch.setenv("DFKD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def image_paths(folder, bad_at=3):
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return paths[:bad_at] + [str(bad)] + paths[bad_at:]


def test_cache_holds_the_same_pixels_skips_the_same_files_and_is_reused(pattern_folder, on_disk, monkeypatch):
    paths = image_paths(pattern_folder)
    labels = list(range(len(paths)))
    monkeypatch.setenv("DFKD_IN_MEMORY_BYTES", str(1 << 30))
    ram = decode_images(paths, SPEC, labels)
    monkeypatch.setenv("DFKD_IN_MEMORY_BYTES", "0")
    disk = decode_images(paths, SPEC, labels)
    assert disk.on_disk and not ram.on_disk
    assert disk.skipped == ram.skipped == [{"path": paths[3], "reason": disk.skipped[0]["reason"]}]
    assert disk.paths == ram.paths and torch.equal(disk.labels, ram.labels)
    idx = torch.tensor([5, 0, 5, len(disk) - 1])
    assert torch.equal(disk.read(idx), ram.read(idx))
    assert torch.equal(torch.cat(list(disk.batches(4))), ram.images)
    sub = disk.subset(torch.tensor([2, 7]))
    assert torch.equal(sub.read(torch.tensor([1, 0])), ram.images[[7, 2]])

    (entry,) = [p for p in on_disk.iterdir() if p.is_dir()]
    assert sorted(p.name for p in entry.iterdir()) == ["digests.u8", "images.u8", "meta.json"]
    stamp = (entry / "meta.json").stat().st_mtime_ns
    decode_images(paths, SPEC, labels)  # the same rows again: the entry is reused, not rebuilt
    assert (entry / "meta.json").stat().st_mtime_ns == stamp
    os.utime(paths[0], ns=(1, 1))  # an edited file: another entry
    decode_images(paths, SPEC, labels)
    decode_images(paths, InputSpec(size=(8, 8), channels=1), labels)  # another input size: another
    assert len([p for p in on_disk.iterdir() if p.is_dir()]) == 3


def test_a_killed_build_resumes_with_the_chunks_still_missing(pattern_folder, on_disk, monkeypatch):
    paths = image_paths(pattern_folder)
    monkeypatch.setattr(cache, "CHUNK", 5)
    decoded = []

    def stop_after_two_chunks(done, total):
        decoded.append(done)
        if len(decoded) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        decode_images(paths, SPEC, on_event=lambda ev: isinstance(ev, Decoded) and stop_after_two_chunks(ev.done,
                                                                                                         ev.total))
    (entry,) = [p for p in on_disk.iterdir() if p.is_dir()]
    assert sorted(p.name for p in (entry / "parts").iterdir()) == ["0.json", "1.json"]
    assert not (entry / "meta.json").exists()
    decoded.clear()
    again = decode_images(paths, SPEC, on_event=lambda ev: isinstance(ev, Decoded) and decoded.append(ev.done))
    fresh = decode_images(paths, SPEC, cache_dir=on_disk / "fresh")
    assert torch.equal(torch.cat(list(again.batches(64))), torch.cat(list(fresh.batches(64))))
    assert again.skipped == fresh.skipped and len(again.skipped) == 1
    assert json.loads((entry / "meta.json").read_text())["failed"] == [[3, again.skipped[0]["reason"]]]
    assert not (entry / "parts").exists()


def test_a_cut_off_or_foreign_entry_is_one_clear_line(pattern_folder, on_disk):
    paths = image_paths(pattern_folder)
    data = decode_images(paths, SPEC)
    (entry,) = [p for p in on_disk.iterdir() if p.is_dir()]
    with open(entry / "images.u8", "r+b") as f:
        f.truncate(100)
    with pytest.raises(DfkdError, match="shorter than its meta.json says"):
        data.read(torch.tensor([len(data) - 1]))
    with pytest.raises(DfkdError, match=r"images.u8: holds 100 bytes, its meta.json says \d+ .* remove"):
        decode_images(paths, SPEC)  # found when the entry is opened, before any training
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps({**meta, "rows": 3}))
    with pytest.raises(DfkdError, match=r"meta.json: does not describe this data .* remove"):
        decode_images(paths, SPEC)
    (on_disk / "file").write_text("x")
    with pytest.raises(DfkdError, match="--cache-dir .*file: cannot be used"):
        decode_images(paths, SPEC, cache_dir=on_disk / "file")


@pytest.mark.slow
def test_distill_from_the_cache_trains_the_same_student_as_from_memory(tmp_path, digits_folders, digits_teacher,
                                                                        monkeypatch):
    teacher = load_card(digits_teacher)
    c = resolve_config(default_config(), sets=["method=robust"])
    c.update(dict(epochs=2, batch_size=64, lr=0.05, augment="crop", pad=2, amp=False))
    data = [str(digits_folders[1])]
    ram = distill(teacher, "resnet8", data, tmp_path / "ram", c, workers=0, device="cpu")
    monkeypatch.setenv("DFKD_IN_MEMORY_BYTES", "0")
    disk = distill(teacher, "resnet8", data, tmp_path / "disk", c, workers=0, device="cpu",
                   cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*/images.u8"))) == 1
    assert disk.steps == ram.steps and disk.images == ram.images
    a = torch.load(tmp_path / "ram" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "disk" / "student.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    counts = [json.loads((tmp_path / d / "class_counts.json").read_text())["class_counts"] for d in ("ram", "disk")]
    assert counts[0] == counts[1]
    shutil.rmtree(tmp_path / "cache")


def test_a_damaged_entry_is_refused_never_trained_on(tmp_path, pattern_folder, on_disk, random_teacher):
    """Bytes flipped inside images.u8 (same size, meta.json intact): the row's digest no longer
    matches, and distill ends with one line naming the folder to remove (issue 25, case 4)."""
    from typer.testing import CliRunner

    from dfkd.cli import app

    def run(out):
        return CliRunner().invoke(app, ["distill", "--teacher", str(random_teacher), "--student", "resnet8", "--data",
                                        str(pattern_folder), "--method", "kd", "--steps", "2", "--batch-size", "4",
                                        "--device", "cpu", "--out", str(tmp_path / out)])

    assert run("first").exit_code == 0
    (entry,) = [p for p in on_disk.iterdir() if p.is_dir()]
    row_bytes = SPEC.channels * SPEC.size[0] * SPEC.size[1]
    with open(entry / "images.u8", "r+b") as f:
        f.seek(5 * row_bytes + 7)
        byte = f.read(1)
        f.seek(5 * row_bytes + 7)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = run("second")
    assert result.exit_code == 2, result.output
    assert "images.u8: row 5 is damaged" in result.output and str(entry) in result.output
    assert not (tmp_path / "second" / "student.yaml").exists()
    data = decode_images(image_paths(pattern_folder), SPEC)  # another order of the rows: its own entry, sound
    assert data.read(torch.arange(len(data))).shape[0] == len(data)
