import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfkd.errors import DfkdError
from dfkd.images import BadImage, InputSpec, image_tensor, load_image, open_labeled, open_pool


def make_bad_pool(root: Path) -> dict[str, str | None]:
    """Every kind of file a wild pool holds; value = expected skip reason fragment (None = usable)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8), "RGB")
    rgb.save(root / "rgb.png")
    buf = io.BytesIO()
    rgb.save(buf, "PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 200, dtype=np.uint8)))
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("this is not an image\n")
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(root / "rgba.png")
    Image.new("CMYK", (16, 16), (0, 255, 0, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)).save(root / "gray16.png")
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 255, 255, 255] * 128)
    pal.info["transparency"] = 0
    pal.save(root / "palette.png")
    Image.new("1", (9000, 9000)).save(root / "bomb.png")  # 81 Mpx, a few kB on disk
    (root / "sub").mkdir()
    Image.new("L", (30, 10), 200).save(root / "sub" / "gray.bmp")
    return {"rgb.png": None, "truncated.png": "cannot decode", "corrupt.png": "not an image",
            "empty.jpg": "empty file", "notes.txt": "not an image", "rgba.png": None, "cmyk.jpg": None,
            "gray16.png": None, "palette.png": None, "bomb.png": "decompression bomb", "sub/gray.bmp": None}


@pytest.mark.parametrize("channels", [1, 3])
def test_every_kind_of_file_decodes_or_gives_a_reason(tmp_path: Path, channels: int):
    expected = make_bad_pool(tmp_path / "pool")
    for name, reason in expected.items():
        path = str(tmp_path / "pool" / name)
        if reason is None:
            img = load_image(path, channels)
            assert img.mode == ("L" if channels == 1 else "RGB"), name
        else:
            with pytest.raises(BadImage, match=reason):
                load_image(path, channels)


def test_modes_are_converted_faithfully(tmp_path: Path):
    make_bad_pool(tmp_path / "pool")
    assert np.asarray(load_image(str(tmp_path / "pool" / "gray16.png"), 1)).max() == round(40000 / 65535 * 255)
    red = np.asarray(load_image(str(tmp_path / "pool" / "rgba.png"), 3))[0, 0]
    assert tuple(red) == (128, 0, 0)  # half-transparent red over black
    assert tuple(np.asarray(load_image(str(tmp_path / "pool" / "cmyk.jpg"), 3))[0, 0])[0] > 200


@pytest.mark.parametrize("mode, corner", [("stretch", 200), ("crop", 200), ("pad", 0)])
def test_resize_modes(tmp_path: Path, mode: str, corner: int):
    Image.new("L", (40, 10), 200).save(tmp_path / "wide.png")
    spec = InputSpec(size=(8, 8), channels=1, mean=[0.0], std=[1.0], resize=mode)
    x = image_tensor(str(tmp_path / "wide.png"), spec)
    assert x.shape == (1, 8, 8) and int(x[0, 0, 0]) == corner


def test_pools_and_labeled_folders(tmp_path: Path, pattern_folder: Path):
    pool = open_pool(pattern_folder)
    assert len(pool) == 18 and pool.paths == sorted(pool.paths)
    index, names = open_labeled(pattern_folder)
    assert names == ["bars_h", "bars_v", "blob"] and sorted(set(index.labels())) == [0, 1, 2]
    index, names = open_labeled(pattern_folder, ["blob", "bars_v", "bars_h"])
    assert index.labels()[0] == 2  # folders map onto a card's class order
    with pytest.raises(DfkdError, match="not classes of the model"):
        open_labeled(pattern_folder, ["bars_h", "bars_v"])
    (tmp_path / "void").mkdir()
    with pytest.raises(DfkdError, match="the pool is empty"):
        open_pool(tmp_path / "void")
    with pytest.raises(DfkdError, match="no such directory"):
        open_pool(tmp_path / "missing")


def test_walk_records_unreadable_folders_and_names_an_index_cannot_hold(tmp_path, monkeypatch):
    import os

    from dfkd.pool import walk_files

    for d in ("a", "b", "c"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.png").write_bytes(b"")
    (tmp_path / "a" / "bad\nname.png").write_bytes(b"")
    real = os.scandir

    def scandir(path):  # root reads any folder, so unreadable is simulated
        if str(path).endswith("/b"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    problems = []
    files = list(walk_files(tmp_path, problems))
    assert files == [str(tmp_path / "a" / "x.png"), str(tmp_path / "c" / "x.png")]
    assert [(p["path"], p["reason"]) for p in problems] == [
        (str(tmp_path / "a" / "bad\\nname.png"), "file name holds a tab, newline or bytes that are not UTF-8: rename it"),
        (str(tmp_path / "b"), "folder not readable (Permission denied)")]
