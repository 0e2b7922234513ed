"""Estimates of what a data-free user cannot know: the in-distribution count of a pool
(select --num-images auto), the PU class prior (pu-train --prior auto) and the teacher's accuracy
(distill --method noisy with objective.estimate_accuracy), on pools whose truth is known."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dfkd.cards import load_card
from dfkd.cli import app
from dfkd.distill.noisy import teacher_diagonal
from dfkd.distill.run import distill
from dfkd.errors import DfkdError
from dfkd.index import read_index
from dfkd.mixture import best_bin_estimate, top_bins
from dfkd.pu.prior import estimate_prior
from dfkd.pu.train import PuConfig, pu_train
from dfkd.select import select_pool
from dfkd.select.estimate import LEVELS, estimate_in_distribution, noise_summary

from test_distill import cfg, wild_pool
from test_pu_pipeline import pu_data

K = 10


def noise_pool(n_in: int, n_out: int, seed: int = 0):
    """(predicted class, noise value) rows: in-distribution log V ~ N(-8, 2), the rest ~ N(-2, 1.5)."""
    rng = np.random.default_rng(seed)
    v = np.concatenate([np.exp(rng.normal(-8, 2, n_in)), np.minimum(np.exp(rng.normal(-2, 1.5, n_out)), np.log(K))])
    return rng.integers(0, K, len(v)), v


def test_best_bin_estimate_by_hand():
    # the component's top bins hold 10 %, 50 %, 100 % of it; the mixture's 4 %, 30 %, 100 %
    est = best_bin_estimate(np.array([0.1, 0.5, 1.0]), np.array([0.04, 0.3, 1.0]), 10**6, 10**6)
    assert est.alpha == pytest.approx(0.4) and est.component_share == 0.1  # min ratio, concentration ~0
    # few component samples: the 10 % bin's term (eps / 0.1) outweighs its lower ratio
    few = best_bin_estimate(np.array([0.1, 0.5, 1.0]), np.array([0.04, 0.3, 1.0]), 100, 10**6)
    assert few.alpha == pytest.approx(0.6) and few.low < 0.6 < few.high
    q_c, q_m = top_bins(np.array([3.0, 2.0, 1.0, 0.0]), np.array([5.0, 2.0, -1.0, -2.0]))
    assert q_c.tolist() == [1.0, 0.75, 0.5, 0.25] and q_m.tolist() == [0.5, 0.5, 0.5, 0.25]  # thresholds 0, 1, 2, 3


@pytest.mark.parametrize("n_in,n_out", [(2000, 7500), (200, 9800), (4000, 6000)])
def test_in_distribution_count_near_the_truth_with_and_without_the_card(n_in, n_out):
    labels, values = noise_pool(n_in, n_out)
    _, ref_values = noise_pool(5000, 0, seed=1)
    ref = noise_summary(ref_values)
    rows = list(zip(labels.tolist(), values.tolist()))
    by_card = estimate_in_distribution(iter(rows), K, ref, "teacher.yaml")
    by_mixture = estimate_in_distribution(iter(rows), K)
    for e in (by_card, by_mixture):
        assert abs(e.count - n_in) <= 0.03 * (n_in + n_out), (e.method, e.count, n_in)
        assert e.low <= e.count <= e.high and e.scored == n_in + n_out
        assert sum(e.class_counts) == e.count and len(e.class_counts) == K
    assert (by_card.method, by_mixture.method) == ("card", "mixture")


def test_noise_summary_holds_the_quantiles_at_the_levels():
    s = noise_summary(np.arange(101.0))
    assert s["images"] == 101 and s["levels"] == list(LEVELS)
    assert s["quantiles"][LEVELS.index(0.5)] == 50 and s["quantiles"][LEVELS.index(0.99)] == 99
    assert noise_summary(np.zeros(0)) is None


def test_estimate_refuses_an_empty_pool_equal_noise_values_and_a_bad_reference():
    with pytest.raises(DfkdError, match="no scored image"):
        estimate_in_distribution(iter([]), K)
    with pytest.raises(DfkdError, match="same noise value"):
        estimate_in_distribution(iter([(c % K, 0.25) for c in range(500)]), K)
    with pytest.raises(DfkdError, match="teacher.yaml: noise_values"):
        estimate_in_distribution(iter([(0, 0.1)]), K, {"levels": [0.5]}, "teacher.yaml")


def test_prior_estimate_near_the_truth_and_refusals():
    torch.manual_seed(0)
    mu = torch.zeros(16)
    mu[0] = 5.0
    for prior in (0.02, 0.2, 0.4):
        n_in = int(prior * 6000)
        pool = torch.cat([torch.randn(n_in, 16) + mu, torch.randn(6000 - n_in, 16)])
        est = estimate_prior(torch.randn(200, 16) + mu, pool)
        assert abs(est.prior - prior) <= 0.03 and est.low <= est.prior <= est.high, (prior, est)
    with pytest.raises(DfkdError, match="at least 10 positives"):
        estimate_prior(torch.randn(5, 16) + mu, torch.randn(500, 16))
    with pytest.raises(DfkdError, match="no pool image looks like the positives"):
        estimate_prior(torch.randn(200, 16) + 40 * mu, torch.randn(3000, 16))


def test_select_auto_selects_the_estimated_in_distribution_count(tmp_path, digits_folders, digits_teacher):
    """A pool of the digits test images (the truth: 397) and 300 noise images; the digits teacher's
    card holds its noise values on that test split (eval --write-card). This small teacher is as
    sure of many noise images as of digits, so best bin estimation gives what it promises there:
    not less than the truth, up to noise."""
    train, test = digits_folders
    pool = wild_pool(tmp_path / "pool", test)
    truth = len(list(test.rglob("*.png")))
    card = load_card(digits_teacher)
    assert card.extra["noise_values"]["images"] == truth
    res = select_pool(card, pool, tmp_path / "auto", num_images="auto", dedup="off", workers=0, device="cpu")
    e = res.estimate
    assert e.method == "card" and truth - 0.05 * e.scored <= e.count < e.scored, (e, truth)
    assert res.selected == e.count and e.low <= e.count <= e.high and sum(res.class_counts) == e.count
    manifest = json.loads(res.files["manifest"].read_text())
    assert manifest["summary"]["in_distribution"]["count"] == e.count and manifest["options"]["num"] == "auto"
    only_digits = select_pool(card, test, tmp_path / "digits", num_images="auto", dedup="off", workers=0, device="cpu")
    assert only_digits.estimate.count >= 0.95 * truth  # a pool of in-distribution images only
    no_card = load_card(digits_teacher)
    no_card.extra.pop("noise_values")
    again = select_pool(no_card, pool, tmp_path / "mixture", num_images="auto", dedup="off", workers=0, device="cpu")
    assert again.estimate.method == "mixture" and again.selected == again.estimate.count > 0


@pytest.mark.parametrize("args,fragment", [
    (["--num-images", "auto", "--score", "entropy"], "--num-images auto: estimates from the noise value"),
    (["--num-images", "many"], "--num-images 'many': expected a whole number or auto"),
])
def test_cli_select_auto_bad_input_is_one_line(tmp_path, pattern_folder, random_teacher, args, fragment):
    res = CliRunner().invoke(app, ["select", "--teacher", str(random_teacher), "--pool", str(pattern_folder),
                                   "--out", str(tmp_path / "run"), "--workers", "0", "--device", "cpu", *args])
    assert res.exit_code == 2 and res.stderr.strip().splitlines()[-1].count(fragment) == 1, res.output
    assert "Traceback" not in res.output


def test_pu_train_prior_auto_estimates_near_the_truth_and_records_it(tmp_path, digits_folders, digits_teacher):
    train, _ = digits_folders
    pos, pool, truth = pu_data(tmp_path, train)
    prior = sum(truth.values()) / len(truth)
    r = pu_train(load_card(digits_teacher), pos, pool, tmp_path / "pu",
                 PuConfig(steps=2, batch_size=32, amp=False, nnpu={"prior": "auto"}), workers=0, device="cpu")
    assert abs(r.prior - prior) <= 0.1, (r.prior, prior)
    assert r.prior_estimate.low <= r.prior <= r.prior_estimate.high
    recorded = load_card(r.card).extra["pu"]
    assert recorded["prior"] == r.prior and recorded["prior_estimate"]["prior"] == pytest.approx(r.prior, abs=1e-6)
    res = CliRunner().invoke(app, ["pu-train", "--teacher", str(digits_teacher), "--positive", str(pos),
                                   "--unlabeled", str(pool), "--out", str(tmp_path / "bad"), "--prior", "half"])
    assert res.exit_code == 2 and "--prior 'half': expected a number in (0, 1) or auto" in res.stderr


def test_noisy_without_accuracy_errors_or_estimates_from_the_teachers_confidence(tmp_path, pattern_folder,
                                                                                random_teacher):
    info = {"confidence": {"mean": 0.8, "class_mean": [0.9, 0.7, 0.6]}}
    with pytest.raises(DfkdError, match="objective.estimate_accuracy=true"):
        teacher_diagonal(3, None, info)
    a, source = teacher_diagonal(3, None, info, estimate=True)
    assert a.tolist() == pytest.approx([0.9, 0.7, 0.6]) and "confidence" in source
    assert teacher_diagonal(3, None, info, per_class=False, estimate=True)[0].tolist() == pytest.approx([0.8] * 3)
    assert teacher_diagonal(3, 0.5, info, estimate=True)[0].tolist() == [0.5] * 3  # a given value wins
    card = load_card(random_teacher)
    assert card.accuracy is None
    r = distill(card, "resnet8", [pattern_folder], tmp_path / "noisy",
                cfg("noisy", steps=2, objective={"estimate_accuracy": True}), workers=0, device="cpu")
    assert "mean confidence on the training images (an estimate: " in r.description


def test_estimate_refuses_noise_values_that_fill_one_histogram_bin():
    rng = np.random.default_rng(0)
    rows = list(zip(rng.integers(0, K, 1000).tolist(), (np.log(K) - rng.uniform(0, 1e-5, 1000)).tolist()))
    with pytest.raises(DfkdError, match="nearly the same noise value"):
        estimate_in_distribution(iter(rows), K)


def _cli(*args):
    res = CliRunner().invoke(app, [*args, "--workers", "0", "--device", "cpu"])
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    return res.exit_code, res.stderr.strip().splitlines()


def test_cli_bad_cases_end_with_one_line_and_exit_2(tmp_path, pattern_folder, random_teacher):
    from dfkd.cards import save_card
    from dfkd.images import InputSpec
    from dfkd.models import ARCHS

    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _cli("select", "--teacher", str(random_teacher), "--pool", str(empty), "--out",
                     str(tmp_path / "s1"), "--num-images", "auto")
    assert code == 2 and len(err) == 1 and "the pool is empty" in err[0], err
    torch.manual_seed(0)
    model = ARCHS.get("resnet8")(num_classes=3, in_channels=1)
    torch.nn.init.zeros_(model.fc.weight)
    torch.nn.init.zeros_(model.fc.bias)
    flat = save_card(tmp_path / "flat" / "teacher.yaml", "resnet8", 3,
                     InputSpec(size=(16, 16), channels=1, mean=[0.5], std=[0.5]), model.state_dict(),
                     classes=["bars_h", "bars_v", "blob"])
    code, err = _cli("select", "--teacher", str(flat), "--pool", str(pattern_folder), "--out",
                     str(tmp_path / "s2"), "--num-images", "auto")
    assert code == 2 and len(err) == 1 and "every pool image has the same noise value (1.099)" in err[0], err
    assert not (tmp_path / "s2" / "selected.tsv").exists()
    few = tmp_path / "few" / "bars_h"
    few.mkdir(parents=True)
    for f in sorted((pattern_folder / "bars_h").glob("*.png"))[:3]:
        (few / f.name).write_bytes(f.read_bytes())
    code, err = _cli("pu-train", "--teacher", str(random_teacher), "--positive", str(few.parent), "--unlabeled",
                     str(pattern_folder), "--out", str(tmp_path / "p1"), "--prior", "auto", "--steps", "1")
    assert code == 2 and err[-1].startswith("dfkd pu-train: error: --prior auto: needs at least 10 positives"), err
    assert not (tmp_path / "p1" / "pu.yaml").exists()


def test_cli_prior_auto_refuses_positives_unlike_every_pool_image(tmp_path, digits_folders, digits_teacher):
    """Positives: digits; pool: random-noise images only (no image like them): not identifiable."""
    train, _ = digits_folders
    rng = np.random.default_rng(3)
    pool = tmp_path / "noise"
    pool.mkdir()
    for i in range(300):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), "L").save(pool / f"n{i:03d}.png")
    code, err = _cli("pu-train", "--teacher", str(digits_teacher), "--positive", str(train), "--unlabeled",
                     str(pool), "--out", str(tmp_path / "pu"), "--prior", "auto", "--steps", "1")
    assert code == 2 and "no pool image looks like the positives" in err[-1] and "not identifiable" in err[-1], err
    assert not (tmp_path / "pu" / "pu.yaml").exists()


def test_report_shows_the_auto_estimate_and_its_cut(tmp_path, digits_folders, digits_teacher):
    """dfkd report on a --num-images auto run: the manifest's estimate, method, range and the
    pool's noise value at the estimated count; a fixed-budget run has no such section."""
    _, test = digits_folders
    pool = wild_pool(tmp_path / "pool", test)
    for num in ("auto", "50"):
        code, err = _cli("select", "--teacher", str(digits_teacher), "--pool", str(pool), "--out",
                         str(tmp_path / num), "--num-images", num, "--dedup", "off")
        assert code == 0, err
        assert CliRunner().invoke(app, ["report", str(tmp_path / num)]).exit_code == 0
    e = json.loads((tmp_path / "auto" / "manifest.json").read_text())["summary"]["in_distribution"]
    page = (tmp_path / "auto" / "report.html").read_text()
    scores = sorted(float(r["score"]) for r in read_index(tmp_path / "auto" / "scores.tsv").rows)
    assert f"{e['count']} of {e['scored']} ({e['share']:.1%})" in page
    assert f"{e['low']} .. {e['high']}" in page and f"{e['method']}: {e['detail']}" in page
    assert f"score &lt;= {scores[e['count'] - 1]:.6g}: the {e['count']} lowest" in page
    assert "In-distribution estimate" not in (tmp_path / "50" / "report.html").read_text()


@pytest.mark.slow
def test_pipelines_run_without_a_number_to_guess(tmp_path, digits_folders, digits_teacher):
    """pipelines/dfnd.sh and pipelines/pu.sh with their defaults (NUM and PRIOR: auto), end to end on the digits pool."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    train, test = digits_folders
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "STEPS": "2",
           "SELECT_ARGS": "--workers 0 --dedup off", "DISTILL_ARGS": "--workers 0 --batch-size 16"}
    pool = wild_pool(tmp_path / "pool", test)
    out = subprocess.run(["bash", str(root / "pipelines/dfnd.sh"), str(digits_teacher), str(pool), str(tmp_path / "dfnd")],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "dfnd" / "select" / "manifest.json").read_text())["summary"]
    assert summary["selected"] == summary["in_distribution"]["count"] > 0 and Path(out.stdout.strip()).is_file()
    pos, upool, _ = pu_data(tmp_path / "pu-data", train)
    out = subprocess.run(["bash", str(root / "pipelines/pu.sh"), str(digits_teacher), str(pos), str(upool),
                          str(tmp_path / "pu")], env={**env, "PU_ARGS": "--steps 2 --workers 0",
                                                      "EXPAND_ARGS": "--workers 0"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    pu = load_card(tmp_path / "pu" / "pu" / "pu.yaml").extra["pu"]
    assert pu["prior_estimate"]["prior"] == pytest.approx(pu["prior"], abs=1e-6) and 0 < pu["prior"] < 1
    assert Path(out.stdout.strip()).is_file()
