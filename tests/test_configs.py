"""Every shipped pipelines/configs/*.yaml goes through the CLI's config layering and trains a few
steps for real: pu-train-*.yaml with `dfkd pu-train`, the others with `dfkd distill`."""
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dfkd.cards import load_card, update_card
from dfkd.cli import app
from dfkd.config import COMMANDS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "pipelines" / "configs").glob("*.yaml"))


def flat(d: dict, prefix: str = "") -> dict:
    """{"objective": {"T": 4}} -> {"objective.T": 4}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_the_configs_are_found_and_both_commands_have_some():
    names = [p.name for p in CONFIGS]
    assert any(n.startswith("pu-train-") for n in names) and any(not n.startswith("pu-train-") for n in names)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_runs_two_steps_and_its_values_are_saved(config, tmp_path, pattern_folder, random_teacher):
    update_card(random_teacher, accuracy=0.8)  # noisy's Q needs the teacher's accuracy
    out = tmp_path / "out"
    common = ["--config", str(config), "--teacher", str(random_teacher), "--out", str(out), "--steps", "2",
              "--workers", "0", "--no-amp"]
    if config.name.startswith("pu-train-"):
        args = ["pu-train", *common, "--positive", str(pattern_folder / "bars_h"), "--unlabeled", str(pattern_folder),
                "--prior", "0.3"]
        card = out / "pu.yaml"
    else:
        args = ["distill", *common, "--student", "resnet8", "--data", str(pattern_folder)]
        card = out / "student.yaml"
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(card)
    assert load_card(card).num_classes == 3
    command = "pu-train" if config.name.startswith("pu-train-") else "distill"
    given = flat({k: v for k, v in yaml.safe_load(config.read_text()).items()  # other commands' sections aside
                  if k not in COMMANDS or k == command})
    saved = flat(yaml.safe_load((out / "config.yaml").read_text()))
    assert saved["steps"] == 2  # the flag over the file
    for key, value in given.items():
        if key != "steps":
            assert key in saved and saved[key] == value, (key, value, saved.get(key))
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert steps[-1] == 2
    if config.name.startswith("pu-train-"):
        assert saved["nnpu.prior"] == 0.3
