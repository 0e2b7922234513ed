"""The papers' reference recipes (issue 14): robust KD's fixed reference perturbation, and the
shipped ``pipelines/configs/*-reference.yaml`` against the official scripts' budgets and schedules.

How a test sees the weight vector a batch used: on a batch whose samples all have teacher argmax
c, the robust loss is max_v v[c]·mean(kl) and the logged ``kd`` is mean(kl), so loss / kd is the
weight the worst candidate gives class c on that batch.
"""
from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import pytest
import torch

from dfkd.config import resolve_config
from dfkd.distill import build_objective, perturbed_weights, robust_class_weights
from dfkd.distill.run import DistillConfig, default_config
from dfkd.errors import DfkdError
from dfkd.train.schedule import lr_factor

CONFIGS = Path(__file__).resolve().parent.parent / "pipelines" / "configs"
K = 4
INFO = {"class_counts": [5.0, 1.0, 3.0, 2.0]}
REFERENCE = {"perturbation": "reference", "eps": 0.1, "seed": 11}


def batch_for_class(c: int, seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits for n samples whose teacher argmax is class c."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n, K, generator=g)
    teacher[:, c] += 10.0
    return torch.randn(n, K, generator=g), teacher


def weights_used(obj, batches: int = 3, first_seed: int = 0) -> torch.Tensor:
    """batches × K: per batch, the weight the chosen candidate gave each class (loss / kd)."""
    rows = []
    for b in range(batches):
        row = []
        for c in range(K):
            out = obj(*batch_for_class(c, seed=1000 * (first_seed + b) + c))
            row.append(float(out["loss"]) / float(out["kd"]))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def roundtrip(module: torch.nn.Module) -> dict:
    """A state_dict saved and read back as the training loop does (torch.save, weights_only load)."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---- robust KD: the reference perturbation is drawn once ---------------------------------

def test_reference_perturbation_is_the_same_on_every_batch():
    obj = build_objective("robust", K, REFERENCE, INFO)
    assert obj.opts["M"] == 1
    used = weights_used(obj, batches=4)
    w = robust_class_weights(torch.tensor(INFO["class_counts"])).double()
    v = used[0]
    for row in used[1:]:
        torch.testing.assert_close(row, v, rtol=1e-5, atol=0)      # one vector for the whole run
    assert (v >= w).all() and (v > w).any() and (v < w + 0.1).all()  # one-sided: w + eps·U[0,1)
    torch.testing.assert_close(v, obj.candidates()[1].double(), rtol=1e-5, atol=0)
    # the official draw: w + eps·u from a generator seeded once, here by objective.seed
    expected = perturbed_weights(w.float(), 0.1, 1, "reference", torch.Generator().manual_seed(11))[1]
    torch.testing.assert_close(v, expected.double(), rtol=1e-5, atol=0)
    assert "fixed" in obj.describe()


def test_reference_perturbation_survives_a_state_dict_round_trip():
    a = build_objective("robust", K, REFERENCE, INFO)
    before = weights_used(a, batches=2)
    state = roundtrip(torch.nn.ModuleDict({"base": a}))              # nested, as the loop saves it
    after_cut = weights_used(a, batches=2, first_seed=2)             # the run goes on...

    resumed = torch.nn.ModuleDict({"base": build_objective("robust", K, REFERENCE, INFO)})
    resumed.load_state_dict(state)                                   # ...or is resumed here
    torch.testing.assert_close(weights_used(resumed["base"], batches=2, first_seed=2), after_cut,
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(after_cut[0], before[0], rtol=1e-5, atol=0)

    # the vector comes from the checkpoint: a build with another seed draws another vector,
    # and after loading it uses the stored one
    other = build_objective("robust", K, {**REFERENCE, "seed": 12}, INFO)
    assert not torch.allclose(weights_used(other, batches=1)[0], before[0])
    holder = torch.nn.ModuleDict({"base": other})
    holder.load_state_dict(state)
    torch.testing.assert_close(weights_used(other, batches=1)[0], before[0], rtol=1e-5, atol=0)

    # a checkpoint written before the vector was stored (generator only) still loads
    old = build_objective("robust", K, REFERENCE, INFO)
    old.set_extra_state({"generator": torch.Generator().manual_seed(0).get_state()})
    torch.testing.assert_close(weights_used(old, batches=1)[0], before[0], rtol=1e-5, atol=0)


def test_reference_checkpoint_with_another_m_is_refused():
    state = roundtrip(build_objective("robust", K, {**REFERENCE, "M": 2}, INFO))
    with pytest.raises(DfkdError, match="reference perturbations"):
        build_objective("robust", K, REFERENCE, INFO).load_state_dict(state)


def test_box_perturbation_still_varies_per_batch_and_resumes():
    obj = build_objective("robust", K, {"seed": 11}, INFO)
    assert obj.opts["perturbation"] == "box" and obj.opts["M"] == 8
    assert obj.fixed_candidates is None and "redrawn every batch" in obj.describe()
    used = weights_used(obj, batches=4)
    assert not torch.allclose(used[1], used[0]) and not torch.allclose(used[2], used[1])
    state = roundtrip(obj)
    nxt = weights_used(obj, batches=2, first_seed=4)
    resumed = build_objective("robust", K, {"seed": 11}, INFO)
    resumed.load_state_dict(state)
    torch.testing.assert_close(weights_used(resumed, batches=2, first_seed=4), nxt, rtol=1e-6, atol=0)


# ---- the shipped reference configs -------------------------------------------------------

def recipe(name: str) -> DistillConfig:
    cfg = DistillConfig(**resolve_config(default_config(), CONFIGS / name, [], {}))
    cfg.check()
    return cfg


def official_dfnd_epochs(k: int) -> tuple[int, list[int]]:
    """DFND-train.py: E = int(40000 / k * 512); the loop runs epochs 1..E-1; lr 0.1 while
    e < 0.4·E, 0.01 while e < 0.8·E. Returns (epochs run, the first epoch at each lower lr)."""
    E = int(40000 / k * 512)
    firsts = [next(e for e in range(1, E) if e >= f * E) for f in (0.4, 0.8)]
    return E - 1, firsts


def test_dfnd_reference_budget_is_the_official_images_seen():
    cfg = recipe("dfnd-reference.yaml")
    assert (cfg.method, cfg.batch_size, cfg.steps) == ("noisy", 256, 80000)
    assert cfg.steps * cfg.batch_size == 2.048e7
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov) == (0.1, 0.9, 5e-4, False)
    assert cfg.objective["temperature"] == 4 and cfg.objective["per_class_accuracy"] is False
    assert official_dfnd_epochs(600_000) == (33, [14, 28])           # the script's default k
    total = cfg.steps
    factors = [lr_factor(cfg, s, total) for s in range(total)]
    drops = [next(s for s, x in enumerate(factors) if x < level) for level in (0.5, 0.05)]
    assert drops == [32_000, 64_000] and factors[-1] == pytest.approx(0.01)
    for k in (50_000, 100_000, 600_000, 1_000_000):
        epochs, firsts = official_dfnd_epochs(k)
        # images seen: the script falls k to 2k short of the budget (E - 1 epochs, E rounded down)
        assert 2.048e7 - 2 * k < epochs * k <= 2.048e7 - k
        # each lr drop: dfkd's (step-based) and the script's (epoch-based) within (1 + f)·k images
        for f, first, step in zip((0.4, 0.8), firsts, drops):
            dfkd_images, script_images = step * cfg.batch_size, (first - 1) * k
            assert dfkd_images == f * 2.048e7
            assert 0 <= dfkd_images - script_images < (1 + f) * k


def test_pu_reference_matches_the_official_student_stage():
    cfg = recipe("pu-reference.yaml")
    assert (cfg.method, cfg.batch_size, cfg.epochs, cfg.steps) == ("robust", 2048, 200, None)
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.nesterov) == (0.1, 0.9, 5e-4, False)
    assert cfg.objective == {"temperature": 1, "eps": 0.1, "M": 1, "perturbation": "reference"}
    # the official lr, epoch by epoch: MultiStepLR([50, 100, 150], 0.1) stepped at the START of
    # every epoch (train_model.train), before that epoch's optimizer steps
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=cfg.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[50, 100, 150], gamma=0.1)
    official = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                              # step() before optimizer.step()
        for _ in range(cfg.epochs):
            sched.step()
            official.append(opt.param_groups[0]["lr"])
            opt.step()
    assert official[48] == pytest.approx(0.1) and official[49] == pytest.approx(0.01)
    for per_epoch in (1, 7, 24, 625):                                # any set size
        total = cfg.epochs * per_epoch
        for e in range(cfg.epochs):
            for s in (e * per_epoch, (e + 1) * per_epoch - 1):       # first and last step of epoch e
                assert cfg.lr * lr_factor(cfg, s, total) == pytest.approx(official[e], rel=1e-9), (per_epoch, e)


@pytest.mark.parametrize("name", ["dfnd-reference.yaml", "pu-reference.yaml"])
def test_reference_configs_build_their_objective(name):
    cfg = recipe(name)
    info = {"class_counts": [1.0, 2.0, 3.0], "accuracy": 0.9}
    obj = build_objective(cfg.method, 3, cfg.objective, info)
    out = obj(torch.randn(5, 3), torch.randn(5, 3))
    assert math.isfinite(float(out["loss"].detach()))
