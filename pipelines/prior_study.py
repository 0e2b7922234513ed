#!/usr/bin/env python3
"""Issue 24: ``pu-train --prior auto``'s estimators against the truth of the demo pools.

    python pipelines/prior_study.py TEACHER_CARD POSITIVES POOLS_DIR DATA/wild_truth.tsv

POOLS_DIR holds pool-NAME.tsv files (pipelines/estimate_study.py writes pool-{demo,02,40}.tsv; an
index of the larger pool's images is another), their images all in wild_truth.tsv. The features
are exactly those ``pu-train --prior auto`` estimates from (the PU model's pooled multi-scale
features, the teacher's weights), computed by pu_train itself and cached in
POOLS_DIR/features-NAME.pt. One JSON line per pool: the truth (never shown to the estimators) and
each estimator's prior.
"""
import json
import os
import sys

import numpy as np
import torch

import dfkd.pu.train as pu_train_module
from dfkd.cards import load_card
from dfkd.mixture import best_bin_estimate, top_bins
from dfkd.pu import prior as P
from dfkd.pu.train import PuConfig, pu_train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from truth import read  # noqa: E402


class _Got(Exception):
    pass


def features(card, positives, pool_tsv, cache):
    if os.path.exists(cache):
        return torch.load(cache)

    def grab(pos, unl, seed=0):
        raise _Got(pos, unl)

    original, pu_train_module.estimate_prior = pu_train_module.estimate_prior, grab
    try:
        pu_train(card, positives, pool_tsv, cache + ".run", PuConfig(steps=1, amp=False, nnpu={"prior": "auto"}),
                 workers=0, device="cpu", overwrite=True)
    except _Got as got:
        pos, unl = got.args
    finally:
        pu_train_module.estimate_prior = original
    torch.save((pos, unl), cache)
    return pos, unl


def bbe(l2=P.L2, seeds=(0,)):
    """BBE on cross-fitted logistic scores; several seeds: the mean of their estimates."""
    def run(pos, unl):
        return float(np.mean([best_bin_estimate(*top_bins(*P.crossfit_scores(pos, unl, s, l2)), len(pos), len(unl)).alpha
                              for s in seeds]))
    return run


def split_std(pos, unl, seeds=range(8)):
    """How much one fold split's BBE estimate moves with the split: the standard deviation over 8."""
    return float(np.std([best_bin_estimate(*top_bins(*P.crossfit_scores(pos, unl, s)), len(pos), len(unl)).alpha
                         for s in seeds]))


def elkan_noto(pos, unl):
    """Elkan & Noto (2008) e1: c = mean P(s=1|x) over held-out positives (the balanced fit's logit
    moved to the sample's proportions), prior = n_p (1 - c) / (c n_u)."""
    sp, _ = P.crossfit_scores(pos, unl)
    c = float(np.mean(1 / (1 + np.exp(-(sp + np.log(len(pos) / len(unl)))))))
    return min(1.0, len(pos) * (1 - c) / (c * len(unl)))


ESTIMATORS = {"auto": lambda pos, unl: P.estimate_prior(pos, unl).prior,  # what --prior auto gives
              "bbe_1split": bbe(), "bbe_8splits": bbe(seeds=range(8)), "bbe_split_std": split_std, "bbe_l2_0.01": bbe(0.01),
              "bbe_l2_1": bbe(1.0), "elkan_noto_e1": elkan_noto}


def main(teacher, positives, pools, truth_path):
    truth = {r["path"]: r["source"] == "fashion" for r in read(truth_path)}
    card = load_card(teacher)
    for name in sorted(f[len("pool-"):-len(".tsv")] for f in os.listdir(pools)
                       if f.startswith("pool-") and f.endswith(".tsv")):
        tsv = os.path.join(pools, f"pool-{name}.tsv")
        rows = [r["path"] for r in read(tsv)]
        pos, unl = features(card, positives, tsv, os.path.join(pools, f"features-{name}.pt"))
        line = {"pool": name, "images": len(rows), "true_prior": round(sum(truth[p] for p in rows) / len(rows), 4)}
        for method, fn in ESTIMATORS.items():
            line[method] = round(fn(pos, unl), 4)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    main(*sys.argv[1:])
