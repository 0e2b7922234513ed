import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dfkd.cards import load_card
from dfkd.cli import app
from dfkd.errors import DfkdError
from dfkd.index import read_index
from dfkd.select import POLICIES, SCORERS, select_pool
from dfkd.select.scores import noise_value

from test_images import make_bad_pool


def test_noise_value_matches_hand_computation():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [10.0, -10.0, 0.0]])
    # V = -log(max softmax): row 0: -log(e^2 / (e^2 + e + 1)); row 1: log 3; row 2: -log(e^10/(e^10+e^-10+1))
    hand = [-math.log(math.exp(2) / (math.exp(2) + math.e + 1)), math.log(3),
            -math.log(math.exp(10) / (math.exp(10) + math.exp(-10) + 1))]
    assert noise_value(logits).tolist() == pytest.approx(hand, rel=1e-6)
    # the noise value ranks exactly as the max softmax does (descending confidence)
    conf = torch.softmax(logits, 1).max(1).values
    assert torch.equal(noise_value(logits).argsort(), (-conf).argsort())


def test_other_scorers_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert SCORERS.get("entropy")(logits).tolist() == pytest.approx(
        [math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))])
    assert SCORERS.get("energy")(logits).tolist() == pytest.approx([-math.log(2), -math.log(4)])


@pytest.mark.parametrize("key", SCORERS.keys())
def test_scorer_contract_one_finite_value_per_image_in_order(key: str):
    logits = torch.randn(7, 4, generator=torch.Generator().manual_seed(0)) * 5
    ids = [f"img{i}.png" for i in range(7)]
    values = SCORERS.get(key)(logits, ids, 3)
    assert values.shape == (7,) and torch.isfinite(values).all()
    assert torch.equal(SCORERS.get(key)(logits[2:5], ids[2:5], 3), values[2:5])  # batching does not matter


def test_random_scorer_depends_on_seed_not_position():
    ids = [f"x{i}" for i in range(50)]
    a, b = SCORERS.get("random")(torch.zeros(50, 2), ids, 1), SCORERS.get("random")(torch.zeros(50, 2), ids, 2)
    assert not torch.equal(a, b) and 0 <= float(a.min()) and float(a.max()) < 1


SCORES = np.array([0.9, 0.1, 0.5, 0.2, 0.3, 0.05, 0.7, 0.2, 0.6])
LABELS = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2])


FEATURES = np.random.default_rng(0).normal(size=(9, 6)).astype(np.float32)


@pytest.mark.parametrize("key", POLICIES.keys())
@pytest.mark.parametrize("num", [1, 4, 9])
def test_policy_contract_unique_deterministic_best_first(key: str, num: int):
    policy = POLICIES.get(key)
    feats = FEATURES if policy.needs_features else None
    picked = policy(SCORES, LABELS, num, 3, feats)
    assert len(picked) == num == len(set(picked.tolist()))
    assert list(SCORES[picked]) == sorted(SCORES[picked])
    again = policy(SCORES.copy(), LABELS.copy(), num, 3, None if feats is None else feats.copy())
    assert np.array_equal(picked, again)
    if policy.needs_features:
        with pytest.raises(ValueError, match="features"):
            policy(SCORES, LABELS, num, 3)


def test_diverse_policy_spends_a_class_quota_across_clusters():
    """Class 0 has 20 near-identical best-scored images and 10 other ones a little worse: per-class
    top-k takes only the first kind, the diverse policy takes both kinds."""
    rng = np.random.default_rng(1)
    a = np.eye(8, dtype=np.float32)[0] + 0.01 * rng.normal(size=(20, 8)).astype(np.float32)
    b = np.eye(8, dtype=np.float32)[1] + 0.01 * rng.normal(size=(10, 8)).astype(np.float32)
    features = np.concatenate([a, b])
    scores = np.concatenate([np.linspace(0.01, 0.2, 20), np.linspace(0.3, 0.4, 10)])
    labels = np.zeros(30, dtype=np.int64)
    top = POLICIES.get("per-class")(scores, labels, 10, 1)
    diverse = POLICIES.get("diverse")(scores, labels, 10, 1, features)
    assert (top >= 20).sum() == 0 and (diverse >= 20).sum() >= 1
    assert diverse[0] == 0 and 20 in diverse.tolist()  # the other kind's best-scored image is taken too


def test_global_top_k_takes_the_smallest_scores_ties_in_pool_order():
    assert POLICIES.get("global")(SCORES, LABELS, 4, 3).tolist() == [5, 1, 3, 7]


def test_per_class_balances_and_hands_shortfalls_to_the_global_ranking():
    # 6 slots over 3 classes = 2 each; class 0's best two are 1 (0.1), 3 (0.2); class 1: 5, 6; class 2: 7, 8
    assert sorted(POLICIES.get("per-class")(SCORES, LABELS, 6, 3).tolist()) == [1, 3, 5, 6, 7, 8]
    # 7 slots: quotas 3/2/2 (remainder to the lowest class ids)
    counts = np.bincount(LABELS[POLICIES.get("per-class")(SCORES, LABELS, 7, 3)], minlength=3)
    assert counts.tolist() == [3, 2, 2]
    # class 3 has no candidates: its quota goes to the best remaining images anywhere
    picked = POLICIES.get("per-class")(SCORES, LABELS, 8, 4)
    assert len(picked) == 8 and np.bincount(LABELS[picked], minlength=3).tolist() == [4, 2, 2]


def copy_pool(pattern_folder: Path, dest: Path) -> Path:
    shutil.copytree(pattern_folder, dest / "good")
    make_bad_pool(dest / "bad")
    return dest


def test_select_writes_scores_selected_skipped_and_manifest(tmp_path, pattern_folder, random_teacher):
    pool = copy_pool(pattern_folder, tmp_path / "pool")
    card = load_card(random_teacher)
    res = select_pool(card, pool, tmp_path / "run", num_images=6, batch_size=4, workers=0, device="cpu")
    assert (res.pool_size, res.skipped, res.scored, res.selected) == (29, 5, 24, 6)
    skipped = read_index(tmp_path / "run" / "skipped.tsv")
    reasons = {Path(r["path"]).name: r["reason"] for r in skipped.rows}
    assert set(reasons) == {"truncated.png", "corrupt.png", "empty.jpg", "notes.txt", "bomb.png"}
    scores = read_index(tmp_path / "run" / "scores.tsv")
    assert scores.columns == ["path", "label", "score", "confidence"] and len(scores) == 24
    for r in scores.rows:
        assert float(r["score"]) == pytest.approx(-math.log(float(r["confidence"])), abs=1e-4)
    selected = read_index(tmp_path / "run" / "selected.tsv")
    values = [float(r["score"]) for r in selected.rows]
    assert values == sorted(values) and len(selected) == 6
    assert sum(res.class_counts) == 6
    # every file written whole (atomic_write's temporaries renamed away), nothing else left beside them
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert names == {".lock", ".scoring", "run.json", "manifest.json", "scores.tsv", "selected.tsv", "skipped.tsv",
                     "duplicates.tsv"}, names


def test_interrupted_select_resumes_to_identical_files(tmp_path, pattern_folder, random_teacher):
    pool = copy_pool(pattern_folder, tmp_path / "pool")
    card = load_card(random_teacher)
    select_pool(card, pool, tmp_path / "whole", ratio=0.5, batch_size=4, workers=0, device="cpu")
    calls = []

    def interrupt(done, total):
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        select_pool(card, pool, tmp_path / "cut", ratio=0.5, batch_size=4, workers=0, device="cpu",
                    on_progress=interrupt)
    assert not (tmp_path / "cut" / "scores.tsv").exists()
    seen = []
    res = select_pool(card, pool, tmp_path / "cut", ratio=0.5, batch_size=4, workers=0, device="cpu",
                      on_progress=lambda d, t: seen.append(d))
    assert seen[0] == 8  # two batches were kept from the first attempt
    for name in ("scores.tsv", "selected.tsv", "skipped.tsv"):
        assert (tmp_path / "cut" / name).read_text() == (tmp_path / "whole" / name).read_text()
    assert res.selected == 12


def test_max_noise_keeps_only_confident_images(tmp_path, pattern_folder, random_teacher):
    card = load_card(random_teacher)
    res = select_pool(card, pattern_folder, tmp_path / "all", workers=0, device="cpu")
    median = res.score_quantiles["median"]
    res2 = select_pool(card, pattern_folder, tmp_path / "half", max_score=median, workers=0, device="cpu")
    rows = read_index(tmp_path / "half" / "selected.tsv").rows
    assert 0 < res2.selected < 18 and all(float(r["score"]) <= median for r in rows)


def test_nan_teacher_outputs_are_recorded_not_selected(tmp_path, pattern_folder):
    class NaNModel(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 3)
            out[0] = float("nan")
            return out

    script = tmp_path / "nan.ts"
    torch.jit.trace(NaNModel(), torch.zeros(2, 1, 16, 16)).save(str(script))
    card = load_card(script, {"size": 16, "channels": 1, "mean": [0.5], "std": [0.5]})
    res = select_pool(card, pattern_folder, tmp_path / "run", batch_size=100, workers=0, device="cpu")
    assert res.skipped == 1 and "not finite" in (tmp_path / "run" / "skipped.tsv").read_text()


def test_cli_prints_only_the_selected_path_on_stdout(tmp_path, pattern_folder, random_teacher):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["select", "--teacher", str(random_teacher), "--pool", str(pattern_folder),
                                 "--out", str(out), "--num-images", "5", "--global", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out / "selected.tsv")
    assert len(read_index(out / "selected.tsv")) == 5


def test_cli_shards_print_their_scores_path_and_merge_prints_the_selection(tmp_path, pattern_folder, random_teacher):
    """A --shard run selects nothing (the merge does): it used to crash drawing an empty table row."""
    base = ["select", "--teacher", str(random_teacher), "--pool", str(pattern_folder), "--workers", "0"]
    for i in range(2):
        res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / f"s{i}"), "--shard", f"{i}/2"])
        assert res.exit_code == 0, res.output
        assert res.stdout.strip() == str(tmp_path / f"s{i}" / "scores.tsv")
    res = CliRunner().invoke(app, ["select", "--merge", str(tmp_path / "s0"), "--merge", str(tmp_path / "s1"),
                                   "--out", str(tmp_path / "all"), "--num-images", "5"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(tmp_path / "all" / "selected.tsv") and len(read_index(res.stdout.strip())) == 5


@pytest.mark.parametrize("args, message", [
    (["--teacher", "missing.yaml"], "--teacher missing.yaml: model card not found"),
    (["--pool", "nowhere"], "--pool nowhere: no such directory"),
    (["--num-images", "0"], "--num-images 0: must be at least 1"),
    (["--score", "magic"], "--score 'magic': expected one of energy, entropy, noise, random"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, pattern_folder, random_teacher, args, message):
    base = {"--teacher": str(random_teacher), "--pool": str(pattern_folder), "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["select", *[x for kv in base.items() for x in kv]]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


def test_selecting_again_reuses_the_scores_and_a_changed_pool_is_refused(tmp_path, pattern_folder, random_teacher):
    card = load_card(random_teacher)
    out = tmp_path / "run"
    select_pool(card, pattern_folder, out, num_images=6, batch_size=4, workers=0, device="cpu")
    rows = out / ".scoring" / "rows.tsv"
    stamp = rows.stat().st_mtime_ns
    res = select_pool(card, pattern_folder, out, num_images=3, policy="global", batch_size=4, workers=0, device="cpu")
    assert res.selected == 3 and len(read_index(out / "selected.tsv")) == 3
    assert rows.stat().st_mtime_ns == stamp  # selected again from the stored scores, not scored again
    shutil.copy(next(pattern_folder.rglob("*.png")), pattern_folder / "bars_h" / "new.png")
    with pytest.raises(DfkdError, match=r"other inputs \(pool\)"):
        select_pool(card, pattern_folder, out, num_images=3, workers=0, device="cpu")
    assert not (out / ".pool-listing.tsv").exists()
    res = select_pool(card, pattern_folder, out, num_images=3, workers=0, device="cpu", overwrite=True)
    assert res.pool_size == 19


def test_report_of_a_real_select_run_names_the_teachers_classes(tmp_path, pattern_folder, random_teacher):
    from dfkd.report import write_report

    res = select_pool(load_card(random_teacher), pattern_folder, tmp_path / "run", num_images=6, workers=0, device="cpu")
    html = write_report(res.out).read_text()
    # the class names as the page shows them: not inside images, nor in tooltips (which hold paths,
    # and the pool's folders have the classes' names)
    shown = re.sub(r'<img [^>]*>|title="[^"]*"', "", html)
    predicted = {["bars_h", "bars_v", "blob"][int(r["label"])] for r in read_index(res.out / "scores.tsv").rows}
    assert predicted and all(f"<td>{name}<br>" in shown for name in predicted), shown[-4000:]


def test_progress_outside_a_terminal_is_plain_lines_at_an_interval(tmp_path, pattern_folder, random_teacher,
                                                                   monkeypatch):
    monkeypatch.setenv("DFKD_PROGRESS_SECONDS", "0")  # a line at every update
    res = CliRunner().invoke(app, ["select", "--teacher", str(random_teacher), "--pool", str(pattern_folder),
                                   "--out", str(tmp_path / "run"), "--num-images", "5", "--batch-size", "4",
                                   "--workers", "0"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("scoring ")]
    assert len(lines) >= 4 and lines[-1].startswith("scoring 18/18 (100%)") and "img/s" in lines[-1]
    assert not any(ln.startswith("scoring ━") for ln in res.stderr.splitlines())  # no bar drawn into a log


@pytest.mark.slow
def test_select_drops_exact_and_near_duplicates_before_the_budget_is_spent(tmp_path, digits_folders, digits_teacher):
    """Every image of a pool is there 3 more times: a byte copy, a 2x upscale and a JPEG re-encode.
    The selection holds each picture once, and duplicates.tsv names the kept row of each copy."""
    from PIL import Image

    pool = tmp_path / "pool"
    originals = sorted(digits_folders[1].rglob("*.png"))[:60]
    for i, f in enumerate(originals):
        (pool / "a").mkdir(parents=True, exist_ok=True)
        shutil.copy(f, pool / "a" / f"{i:03d}.png")
        for sub in "bcd":
            (pool / sub).mkdir(exist_ok=True)
        shutil.copy(f, pool / "b" / f"{i:03d}.png")
        with Image.open(f) as im:
            im.resize((32, 32), Image.BICUBIC).save(pool / "c" / f"{i:03d}.png")
            im.convert("RGB").save(pool / "d" / f"{i:03d}.jpg", quality=90)
    r = select_pool(load_card(digits_teacher), pool, tmp_path / "sel", num_images=50, workers=0, device="cpu")
    chosen = [Path(p) for p in read_index(r.files["selected"]).paths]
    assert len(chosen) == 50 and len({p.stem for p in chosen}) == 50  # one copy of each picture
    dups = read_index(r.files["duplicates"]).rows
    assert r.duplicates == len(dups) > 0
    for d in dups:
        assert Path(d["path"]).stem == Path(d["duplicate_of"]).stem, d  # a copy of the same picture
        if d["kind"] == "exact":  # only the byte copies are exact
            assert {Path(d["path"]).parent.name, Path(d["duplicate_of"]).parent.name} == {"a", "b"}
        else:
            assert float(d["cosine"]) >= 0.99
    kinds = {d["kind"] for d in dups}
    assert kinds == {"exact", "near"}
    plain = select_pool(load_card(digits_teacher), pool, tmp_path / "plain", num_images=50, dedup="off", workers=0,
                        device="cpu")
    assert len({Path(p).stem for p in read_index(plain.files["selected"]).paths}) < 50  # copies spent the budget
    with pytest.raises(DfkdError, match="--dedup 'fuzzy'"):
        select_pool(load_card(digits_teacher), pool, tmp_path / "x", num_images=5, dedup="fuzzy", device="cpu")
