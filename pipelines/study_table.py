#!/usr/bin/env python3
"""Collect the study's runs into Markdown tables: mean and spread (min-max) over seeds, one table
per wild pool at equal steps, and the equal-epochs table when its runs exist.

    python pipelines/study_table.py RUNS DATA [LARGE [COPIES]]
"""
import glob
import json
import os
import subprocess
import sys

WHOLE = [("original", "Student trained on the original data (10,000 labeled images)"),
         ("kd-original", "KD on the original data (10,000 images)")]
POOL = [
    ("kd-wild", "KD on the whole wild pool ({pool} images)"),
    ("random", "Random selection + noisy distillation"),
    ("dfnd-global", "DFND selection, global top-k as in the paper + noisy distillation"),
    ("dfnd-per-class", "DFND selection, per-class top-k, near-duplicates dropped (dfkd default) + noisy distillation"),
    ("dedup-off", "DFND selection, per-class top-k, duplicates kept + noisy distillation"),
    ("diverse", "DFND selection, per-class across 8 k-means clusters (`--policy diverse`) + noisy distillation"),
    ("online", "Online selection: whole pool streamed, each batch keeps its 20 % lowest noise values"),
    ("online-per-class", "Online selection per class (`online.policy=per-class`): each batch keeps 20 %, its predicted classes taking turns"),
    ("pu", "PU Compression: 200 positives (2 %) + expanded pool + robust KD"),
    ("ensemble", "Ensemble of two teachers (resnet20 + resnet14): per-class selection + noisy distillation"),
    ("mlkd", "Per-class selection + noisy distillation + MLKD align (×10) + correlation (×20)"),
]
HEADER = ("| method | student top-1 (mean ± half-range) | seeds | images trained on (Fashion-MNIST share) |\n"
          "| --- | --- | --- | --- |")


def load(path):
    with open(path) as f:
        return json.load(f)


def in_dist(index, data):
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "truth.py"), index,
                          os.path.join(data, "wild_truth.tsv")], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def row(runs, key, name, data=None, pictures=False):
    """One table line for runs/seed*/key, or None when no seed has finished it; ``pictures``: say
    how many distinct pictures the (first seed's) selection holds."""
    evals = sorted(glob.glob(os.path.join(runs, "seed*", key, "eval", "eval.json")))
    if not evals:
        return None
    accs = [load(e)["top1"] for e in evals]
    mean, half = sum(accs) / len(accs), (max(accs) - min(accs)) / 2
    run = os.path.dirname(os.path.dirname(evals[0]))
    used = ""
    for index, extra in ((os.path.join(run, "select", "selected.tsv"), ""),
                         (os.path.join(run, "expand", "expanded.tsv"), " + 200 positives")):
        if data and os.path.isfile(index):
            t = in_dist(index, data)
            used = f"{t['selected']:,} ({t['in_distribution_share']:.2f}){extra}"
            if pictures:
                used += f", {t['distinct_pictures']:,} distinct pictures"
    return f"| {name} | {mean:.4f} ± {half:.4f} | {len(accs)} | {used} |"


def pool_size(data):
    with open(os.path.join(data, "wild_truth.tsv")) as f:
        return sum(1 for _ in f) - 1


def table(runs, pools, suffix=""):
    """The rows trained on whole sets (with ``suffix``) and every pool's rows, one table each."""
    lines = []
    for title, pool_runs, data, pictures in pools:
        size = pool_size(data)
        lines += ["", f"**{title}** ({size:,} images, {in_dist_share(data):.0%} Fashion-MNIST)", "", HEADER]
        lines += [r for key, name in WHOLE if (r := row(runs, key + suffix, name))]
        for key, name in POOL:
            if suffix and key != "kd-wild":
                continue
            r = row(pool_runs, key + suffix, name.format(pool=f"{size:,}"), data, pictures)
            if r:
                lines.append(r)
    return lines


def in_dist_share(data):
    with open(os.path.join(data, "wild_truth.tsv")) as f:
        kinds = [ln.split("\t")[1] for ln in list(f)[1:]]
    return kinds.count("fashion") / len(kinds)


def main(runs, data, large=None, copies=None):
    out = ["| teacher | top-1 | trained on |", "| --- | --- | --- |",
           f"| resnet20 | {load(os.path.join(runs, 'teacher', 'eval', 'eval.json'))['top1']:.4f} | 10,000 labeled |"]
    second = os.path.join(runs, "teacher2", "eval", "eval.json")
    if os.path.isfile(second):
        out.append(f"| resnet14 (the ensemble's second) | {load(second)['top1']:.4f} | 10,000 labeled |")
    pools = [("Demo pool", os.path.join(runs, "demo"), data, False)]
    if large and os.path.isdir(os.path.join(runs, "large")):
        pools.append(("Larger pool", os.path.join(runs, "large"), large, False))
    if copies and os.path.isdir(os.path.join(runs, "copies")):
        pools.append(("Demo pool with every image 3 more times (2x upscale, JPEG-75, 3/4 size)",
                      os.path.join(runs, "copies"), copies, True))
    out += ["", "### Equal steps", *table(runs, pools)]
    if glob.glob(os.path.join(runs, "seed*", "*-epochs")):
        out += ["", "### Equal epochs (20): the whole-set rows; selection rows are the same runs as above",
                *table(runs, pools, "-epochs")]
    print("\n".join(out))


if __name__ == "__main__":
    main(*sys.argv[1:5])
