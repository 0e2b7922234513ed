"""2 torchrun ranks (gloo on the CPU, NCCL on GPUs) against 1 process, on real images.

Measured, each as a user runs it (``dfkd ...`` against ``torchrun --nproc-per-node N -m dfkd ...``):

* ``select``: wall time of both, their ratio, and whether selected.tsv / scores.tsv are identical;
* ``distill``: wall time, the median training throughput from metrics.jsonl, and the student's
  top-1 on the test set for both (the same steps and global batches; per-rank BatchNorm, so
  equal in expectation, not bit for bit);
* resume after a kill on N ranks: a run killed once its first checkpoint is written, started
  again, against the uninterrupted N-rank run (largest weight difference).

    python bench/ranks.py --teacher runs/demo/teacher/model.yaml --pool data/demo/wild \\
        --test data/demo/test [--num-images 2000] [--epochs 4] [--ranks 2] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True)
    p.add_argument("--pool", required=True)
    p.add_argument("--test", required=True, help="labeled test images (ImageFolder)")
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--method", default="kd")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="runs/bench-ranks")
    return p.parse_args(argv)


def run(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv=None) -> None:
    a = parse(argv)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    one = [sys.executable, "-m", "dfkd"]
    many = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.ranks),
            "-m", "dfkd"]
    sel = ["select", "--teacher", a.teacher, "--pool", a.pool, "--num-images", str(a.num_images),
           "--device", a.device]
    t1 = run(one + sel + ["--out", str(work / "select-1")], env)
    tn = run(many + sel + ["--out", str(work / f"select-{a.ranks}")], env)
    same = {f: (work / "select-1" / f).read_text() == (work / f"select-{a.ranks}" / f).read_text()
            for f in ("selected.tsv", "scores.tsv", "skipped.tsv")}
    pool = sum(1 for _ in open(work / "select-1" / "scores.tsv")) - 1
    print(f"select, {pool} pool images:  1 process {t1:.1f} s ({pool / t1:.0f} img/s),"
          f"  {a.ranks} ranks {tn:.1f} s ({pool / tn:.0f} img/s);  ratio {t1 / tn:.2f}")
    print(f"  identical files: {', '.join(f'{k} {v}' for k, v in same.items())}")

    data = str(work / "select-1" / "selected.tsv")
    dist = ["distill", "--teacher", a.teacher, "--student", "resnet8", "--data", data, "--method", a.method,
            "--epochs", str(a.epochs), "--device", a.device]
    rows = []
    for name, prefix in (("1 process", one), (f"{a.ranks} ranks", many)):
        out = work / f"distill-{name.split()[0]}"
        wall = run(prefix + dist + ["--out", str(out)], env)
        rates = [json.loads(ln)["images_per_s"] for ln in open(out / "metrics.jsonl")][1:]
        res = subprocess.run(one + ["eval", "--model", str(out / "student.yaml"), "--data", a.test,
                                    "--device", a.device], capture_output=True, text=True, env=env)
        top1 = json.loads(res.stdout)["top1"]
        rows.append((name, wall, statistics.median(rates), top1))
        print(f"distill {a.method}, {a.epochs} epochs, {name}: {wall:.1f} s, median {statistics.median(rates):.0f}"
              f" img/s, student top-1 {top1:.4f}")
    print(f"  throughput ratio {a.ranks} ranks / 1 process: {rows[1][2] / rows[0][2]:.2f};"
          f" wall-time ratio: {rows[0][1] / rows[1][1]:.2f}; top-1 difference {rows[1][3] - rows[0][3]:+.4f}")

    cut = work / "distill-cut"
    proc = subprocess.Popen(many + dist + ["--out", str(cut), "--set", "checkpoint_every=5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    while not (cut / "checkpoints" / "last.pt").is_file() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(cut / "checkpoints" / "last.pt", weights_only=True)["step"]
    whole = work / "distill-whole"
    run(many + dist + ["--out", str(whole), "--set", "checkpoint_every=5"], env)
    run(many + dist + ["--out", str(cut), "--set", "checkpoint_every=5"], env)
    wa = torch.load(whole / "student.pt", weights_only=True)
    wb = torch.load(cut / "student.pt", weights_only=True)
    diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    print(f"resume on {a.ranks} ranks: killed (SIGKILL) after step {step}, started again: largest weight"
          f" difference to the uninterrupted {a.ranks}-rank run {diff:.3g}")


if __name__ == "__main__":
    main()
