import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dfkd.cards import load_card
from dfkd.cli import app
from dfkd.distill.run import default_config, distill
from dfkd.errors import DfkdError
from dfkd.evaluate import evaluate
from dfkd.index import read_index
from dfkd.pu.expand import expand
from dfkd.pu.train import NnpuObjective, PuConfig, positive_repeat, pu_train
from dfkd.train.objective import Batch


def pu_data(root: Path, train: Path, n_pos_per_class: int = 4, n_ood: int = 700):
    """Positives: a few labeled digits; pool: the other digits (known truth) + textured noise."""
    rng = np.random.default_rng(2)
    pos, pool = root / "positives", root / "pool"
    truth = {}
    for c in sorted(p.name for p in train.iterdir()):
        files = sorted((train / c).glob("*.png"))
        (pos / c).mkdir(parents=True)
        for f in files[:n_pos_per_class]:
            shutil.copy(f, pos / c / f.name)
        (pool / "in").mkdir(parents=True, exist_ok=True)
        for f in files[n_pos_per_class:]:
            shutil.copy(f, pool / "in" / f"{c}_{f.name}")
            truth[str((pool / "in" / f"{c}_{f.name}").resolve())] = True
    (pool / "out").mkdir()
    yy, xx = np.mgrid[0:16, 0:16]
    for i in range(n_ood):
        kind = i % 3
        img = (rng.integers(0, 255, (16, 16)) if kind == 0 else
               ((xx * rng.uniform(0.3, 2) + yy * rng.uniform(0.3, 2)) % 8 < 4) * 255 if kind == 1 else
               (np.hypot(yy - rng.integers(0, 16), xx - rng.integers(0, 16)) < rng.integers(2, 9)) * 255)
        path = pool / "out" / f"n{i:04d}.png"
        Image.fromarray(np.asarray(img, dtype=np.uint8), "L").save(path)
        truth[str(path.resolve())] = False
    return pos, pool, truth


@pytest.mark.slow
def test_pu_train_expand_separates_in_from_out_and_feeds_robust_kd(tmp_path, digits_folders, digits_teacher):
    train, test = digits_folders
    teacher = load_card(digits_teacher)
    pos, pool, truth = pu_data(tmp_path, train)
    prior = sum(truth.values()) / len(truth)
    cfg = PuConfig(epochs=4, batch_size=64, amp=False, augment="crop", pad=2, nnpu={"prior": prior})
    r = pu_train(teacher, pos, pool, tmp_path / "pu", cfg, workers=0, device="cpu")
    assert r.teacher_keys_loaded == r.backbone_keys > 0  # the teacher's weights all loaded
    assert r.heldout_positive_recall is not None and r.heldout_positive_recall >= 0.5
    assert (tmp_path / "pu" / "skipped.tsv").read_text().startswith("path\treason\n")  # written, if empty
    e = expand(r.card, pos, pool, tmp_path / "expand", workers=0, device="cpu")
    rows = read_index(e.files["expanded"]).rows
    positives = [x for x in rows if x["source"] == "positive"]
    picked = [x for x in rows if x["source"] == "pool"]
    assert len(positives) == 40 and {x["label"] for x in positives} == {str(i) for i in range(10)}
    precision = np.mean([truth[x["path"]] for x in picked])
    recall = sum(truth[x["path"]] for x in picked) / sum(truth.values())
    assert precision > 0.8 and recall > 0.5, (precision, recall)
    assert len(read_index(e.files["pu_scores"])) == len(truth)
    assert sum(e.class_counts) == e.selected
    c = {**default_config(), "method": "robust", "epochs": 4, "batch_size": 64, "lr": 0.05, "amp": False,
         "augment": "crop", "pad": 2}
    student = distill(teacher, "resnet8", [e.files["expanded"]], tmp_path / "student", c, workers=0, device="cpu")
    assert evaluate(load_card(student.card), test, workers=0, device="cpu").top1 > 0.5


@pytest.mark.slow
def test_expand_top_n_repeat_and_errors(tmp_path, digits_folders, digits_teacher):
    train, _ = digits_folders
    teacher = load_card(digits_teacher)
    pos, pool, truth = pu_data(tmp_path, train, n_pos_per_class=2, n_ood=30)
    cfg = PuConfig(steps=3, batch_size=32, amp=False, nnpu={"prior": 0.5})
    r = pu_train(teacher, pos, pool, tmp_path / "pu", cfg, workers=0, device="cpu")
    e = expand(r.card, pos, pool, tmp_path / "e", num_images=25, repeat_positive=3, workers=0, device="cpu")
    rows = read_index(e.files["expanded"]).rows
    assert len(rows) == 20 * 3 + 25
    scores = [float(x["score"]) for x in rows if x["source"] == "pool"]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(DfkdError, match="not a PU card"):
        expand(digits_teacher, pos, pool, tmp_path / "x", device="cpu")
    with pytest.raises(DfkdError, match="--teacher .*missing.yaml: no such file"):  # was silently ignored
        expand(r.card, pos, pool, tmp_path / "x", teacher=tmp_path / "missing.yaml", device="cpu")
    good = next((pos / "0").glob("*.png"))
    (pos / "0" / "truncated.png").write_bytes(good.read_bytes()[:40])  # was written as a positive
    e2 = expand(r.card, pos, pool, tmp_path / "e2", num_images=5, workers=0, device="cpu")
    assert e2.positives == 20 and "truncated.png" not in e2.files["expanded"].read_text()
    assert "truncated.png" in e2.files["skipped"].read_text()
    res = CliRunner().invoke(app, ["pu-train", "--teacher", str(digits_teacher), "--positive", str(pos),
                                   "--unlabeled", str(pool), "--out", str(tmp_path / "p2"), "--prior", "1.5"])
    assert res.exit_code == 2 and "--prior" in res.stderr


@pytest.mark.slow
def test_cli_pu_train_and_expand_print_paths(tmp_path, digits_folders, digits_teacher):
    pos, pool, _ = pu_data(tmp_path, digits_folders[0], n_pos_per_class=2, n_ood=20)
    runner = CliRunner()
    res = runner.invoke(app, ["pu-train", "--teacher", str(digits_teacher), "--positive", str(pos),
                              "--unlabeled", str(pool), "--out", str(tmp_path / "pu"), "--prior", "0.9",
                              "--steps", "2", "--workers", "0", "--no-amp"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(tmp_path / "pu" / "pu.yaml") and "held-out positives" in res.stderr
    res = runner.invoke(app, ["expand", "--pu", str(tmp_path / "pu" / "pu.yaml"), "--positive", str(pos),
                              "--unlabeled", str(pool), "--out", str(tmp_path / "e"), "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(tmp_path / "e" / "expanded.tsv")
    res = runner.invoke(app, ["distill", "--teacher", str(tmp_path / "pu" / "pu.yaml"), "--student", "resnet8",
                              "--data", str(tmp_path / "e" / "expanded.tsv"), "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "is a PU card" in res.stderr  # not a list of mismatched weight keys


def test_positives_are_repeated_to_their_share_and_zero_means_as_they_come():
    assert positive_repeat(0.25, 900, 10) == 30  # 300 positive rows against 900 unlabeled: 25 %
    assert positive_repeat(0.25, 900, 10) * 10 / (positive_repeat(0.25, 900, 10) * 10 + 900) >= 0.25
    assert positive_repeat(0.25, 900, 29) * 29 / (positive_repeat(0.25, 900, 29) * 29 + 900) >= 0.25
    assert positive_repeat(0.25, 20, 10) == 1 and positive_repeat(0.0, 900, 10) == 1
    with pytest.raises(DfkdError, match="--positive-share"):
        PuConfig(positive_share=1.0, nnpu={"prior": 0.5}).check()


def test_a_batch_without_positives_or_unlabeled_takes_no_step():
    obj = NnpuObjective(0.3)
    scores = torch.randn(6, requires_grad=True)
    for labels in (torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)):
        out = obj(Batch(scores, labels))
        out["loss"].backward()
        assert float(out["loss"].detach()) == 0.0 and torch.count_nonzero(scores.grad) == 0
        assert set(out) == {"loss", "risk", "positive_risk", "negative_risk", "clipped"}
    full = obj(Batch(scores, torch.tensor([1, 0, 0, 1, 0, 0])))
    assert set(full) == set(out) and float(full["risk"]) > 0


def test_pu_config_sections_layer_and_bad_values_name_the_flag(tmp_path):
    from dfkd.config import resolve_config
    from dfkd.pu.train import default_config

    ref = Path(__file__).parents[1] / "pipelines" / "configs" / "pu-train-reference.yaml"
    cfg = resolve_config(default_config(), ref, ["nnpu.beta=0.1"], {"nnpu.prior": 0.2})
    c = PuConfig(**cfg)
    c.check()
    assert (c.batch_size, c.optimizer, c.lr, c.positive_share) == (4096, "sgd", 0.001, 0.0)
    assert c.nnpu == {"prior": 0.2, "beta": 0.1, "gamma": 1.0}
    default = PuConfig()
    default.check()  # the prior's default: auto, estimated in the run
    assert default.nnpu["prior"] == "auto"
    with pytest.raises(DfkdError, match="--prior 'often': expected a number in"):
        PuConfig(nnpu={"prior": "often"}).check()
    with pytest.raises(DfkdError, match="nnpu.priors"):
        resolve_config(default_config(), None, ["nnpu.priors=0.2"])
    with pytest.raises(DfkdError, match="section 'model' has no key 'tap'"):
        PuConfig(model={"tap": "layer1"})


@pytest.mark.slow
def test_pu_train_resumes_to_identical_weights_and_refuses_another_config(tmp_path, digits_folders, digits_teacher):
    teacher = load_card(digits_teacher)
    pos, pool, _ = pu_data(tmp_path, digits_folders[0], n_pos_per_class=2, n_ood=40)
    cfg = PuConfig(steps=6, batch_size=32, amp=False, checkpoint_every=2, nnpu={"prior": 0.5})
    whole = pu_train(teacher, pos, pool, tmp_path / "whole", cfg, workers=0, device="cpu")
    assert pu_train(teacher, pos, pool, tmp_path / "cut", cfg, workers=0, device="cpu", stop_after=3) is not None
    resumed = pu_train(teacher, pos, pool, tmp_path / "cut", cfg, workers=0, device="cpu")
    assert resumed.resumed_from == 3 and resumed.steps == whole.steps == 6
    a, b = torch.load(tmp_path / "whole" / "pu.pt"), torch.load(tmp_path / "cut" / "pu.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = PuConfig(steps=6, batch_size=32, amp=False, checkpoint_every=2, nnpu={"prior": 0.4})
    with pytest.raises(DfkdError, match="other inputs.*config"):
        pu_train(teacher, pos, pool, tmp_path / "cut", other, workers=0, device="cpu")


@pytest.mark.slow
def test_expand_drops_copies_of_pool_images_and_of_positives(tmp_path, digits_folders, digits_teacher):
    """Each of 40 pool digits is there twice more (a byte copy and a 2x upscale) and one positive is
    in the pool too: the expanded set holds each picture once and no copy of a positive."""
    train, test = digits_folders
    pos, pool = tmp_path / "positives", tmp_path / "pool"
    for c in sorted(p.name for p in train.iterdir()):
        (pos / c).mkdir(parents=True)
        for f in sorted((train / c).glob("*.png"))[:2]:
            shutil.copy(f, pos / c / f.name)
    for sub in ("a", "b", "c", "p"):
        (pool / sub).mkdir(parents=True)
    for i, f in enumerate(sorted(test.rglob("*.png"))[:40]):
        shutil.copy(f, pool / "a" / f"{i:03d}.png")
        shutil.copy(f, pool / "b" / f"{i:03d}.png")
        with Image.open(f) as im:
            im.resize((32, 32), Image.BICUBIC).save(pool / "c" / f"{i:03d}.png")
    positive = sorted((pos / "3").glob("*.png"))[0]
    shutil.copy(positive, pool / "p" / "copy.png")
    r = pu_train(load_card(digits_teacher), pos, pool, tmp_path / "pu",
                 PuConfig(steps=3, batch_size=32, amp=False, nnpu={"prior": 0.9}), workers=0, device="cpu")
    everything = -1e9  # a threshold every image passes: only duplicates are left out
    e = expand(r.card, pos, pool, tmp_path / "e", threshold=everything, workers=0, device="cpu")
    picked = [Path(x["path"]) for x in read_index(e.files["expanded"]).rows if x["source"] == "pool"]
    assert len(picked) == 40 and len({p.stem for p in picked}) == 40 and e.selected == 40
    dups = {Path(d["path"]).relative_to(pool).as_posix(): d for d in read_index(e.files["duplicates"]).rows}
    assert e.duplicates == len(dups) == 81
    assert dups["p/copy.png"]["duplicate_of"] == str(positive.resolve()) and dups["p/copy.png"]["kind"] == "exact"
    for d in dups.values():
        assert Path(d["path"]).stem == Path(d["duplicate_of"]).stem or d["path"].endswith("copy.png"), d
    assert {d["kind"] for d in dups.values()} == {"exact", "near"}
    assert load_manifest_summary(e.files["manifest"])["duplicates"] == 81
    plain = expand(r.card, pos, pool, tmp_path / "plain", threshold=everything, dedup="off", workers=0, device="cpu")
    assert plain.selected == 121 and "duplicates" not in plain.files
    few = expand(r.card, pos, pool, tmp_path / "few", num_images=30, workers=0, device="cpu")
    assert few.selected == 30 and len({Path(x["path"]).stem for x in read_index(few.files["expanded"]).rows
                                       if x["source"] == "pool"}) == 30
    res = CliRunner().invoke(app, ["expand", "--pu", str(r.card), "--positive", str(pos), "--unlabeled", str(pool),
                                   "--out", str(tmp_path / "x"), "--dedup", "fuzzy"])
    assert res.exit_code == 2 and "--dedup 'fuzzy'" in res.stderr


def load_manifest_summary(path):
    import json
    return json.loads(Path(path).read_text())["summary"]
