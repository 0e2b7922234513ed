"""pipelines/demo.sh, run with stand-ins for dfkd and python that log their arguments: the demo's
figures are fp32 on every CPU unless DFKD_DEMO_AMP=1."""
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def demo_commands(tmp_path, **env) -> list[list[str]]:
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    for name in ("dfkd", "python"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        (bin_dir / name).chmod(0o755)
    subprocess.run(["bash", "pipelines/demo.sh"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RUNS": str(tmp_path / "runs"),
                        "DATA": str(tmp_path / "data"), **env})
    return [line.split() for line in log.read_text().splitlines() if line.startswith("dfkd ")]


@pytest.mark.parametrize("env,want", [({}, True), ({"DFKD_DEMO_AMP": "1"}, False)])
def test_the_demo_runs_in_fp32_unless_asked(tmp_path, env, want):
    commands = demo_commands(tmp_path, **env)
    model_runs = [c for c in commands if c[1] in ("train", "select", "distill", "eval")]
    assert [c[1] for c in model_runs] == ["train", "eval", "select", "distill", "eval"]
    assert all(("--no-amp" in c) == want for c in model_runs[:4]), model_runs
