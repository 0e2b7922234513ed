import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dfkd.cards import build_arch, load_card, read_state_dict, save_card, update_card
from dfkd.cli import app
from dfkd.config import resolve_config
from dfkd.distill.run import default_config, distill
from dfkd.errors import DfkdError
from dfkd.evaluate import evaluate
from dfkd.index import read_index, write_index
from dfkd.select import select_pool


def wild_pool(root: Path, digits_train: Path, n_ood: int = 300) -> Path:
    """Unlabeled pool: the digits images (flat, no class folders) plus random-noise images."""
    rng = np.random.default_rng(1)
    (root / "ood").mkdir(parents=True)
    for i, p in enumerate(sorted(digits_train.rglob("*.png"))):
        shutil.copy(p, root / f"d{i:04d}.png")
    for i in range(n_ood):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8), "L").save(root / "ood" / f"n{i}.png")
    return root


def cfg(method: str, **kw) -> dict:
    c = resolve_config(default_config(), sets=[f"method={method}"])
    c.update(dict(epochs=6, batch_size=64, lr=0.05, augment="crop", pad=2, amp=False, log_every=5))
    c.update(kw)
    return c


def top1(card_path: Path, test: Path) -> float:
    return evaluate(load_card(card_path), test, workers=0, device="cpu").top1


def class_accuracy(card_path: Path, test: Path) -> list[float]:
    return evaluate(load_card(card_path), test, workers=0, device="cpu").class_accuracy


def untrained_student(tmp_path: Path, teacher) -> Path:
    """The student distill starts from (same arch, same seed), saved untrained."""
    torch.manual_seed(cfg("kd")["seed"])
    model = build_arch("resnet8", teacher.num_classes, teacher.input.channels)
    return save_card(tmp_path / "untrained" / "student.yaml", "resnet8", teacher.num_classes, teacher.input,
                     model.state_dict(), classes=teacher.classes)


@pytest.mark.slow
def test_select_then_kd_closes_most_of_the_gap_from_an_untrained_student_to_the_teacher(tmp_path, digits_folders,
                                                                                         digits_teacher):
    train, test = digits_folders
    teacher = load_card(digits_teacher)
    pool = wild_pool(tmp_path / "pool", train)
    sel = select_pool(teacher, pool, tmp_path / "select", num_images=900, workers=0, device="cpu")
    result = distill(teacher, "resnet8", [sel.files["selected"]], tmp_path / "student", cfg("kd"),
                     workers=0, device="cpu")
    student = load_card(result.card)
    assert student.classes == teacher.classes and student.input == teacher.input
    assert set(result.last) >= {"loss", "kd", "lr", "images_per_s"}
    before, after, goal = top1(untrained_student(tmp_path, teacher), test), top1(result.card, test), teacher.accuracy
    assert goal - before > 0.5  # (the fixture's teacher is far above chance)
    assert (after - before) / (goal - before) > 0.8, f"untrained {before:.3f}, KD student {after:.3f}, teacher {goal:.3f}"


def underconfident_teacher(tmp_path: Path, teacher) -> Path:
    """The teacher with its logits divided by 8: the same argmax, so the same accuracies (copied into
    its card), but soft targets at T=4 so flat that KD alone teaches little in a few epochs."""
    state = read_state_dict(teacher.weights)
    state["fc.weight"], state["fc.bias"] = state["fc.weight"] / 8, state["fc.bias"] / 8
    return save_card(tmp_path / "soft" / "teacher.yaml", teacher.arch, teacher.num_classes, teacher.input, state,
                     classes=teacher.classes, accuracy=teacher.accuracy, class_accuracy=teacher.class_accuracy)


@pytest.mark.slow
def test_noisy_nll_term_teaches_what_kd_alone_does_not_from_an_underconfident_teacher(tmp_path, digits_folders,
                                                                                      digits_teacher):
    """DFND = KD + λ·NLL(softmax(z_S)·Q, argmax teacher). Baseline: the same run with λ = 0 (KD alone)."""
    train, test = digits_folders
    soft = underconfident_teacher(tmp_path, load_card(digits_teacher))
    teacher_top1 = top1(soft, test)
    assert teacher_top1 == pytest.approx(load_card(digits_teacher).accuracy)  # only the confidence changed
    data = [str(train)]
    noisy = distill(load_card(soft), "resnet8", data, tmp_path / "noisy", cfg("noisy", epochs=3),
                    workers=0, device="cpu")
    kd_only = distill(load_card(soft), "resnet8", data, tmp_path / "kd_only",
                      cfg("noisy", epochs=3, objective={"lambda": 0.0}), workers=0, device="cpu")
    assert noisy.steps == kd_only.steps and "from card class_accuracy" in noisy.description
    assert {"kd", "noisy_nll"} <= set(noisy.last)
    with_nll, without = top1(noisy.card, test), top1(kd_only.card, test)
    assert with_nll > without + 0.25, f"noisy {with_nll:.3f}, λ=0 {without:.3f}, teacher {teacher_top1:.3f}"
    assert with_nll > 0.8 * teacher_top1


@pytest.mark.slow
def test_robust_class_weights_lift_the_classes_rare_in_the_data_over_plain_kd(tmp_path, digits_folders,
                                                                             digits_teacher):
    """PU's robust KD weights each sample by 1/(teacher's soft count of its class). Baseline: plain KD
    at the same temperature (T=1), same steps and data, where digits 5-9 are 10 images each against
    all ~140 of digits 0-4."""
    train, test = digits_folders
    teacher = load_card(digits_teacher)
    rare = [str(c) for c in range(5, 10)]
    paths = [p for c in sorted(train.iterdir()) for p in sorted(c.glob("*.png"))[:10 if c.name in rare else None]]
    write_index(tmp_path / "imbalanced.tsv", [{"path": str(p)} for p in paths], ["path"])
    data = [tmp_path / "imbalanced.tsv"]
    robust = distill(teacher, "resnet8", data, tmp_path / "robust", cfg("robust", epochs=20), workers=0, device="cpu")
    plain = distill(teacher, "resnet8", data, tmp_path / "plain", cfg("kd", epochs=20, objective={"temperature": 1.0}),
                    workers=0, device="cpu")
    assert robust.steps == plain.steps and "worst_index" in robust.last
    counts = json.loads((tmp_path / "robust" / "class_counts.json").read_text())
    assert counts["images"] == len(paths)
    assert set(sorted(range(10), key=lambda k: counts["class_counts"][k])[:5]) == {5, 6, 7, 8, 9}  # the weights' input
    r, p = class_accuracy(robust.card, test), class_accuracy(plain.card, test)
    gain = np.mean(r[5:]) - np.mean(p[5:])
    assert gain > 0.07, f"rare digits: robust {np.mean(r[5:]):.3f}, plain KD {np.mean(p[5:]):.3f}"
    assert np.mean(r) > np.mean(p), f"mean class accuracy: robust {np.mean(r):.3f}, plain KD {np.mean(p):.3f}"


@pytest.mark.slow
def test_images_the_teacher_outputs_nan_on_are_skipped_and_recorded(tmp_path, digits_folders, digits_teacher):
    """Before: a misleading "loss became nan ... lower --lr"; now those images are left out, as in select."""
    from dfkd.cards import load_model

    class HalfNaN(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x)
            bright = x.mean(dim=(1, 2, 3)) > 0.1
            return torch.where(bright[:, None], torch.full_like(out, float("nan")), out)

    card = load_card(digits_teacher)
    script = tmp_path / "nan.ts"
    torch.jit.trace(HalfNaN(load_model(card)), torch.zeros(2, 1, 16, 16)).save(str(script))
    nan_card = load_card(script, {"size": 16, "channels": 1, "mean": card.input.mean, "std": card.input.std})
    res = distill(nan_card, "resnet8", [str(digits_folders[1])], tmp_path / "run", cfg("kd", steps=4),
                  workers=0, device="cpu")
    skipped = read_index(tmp_path / "run" / "skipped.tsv").rows
    assert 0 < len(skipped) == res.skipped < 397 and res.images == 397 - len(skipped)
    assert all("not finite" in r["reason"] for r in skipped) and res.steps == 4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["noisy", "robust"])
def test_interrupted_distill_resumes_to_identical_weights(tmp_path, digits_folders, digits_teacher, method):
    teacher = load_card(digits_teacher)
    data = [str(digits_folders[1])]  # any images will do
    c = cfg(method, epochs=3, checkpoint_every=3)
    distill(teacher, "resnet8", data, tmp_path / "whole", c, workers=0, device="cpu")
    cut = distill(teacher, "resnet8", data, tmp_path / "cut", c, workers=0, device="cpu", stop_after=4)
    assert cut.steps == 4
    again = distill(teacher, "resnet8", data, tmp_path / "cut", c, workers=0, device="cpu")
    assert again.resumed_from == 4 and again.steps == 18
    a = torch.load(tmp_path / "whole" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "student.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if method == "noisy":
        ca = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)["objective"]
        cb = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)["objective"]
        assert torch.equal(ca["base.theta"], cb["base.theta"]) and ca["base.theta"].abs().sum() > 0  # θ learned, resumed
    if method == "robust":  # a finished run again keeps its card as eval --write-card left it
        update_card(tmp_path / "cut" / "student.yaml", accuracy=0.5)
        done = distill(teacher, "resnet8", data, tmp_path / "cut", c, workers=0, device="cpu")
        assert done.resumed_from == done.steps == 18 and load_card(done.card).accuracy == 0.5


@pytest.mark.slow
def test_resume_with_other_inputs_is_refused_unless_overwrite(tmp_path, digits_folders, digits_teacher):
    teacher = load_card(digits_teacher)
    train, test = str(digits_folders[0]), str(digits_folders[1])
    run = tmp_path / "run"
    distill(teacher, "resnet8", [test], run, cfg("kd", epochs=2), workers=0, device="cpu", stop_after=2)
    with pytest.raises(DfkdError, match=r"holds a run with other inputs \(config\.lr\)"):
        distill(teacher, "resnet8", [test], run, cfg("kd", epochs=2, lr=0.2), workers=0, device="cpu")
    with pytest.raises(DfkdError, match=r"holds a run with other inputs \(data\)"):  # was: "resumed", old student kept
        distill(teacher, "resnet8", [train], run, cfg("kd", epochs=2), workers=0, device="cpu")
    with pytest.raises(DfkdError, match=r"holds a run with other inputs \(student\)"):  # was: a state_dict traceback
        distill(teacher, "resnet14", [test], run, cfg("kd", epochs=2), workers=0, device="cpu")
    with pytest.raises(DfkdError, match="holds a run of dfkd distill, which --overwrite does not clear"):
        select_pool(teacher, test, run, num_images=5, workers=0, device="cpu", overwrite=True)
    fresh = distill(teacher, "resnet8", [train], run, cfg("kd", steps=3), workers=0, device="cpu", overwrite=True)
    assert fresh.resumed_from == 0 and fresh.steps == 3 and fresh.images == 1400
    again = distill(teacher, "resnet8", [train], run, cfg("kd", steps=3), workers=0, device="cpu")
    assert again.resumed_from == 3  # same inputs: a resume (here of a finished run)


def test_config_layers_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: robust\nlr: 0.2\nobjective: {eps: 0.3, M: 2}\n")
    c = resolve_config(default_config(), f, ["objective.M=4", "epochs=7"], {"lr": 0.05})
    assert (c["method"], c["lr"], c["epochs"], c["objective"]) == ("robust", 0.05, 7, {"eps": 0.3, "M": 4})
    with pytest.raises(DfkdError, match="unknown config key 'epoch'"):
        resolve_config(default_config(), sets=["epoch=3"])
    f.write_text("- a list\n")
    with pytest.raises(DfkdError, match="expected a mapping"):
        resolve_config(default_config(), f)


@pytest.mark.slow
def test_cli_distill_then_student_is_a_teacher_and_exports(tmp_path, digits_folders, digits_teacher):
    train, test = digits_folders
    runner = CliRunner()
    res = runner.invoke(app, ["distill", "--teacher", str(digits_teacher), "--student", "resnet8", "--data",
                              str(test), "--out", str(tmp_path / "s"), "--method", "noisy", "--steps", "4",
                              "--batch-size", "32", "--workers", "0", "--no-amp", "--eval-data", str(test),
                              "--set", "objective.lambda=0.5", "--temperature", "2"])
    assert res.exit_code == 0, res.output
    card = Path(res.stdout.strip())
    assert "from card class_accuracy" in res.stderr and "best val top-1" in res.stderr
    assert (tmp_path / "s" / "checkpoints" / "best.pt").is_file()
    res = runner.invoke(app, ["distill", "--teacher", str(card), "--student", "resnet8", "--data", str(test),
                              "--out", str(tmp_path / "s2"), "--method", "kd", "--steps", "2", "--workers", "0"])
    assert res.exit_code == 0, res.output  # a student card serves as a teacher
    res = runner.invoke(app, ["distill", "--teacher", str(card), "--student", "resnet8", "--data", str(test),
                              "--out", str(tmp_path / "s3"), "--method", "noisy", "--steps", "2"])
    assert res.exit_code == 2 and "objective.accuracy" in res.stderr  # no accuracy in a fresh card
    res = runner.invoke(app, ["export", "--model", str(card), "--out", str(tmp_path / "s.ts")])
    assert res.exit_code == 0, res.output
    ts = torch.jit.load(str(tmp_path / "s.ts"))
    assert ts(torch.zeros(2, 1, 16, 16)).shape == (2, 10)
    assert "max |difference|" in res.stderr
    assert load_card(tmp_path / "s.ts").input == load_card(card).input  # the exported file says how to feed it
    res = runner.invoke(app, ["eval", "--model", str(tmp_path / "s.ts"), "--data", str(test)])
    assert res.exit_code == 0, res.output


def test_export_onnx_matches(tmp_path, random_teacher):
    pytest.importorskip("onnxruntime")
    from dfkd.export import export_model

    result = export_model(load_card(random_teacher), "onnx", tmp_path / "t.onnx")
    assert result.max_abs_diff < 1e-3


def second_teacher(tmp_path: Path, digits_teacher: Path) -> Path:
    """The digits teacher again, but fed 20×20 RGB: an ensemble member with another input."""
    import yaml

    data = yaml.safe_load(digits_teacher.read_text())
    data["weights"] = str(digits_teacher.with_suffix(".pt"))
    data["input"]["size"] = [20, 20]
    path = tmp_path / "t2.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_ensemble_with_align_and_correlation_distills_and_selects(tmp_path, digits_folders, digits_teacher):
    train, test = digits_folders
    t1, t2 = load_card(digits_teacher), load_card(second_teacher(tmp_path, digits_teacher))
    c = cfg("noisy", steps=6, align={"weight": 10.0, "hidden": 32}, correlation={"weight": 20.0, "tau": 0.5},
            discriminator={"weight": 0.5, "hidden": 16, "lr": 1e-4})
    r = distill([t1, t2], "resnet8", [str(test)], tmp_path / "s", c, workers=0, device="cpu")
    assert {"align", "correlation", "disc", "fool", "noisy_nll"} <= set(r.last)
    assert "align ×10" in r.description
    sel = select_pool([t1, t2], test, tmp_path / "sel", num_images=50, workers=0, device="cpu")
    single = select_pool(t1, test, tmp_path / "sel1", num_images=50, workers=0, device="cpu")
    assert sel.selected == 50 and sel.score_quantiles != single.score_quantiles


def test_feature_terms_refuse_a_torchscript_teacher(tmp_path, pattern_folder, random_teacher):
    from dfkd.cards import load_model

    model = load_model(load_card(random_teacher))
    ts = tmp_path / "t.ts"
    torch.jit.trace(model, torch.zeros(1, 1, 16, 16)).save(str(ts))
    card = load_card(ts, {"size": 16, "channels": 1, "mean": [0.5], "std": [0.5]})
    with pytest.raises(DfkdError, match="TorchScript: its features cannot be read"):
        distill(card, "resnet8", [str(pattern_folder)], tmp_path / "s",
                cfg("kd", steps=2, align={"weight": 1.0, "hidden": 8}), workers=0, device="cpu")


@pytest.mark.slow
def test_the_readme_python_api_example_runs(tmp_path, digits_folders, digits_teacher):
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    train, test = digits_folders
    for old, new in (("runs/demo/teacher/model.yaml", str(digits_teacher)), ("data/demo/wild", str(test)),
                     ("data/demo/test", str(test)), ("runs/api", str(tmp_path / "api")), ("num_images=2000", "num_images=300"),
                     ("epochs=5", "epochs=2")):
        assert old in code, old
        code = code.replace(old, new)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "api" / "student" / "student.yaml").is_file()
    assert len(read_index(tmp_path / "api" / "select" / "selected.tsv")) == 300


def test_a_run_recorded_before_a_config_key_existed_still_resumes(tmp_path, pattern_folder, random_teacher):
    """online.policy came after 0.2.0, whose online selection was global: a run.json without the
    key is the same run as one with policy global, and as any run without online selection."""
    teacher, data = load_card(random_teacher), str(pattern_folder)
    base = cfg("kd", steps=4, batch_size=8)

    def old_run(name: str, online: dict):
        run = tmp_path / name
        # one path, not a list (the API used to read each character of the path as a --data)
        distill(teacher, "resnet8", data, run, {**base, "online": online}, workers=0, device="cpu", stop_after=2)
        record = json.loads((run / "run.json").read_text())
        del record["inputs"]["config"]["online"]["policy"]  # as 0.2.0 wrote it
        (run / "run.json").write_text(json.dumps(record))
        return run

    run = old_run("whole", {"keep": 1.0})  # no online selection: today's default policy trains the same
    assert distill(teacher, "resnet8", [data], run, base, workers=0, device="cpu").resumed_from == 2
    run = old_run("online", {"keep": 0.5, "policy": "global"})
    with pytest.raises(DfkdError, match=r"other inputs \(config\.online\.policy\)"):  # default: per-class
        distill(teacher, "resnet8", [data], run, {**base, "online": {"keep": 0.5}}, workers=0, device="cpu")
    again = distill(teacher, "resnet8", [data], run, {**base, "online": {"keep": 0.5, "policy": "global"}},
                    workers=0, device="cpu")
    assert again.resumed_from == 2 and again.steps == 4
