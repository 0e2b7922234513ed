#!/usr/bin/env python3
"""The table of pipelines/budget_study.sh: per pool and budget, the selection's size and true
in-distribution share and recall, the auto estimate, and each seed's student top-1.

    python pipelines/budget_table.py OUT DATA/wild_truth.tsv [DATA2/wild_truth.tsv ...]

Only for the demo data, whose truth is known (never shown to the methods).
"""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from truth import read  # noqa: E402  (an index's rows, paths resolved)


def main(out, *truth_paths):
    fashion = {r["path"] for t in truth_paths for r in read(t) if r["source"] == "fashion"}
    print("| pool | budget | selected | true share (recall) | seeds' top-1 | mean |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in sorted(os.listdir(out)):
        folder = os.path.join(out, name)
        runs = [d for d in os.listdir(folder) if re.fullmatch(r"select-[^.]+", d)] if os.path.isdir(folder) else []
        if not runs:
            continue
        pool = [r["path"] for r in read(os.path.join(folder, runs[0], "scores.tsv"))]
        pool_in = len(fashion.intersection(pool))
        budgets = sorted((d[len("select-"):] for d in runs),
                         key=lambda b: (b != "auto", int(b) if b.isdigit() else 0))
        for b in budgets:
            sel = os.path.join(folder, f"select-{b}")
            picked = [r["path"] for r in read(os.path.join(sel, "selected.tsv"))]
            hits = len(fashion.intersection(picked))
            label = b
            if b == "auto":
                e = json.load(open(os.path.join(sel, "manifest.json")))["summary"]["in_distribution"]
                label = f"auto ({e['method']}: {e['count']:,}, {e['low']:,}..{e['high']:,})"
            tops = []
            for d in sorted(os.listdir(folder)):
                if re.fullmatch(rf"student-{re.escape(b)}-s\d+", d) and os.path.isfile(os.path.join(folder, d, "eval", "eval.json")):
                    tops.append(json.load(open(os.path.join(folder, d, "eval", "eval.json")))["top1"])
            mean = f"{sum(tops) / len(tops):.4f}" if tops else ""
            print(f"| {name} ({len(pool):,} images, {pool_in:,} true) | {label} | {len(picked):,} |"
                  f" {hits / max(1, len(picked)):.3f} ({hits / max(1, pool_in):.3f}) |"
                  f" {' / '.join(f'{t:.4f}' for t in tops)} | {mean} |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(*sys.argv[1:])
