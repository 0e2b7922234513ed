"""One command lifecycle (issue 22): every command declares its inputs, config and outputs, and
one place (dfkd.lifecycle) runs them: config layers for every command, rank-0 writes, every rank
gets the result, an error on one rank ends every rank with one line."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dfkd.cli import app
from dfkd.config import resolve, resolve_config
from dfkd.distill.run import default_config
from dfkd.errors import DfkdError
from dfkd.index import read_index
from dfkd.pu.expand import ExpandConfig
from dfkd.select import SelectConfig, select_pool

from test_distributed import ENV, torchrun

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "pipelines" / "configs"
runner = CliRunner()


def test_a_recipe_file_gives_each_command_its_section():
    """dfnd-reference.yaml says `policy: global` as data: select reads its section, distill the rest."""
    assert resolve(SelectConfig, CONFIGS / "dfnd-reference.yaml", command="select").policy == "global"
    distill = resolve_config(default_config(), CONFIGS / "dfnd-reference.yaml", command="distill")
    assert distill["steps"] == 80000 and "select" not in distill


def test_config_layers_are_the_same_for_select_and_expand(tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump({"select": {"num_images": 7, "policy": "global"}, "expand": {"threshold": 0.5}}))
    cfg = resolve(SelectConfig, f, ["num_images=9"], {"policy": None, "dedup": "exact"}, command="select")
    assert (cfg.num_images, cfg.policy, cfg.dedup) == (9, "global", "exact")  # file < --set < flags; None: not given
    assert resolve(ExpandConfig, f, command="expand").threshold == 0.5
    flat = tmp_path / "flat.yaml"  # no select: section: its keys are select's, and threshold is not one
    flat.write_text("threshold: 1\n")
    with pytest.raises(DfkdError, match=r"^--config .*flat.yaml: unknown config key 'threshold'"):
        resolve(SelectConfig, flat, command="select")
    with pytest.raises(DfkdError, match=r"^num: unknown config key 'num'"):  # the API names its keyword
        resolve(SelectConfig, None, flags={"num": 3}, command="select", api=True)


def test_select_reads_config_and_flags_win(tmp_path, pattern_folder, random_teacher):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("select:\n  policy: global\n  num_images: 5\n  dedup: 'off'\n")
    out = tmp_path / "sel"
    r = runner.invoke(app, ["select", "--teacher", str(random_teacher), "--pool", str(pattern_folder), "--out",
                            str(out), "--config", str(recipe), "--device", "cpu", "--workers", "0"])
    assert r.exit_code == 0, r.output
    options = json.loads((out / "manifest.json").read_text())["options"]
    assert (options["policy"], options["num"], options["dedup"]) == ("global", 5, "off")
    assert len(read_index(out / "selected.tsv")) == 5
    out2 = tmp_path / "sel2"
    r = runner.invoke(app, ["select", "--teacher", str(random_teacher), "--pool", str(pattern_folder), "--out",
                            str(out2), "--config", str(recipe), "--per-class", "--num-images", "6", "--device", "cpu",
                            "--workers", "0"])
    assert r.exit_code == 0, r.output
    options = json.loads((out2 / "manifest.json").read_text())["options"]
    assert (options["policy"], options["num"]) == ("per-class", 6)


def test_the_api_takes_a_dict_or_a_file_as_config(tmp_path, pattern_folder, random_teacher):
    a = select_pool(str(random_teacher), pattern_folder, tmp_path / "a", {"num_images": 4, "policy": "global"},
                    workers=0, device="cpu")
    f = tmp_path / "s.yaml"
    f.write_text("num_images: 4\npolicy: global\n")
    b = select_pool(random_teacher, pattern_folder, tmp_path / "b", f, workers=0, device="cpu")
    assert a.selected == b.selected == 4
    assert (tmp_path / "a" / "selected.tsv").read_text() == (tmp_path / "b" / "selected.tsv").read_text()


COMMAND_MODULES = ["dfkd/select/run.py", "dfkd/pu/expand.py", "dfkd/pu/train.py", "dfkd/distill/run.py",
                   "dfkd/train/classifier.py", "dfkd/evaluate.py", "dfkd/cli.py"]


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_no_command_builds_its_own_run_directory_or_asks_its_rank(module):
    """run.json, the manifest and the rank question belong to dfkd.lifecycle: a command that opens
    its run, writes a manifest or asks ``ranks.main`` itself has left the one lifecycle."""
    tree = ast.parse((ROOT / module).read_text(encoding="utf-8"))
    names = {n.attr if isinstance(n, ast.Attribute) else n.id for n in ast.walk(tree)
             if isinstance(n, (ast.Attribute, ast.Name))}
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not ({"open_run", "write_manifest", "RunDir"} & (names | imported)), module
    assert "main" not in {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                          and isinstance(n.value, ast.Attribute) and n.value.attr == "ranks"}, module


def test_eval_writes_its_run_through_the_lifecycle(tmp_path, pattern_folder, random_teacher):
    from dfkd.evaluate import evaluate

    shutil.copytree(pattern_folder, pattern_folder.parent / "other")
    (pattern_folder.parent / "other" / "blob" / "000.png").unlink()
    r = evaluate(random_teacher, pattern_folder, tmp_path / "ev", workers=0, device="cpu")
    manifest = json.loads((tmp_path / "ev" / "manifest.json").read_text())
    assert manifest["command"] == "eval" and manifest["summary"]["top1"] == r.top1
    assert set(manifest["inputs"]) == {"model", "model_weights", "data"}
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["top1"] == r.top1
    with pytest.raises(DfkdError, match="holds a run with other inputs"):
        evaluate(random_teacher, pattern_folder.parent / "other", tmp_path / "ev", workers=0, device="cpu")


SCRIPT = """
import sys
from dfkd.select import select_pool
from dfkd.dist import join
r = select_pool(sys.argv[1], sys.argv[2], sys.argv[3], num_images=5, workers=0, device="cpu")
ranks, _ = join("cpu")
with open(f"{sys.argv[3]}-rank{ranks.rank}.txt", "w") as f:  # a file each: the ranks share one stdout
    f.write(f"{type(r).__name__} selected={r.selected} files={sorted(r.files)}")
"""


@pytest.mark.slow
def test_every_rank_gets_the_result(tmp_path, pattern_folder, random_teacher):
    script = tmp_path / "api.py"
    script.write_text(SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(random_teacher), str(pattern_folder), str(tmp_path / "sel")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr
    said = [(tmp_path / f"sel-rank{rank}.txt").read_text() for rank in (0, 1)]
    assert said[0] == said[1] and said[0].startswith("SelectResult selected=5"), said


@pytest.mark.slow
def test_an_error_only_rank_0_meets_ends_every_rank_with_its_line(tmp_path):
    """A pool of unreadable files: the rows reach rank 0, which finds nothing to select; rank 1
    learns it from the lifecycle (Run.on_main) and ends with the same line, not in a hang."""
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(6):
        (pool / f"{i}.png").write_bytes(b"not a png")
    from dfkd.cards import save_card
    from dfkd.images import InputSpec
    from dfkd.models import ARCHS

    card = save_card(tmp_path / "t" / "t.yaml", "resnet8", 3, InputSpec((16, 16), 1, [0.5], [0.5]),
                     ARCHS.get("resnet8")(num_classes=3, in_channels=1).state_dict())
    start = time.monotonic()
    done = torchrun("select", "--teacher", str(card), "--pool", str(pool), "--out", str(tmp_path / "sel"),
                    "--device", "cpu", "--workers", "0", timeout=240)
    assert time.monotonic() - start < 200
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "dfkd select: error:" in line]
    assert errors and all("no image of the pool could be scored" in e for e in errors), done.stderr
    assert not [line for line in done.stderr.splitlines() if line.strip().startswith('File "') and "/dfkd/" in line]


FAIL_ON_RANK_1 = """
import os, sys
import dfkd.select.run as run
from dfkd.cli import main
from dfkd.errors import DfkdError
real = run.load_teacher
def load_teacher(*a, **k):  # rank 1 alone meets an error, before any collective of the run
    if os.environ["RANK"] == "1":
        raise DfkdError("rank 1 cannot read its teacher")
    return real(*a, **k)
run.load_teacher = load_teacher
sys.argv = ["dfkd", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_an_error_only_rank_1_meets_is_shown_and_ends_every_rank(tmp_path, pattern_folder, random_teacher):
    """Rank 1's own line reaches the user (rank 0 never heard of it), and rank 0, left in a
    collective, ends with one line too, not gloo's traceback."""
    script = tmp_path / "fail.py"
    script.write_text(FAIL_ON_RANK_1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           "select", "--teacher", str(random_teacher), "--pool", str(pattern_folder), "--out", str(tmp_path / "sel"),
           "--device", "cpu", "--workers", "0"]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV)
    assert time.monotonic() - start < 200 and done.returncode != 0
    lines = done.stderr.splitlines()
    assert any(line.startswith("dfkd select: error: rank 1 cannot read its teacher (rank 1)") for line in lines)
    # rank 0 ends with its one line when gloo tells it first, or silently when torchrun's SIGTERM
    # comes first (a race); never with gloo's traceback
    assert not [line for line in lines if line.startswith("[rank0]:")], done.stderr


def test_a_rank_whose_peer_has_gone_ends_with_one_line(monkeypatch, tmp_path, random_teacher, pattern_folder):
    """What rank 0 meets in a collective once another rank has ended: gloo's RuntimeError."""
    import dfkd.select

    def gone(*args, **kwargs):
        raise RuntimeError("[../gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:21707")

    monkeypatch.setattr(dfkd.select, "select_pool", gone)
    r = runner.invoke(app, ["select", "--teacher", str(random_teacher), "--pool", str(pattern_folder), "--out",
                            str(tmp_path / "sel")])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        "dfkd select: error: another rank stopped on an error (its line is above); every rank stops"]
