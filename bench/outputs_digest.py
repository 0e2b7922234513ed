"""Run every dfkd command once on small generated images and print a SHA-256 per output file.

For checking that a refactor changes no result: run it before and after, then diff the two
listings (``diff before.txt after.txt``). Timestamps, argv, versions and absolute paths are
taken out of the manifests, eval.json and report.html before hashing; everything else is hashed
as written (scores, selections, weights, checkpoints, metrics without their timing columns).

    python bench/outputs_digest.py --work /tmp/digest > after.txt
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import write_pattern_folder  # noqa: E402  (the tests' generated images)

TIMING = ("images_per_s", "seconds", "time")


def images(root: Path, per_class: int, seed: int, noise: int = 0) -> Path:
    """The tests' three classes of 16-px grey patterns (tests/conftest.py), and ``noise`` images
    of uniform noise in a folder ``noise`` (the pool's foreign images)."""
    write_pattern_folder(root, per_class, 16, seed)
    rng = np.random.default_rng(seed)
    if noise:
        (root / "noise").mkdir(parents=True, exist_ok=True)
        for i in range(noise):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(root / "noise" / f"{i:03d}.png")
    return root


def dfkd(*args: str) -> None:
    cmd = [sys.executable, "-m", "dfkd", *args, "--device", "cpu", "--workers", "0"] \
        if args[0] not in ("report",) else [sys.executable, "-m", "dfkd", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DFKD_CACHE_DIR": str(CACHE)})
    if done.returncode != 0:
        sys.exit(f"dfkd {' '.join(args)} failed:\n{done.stderr}")


def digest(path: Path, work: Path) -> str:
    data = path.read_bytes()
    if path.suffix in (".json", ".html", ".yaml", ".jsonl", ".tsv", ".txt"):
        text = data.decode("utf-8").replace(str(work), "WORK")
        if path.name in ("manifest.json", "eval.json", "shard.json", "run.json"):
            obj = json.loads(text)
            for key in ("finished", "argv", "versions"):
                obj.pop(key, None)
            text = json.dumps(obj, sort_keys=True)
        elif path.name == "metrics.jsonl":
            text = "\n".join(json.dumps({k: v for k, v in json.loads(line).items() if k not in TIMING}, sort_keys=True)
                             for line in text.splitlines())
        elif path.suffix == ".html":
            text = re.sub(r"\d{4}-\d\d-\d\d[T ][\d:]+[+\-\d]*", "TIME", text)
        data = text.encode()
    return hashlib.sha256(data).hexdigest()[:16]


def main() -> None:
    global CACHE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="Folder for the data and runs (emptied first).")
    a = ap.parse_args()
    work = a.work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    CACHE = work / "cache"
    train, test = images(work / "train", 40, 0), images(work / "test", 10, 1)
    pool, pos = images(work / "pool", 30, 2, noise=60), images(work / "pos", 4, 3)
    r = work / "runs"
    teacher = r / "teacher" / "model.yaml"
    dfkd("train", "--arch", "resnet8", "--data", str(train), "--out", str(r / "teacher"), "--steps", "40",
         "--batch-size", "32", "--no-amp")
    dfkd("eval", "--model", str(teacher), "--data", str(test), "--write-card", "--out", str(r / "teacher-eval"))
    dfkd("select", "--teacher", str(teacher), "--pool", str(pool), "--out", str(r / "select"), "--num-images", "40")
    dfkd("select", "--teacher", str(teacher), "--pool", str(pool), "--out", str(r / "select-auto"),
         "--num-images", "auto", "--global")
    for i in range(2):
        dfkd("select", "--teacher", str(teacher), "--pool", str(pool), "--out", str(r / "shards" / str(i)),
             "--shard", f"{i}/2")
    dfkd("select", "--merge", str(r / "shards"), "--out", str(r / "merged"), "--num-images", "40")
    selected = r / "select" / "selected.tsv"
    for method in ("kd", "noisy"):
        dfkd("distill", "--teacher", str(teacher), "--student", "resnet8", "--data", str(selected), "--out",
             str(r / f"distill-{method}"), "--method", method, "--steps", "12", "--batch-size", "16",
             "--eval-data", str(test), "--no-amp")
        dfkd("eval", "--model", str(r / f"distill-{method}" / "student.yaml"), "--data", str(test), "--out",
             str(r / f"distill-{method}" / "eval"))
    dfkd("pu-train", "--teacher", str(teacher), "--positive", str(pos), "--unlabeled", str(pool), "--out",
         str(r / "pu"), "--prior", "0.5", "--steps", "10", "--batch-size", "16", "--no-amp")
    dfkd("expand", "--pu", str(r / "pu" / "pu.yaml"), "--positive", str(pos), "--unlabeled", str(pool),
         "--out", str(r / "expand"))
    dfkd("distill", "--teacher", str(teacher), "--student", "resnet8", "--data", str(r / "expand" / "expanded.tsv"),
         "--out", str(r / "distill-robust"), "--method", "robust", "--steps", "12", "--batch-size", "16", "--no-amp")
    for run in ("select", "expand", "distill-kd"):
        dfkd("report", str(r / run))
    for path in sorted(p for p in r.rglob("*") if p.is_file() and p.name != ".lock" and "tensorboard" not in p.parts):
        print(f"{digest(path, work)}  {path.relative_to(r)}")


if __name__ == "__main__":
    main()
