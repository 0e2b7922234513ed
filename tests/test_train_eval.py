import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dfkd.cards import load_card, load_model, update_card
from dfkd.cli import app
from dfkd.evaluate import evaluate
from dfkd.train.classifier import train_classifier
from dfkd.train.loop import LoopConfig
from dfkd.train.schedule import model_lr


def small_cfg(**kw) -> LoopConfig:
    base = dict(epochs=4, batch_size=64, lr=0.05, augment="crop", pad=2, log_every=10, amp=False)
    base.update(kw)
    return LoopConfig(**base)


@pytest.mark.slow
def test_train_then_eval_on_real_digits(tmp_path: Path, digits_folders):
    train, test = digits_folders
    result = train_classifier("resnet8", train, tmp_path / "run", small_cfg(), workers=0, device="cpu")
    card = load_card(result.card)
    assert card.classes == [str(i) for i in range(10)] and card.input.channels == 1
    assert result.val_top1 > 0.6  # 10 classes: chance is 0.1
    res = evaluate(card, test, workers=0, device="cpu")
    assert res.num_images == 397 and res.top1 > 0.6 and res.top5 >= res.top1
    assert sum(map(sum, res.confusion)) == 397
    assert res.top1 == sum(res.confusion[i][i] for i in range(10)) / 397  # exactly: no float32 digits in eval.json
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == result.steps and "val_top1" in records[-1] and "lr" in records[0]

def same_weights(a: Path, b: Path) -> bool:
    """The two runs' model.pt hold the same tensors, bit for bit."""
    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)



def test_interrupted_training_resumes_to_the_same_weights(tmp_path: Path, pattern_folder: Path):
    cfg = small_cfg(epochs=3, batch_size=4, checkpoint_every=2, augment="crop-flip")
    whole = train_classifier("resnet8", pattern_folder, tmp_path / "whole", cfg, val_split=0.2,
                             workers=0, device="cpu")
    part = train_classifier("resnet8", pattern_folder, tmp_path / "cut", cfg, val_split=0.2, workers=0,
                            device="cpu", stop_after=5)
    assert part.steps == 5
    again = train_classifier("resnet8", pattern_folder, tmp_path / "cut", cfg, val_split=0.2, workers=0,
                             device="cpu")
    assert again.resumed_from == 5 and again.steps == whole.steps == 9
    assert same_weights(tmp_path / "whole", tmp_path / "cut")
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no step logged twice after the resume
    update_card(tmp_path / "cut" / "model.yaml", accuracy=0.5)  # as eval --write-card does
    done = train_classifier("resnet8", pattern_folder, tmp_path / "cut", cfg, val_split=0.2, workers=0, device="cpu")
    assert done.resumed_from == done.steps == 9
    assert yaml.safe_load((tmp_path / "cut" / "model.yaml").read_text())["accuracy"] == 0.5  # not written over


def test_a_checkpoint_from_before_the_lr_schedulers_resumes_to_the_same_weights(tmp_path: Path, pattern_folder: Path):
    cfg = small_cfg(epochs=3, batch_size=4, checkpoint_every=2, schedule="cosine", lr=0.1)
    whole = train_classifier("resnet8", pattern_folder, tmp_path / "whole", cfg, val_split=0.2,
                             workers=0, device="cpu")
    train_classifier("resnet8", pattern_folder, tmp_path / "cut", cfg, val_split=0.2, workers=0,
                     device="cpu", stop_after=5)
    last = tmp_path / "cut" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    assert state["step"] == 5 and [s["last_epoch"] for s in state["schedulers"]] == [5]
    del state["schedulers"]  # as the loop wrote it before: the lr of the last step trained, no initial_lr
    (group,) = state["optimizer"]["param_groups"]
    del group["initial_lr"]
    group["lr"] = cfg.lr * (model_lr(cfg, 4, whole.steps) / cfg.lr)
    torch.save(state, last)
    again = train_classifier("resnet8", pattern_folder, tmp_path / "cut", cfg, val_split=0.2, workers=0,
                             device="cpu")
    assert again.resumed_from == 5 and again.steps == whole.steps == 9
    assert same_weights(tmp_path / "whole", tmp_path / "cut")
    lrs = [[json.loads(x)["lr"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
           for run in ("whole", "cut")]
    assert lrs[0] == lrs[1] and len(set(lrs[0])) > 1


@pytest.mark.slow
def test_cli_train_eval_write_card(tmp_path: Path, digits_folders):
    train, test = digits_folders
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--arch", "resnet8", "--data", str(train), "--out", str(tmp_path / "t"),
                              "--steps", "30", "--batch-size", "64", "--no-amp", "--workers", "0",
                              "--set", "augment=crop", "--set", "lr=0.05"])
    assert res.exit_code == 0, res.output
    card_path = Path(res.stdout.strip())
    assert card_path == tmp_path / "t" / "model.yaml"
    res = runner.invoke(app, ["eval", "--model", str(card_path), "--data", str(test), "--write-card",
                              "--workers", "0", "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "e" / "eval.json").read_text())
    card = yaml.safe_load(card_path.read_text())
    assert card["accuracy"] == pytest.approx(saved["top1"], abs=1e-6)
    assert len(card["class_accuracy"]) == 10 and "top-1" in res.stderr
    bad = runner.invoke(app, ["train", "--arch", "resnet8", "--data", str(train), "--out", str(tmp_path / "x"),
                              "--set", "learning_rate=1"])
    assert bad.exit_code == 2 and "unknown config key 'learning_rate'" in bad.stderr


def test_eval_rejects_a_teacher_with_the_wrong_class_count(tmp_path: Path, random_teacher: Path, digits_folders):
    res = CliRunner().invoke(app, ["eval", "--model", str(random_teacher), "--data", str(digits_folders[1])])
    assert res.exit_code == 2 and "are not classes of the model" in res.stderr


def test_diverging_training_stops_with_a_clear_error_and_keeps_no_nan_checkpoint(tmp_path, pattern_folder):
    from dfkd.errors import DfkdError

    cfg = small_cfg(epochs=20, batch_size=4, lr=1e12, log_every=1, checkpoint_every=1)
    with pytest.raises(DfkdError, match="lower --lr"):
        train_classifier("resnet8", pattern_folder, tmp_path / "run", cfg, val_split=0.2, workers=0, device="cpu")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_tensorboard_logs_the_metrics_and_a_resume_drops_the_redone_steps(tmp_path: Path, pattern_folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from typer.testing import CliRunner

    from dfkd.cli import app

    out = tmp_path / "run"
    cfg = LoopConfig(steps=6, batch_size=8, log_every=1)
    train_classifier("resnet8", pattern_folder, out, cfg, val_split=0, workers=0, device="cpu", stop_after=3,
                     tensorboard=True)  # interrupted after step 3 ...
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + json.dumps({"step": 4}) + "\n")
    args = ["train", "--arch", "resnet8", "--data", str(pattern_folder), "--out", str(out), "--steps", "6",
            "--batch-size", "8", "--workers", "0", "--val-split", "0", "--set", "log_every=1", "--tensorboard"]
    res = CliRunner().invoke(app, args)  # ... and resumed from the command line
    assert res.exit_code == 0, res.output
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    logged = [json.loads(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(logged, rel=1e-6)
    assert yaml.safe_load((out / "config.yaml").read_text())["steps"] == 6  # the resolved config, as distill


def test_train_resumes_only_with_the_same_config_and_names_the_key(tmp_path: Path, pattern_folder: Path):
    runner = CliRunner()
    base = ["train", "--arch", "resnet8", "--data", str(pattern_folder), "--out", str(tmp_path / "run"),
            "--steps", "2", "--batch-size", "4", "--workers", "0", "--no-amp"]
    assert runner.invoke(app, base).exit_code == 0
    res = runner.invoke(app, [*base, "--lr", "0.05"])
    assert res.exit_code == 2 and "other inputs (config.lr)" in res.stderr, res.output
    res = runner.invoke(app, [*base, "--set", "schedule=multistep"])
    assert res.exit_code == 2 and "config.schedule" in res.stderr
    again = runner.invoke(app, base)  # the same config: the finished run is found, nothing retrained
    assert again.exit_code == 0 and "resumed from step" in again.stderr
