"""The Mahalanobis reference of ``select --num-images auto`` (dfkd/select/mahalanobis.py): the fit
``eval --write-card`` writes beside the card, and the estimate select reads from the pool's distances."""
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dfkd.cards import load_card
from dfkd.cli import app
from dfkd.errors import DfkdError
from dfkd.evaluate import evaluate
from dfkd.index import read_index
from dfkd.select import mahalanobis, merge_shards, select_pool
from dfkd.select.estimate import LEVELS, MAHALANOBIS, estimate_in_distribution
from dfkd.select.mahalanobis import SHRINK, ClassGaussians, ReferenceFit

from test_distill import wild_pool


def gaussian_classes(n: int, k: int = 3, d: int = 5, seed: int = 0):
    g = np.random.default_rng(seed)
    mu = g.normal(0, 6, (k, d))
    a = g.normal(0, 1, (d, d))
    y = g.integers(0, k, n)
    return mu[y] + g.normal(0, 1, (n, d)) @ a.T, y, mu, a @ a.T


def test_fit_holds_out_every_other_image_and_measures_the_distance_by_hand():
    x, y, _, _ = gaussian_classes(4000)
    fit = ReferenceFit(3)
    for lo in range(0, 4000, 333):  # batches of any size: the split follows the row position
        fit.add(x[lo:lo + 333], y[lo:lo + 333])
    gaussians, summary = fit.finish()
    assert summary["images"] == 2000 and summary["fitted"] == 2000 and summary["levels"] == list(LEVELS)
    train, ty = x[0::2], y[0::2]
    mu = np.stack([train[ty == c].mean(0) for c in range(3)])
    r = train - mu[ty]
    cov = r.T @ r / len(train)
    cov = (1 - SHRINK) * cov + SHRINK * np.trace(cov) / 5 * np.eye(5)
    p = np.linalg.inv(cov)
    held = x[1::2]
    by_hand = np.min([np.einsum("nd,de,ne->n", held - m, p, held - m) for m in mu], axis=0)
    got = gaussians.distance(torch.from_numpy(held)).numpy()
    np.testing.assert_allclose(got, by_hand, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(summary["quantiles"], np.quantile(by_hand, LEVELS), rtol=1e-4)
    # in-class points are chi-square with 5 degrees of freedom (median 4.35), up to the shrinkage
    assert 3.9 < np.median(got) < 4.8


def test_fit_holds_out_at_most_held_out_images_and_needs_two_per_class(monkeypatch):
    monkeypatch.setattr(mahalanobis, "HELD_OUT", 100)
    x, y, _, _ = gaussian_classes(1000)
    fit = ReferenceFit(3)
    fit.add(x, y)
    _, summary = fit.finish()
    assert summary["images"] == 100 and summary["fitted"] == 900
    few = ReferenceFit(3)
    few.add(x[:1], y[:1])
    assert few.finish() is None  # one image: nothing held out, no class with two


def test_save_load_and_a_bad_file_is_one_line(tmp_path):
    x, y, _, _ = gaussian_classes(600)
    fit = ReferenceFit(3)
    fit.add(x, y)
    gaussians, _ = fit.finish()
    path = gaussians.save(tmp_path / "m.npz")
    again = ClassGaussians.load(path, 3, "card.yaml")
    q = torch.from_numpy(x[:50])
    np.testing.assert_allclose(again.distance(q).numpy(), gaussians.distance(q).numpy(), rtol=1e-4)
    with pytest.raises(DfkdError, match="does not fit the card's 4 classes"):
        ClassGaussians.load(path, 4, "card.yaml")
    with pytest.raises(DfkdError, match="have 4 dimensions, its Mahalanobis fit 5"):
        again.distance(torch.zeros(2, 4))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DfkdError, match="bad.npz cannot be read"):
        ClassGaussians.load(tmp_path / "bad.npz", 3, "card.yaml")


def test_the_distance_finds_foreign_points_the_noise_value_cannot():
    """Foreign points around the same class centres (a teacher would be as sure of them), but
    spread far wider than the classes' feature clusters: by distance, best bin estimation finds
    the true share (an upper bound, by the few foreign points that fall inside the clusters)."""
    x, y, mu, _ = gaussian_classes(6000, seed=1)
    fit = ReferenceFit(3)
    fit.add(x[:3000], y[:3000])
    gaussians, summary = fit.finish()
    g = np.random.default_rng(2)
    foreign = mu[g.integers(0, 3, 4000)] + g.normal(0, 6, (4000, 5))  # same centres, six times the spread
    pool = np.concatenate([x[3000:], foreign])
    labels = np.concatenate([y[3000:], g.integers(0, 3, 4000)])
    d = gaussians.distance(torch.from_numpy(pool)).numpy()
    e = estimate_in_distribution(zip(labels.tolist(), d.tolist()), 3, summary, "card.yaml", MAHALANOBIS)
    assert e.method == "mahalanobis" and 3000 <= e.count < 1.05 * 3000, e
    assert e.low <= e.count <= e.high and sum(e.class_counts) == e.count


@pytest.fixture
def split_digits(tmp_path, digits_folders, digits_teacher):
    """The digits test split halved: labeled images for eval --write-card, and a pool of the other
    half (the truth) and 300 noise images; a copy of the digits teacher."""
    _, test = digits_folders
    val, held = tmp_path / "val", tmp_path / "held"
    for i, p in enumerate(sorted(test.rglob("*.png"))):
        dest = (val if i % 2 else held) / p.parent.name
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest / p.name)
    card = tmp_path / "teacher" / "model.yaml"
    card.parent.mkdir()
    shutil.copy(digits_teacher, card)
    shutil.copy(load_card(digits_teacher).weights, card.parent / load_card(digits_teacher).weights.name)
    pool = wild_pool(tmp_path / "pool", held)
    return card, val, pool, len(list(held.rglob("*.png")))


def test_write_card_fits_and_select_auto_estimates_from_the_distances(tmp_path, split_digits):
    card_path, val, pool, truth = split_digits
    by_noise = select_pool(card_path, pool, tmp_path / "noise", num_images="auto", dedup="off", workers=0,
                           device="cpu")
    assert by_noise.estimate.method == "card" and "distance" not in read_index(by_noise.files["scores"]).columns
    r = evaluate(card_path, val, workers=0, device="cpu", write_card=True)
    card = load_card(card_path)
    assert card.mahalanobis == card_path.with_suffix(".mahalanobis.npz") and card.mahalanobis.is_file()
    assert card.extra["mahalanobis"] == r.mahalanobis and r.mahalanobis["images"] + r.mahalanobis["fitted"] == r.num_images
    res = select_pool(card, pool, tmp_path / "auto", num_images="auto", dedup="off", workers=0, device="cpu")
    e = res.estimate
    assert e.method == "mahalanobis" and "Mahalanobis distances" in e.detail
    assert abs(e.count - truth) < abs(by_noise.estimate.count - truth), (e, by_noise.estimate, truth)
    assert abs(e.count - truth) <= 0.15 * truth, (e, truth)
    assert res.selected == e.count
    scores = read_index(res.files["scores"])
    assert scores.columns[:5] == ["path", "label", "score", "confidence", "distance"]
    assert all(np.isfinite(float(row["distance"])) and float(row["distance"]) >= 0 for row in scores.rows)
    manifest = json.loads(res.files["manifest"].read_text())
    assert manifest["summary"]["in_distribution"]["method"] == "mahalanobis"
    assert "teacher0_mahalanobis" in manifest["inputs"]
    # the distances do not depend on the score, so auto takes any score then
    entropy = select_pool(card, pool, tmp_path / "entropy", num_images="auto", score="entropy", dedup="off",
                          workers=0, device="cpu")
    assert entropy.estimate == e and entropy.selected == e.count
    # two shards merged give the same estimate as one run
    for i in range(2):
        select_pool(card, pool, tmp_path / f"shard{i}", shard=(i, 2), workers=0, device="cpu")
    merged = merge_shards([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged", num_images="auto",
                          dedup="off", workers=0, device="cpu")
    assert merged.estimate == e


def test_a_card_whose_fit_is_missing_or_broken_is_one_line(tmp_path, split_digits):
    card_path, val, pool, _ = split_digits
    evaluate(card_path, val, workers=0, device="cpu", write_card=True)
    npz = card_path.with_suffix(".mahalanobis.npz")
    npz.write_bytes(b"broken")
    res = CliRunner().invoke(app, ["select", "--teacher", str(card_path), "--pool", str(pool), "--out",
                                   str(tmp_path / "run"), "--num-images", "auto", "--workers", "0", "--device", "cpu"])
    assert res.exit_code == 2 and "mahalanobis file" in res.stderr.strip().splitlines()[-1], res.output
    npz.unlink()
    res = CliRunner().invoke(app, ["select", "--teacher", str(card_path), "--pool", str(pool), "--out",
                                   str(tmp_path / "run2"), "--num-images", "auto", "--workers", "0", "--device", "cpu"])
    assert res.exit_code == 2 and res.stderr.strip().splitlines()[-1].endswith(f"mahalanobis file {npz} not found")
    assert "Traceback" not in res.output
