"""WebDataset tar shards as pools and training data; files reached twice counted once."""
import io
import os
import tarfile

import pytest
from typer.testing import CliRunner

from dfkd.cards import load_card
from dfkd.cli import app
from dfkd.distill.run import default_config, distill
from dfkd.config import resolve_config
from dfkd.errors import DfkdError
from dfkd.evaluate import evaluate
from dfkd.index import read_index, write_index
from dfkd.images import load_image, open_pool
from dfkd.pool import walk_files
from dfkd.select import select_pool
from dfkd.shards import expand_braces


def write_shards(folder, out, n_shards=4):
    """The images of an ImageFolder as webdataset shards: KEY.png, KEY.cls and KEY.json per sample."""
    files = sorted(p for p in folder.rglob("*.png"))
    out.mkdir(parents=True)
    per = -(-len(files) // n_shards)
    for s in range(n_shards):
        with tarfile.open(out / f"{s:03d}.tar", "w") as tar:
            for p in files[s * per:(s + 1) * per]:
                key = f"{p.parent.name}_{p.stem}"
                tar.add(p, arcname=f"{key}.png")
                for suffix, data in ((".cls", p.parent.name.encode()), (".json", b"{}")):
                    info = tarfile.TarInfo(key + suffix)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return files


def test_brace_patterns_expand_as_webdataset_writes_them():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    with pytest.raises(DfkdError, match="empty"):
        expand_braces("{3..1}.tar")


@pytest.mark.slow
def test_select_from_shards_picks_the_images_the_extracted_folder_gives(tmp_path, digits_folders, digits_teacher):
    folder = digits_folders[1]
    files = write_shards(folder, tmp_path / "shards")
    teacher = load_card(digits_teacher)
    pattern = str(tmp_path / "shards" / "{000..003}.tar")
    index = open_pool(pattern)
    assert len(index) == len(files) and all(".tar#" in p and p.endswith(".png") for p in index.paths)
    a = select_pool(teacher, pattern, tmp_path / "from-shards", num_images=100, workers=0, device="cpu")
    b = select_pool(teacher, folder, tmp_path / "from-folder", num_images=100, workers=0, device="cpu")
    assert a.scored == b.scored == len(files) and a.skipped == b.skipped == 0

    def picked(run):
        rows = read_index(run / "selected.tsv").rows
        return {(os.path.basename(r["path"]).split("#")[-1].split("_")[-1], r["score"]) for r in rows}

    assert picked(a.out) == picked(b.out) and len(picked(a.out)) == 100
    # the selected rows distill directly, and a labeled index of members evaluates
    c = resolve_config(default_config(), sets=["method=kd"])
    c.update(dict(steps=2, batch_size=32, amp=False))
    d = distill(teacher, "resnet8", [a.out / "selected.tsv"], tmp_path / "student", c, workers=0, device="cpu")
    assert d.images == 100 and d.skipped == 0
    labeled = [{"path": p, "label": os.path.basename(p).split("#")[1].split("_")[0]} for p in index.paths]
    write_index(tmp_path / "labeled.tsv", labeled, ["path", "label"])
    assert evaluate(teacher, tmp_path / "labeled.tsv", workers=0, device="cpu").top1 == \
        evaluate(teacher, folder, workers=0, device="cpu").top1


def test_a_folder_of_shards_a_broken_shard_and_a_missing_one(tmp_path, pattern_folder, random_teacher):
    write_shards(pattern_folder, tmp_path / "pool" / "tars", n_shards=2)
    (tmp_path / "pool" / "tars" / "002.tar").write_bytes(b"this is not a tar file" * 40)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["select", "--teacher", str(random_teacher), "--pool", str(tmp_path / "pool"),
                                      "--out", str(run), "--num-images", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(read_index(run / "scores.tsv")) == 18  # 18 images; the .cls/.json sidecars are not rows
    (skip,) = read_index(run / "skipped.tsv").rows
    assert skip["path"].endswith("002.tar") and "tar shard not readable" in skip["reason"]
    result = CliRunner().invoke(app, ["select", "--teacher", str(random_teacher), "--out", str(tmp_path / "r2"),
                                      "--pool", str(tmp_path / "pool" / "tars" / "{000..005}.tar"),
                                      "--num-images", "5", "--device", "cpu"])
    assert result.exit_code == 2 and "shard" in result.output and "003.tar not found" in result.output
    with pytest.raises(Exception) as bad:
        load_image(str(tmp_path / "pool" / "tars" / "000.tar#nothing.png"), 1)
    assert "is not in" in str(bad.value) or "not found" in str(bad.value)


def test_a_file_reached_twice_is_listed_once(tmp_path, pattern_folder):
    first = sorted(pattern_folder.rglob("*.png"))[0]
    os.symlink(first, pattern_folder / "bars_h" / "zz_link.png")  # a symlink to a file of the pool
    os.link(first, pattern_folder / "blob" / "hard.png")  # a second name of the same file
    outside = tmp_path / "outside.png"
    outside.write_bytes(first.read_bytes())
    os.symlink(outside, pattern_folder / "blob" / "out1.png")  # two links to one file outside the pool
    os.symlink(outside, pattern_folder / "blob" / "out2.png")
    problems = []
    files = list(walk_files(pattern_folder, problems))
    assert len(files) == 18 + 1  # the 18 images once each, the outside file once
    assert len({os.stat(f).st_ino for f in files}) == len(files)
    assert sorted(os.path.basename(p["path"]) for p in problems) == ["hard.png", "out2.png", "zz_link.png"]
    assert all("counted once" in p["reason"] for p in problems)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_header_scanner_reads_what_tarfile_writes(tmp_path, fmt):
    from dfkd import shards

    names = ["a.png", "dir/" + "x" * 120 + ".jpg", "d" * 90 + "/" + "e" * 60 + ".png", "ünï.png", "empty.png"]
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            if fmt == tarfile.USTAR_FORMAT and len(name.split("/")[-1]) > 100:
                continue
            data = bytes([i]) * (0 if name == "empty.png" else 700 * i + 3)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        want = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    got = {m.split("#", 1)[1]: shards.read_member(str(path), m.split("#", 1)[1])
           for m in shards.members(str(path), lambda p, r: None)}
    assert got == want and len(got) >= 4


def test_a_shard_cut_off_part_way_keeps_the_members_before_the_cut(tmp_path, pattern_folder):
    write_shards(pattern_folder, tmp_path / "s", n_shards=1)
    whole = (tmp_path / "s" / "000.tar").read_bytes()
    (tmp_path / "s" / "000.tar").write_bytes(whole[:len(whole) // 2 + 100])  # cut off inside a member
    index = open_pool(tmp_path / "s" / "000.tar")
    assert 0 < len(index) < 18
    (problem,) = index.problems
    assert problem["path"].endswith("000.tar") and "tar shard not readable past its first" in problem["reason"]
    assert all(load_image(p, 1).size == (16, 16) for p in index.paths)  # every member kept is whole
