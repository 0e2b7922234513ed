"""``dfkd select`` from WebDataset tar shards against the same images as a folder.

Packs every image of ``--pool`` (a folder) into tar shards of ``--per-shard`` images, in the
folder's listing order, as img2dataset writes them (``KEY.EXT`` plus a ``KEY.json`` sidecar;
kept under ``--work`` and reused), then runs in child processes, each twice (the figure is the
faster run, so both read from a warm page cache)

    python -m dfkd select --teacher CARD --pool POOL --out RUN --num-images 2000 --device cpu
    python -m dfkd select --teacher CARD --pool 'SHARDS/{000000..N}.tar' --out RUN ...

and prints images/s of each, their ratio (goal: shards >= 1.0 of the folder) and whether both
selected the same images with the same scores.

    python bench/shards.py --teacher runs/demo/teacher/model.yaml --pool data/demo/wild
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from dfkd.index import read_index
from dfkd.pool import walk_files


def pack(pool: Path, out: Path, per_shard: int) -> str:
    """Shards of the pool's files (reused when complete); returns the brace pattern."""
    files = list(walk_files(pool))
    n = -(-len(files) // per_shard)
    stamp = out / ".complete"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == {"files": len(files), "per_shard": per_shard}):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for s in range(n):
            with tarfile.open(out / f"{s:06d}.tar", "w") as tar:
                for i, f in enumerate(files[s * per_shard:(s + 1) * per_shard], s * per_shard):
                    key = f"{i:09d}"
                    tar.add(f, arcname=key + os.path.splitext(f)[1].lower())
                    meta = json.dumps({"url": os.path.relpath(f, pool)}).encode()
                    info = tarfile.TarInfo(key + ".json")
                    info.size = len(meta)
                    tar.addfile(info, io.BytesIO(meta))
        stamp.write_text(json.dumps({"files": len(files), "per_shard": per_shard}))
    return str(out / f"{{000000..{n - 1:06d}}}.tar")


def select(teacher: str, pool: str, out: Path, num: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "dfkd", "select", "--teacher", teacher, "--pool", pool, "--out", str(out),
           "--num-images", str(num), "--device", "cpu"]
    start = time.perf_counter()
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--pool", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-shards"))
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--num-images", type=int, default=2000)
    a = ap.parse_args()
    pattern = pack(a.pool, a.work / "shards", a.per_shard)
    sources = {"folder": str(a.pool), "shards": pattern}
    walls = {name: min(select(a.teacher, src, a.work / f"run-{name}", a.num_images) for _ in range(2))
             for name, src in sources.items()}
    n = len(read_index(a.work / "run-folder" / "scores.tsv"))

    def picked(name: str) -> list[tuple[str, str]]:
        rows = read_index(a.work / f"run-{name}" / "selected.tsv").rows
        return sorted((r["score"], r["label"]) for r in rows)

    for name, wall in walls.items():
        print(f"select from the {name:<7} {n} images in {wall:6.1f} s  {n / wall:7.0f} img/s  ({sources[name]})")
    print(f"shards / folder: {walls['folder'] / walls['shards']:.2f} (goal >= 1.0);"
          f" same selection (scores and classes): {picked('folder') == picked('shards')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
