from pathlib import Path

import numpy as np
import pytest

from dfkd.errors import DfkdError
from dfkd.index import read_index, write_index


def test_round_trip_keeps_order_columns_and_resolves_relative_paths(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    idx = tmp_path / "sub" / "list.tsv"
    idx.write_text("path\tlabel\tscore\tsource\tnote\nb.png\t2\t0.5\tpool\tx\n/abs/a.png\t-1\t0.25\tpositive\ty\n")
    index = read_index(idx)
    assert index.paths == [str(tmp_path / "sub" / "b.png"), "/abs/a.png"]
    assert index.labels() == [2, -1]
    out = write_index(tmp_path / "copy.tsv", index.rows, index.columns)
    again = read_index(out)
    assert again.columns == ["path", "label", "score", "source", "note"]
    assert again.rows == index.rows


def test_written_floats_and_missing_cells(tmp_path: Path):
    out = write_index(tmp_path / "o.tsv", [{"path": "/x.png", "score": 0.1234567891, "label": 3}],
                      ["label", "path", "score", "extra"])
    assert out.read_text().splitlines() == ["path\tlabel\tscore\textra", "/x.png\t3\t0.123457\t"]


@pytest.mark.parametrize("text, message", [
    ("", "empty index"),
    ("file\tlabel\na.png\t1\n", "no 'path' column"),
    ("path\tlabel\na.png\t1\t9\n", "line 2 has 3 fields"),
    ("path\tlabel\na.png\tcat\n", "not an integer"),
    ("path\n\tx\n", "has 2 fields"),
])
def test_malformed_index_is_a_clear_error(tmp_path: Path, text: str, message: str):
    idx = tmp_path / "bad.tsv"
    idx.write_text(text)
    with pytest.raises(DfkdError, match=message):
        read_index(idx)


def test_missing_index_and_tab_in_path(tmp_path: Path):
    with pytest.raises(DfkdError, match="not found"):
        read_index(tmp_path / "nope.tsv")
    with pytest.raises(DfkdError, match="tab or newline"):
        write_index(tmp_path / "o.tsv", [{"path": "/a\tb.png"}], ["path"])
    assert not (tmp_path / "o.tsv").exists()  # atomic: nothing half-written


def test_path_array_round_trips_selects_and_costs_the_text_plus_16_bytes(tmp_path):
    import pickle

    from dfkd.index import PathArray

    paths = [f"/pool/{i % 7}/image \udcff {i}.png" for i in range(1000)] + ["", "/ü.jpg"]
    a = PathArray.build(paths)
    assert list(a) == paths and len(a) == len(paths) and a[1001] == "/ü.jpg" and a[1000] == ""
    assert list(a[10:20]) == paths[10:20] and list(a.take([5, 5, 0])) == [paths[5], paths[5], paths[0]]
    assert list(a + a[:2]) == paths + paths[:2] and list(pickle.loads(pickle.dumps(a))) == paths
    assert a == paths and a != paths[:-1] and PathArray.of(a) is a and len(PathArray.build([])) == 0
    text = sum(len(p.encode("utf-8", "surrogateescape")) for p in paths)
    assert len(a.blob) + a.starts.nbytes + a.ends.nbytes == text + 16 * len(paths)
    assert a.take(np.arange(0, 1000, 2)).blob is a.blob  # selecting copies no text


def test_rows_stream_an_index_into_paths_and_labels(tmp_path):
    from dfkd.images import labeled_paths, pool_paths

    (tmp_path / "a.png").write_bytes(b"x")
    index = tmp_path / "i.tsv"
    index.write_text("path\tlabel\tscore\na.png\t3\t0.5\nb.png\t\t0.1\n")
    rows = pool_paths(index, "--data")
    assert list(rows.paths) == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert rows.labels.tolist() == [3, -1] and rows.labels.dtype == np.int64
    both = rows + pool_paths(tmp_path / "i.tsv", "--data")
    assert len(both) == 4 and both.labels.tolist() == [3, -1, 3, -1]
    (tmp_path / "bad.tsv").write_text("path\tlabel\na.png\tcat\n")
    with pytest.raises(DfkdError, match="row 2: label 'cat'"):
        pool_paths(tmp_path / "bad.tsv", "--data")
    (tmp_path / "nolabel.tsv").write_text("path\na.png\n")
    with pytest.raises(DfkdError, match="no 'label' column"):
        labeled_paths(tmp_path / "nolabel.tsv")
