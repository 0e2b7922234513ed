"""Reliability, round three (issue 25): no input destroyed by its own run's outputs, no stale result
after a killed --overwrite, untrusted sizes bounded, every dropped file recorded, one line for a
full disk or a file torch cannot load. Each case as a user meets it."""
import errno
import io
import json
import os
import shutil
import sys
import tarfile
import threading
import time
import warnings

import pytest
import torch
from typer.testing import CliRunner

from dfkd import shards
from dfkd.cards import load_card, load_model
from dfkd.cli import app
from dfkd.errors import DfkdError
from dfkd.evaluate import evaluate
from dfkd.index import read_index, write_index
from dfkd.pool import list_pool


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(res, fragment: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and fragment in lines[0], res.stderr
    assert "Traceback" not in res.output


def pool_index(folder, dest):
    rows = sorted(str(p) for p in folder.rglob("*.png"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("path\n" + "\n".join(rows) + "\n")
    return dest


# 1, 2: no output of a command may be one of its input files


def test_select_refuses_to_write_over_its_pool_index(tmp_path, pattern_folder, random_teacher):
    out = tmp_path / "P"
    pool = pool_index(pattern_folder, out / "selected.tsv")
    before = pool.read_bytes()
    res = run("select", "--teacher", random_teacher, "--pool", pool, "--out", out, "--num-images", "5")
    one_line(res, "holds --pool")
    assert pool.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["selected.tsv"]


@pytest.mark.parametrize("command", ["select", "eval"])
def test_a_model_card_inside_out_is_refused(tmp_path, pattern_folder, random_teacher, command):
    out = tmp_path / "out"
    shutil.copytree(random_teacher.parent, out)
    card = out / random_teacher.name
    flags = ["--teacher", card, "--pool"] if command == "select" else ["--model", card, "--data"]
    res = run(command, *flags, pattern_folder, "--out", out, "--overwrite")
    assert res.exit_code == 2 and ("holds --teacher" if command == "select" else "holds --model") in res.stderr
    load_model(load_card(card))


@pytest.mark.parametrize("which", ["card", "weights"])
def test_export_refuses_to_write_over_the_model(random_teacher, which):
    card = load_card(random_teacher)
    target = card.path if which == "card" else card.weights
    before = target.read_bytes()
    one_line(run("export", "--model", random_teacher, "--out", target), "the model's own file")
    assert target.read_bytes() == before
    load_model(load_card(random_teacher))


# 3: --overwrite starts afresh a run of the same command only


def test_eval_overwrite_does_not_clear_a_training_run(tmp_path, pattern_folder, random_teacher):
    out = tmp_path / "runs" / "teacher"
    (out / "checkpoints").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"command": "train", "inputs": {"arch": "resnet8"}}))
    (out / "checkpoints" / "last.pt").write_bytes(b"a week of training")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    res = run("eval", "--model", random_teacher, "--data", pattern_folder, "--out", out, "--overwrite")
    one_line(res, "holds a run of dfkd train, which --overwrite does not clear")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


# 5: a killed --overwrite run leaves no old output beside the new identity


def test_a_killed_overwrite_leaves_no_old_student(tmp_path, pattern_folder, random_teacher, monkeypatch):
    out = tmp_path / "distill"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"command": "distill", "inputs": {"old": True}}))
    old = [out / "student.yaml", out / "student.pt", out / "manifest.json", out / "class_counts.json"]
    for f in old:
        f.write_text("from the old run")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("dfkd.distill.run.decode_images", killed)  # killed before the run writes any file
    res = run("distill", "--teacher", random_teacher, "--student", "resnet8", "--data", pattern_folder,
              "--out", out, "--method", "kd", "--steps", "1", "--workers", "0", "--overwrite")
    assert res.exit_code == 130, res.output
    assert not any(f.exists() for f in old), sorted(p.name for p in out.iterdir())
    assert json.loads((out / "run.json").read_text())["inputs"].get("old") is None  # the new run's identity


# 6: every file left out is recorded; --val-split NaN refused; tar links recorded


def test_eval_records_files_whose_names_an_index_cannot_hold(tmp_path, pattern_folder, random_teacher):
    data = tmp_path / "data"
    shutil.copytree(pattern_folder, data)
    shutil.copy(data / "blob" / "000.png", data / "blob" / "a\tb.png")
    shutil.copy(data / "blob" / "000.png", os.fsdecode(os.fsencode(data / "blob") + b"/\xff.png"))
    result = evaluate(load_card(random_teacher), data, workers=0, device="cpu")
    assert result.num_images == 18
    assert sorted(s["path"].rsplit("/", 1)[1] for s in result.skipped) == ["\\xff.png", "a\\tb.png"]


def tar_with(path, members):
    """A tar of ``members`` (name, bytes or a link target given as ("link", target, type))."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = data[2], data[1]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_links_and_unindexable_names_in_a_tar_are_recorded(tmp_path, pattern_folder):
    png = (pattern_folder / "blob" / "000.png").read_bytes()
    tar = tar_with(tmp_path / "s.tar", [("a.png", png), ("hard.png", ("link", "a.png", tarfile.LNKTYPE)),
                                        ("soft.png", ("link", "a.png", tarfile.SYMTYPE)),
                                        ("tab\there.png", png), ("new\nline.png", png)])
    listing = list_pool(tar, tmp_path / "listing.tsv")
    assert [r["path"] for r in listing.rows()] == [f"{tar}#a.png"]
    noted = {p["path"].split("#")[1]: p["reason"] for p in listing.problems}
    assert sorted(noted) == ["hard.png", "new\\nline.png", "soft.png", "tab\\there.png"]
    assert "link" in noted["hard.png"] and "tab or newline" in noted["tab\\there.png"]


# 7, 8: untrusted sizes are bounded before anything is iterated or allocated


def test_a_negative_member_size_ends_the_scan(tmp_path, pattern_folder):
    png = (pattern_folder / "blob" / "000.png").read_bytes()
    tar = tmp_path / "neg.tar"
    tar_with(tar, [("a.png", png), ("b.png", png)])
    data = bytearray(tar.read_bytes())
    second = 512 + -(-len(png) // 512) * 512
    header = data[second:second + 512]
    header[124:136] = b"-0000001000\0"  # -512: the next header would be this one again
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    data[second:second + 512] = header
    tar.write_bytes(bytes(data))
    notes = []
    found = []
    worker = threading.Thread(target=lambda: found.extend(shards.members(str(tar), lambda p, r: notes.append(r))),
                              daemon=True)
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "the scan loops on a header with a negative size"
    assert found == [f"{tar}#a.png"] and "bad header at byte" in notes[0]


@pytest.mark.parametrize("pattern", ["x/{0..1000000}.tar", "{0..999}/{0..999}{a,b}.tar", "x/{0..999999999}.tar",
                                     "{0..99999}/{0..99999}/{0..99999}.tar"])
def test_a_brace_pattern_naming_too_many_shards_is_refused_before_it_is_expanded(pattern):
    start = time.perf_counter()
    with pytest.raises(DfkdError, match="more than dfkd takes from one pattern"):
        shards.expand_braces(pattern)
    assert time.perf_counter() - start < 0.5


def test_select_refuses_a_huge_brace_pattern_in_one_line(tmp_path, random_teacher):
    res = run("select", "--teacher", random_teacher, "--pool", tmp_path / "x" / "{0..999999999}.tar",
              "--out", tmp_path / "out")
    one_line(res, "names 1000000000 shards")


# 10: a NUL byte in a row is written escaped; torch's warnings do not precede the one line


def test_a_nul_byte_in_a_row_is_written_escaped(tmp_path):
    path = write_index(tmp_path / "skipped.tsv", [{"path": "/pool/a\0b.png", "reason": "cannot decode"}],
                       ["path", "reason"])
    assert b"\0" not in path.read_bytes()
    assert read_index(path).paths == ["/pool/a\\0b.png"]


@pytest.fixture
def model_files(tmp_path, random_teacher):
    model = load_model(load_card(random_teacher))
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.jit.trace(model, torch.zeros(1, 1, 16, 16)).save(str(tmp_path / "bare.ts"))
    card = random_teacher.read_text().replace("weights: teacher.pt", f"weights: {tmp_path / 'bare.ts'}")
    (tmp_path / "ts_weights.yaml").write_text(card)
    return tmp_path


@pytest.fixture
def warnings_shown(monkeypatch):
    """Warnings printed on stderr, as outside pytest (which records them, and ignores torch.jit's)."""
    warnings.simplefilter("default")  # pytest restores its filters after the test

    def show(msg):
        sys.stderr.write(warnings.formatwarning(msg.message, msg.category, msg.filename, msg.lineno, msg.line))

    monkeypatch.setattr(warnings, "_showwarnmsg_impl", show)


@pytest.mark.parametrize("model,fragment", [
    ("weights.pt", "is a state_dict, not a model card: write a card that names it"),
    ("bare.ts", "does not say its input"),
    ("ts_weights.yaml", "bare.ts"),
])
def test_a_file_torch_cannot_load_gives_one_line_alone(model_files, pattern_folder, warnings_shown, model, fragment):
    res = run("eval", "--model", model_files / model, "--data", pattern_folder)
    one_line(res, fragment)


# 9: a full disk ends a command with one line, and leaves no half-written file


@pytest.fixture
def full_disk(monkeypatch):
    """Writes of files named in the returned set fail as on a full disk (/dev/full)."""
    names: set[str] = set()
    fdopen = os.fdopen

    def full(fd, mode="r", *args, **kwargs):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if any(os.path.basename(target).startswith(f".{n}.") for n in names):
            os.close(fd)
            return open("/dev/full", mode, *args, **kwargs)
        return fdopen(fd, mode, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", full)
    return names


def test_a_full_disk_under_export_is_one_line(tmp_path, random_teacher, full_disk):
    full_disk.add("model.ts")
    one_line(run("export", "--model", random_teacher, "--out", tmp_path / "model.ts"), "No space left on device")
    assert os.listdir(tmp_path) == ["teacher"]


def test_a_full_disk_under_select_is_one_line(tmp_path, pattern_folder, random_teacher, full_disk):
    full_disk.add("scores.tsv")
    out = tmp_path / "out"
    res = run("select", "--teacher", random_teacher, "--pool", pattern_folder, "--out", out, "--num-images", "3",
              "--workers", "0")
    assert res.exit_code == 2 and "scores.tsv: cannot write it (No space left on device)" in res.stderr.splitlines()[-1]
    assert not [p for p in out.iterdir() if p.name.endswith((".tmp", ".tsv"))]


def test_a_full_disk_outside_an_atomic_write_is_one_line(tmp_path, pattern_folder, random_teacher, monkeypatch):
    def append(*args, **kwargs):
        raise RuntimeError("writer failed") from OSError(errno.ENOSPC, "No space left on device", "rows.tsv")

    monkeypatch.setattr("dfkd.select.run.score_pool", append)
    res = run("select", "--teacher", random_teacher, "--pool", pattern_folder, "--out", tmp_path / "out")
    one_line(res, "rows.tsv: cannot write it (No space left on device)")


@pytest.mark.parametrize("setting,fragment", [("momentum=-1", "momentum -1"), ("momentum=.nan", "momentum nan"),
                                              ("weight_decay=-0.1", "weight_decay -0.1")])
def test_loop_settings_out_of_range_are_one_line(tmp_path, pattern_folder, setting, fragment):
    res = run("train", "--arch", "resnet8", "--data", pattern_folder, "--out", tmp_path / "o", "--set", setting)
    one_line(res, fragment)
    assert not (tmp_path / "o").exists()


def test_val_split_nan_is_refused(tmp_path, pattern_folder):
    res = run("train", "--arch", "resnet8", "--data", pattern_folder, "--out", tmp_path / "o", "--val-split", "nan")
    one_line(res, "--val-split nan")


def test_a_damaged_run_json_is_named_as_such(tmp_path, pattern_folder, random_teacher):
    """A cut-off run.json was reported as 'a run of another command' (issue 22)."""
    from dfkd.select.run import select_pool

    out = tmp_path / "sel"
    select_pool(load_card(random_teacher), pattern_folder, out, num_images=4, batch_size=8, workers=0, device="cpu")
    (out / "run.json").write_text((out / "run.json").read_text()[:20])
    with pytest.raises(DfkdError, match=r"run.json: damaged .* --overwrite starts this run afresh"):
        select_pool(load_card(random_teacher), pattern_folder, out, num_images=4, batch_size=8, workers=0, device="cpu")
    res = select_pool(load_card(random_teacher), pattern_folder, out, num_images=4, batch_size=8, workers=0, device="cpu",
                      overwrite=True)
    assert res.selected == 4 and json.loads((out / "run.json").read_text())["command"] == "select"
