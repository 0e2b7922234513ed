#!/usr/bin/env python3
"""Issue 24's estimates against the truth of the demo pools (the truth is never shown to them).

    python pipelines/estimate_study.py SELECT_RUN DATA/wild_truth.tsv TEACHER_CARD OUT_DIR

SELECT_RUN is a `dfkd select` run on the whole demo pool (its scores.tsv is read again, nothing is
re-scored). Writes OUT_DIR/pool-{demo,02,40}.tsv (the demo pool and subsets with 2 % and 40 %
Fashion-MNIST, seed 0) for `dfkd pu-train --prior auto`, and prints one JSON line per pool: the
true in-distribution count and share, and `select --num-images auto`'s estimate by every method
the card allows (mahalanobis: the scores' distance column against the card's mahalanobis, which
`dfkd eval --write-card` writes; card: the noise values against its noise_values; mixture:
without either). OUT_DIR "-": the whole pool only, nothing written (the larger pool). Only for
the demo data.
"""
import json
import os
import sys

import numpy as np

from dfkd.cards import load_card
from dfkd.select.estimate import MAHALANOBIS, NOISE_VALUE, estimate_in_distribution

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from truth import read  # noqa: E402  (an index's rows, paths resolved)


def main(select_run, truth_path, card_path, out):
    truth = {r["path"]: r["source"] == "fashion" for r in read(truth_path)}
    scored = [r for r in read(os.path.join(select_run, "scores.tsv")) if r["path"] in truth]
    card = load_card(card_path)
    rng = np.random.default_rng(0)
    is_in = np.array([truth[r["path"]] for r in scored])
    inside, outside = np.flatnonzero(is_in), np.flatnonzero(~is_in)
    pools = {"whole": np.arange(len(scored))} if out == "-" else {"demo": np.arange(len(scored)),
             "02": np.sort(np.r_[rng.choice(inside, round(0.02 / 0.98 * len(outside)), replace=False), outside]),
             "40": np.sort(np.r_[inside, rng.choice(outside, round(0.6 / 0.4 * len(inside)), replace=False)])}
    for name, rows in pools.items():
        if out != "-":
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, f"pool-{name}.tsv"), "w", encoding="utf-8") as f:
                f.write("path\n" + "".join(scored[i]["path"] + "\n" for i in rows))
        line = {"pool": name, "images": len(rows), "true_count": int(is_in[rows].sum()),
                "true_share": round(float(is_in[rows].mean()), 4)}
        methods = [("card", "score", NOISE_VALUE, card.extra.get("noise_values")),
                   ("mixture", "score", NOISE_VALUE, None)]
        if "distance" in scored[0] and card.extra.get("mahalanobis"):
            methods.insert(0, ("mahalanobis", "distance", MAHALANOBIS, card.extra["mahalanobis"]))
        for method, column, measure, ref in methods:
            pairs = [(int(scored[i]["label"]), float(scored[i][column])) for i in rows]
            e = estimate_in_distribution(iter(pairs), card.num_classes, ref, str(card_path), measure)
            line[method] = {"count": e.count, "share": round(e.share, 4), "range": [e.low, e.high]}
        print(json.dumps(line))


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(*sys.argv[1:])
