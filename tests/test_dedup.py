"""dfkd.select.dedup: exact and greedy near-duplicate removal in a given order, and k-means."""
import importlib.util
import math
import sys

import numpy as np
import pytest

from dfkd.errors import DfkdError
from dfkd.select import dedup
from dfkd.select.dedup import exact_duplicates, kmeans, near_duplicates, require_faiss

faiss = pytest.importorskip("faiss")


def at_angles(*degrees: float) -> np.ndarray:
    """Unit vectors in the plane at these angles: cosine of two rows = cos(angle between them)."""
    r = np.radians(degrees)
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


def greedy_by_hand(x: np.ndarray, order: np.ndarray, threshold: float) -> tuple[np.ndarray, float]:
    """The rule written out with numpy; and the narrowest call it made: a row's best similarity
    to the threshold, or (when dropped) its best to its second best."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    dup_of, kept, margin = np.full(len(x), -1), [], np.inf
    for i in order:
        if kept:
            sims = np.sort(u[kept] @ u[i])[::-1]
            margin = min(margin, abs(sims[0] - threshold))
            if sims[0] >= threshold and len(sims) > 1 and sims[1] >= threshold:
                margin = min(margin, sims[0] - sims[1])
            sims = u[kept] @ u[i]
            if sims.max() >= threshold:
                dup_of[i] = kept[int(np.argmax(sims))]
                continue
        kept.append(i)
    return dup_of, margin


@pytest.fixture(params=[1, 7, 2048], ids=["batch1", "batch7", "batch2048"])
def batch(request, monkeypatch):
    """Run near_duplicates with rows compared across batches (faiss) and within one (numpy).
    One faiss thread: hundreds of tiny searches on a busy machine would spend seconds waiting
    for OpenMP threads."""
    monkeypatch.setattr(dedup, "BATCH", request.param)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield request.param
    faiss.omp_set_num_threads(threads)


def test_exact_duplicates_keep_the_first_row_in_order():
    digests = [b"a", b"b", b"a", b"c", b"b", b"a"]
    assert exact_duplicates(digests, np.arange(6)).tolist() == [-1, -1, 0, -1, 1, 0]
    # visited best first: the first of each digest in ``order`` is kept, whatever its row number
    got = exact_duplicates(digests, np.array([5, 4, 3, 2, 1, 0]))
    assert got.dtype == np.int64 and got.tolist() == [5, 4, 5, -1, -1, -1]
    assert exact_duplicates([], np.zeros(0, dtype=int)).tolist() == []
    with pytest.raises(ValueError, match="permutation"):
        exact_duplicates(digests, np.array([0, 1, 2, 3, 4, 4]))


def test_near_duplicates_compare_with_kept_rows_only(batch):
    # A~B (20°) and B~C (20°) but not A~C (40°), at a threshold of cos 25°
    x, t = at_angles(0, 20, 40), math.cos(math.radians(25))
    assert near_duplicates(x, np.array([0, 1, 2]), t).tolist() == [-1, 0, -1]  # B dropped, so C stays
    assert near_duplicates(x, np.array([1, 0, 2]), t).tolist() == [1, -1, 1]  # B first takes both
    assert near_duplicates(x, np.array([2, 1, 0]), t).tolist() == [-1, 2, -1]


def test_a_dropped_row_is_charged_to_the_most_similar_kept_row(batch):
    x, t = at_angles(0, 30, 22), math.cos(math.radians(25))  # 22° is within 25° of both kept rows
    assert near_duplicates(x, np.array([0, 1, 2]), t).tolist() == [-1, -1, 1]
    # length does not count, only direction
    assert near_duplicates(x * np.array([[5.0], [0.1], [300.0]], dtype=np.float32), np.array([0, 1, 2]),
                           t).tolist() == [-1, -1, 1]


def test_threshold_is_inclusive(batch):
    x = np.array([[1, 0], [3, 4]], dtype=np.float32)  # cosine exactly 0.6 in float32
    at = float(np.float32(0.6))
    assert near_duplicates(x, np.array([0, 1]), at).tolist() == [-1, 0]
    assert near_duplicates(x, np.array([0, 1]), float(np.nextafter(np.float32(at), np.float32(1)))).tolist() == [-1, -1]


def test_all_distinct_rows_are_kept(batch):
    x = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert (u @ u.T - 2 * np.eye(300)).max() < 0.8  # precondition: no pair is near
    assert (near_duplicates(x, np.random.default_rng(1).permutation(300), 0.8) == -1).all()


def test_near_duplicates_match_the_rule_written_out(batch):
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((40, 16))
    x = (centres[rng.integers(0, 40, 400)] + 0.25 * rng.standard_normal((400, 16))).astype(np.float32)
    x[::50] = 0.5 * x[1::50]  # some exact copies, at another length
    order = rng.permutation(400)
    expected, margin = greedy_by_hand(x, order, 0.97)
    assert margin > 1e-5  # precondition: no similarity so close to the threshold that rounding decides
    got = near_duplicates(x, order, 0.97)
    assert np.array_equal(got, expected)
    assert 50 < (got >= 0).sum() < 350 and (got[got >= 0] != np.flatnonzero(got >= 0)).all()
    assert (got[got[got >= 0]] == -1).all()  # charged to kept rows only


def test_near_duplicates_check_their_input():
    assert near_duplicates(np.zeros((0, 8), dtype=np.float32), np.zeros(0, dtype=int), 0.9).tolist() == []
    x = at_angles(0, 1)
    with pytest.raises(ValueError, match="permutation"):
        near_duplicates(x, np.array([0, 0]), 0.9)
    x[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        near_duplicates(x, np.array([0, 1]), 0.9)
    # an all-zero row has no direction: similar to nothing, so kept
    assert near_duplicates(np.zeros((2, 3), dtype=np.float32), np.array([0, 1]), 0.5).tolist() == [-1, -1]


def test_cuda_uses_a_faiss_gpu_index_when_faiss_has_gpus(monkeypatch):
    moved = []
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "resources", raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, gpu, index: moved.append((res, gpu)) or index,
                        raising=False)
    x, order, t = at_angles(0, 20, 40), np.array([0, 1, 2]), math.cos(math.radians(25))
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert near_duplicates(x, order, t, device="cuda").tolist() == [-1, 0, -1] and moved == []  # CPU fallback
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2)
    assert near_duplicates(x, order, t, device="cuda:1").tolist() == [-1, 0, -1] and moved == [("resources", 1)]
    assert near_duplicates(x, order, t, device="cpu").tolist() == [-1, 0, -1] and len(moved) == 1


def blobs(rng: np.random.Generator, per: int = 60, k: int = 4, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``k`` tight groups of directions (orthogonal centres), rows at random lengths, shuffled."""
    truth = np.repeat(np.arange(k), per)
    x = np.eye(dim)[truth] + 0.05 * rng.standard_normal((k * per, dim))
    x *= rng.uniform(0.1, 10.0, (k * per, 1))
    perm = rng.permutation(k * per)
    return x[perm].astype(np.float32), truth[perm]


def test_kmeans_recovers_separated_groups_and_is_deterministic():
    x, truth = blobs(np.random.default_rng(0))
    got = kmeans(x, 4, seed=0)
    assert got.dtype == np.int64 and got.shape == truth.shape
    # the same partition up to renaming: each true group is one cluster, each cluster one group
    pairs = set(zip(truth.tolist(), got.tolist()))
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == 4 and len({b for _, b in pairs}) == 4
    y = np.random.default_rng(1).standard_normal((500, 8)).astype(np.float32)
    assert np.array_equal(kmeans(y, 7, seed=3, niter=10), kmeans(y, 7, seed=3, niter=10))
    assert set(kmeans(y, 7, seed=3).tolist()) <= set(range(7))


def test_kmeans_clips_k():
    x, _ = blobs(np.random.default_rng(0), per=1)
    assert sorted(kmeans(x, 10).tolist()) == [0, 1, 2, 3]  # k clipped to the 4 rows: one each
    assert kmeans(x, 1).tolist() == [0, 0, 0, 0]
    assert kmeans(np.zeros((0, 3), dtype=np.float32), 5).tolist() == []
    with pytest.raises(ValueError, match="k must be"):
        kmeans(x, 0)


def test_missing_faiss_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    for call in (require_faiss, lambda: near_duplicates(at_angles(0, 1), np.array([0, 1]), 0.9),
                 lambda: kmeans(at_angles(0, 1), 2)):
        with pytest.raises(DfkdError) as e:
            call()
        assert "pip install faiss-cpu" in str(e.value) and "faiss-gpu" in str(e.value) and "\n" not in str(e.value)
    # the module itself imports without faiss, and exact duplicates do not need it
    spec = importlib.util.spec_from_file_location("dfkd.select._dedup_without_faiss", dedup.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.exact_duplicates([b"x", b"x"], np.array([1, 0])).tolist() == [1, -1]


def test_rows_kept_first_stay_and_rows_copying_them_go_whatever_their_scores(tmp_path):
    """expand's positives: rows 0-1 must stay, and a better-scored row that copies one is dropped."""
    from pathlib import Path

    from dfkd.index import read_index
    from dfkd.select.candidates import Look, drop_duplicates

    thumbs = np.concatenate([at_angles(0, 90, 0.5, 45, 90.5), np.zeros((5, 62), np.float32)], axis=1)
    look = Look([b"p0", b"p1", b"a", b"b", b"c"], thumbs, None, ["", "", "", "", ""])
    paths = ["pos0", "pos1", "near-pos0", "other", "near-pos1"]
    scores = np.array([5.0, 5.0, -1.0, 0.0, -2.0])  # the pool rows rank above the positives
    keep, dropped, path = drop_duplicates(paths, scores, look, "near", 0.999, tmp_path, keep_first=2)
    assert keep.tolist() == [True, True, False, True, False] and dropped == 2
    rows = {Path(r["path"]).name: Path(r["duplicate_of"]).name for r in read_index(path).rows}
    assert rows == {"near-pos0": "pos0", "near-pos1": "pos1"}
    keep, _, _ = drop_duplicates(paths, scores, look, "near", 0.999, tmp_path, keep_first=0)
    assert keep.tolist() == [False, False, True, True, True]  # without it, the copies would win


def test_near_duplicates_are_searched_where_the_rows_were_read(tmp_path, monkeypatch):
    """A Look read on CUDA sends the near-duplicate search there (faiss's GPU index)."""
    from dfkd.select import candidates
    from dfkd.select.candidates import Look, drop_duplicates

    seen = []

    def spy(x, order, threshold, *, device="cpu"):
        seen.append(device)
        return np.full(len(x), -1, dtype=np.int64)

    monkeypatch.setattr(candidates, "near_duplicates", spy)
    thumbs = np.concatenate([at_angles(0, 90), np.zeros((2, 62), np.float32)], axis=1)
    for device in ("cpu", "cuda:1"):
        drop_duplicates(["a", "b"], np.zeros(2), Look([b"a", b"b"], thumbs, None, ["", ""], device), "near", 0.99,
                        tmp_path)
    assert seen == ["cpu", "cuda:1"]
