"""Scale-out: torchrun with 2 gloo ranks on the CPU, shards and merge, streaming selection,
one run per directory. Commands are run the way a user runs them (torchrun, the CLI)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dfkd.cli import app
from dfkd.index import read_index
from dfkd.select import POLICIES, select_pool
from dfkd.select.policies import SPREAD, StreamingChoice

from test_images import make_bad_pool

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(*args: str, ranks: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           "-m", "dfkd", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def dfkd(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfkd", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def commands() -> dict:
    import typer.main

    group = typer.main.get_command(app)
    return {name: [o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")]
            for name, cmd in group.commands.items()}


def test_no_dfkd_flag_is_taken_by_torchruns_parser():
    """torchrun's parser accepts abbreviations: a dfkd flag that is a prefix of one of its
    options (--num of --numa-binding) kills the job before dfkd starts."""
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    checked = 0
    for name, flags in commands().items():
        for flag in flags:
            argv = ["--nproc-per-node", "2", "-m", "dfkd", name, flag, "x"]
            try:
                args = parser.parse_args(argv)
            except SystemExit:
                pytest.fail(f"torchrun rejects `dfkd {name} {flag}`")
            assert [args.training_script, *args.training_script_args] == ["dfkd", name, flag, "x"], (name, flag)
            checked += 1
    assert checked > 100


def pool_with_bad_files(root: Path, pattern_folder: Path) -> Path:
    pool = root / "pool"
    usable = sum(v is None for v in make_bad_pool(pool).values())
    shutil.copytree(pattern_folder, pool / "patterns")
    assert usable == 6
    (pool / "loop").mkdir()
    os.symlink("..", pool / "loop" / "back")  # a symlink loop: listed once, recorded, never walked forever
    return pool


@pytest.mark.slow
def test_select_on_two_ranks_writes_the_files_of_one_process(tmp_path, pattern_folder, random_teacher):
    pool = pool_with_bad_files(tmp_path, pattern_folder)
    one = dfkd("select", "--teacher", str(random_teacher), "--pool", str(pool), "--out", str(tmp_path / "one"),
               "--num-images", "7", "--batch-size", "4", "--device", "cpu")
    assert one.returncode == 0, one.stderr
    two = torchrun("select", "--teacher", str(random_teacher), "--pool", str(pool), "--out", str(tmp_path / "two"),
                   "--num-images", "7", "--batch-size", "4", "--device", "cpu")
    assert two.returncode == 0, two.stderr
    assert two.stdout.strip() == str(tmp_path / "two" / "selected.tsv")  # one line: rank 0 only
    assert two.stderr.count("│ scored") == 1 and two.stderr.count("scoring 29/29 (100%)") == 1  # rank 0 alone
    for name in ("scores.tsv", "selected.tsv", "skipped.tsv"):
        a = (tmp_path / "one" / name).read_text().replace(str(tmp_path / "one"), "")
        b = (tmp_path / "two" / name).read_text().replace(str(tmp_path / "two"), "")
        assert a == b, name
    skipped = read_index(tmp_path / "one" / "skipped.tsv").rows
    assert any("already listed" in r["reason"] and r["path"].endswith("back") for r in skipped)
    scored = read_index(tmp_path / "one" / "scores.tsv").paths
    assert len(scored) == len(set(scored)) == 18 + 6  # each file once, though the loop reaches the pool again


def test_shards_merged_equal_one_run(tmp_path, pattern_folder, random_teacher):
    card = __import__("dfkd.cards", fromlist=["load_card"]).load_card(random_teacher)
    os.symlink("..", pattern_folder / "bars_h" / "up")  # a recorded problem, merged like the rows
    whole = select_pool(card, pattern_folder, tmp_path / "whole", num_images=5, batch_size=4, workers=0, device="cpu")
    for i in range(3):
        part = select_pool(card, pattern_folder, tmp_path / "shards" / f"s{i}", shard=(i, 3), batch_size=4,
                           workers=0, device="cpu")
        assert "selected" not in part.files and part.pool_size == 6
    runner = CliRunner()
    res = runner.invoke(app, ["select", "--merge", str(tmp_path / "shards"), "--out", str(tmp_path / "merged"),
                              "--num-images", "5"])
    assert res.exit_code == 0, res.output
    assert "already listed" in (whole.out / "skipped.tsv").read_text()
    for name in ("scores.tsv", "selected.tsv", "skipped.tsv"):
        assert (tmp_path / "merged" / name).read_text() == (whole.out / name).read_text(), name
    res = runner.invoke(app, ["select", "--merge", str(tmp_path / "shards" / "s0"), "--merge",
                              str(tmp_path / "shards" / "s2"), "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "missing 1" in res.stderr


@pytest.mark.parametrize("key", POLICIES.keys())
def test_streaming_choice_equals_the_in_memory_policy(key):
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(5000), 2)  # many ties: broken by pool order both ways
    labels = rng.choice(5, 5000, p=[0.6, 0.3, 0.07, 0.02, 0.01])
    features = rng.normal(size=(5000, 4)).astype(np.float32)
    policy = POLICIES.get(key)
    for num in (1, 37, 400, 5000):
        choice = StreamingChoice(policy, num, 5)
        choice.CHUNK = 97  # prune often
        for i, (s, y) in enumerate(zip(scores, labels)):
            choice.push(s, y, i)
        feats = features[choice.candidates()] if policy.needs_features else None
        assert choice.result(features=feats) == policy(scores, labels, num, 5, features if feats is not None
                                                       else None).tolist()
        assert len(choice.payload) <= (SPREAD + 1 if key == "diverse" else 2) * num + 97


@pytest.mark.slow
def test_a_second_run_into_the_same_out_is_refused_and_a_stale_lock_taken_over(tmp_path, pattern_folder,
                                                                               random_teacher):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from dfkd.rundir import open_run; r = open_run(sys.argv[1], 'select');"
        " print('locked', flush=True); time.sleep(60)"), str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = dfkd("select", "--teacher", str(random_teacher), "--pool", str(pattern_folder), "--out", str(out),
                   "--num-images", "3")
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "another dfkd run is using this directory" in lines[0] \
            and f"pid {holder.pid}" in lines[0], res.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert f"pid {holder.pid}" in (out / ".lock").read_text()  # the killed holder's lock file stays ...
    res = dfkd("select", "--teacher", str(random_teacher), "--pool", str(pattern_folder), "--out", str(out),
               "--num-images", "3")
    assert res.returncode == 0, res.stderr  # ... and is taken over


@pytest.mark.slow
def test_distill_on_two_ranks_trains_one_student_and_resumes(tmp_path, digits_folders, digits_teacher):
    _, test = digits_folders
    args = ["distill", "--teacher", str(digits_teacher), "--student", "resnet8", "--data", str(test),
            "--method", "kd", "--steps", "30", "--batch-size", "32", "--no-amp", "--device", "cpu",
            "--set", "checkpoint_every=1"]
    whole = torchrun(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.strip() == str(tmp_path / "whole" / "student.yaml")
    assert whole.stderr.count("│ skipped images") == 1  # one summary table: rank 0 alone prints
    steps = [l for l in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps))  # one writer
    # interrupted after a checkpoint, then the same command again: the same weights
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "dfkd", *args, "--out", str(tmp_path / "cut")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, start_new_session=True)
    last = tmp_path / "cut" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not last.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = torchrun(*args, "--out", str(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stderr
    a = torch.load(tmp_path / "whole" / "student.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "student.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
