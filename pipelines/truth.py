#!/usr/bin/env python3
"""How much of a selection is really in-distribution: compare an index with wild_truth.tsv.

    python pipelines/truth.py SELECTED.tsv DATA/wild_truth.tsv

Prints one line of JSON: selected, in-distribution share of the selection and of the pool,
recall of in-distribution images, agreement of the teacher's label with the true class, and
how many distinct pictures the selection holds (copies made by prepare_data.py --copies count once).
Only for the demo data, whose truth is known; not part of the library.
"""
import csv
import json
import os
import re
import sys

COPY = re.compile(r"\.(up2\.png|q75\.jpg|s34\.png)$")  # prepare_data.py --copies: NAME.up2.png is NAME.png again


def read(path):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    base = os.path.dirname(os.path.abspath(path))
    for r in rows:
        r["path"] = os.path.realpath(os.path.join(base, r["path"]))
    return rows


def main(selected_path, truth_path):
    truth = {r["path"]: r for r in read(truth_path)}
    selected = [r for r in read(selected_path) if r["path"] in truth and r.get("source", "pool") == "pool"]
    in_dist = [r for r in selected if truth[r["path"]]["source"] == "fashion"]
    pool_in = sum(t["source"] == "fashion" for t in truth.values())
    agree = sum(r.get("teacher_label", r.get("label")) == truth[r["path"]]["label"] for r in in_dist)
    print(json.dumps({
        "selected": len(selected),
        "in_distribution_share": round(len(in_dist) / max(1, len(selected)), 4),
        "pool_in_distribution_share": round(pool_in / max(1, len(truth)), 4),
        "in_distribution_recall": round(len(in_dist) / max(1, pool_in), 4),
        "teacher_label_agreement": round(agree / max(1, len(in_dist)), 4),
        "distinct_pictures": len({COPY.sub(".png", r["path"]) for r in selected}),
    }))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(*sys.argv[1:])
