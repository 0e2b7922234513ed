"""pipelines/prepare_data.py: run it on tiny sizes and check what it writes."""

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "pipelines" / "prepare_data.py"
FASHION = Path("/usr/share/datasets/fashion-mnist")
CLIPART = Path("/usr/share/openclipart/png")
FONTS = Path("/usr/share/fonts/truetype/dejavu")

CLASSES = ["0_tshirt", "1_trouser", "2_pullover", "3_dress", "4_coat",
           "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_boot"]
TINY = ["--train-per-class", "3", "--test-per-class", "2", "--positives-per-class", "1",
        "--pool-in", "10", "--pool-clipart", "5", "--pool-glyphs", "5", "--pool-digits", "5"]

pytestmark = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def pngs(folder):
    return sorted(Path(folder).glob("*.png"))


def check_image(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (28, 28)
        assert im.mode == "L"


def digest(root):
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and p.name != ".complete":
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def have_sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_tiny_layout_and_rerun(tmp_path):
    out = tmp_path / "data"
    r = run("--out", out, *TINY)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out.resolve())
    assert "Traceback" not in r.stderr

    assert (out / "classes.txt").read_text().split() == CLASSES
    assert (out / ".complete").is_file()
    for split, n in (("train", 3), ("test", 2), ("positives", 1)):
        assert sorted(p.name for p in (out / split).iterdir()) == CLASSES
        for c in CLASSES:
            files = pngs(out / split / c)
            assert len(files) == n, (split, c)
            for f in files:
                check_image(f)
    # positives are a labeled share of the train images
    for c in CLASSES:
        pos = {f.name for f in pngs(out / "positives" / c)}
        assert pos <= {f.name for f in pngs(out / "train" / c)}

    expected = {"fashion": 10,
                "clipart": 5 if CLIPART.is_dir() else 0,
                "glyphs": 5 if FONTS.is_dir() else 0,
                "digits": 5 if have_sklearn() else 0}
    lines = (out / "wild_truth.tsv").read_text().splitlines()
    assert lines[0] == "path\tsource\tlabel"
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(row) == 3 for row in rows)
    for source, n in expected.items():
        assert len(pngs(out / "wild" / source)) == n, source
        assert sum(row[1] == source for row in rows) == n, source
    assert len({row[0] for row in rows}) == len(rows) == sum(expected.values())

    train_names = {f.name for c in CLASSES for f in pngs(out / "train" / c)}
    for path, source, label in rows:
        assert path.startswith(f"wild/{source}/")
        check_image(out / path)
        if source == "fashion":
            assert 0 <= int(label) <= 9
            assert Path(path).name not in train_names  # held out from the teacher's data
        else:
            assert int(label) == -1

    # wild/fashion files are named by their Fashion-MNIST train index: check the
    # recorded labels against the label file itself (read the IDX header by hand)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz", "rb") as f:
        raw = f.read()
    assert raw[:4] == b"\x00\x00\x08\x01"
    for path, source, label in rows:
        if source == "fashion":
            idx = int(Path(path).stem.rsplit("-", 1)[1])
            assert raw[8 + idx] == int(label)
    # and the pixels are Fashion-MNIST's, unchanged
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz", "rb") as f:
        pixels = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    for f in pngs(out / "train" / "0_tshirt") + pngs(out / "wild" / "fashion"):
        idx = int(f.stem.rsplit("-", 1)[1])
        assert np.array_equal(np.asarray(Image.open(f)), pixels[idx])
    for c, name in enumerate(CLASSES):
        for f in pngs(out / "train" / name):
            assert raw[8 + int(f.stem.rsplit("-", 1)[1])] == c

    # same arguments again: a no-op
    before = digest(out)
    r2 = run("--out", out, *TINY)
    assert r2.returncode == 0, r2.stderr
    assert "already prepared" in r2.stderr
    assert digest(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftover temp folders


@pytest.mark.slow
def test_deterministic_for_a_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 0), (b, 0), (c, 1)):
        r = run("--out", out, "--seed", seed, *TINY)
        assert r.returncode == 0, r.stderr
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_missing_sources(tmp_path):
    r = run("--out", tmp_path / "x", *TINY, "--fashion-dir", tmp_path / "nowhere")
    assert r.returncode == 2
    assert "apt-get install -y dataset-fashion-mnist" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists()

    out = tmp_path / "y"
    r = run("--out", out, *TINY, "--clipart-dir", tmp_path / "nowhere", "--fonts-dir", tmp_path / "nowhere")
    assert r.returncode == 0, r.stderr
    assert "openclipart-png" in r.stderr and "fonts-dejavu-core" in r.stderr
    assert pngs(out / "wild" / "clipart") == [] and pngs(out / "wild" / "glyphs") == []
    assert len(pngs(out / "wild" / "fashion")) == 10


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("not a prepared data set")
    r = run("--out", tmp_path, *TINY)
    assert r.returncode == 2
    assert "not empty" in r.stderr
    assert (tmp_path / "mine.txt").is_file()


def test_copies_store_every_wild_image_three_more_times(tmp_path):
    out = tmp_path / "data"
    r = run("--out", out, *TINY, "--pool-clipart", "0", "--pool-glyphs", "0", "--pool-digits", "0", "--copies")
    assert r.returncode == 0, r.stderr
    originals = pngs(out / "wild" / "fashion")
    originals = [p for p in originals if p.suffixes == [".png"]]
    assert len(originals) == 10
    for p in originals:
        with Image.open(p.with_name(p.stem + ".up2.png")) as up, Image.open(p.with_name(p.stem + ".s34.png")) as small, \
                Image.open(p.with_name(p.stem + ".q75.jpg")) as jpeg:
            assert up.size == (56, 56) and small.size == (21, 21) and jpeg.format == "JPEG"
    truth = (out / "wild_truth.tsv").read_text().splitlines()[1:]
    assert len(truth) == 40 and len({ln.split("\t")[0] for ln in truth}) == 40
    assert sum(ln.startswith(f"wild/fashion/{originals[0].stem}.") for ln in truth) == 4
    assert "wild copies" in r.stderr
    again = run("--out", out, *TINY, "--pool-clipart", "0", "--pool-glyphs", "0", "--pool-digits", "0")
    assert again.returncode == 0 and "already prepared" not in again.stderr  # another set: rebuilt
    assert not list((out / "wild" / "fashion").glob("*.up2.png"))
