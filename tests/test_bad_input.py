"""Bad flags, configs and outputs: one line on stderr naming the flag or file, exit 2, never a
traceback (the fault-injection cases of the reliability issue), run as a user runs them."""
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dfkd.cli import app
from dfkd.train.record import _truncate_metrics


@pytest.fixture
def env(tmp_path, pattern_folder, random_teacher):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    import torch

    from dfkd.cards import load_card, load_model

    ts = tmp_path / "teacher.ts"  # a 1-channel 16x16 model, given without its input flags
    torch.jit.trace(load_model(load_card(random_teacher)), torch.zeros(1, 1, 16, 16)).save(str(ts))
    (tmp_path / "noweights.yaml").write_text("arch: resnet8\nnum_classes: 3\n"
                                             "input: {size: 16, channels: 1, mean: [0.5], std: [0.5]}\n")
    return {"TS": str(ts), "NW": str(tmp_path / "noweights.yaml"), "T": str(random_teacher),
            "P": str(pattern_folder), "O": str(tmp_path / "out"),
            "F": str(tmp_path / "afile"), "B": str(tmp_path / "binary.yaml"), "D": str(tmp_path)}


CASES = [
    ("select --teacher {T} --pool {P} --out {O} --max-score -1", "--max-score -1"),  # --max-noise: test_cli_usage
    ("select --teacher {T} --pool {P} --out {O} --batch-size 0", "--batch-size 0"),
    ("select --teacher {T} --pool {P} --out {O} --workers -1", "--workers -1"),
    ("select --teacher {T} --pool {P} --out {F}", "is a file"),
    ("select --teacher {T} --pool {P} --out {F}/run", "cannot write there"),  # unwritable (root ignores modes)
    ("select --teacher {T} --pool {P} --out {O} --shard 3/2", "--shard 3/2"),
    ("train --arch resnet8 --data {P} --out {O} --steps 0", "--steps 0"),
    ("train --arch resnet8 --data {P} --out {O} --steps -3", "--steps -3"),
    ("train --arch resnet8 --data {P} --out {O} --set lr=abc", "lr='abc'"),
    ("train --arch resnet8 --data {P} --out {O} --set batch_size=big", "batch_size='big'"),
    ("train --arch resnet8 --data {P} --out {O} --set epochs=[1,2]", "epochs=[1, 2]"),
    ("train --arch resnet8 --data {P} --out {O} --config {B}", "--config"),
    ("train --arch resnet8 --data {P} --out {O} --channels 2", "--channels 2"),
    ("train --arch resnet8 --data {P} --out {O} --size 0", "--size 0"),
    ("train --arch resnet8 --data {P} --out {O} --batch-size 0", "--batch-size 0"),
    ("pu-train --teacher {T} --positive {P} --unlabeled {P} --out {O} --prior 0.5 --reduction 0", "--reduction 0"),
    ("export --model {T} --out {D}", "is a directory"),
    ("expand --pu {T} --positive {P} --unlabeled {P} --out {O} --threshold nan", "--threshold nan"),
    ("expand --pu {T} --positive {P} --unlabeled {P} --out {O} --threshold nan --num-images 5", "--threshold nan"),
    ("eval --model {TS} --data {P}", "no size, mean, std given, and dfkd assumes none; a bare TorchScript file"),
    ("eval --model {TS} --data {P} --input-size 32 --input-channels 3 --input-mean 0.5,0.5,0.5 --input-std 1,1,1",
     "does not take a 1x3x32x32 input"),
    ("eval --model {TS} --data {P} --input-size 16 --input-channels 1 --input-mean x --input-std 1",
     "--input-mean 'x'"),
    ("distill --teacher {T} --student resnet8 --data {P} --out {O}", "--data LABELED_IMAGES --write-card`"),
    ("select --teacher {NW} --pool {P} --out {O}", "has no 'weights', so the model would be randomly"),
    ("select --teacher {T} --pool {P} --out {O} --near-duplicate 2", "--near-duplicate 2"),
    ("expand --pu {T} --positive {P} --unlabeled {P} --out {O} --dedup fuzzy", "--dedup 'fuzzy'"),
    ("distill --teacher {T} --student resnet8 --data {P} --out {O} --method kd --set objective.temperature=-3",
     "objective.temperature=-3"),
    ("distill --teacher {T} --student resnet8 --data {P} --out {O} --method kd --set online.keep=3", "online.keep=3"),
    ("distill --teacher {T} --student resnet8 --data {P} --out {O} --method kd --set online.policy=diverse",
     "online.policy='diverse'"),
    ("eval --model {TS} --data {P} --input-size 16 --input-channels 1 --input-mean 0.5 --input-std nan",
     "--input-std 'nan'"),
    ("distill --teacher {T} --student resnet8 --data {P} --out {O} --method magic", "--method 'magic'"),
    ("expand --pu {D}/nope.yaml --positive {P} --unlabeled {P} --out {O}", "--pu "),
    ("distill --teacher {T} --student resnet8 --data {P} --out {O} --method kd --eval-data {D}/nowhere",
     "--eval-data"),
    # a run's files inside a folder it reads would be images of that folder next time
    ("select --teacher {T} --pool {P} --out {P}/run", "is inside --pool"),
    ("distill --teacher {T} --student resnet8 --data {P} --out {P}/run --method kd", "is inside --data"),
    ("train --arch resnet8 --data {P} --out {P}", "is inside --data"),
    ("eval --model {T} --data {P} --out {P}/eval", "is inside --data"),
    ("pu-train --teacher {T} --positive {P} --unlabeled {D} --out {O} --prior 0.5", "is inside --unlabeled"),
]
AFTER_SCORING = {"--max-score -1"}  # the pool's scores are kept: another --max-score reuses them
ONE_LINE = {"distill", "expand", "train", "pu-train"}  # checked before anything else is printed (the config table)


@pytest.mark.parametrize("args,fragment", CASES, ids=[c[0].split(" --out")[0][:40] + c[1] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(env, args, fragment):
    res = CliRunner().invoke(app, args.format(**env).split())
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert fragment in lines[-1] and len([ln for ln in lines if "error" in ln]) == 1, res.stderr
    if args.split()[0] in ONE_LINE:
        assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.output
    if "{O}" in args and fragment not in AFTER_SCORING:  # no --out left behind holding only the lock (it was)
        assert not Path(env["O"]).exists(), sorted(p.name for p in Path(env["O"]).iterdir())


def test_label_beyond_the_classes_is_refused(tmp_path, pattern_folder):
    rows = [f"{p}\t{0 if i % 2 else 42}" for i, p in enumerate(sorted(pattern_folder.rglob("*.png")))]
    (tmp_path / "idx.tsv").write_text("path\tlabel\n" + "\n".join(rows) + "\n")
    res = CliRunner().invoke(app, ["train", "--arch", "resnet8", "--data", str(tmp_path / "idx.tsv"),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "label 42 leaves class(es) 1, 2, 3" in res.stderr


def test_a_torn_metrics_line_is_dropped(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n" + '{"step": 3, "lo')
    _truncate_metrics(m, 5)
    assert [json.loads(ln)["step"] for ln in m.read_text().splitlines()] == [1, 2]


def test_stale_temporary_files_of_a_killed_write_are_removed(tmp_path, pattern_folder, random_teacher):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    stale = [out / ".scores.tsv.abc123.tmp", out / "checkpoints" / ".last.pt.xyz.tmp"]
    for f in stale:
        f.write_bytes(b"half")
    res = CliRunner().invoke(app, ["select", "--teacher", str(random_teacher), "--pool", str(pattern_folder),
                                   "--out", str(out), "--num-images", "3", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert not any(f.exists() for f in stale)
