"""Parts of the training loop and of distillation's set-up that no other test reaches: the lr
schedules, the device augmentation, the ensemble's accuracies and DFND's per_class_accuracy."""
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfkd.cards import ModelCard, load_card, update_card
from dfkd.distill.objectives import build_objective
from dfkd.distill.run import default_config, distill
from dfkd.images import InputSpec
from dfkd.teacher import ensemble_accuracy
from dfkd.train.augment import AUGMENTS, augment_batch
from dfkd.train.loop import LoopConfig
from dfkd.train.objective import LoopObjective
from dfkd.train.schedule import lr_factor, model_lr
from dfkd.train.steps import Optimizers

# ---- lr schedules ---------------------------------------------------------------------------


@pytest.mark.parametrize("total", [8, 100, 101, 1000])
def test_multistep_drops_by_gamma_at_each_milestone_fraction_of_the_run(total):
    cfg = LoopConfig(schedule="multistep", milestones=[0.3, 0.7], gamma=0.5)
    factors = [lr_factor(cfg, s, total) for s in range(total)]
    first_low = [math.ceil(0.3 * total), math.ceil(0.7 * total)]  # first step at or past m·total
    for s, f in enumerate(factors):
        assert f == 0.5 ** sum(s >= b for b in first_low), (total, s, f)
    assert factors[0] == 1.0 and factors[-1] == 0.25
    assert factors[first_low[0] - 1] == 1.0 and factors[first_low[0]] == 0.5
    assert factors[first_low[1] - 1] == 0.5 and factors[first_low[1]] == 0.25


def test_multistep_counts_milestones_in_any_order_and_none_is_constant():
    total = 40
    a = LoopConfig(schedule="multistep", milestones=[0.25, 0.5, 0.75], gamma=0.1)
    b = LoopConfig(schedule="multistep", milestones=[0.75, 0.25, 0.5], gamma=0.1)
    fa = [lr_factor(a, s, total) for s in range(total)]
    assert fa == [lr_factor(b, s, total) for s in range(total)]
    assert sorted(set(fa), reverse=True) == [1.0, 0.1, 0.1 ** 2, 0.1 ** 3]
    assert [fa.index(v) for v in sorted(set(fa), reverse=True)] == [0, 10, 20, 30]
    none = LoopConfig(schedule="multistep", milestones=[], gamma=0.1)
    assert {lr_factor(none, s, total) for s in range(total)} == {1.0}


@pytest.mark.parametrize("total", [1, 7, 1000])
def test_cosine_starts_at_one_ends_at_zero_and_only_falls(total):
    cfg = LoopConfig(schedule="cosine")
    factors = [lr_factor(cfg, s, total) for s in range(total + 1)]
    assert factors[0] == 1.0
    assert factors[-1] == pytest.approx(0.0, abs=1e-12)  # step == total: the end of the run
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert factors[total - 1] > 0  # the last step trained still moves the weights
    if total % 2 == 0:
        assert factors[total // 2] == pytest.approx(0.5)


def test_constant_is_one_from_the_first_step_to_the_last():
    cfg = LoopConfig(schedule="constant", milestones=[0.5], gamma=0.1)  # milestones are not used
    assert [lr_factor(cfg, s, 10) for s in (0, 5, 9, 10)] == [1.0] * 4


class OwnParameter(LoopObjective):
    """A loss with a parameter of its own, on an Adam of its own whose base lr (1e-3) is not the model's."""

    def __init__(self):
        super().__init__()
        self.h = nn.Parameter(torch.ones(3))

    def forward(self, batch):
        return {"loss": batch.outputs.sum()}

    def extra_param_groups(self):
        return [{"name": "h", "params": [self.h], "lr": 1e-3, "optimizer": "adam"}]


def optimizers(cfg: LoopConfig, total: int, seed=0) -> tuple[Optimizers, nn.Module, OwnParameter]:
    torch.manual_seed(seed)
    model, objective = nn.Linear(3, 2), OwnParameter()
    return Optimizers(model, objective, cfg, total), model, objective


def lrs_while_stepping(opts: Optimizers, model: nn.Module, objective: OwnParameter, steps: int) -> list[list[float]]:
    """The lr of every param group of every optimizer at each of the next ``steps`` steps."""
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. lr_scheduler.step() before optimizer.step()
        for _ in range(steps):
            seen.append([g["lr"] for o in opts.all for g in o.param_groups])
            opts.step((model(torch.ones(1, 3)).sum() * objective.h).sum())
    return seen


def the_loops_lrs(cfg: LoopConfig, step: int, total: int) -> list[float]:
    """What the loop set before the schedulers: each base lr times (the model's lr / cfg.lr)."""
    return [base * (model_lr(cfg, step, total) / cfg.lr) for base in (cfg.lr, 1e-3)]


SCHEDULES = [dict(schedule="cosine"), dict(schedule="multistep", milestones=[0.3, 0.7], gamma=0.5),
             dict(schedule="constant"), dict(schedule="cosine", lr=0.05)]


@pytest.mark.parametrize("kw", SCHEDULES)
def test_the_schedulers_give_every_optimizer_the_factor_of_the_schedule_over_its_own_base_lr(kw):
    cfg, total = LoopConfig(**kw), 20
    opts, model, objective = optimizers(cfg, total)
    assert len(opts.schedulers) == 2
    assert all(isinstance(s, torch.optim.lr_scheduler.LambdaLR) for s in opts.schedulers)
    seen = lrs_while_stepping(opts, model, objective, total)
    for step, lrs in enumerate(seen):
        assert lrs == the_loops_lrs(cfg, step, total), step  # exactly: the weights stay bit-identical
        f = lr_factor(cfg, step, total)
        assert lrs == pytest.approx([cfg.lr * f, 1e-3 * f], rel=1e-12, abs=0)
    assert len({tuple(lrs) for lrs in seen}) > (kw["schedule"] != "constant")


@pytest.mark.parametrize("kw", SCHEDULES)
def test_a_resume_continues_the_schedule_with_or_without_scheduler_state(kw):
    cfg, total, cut = LoopConfig(**kw), 20, 7
    whole = lrs_while_stepping(*optimizers(cfg, total), total)
    first, model, objective = optimizers(cfg, total)
    lrs_while_stepping(first, model, objective, cut)
    state = first.state_dict()
    assert [s["last_epoch"] for s in state["schedulers"]] == [cut, cut]
    again, model2, objective2 = optimizers(cfg, total, seed=1)
    again.load_state_dict(state, cut)
    assert lrs_while_stepping(again, model2, objective2, total - cut) == whole[cut:]
    # a checkpoint written before the schedulers were saved: no scheduler state, no initial_lr,
    # and the groups at the lr of the last step trained (the loop set it before each step)
    old = {"optimizer": state["optimizer"], "extra_optimizers": state["extra_optimizers"]}
    for o_state, lr in zip([old["optimizer"], *old["extra_optimizers"]], the_loops_lrs(cfg, cut - 1, total)):
        for g in o_state["param_groups"]:
            del g["initial_lr"]
            g["lr"] = lr
    again, model2, objective2 = optimizers(cfg, total, seed=1)
    again.load_state_dict(old, cut)
    assert lrs_while_stepping(again, model2, objective2, total - cut) == whole[cut:]
    assert [s.base_lrs for s in again.schedulers] == [[cfg.lr], [1e-3]]
    assert [s["last_epoch"] for s in again.state_dict()["schedulers"]] == [total, total]


# ---- device augmentation --------------------------------------------------------------------


def images(n=32, c=2, h=6, w=7, seed=0) -> torch.Tensor:
    """Distinct, non-zero uint8 images (so a zero pixel can only be padding), not mirror-symmetric."""
    return torch.randint(1, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def crop_shift(out: torch.Tensor, x: torch.Tensor, pad: int) -> tuple[int, int] | None:
    """(dy, dx) with ``out`` == the zero-padded ``x`` read at that offset, or None if there is none."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad))
    found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
             if torch.equal(padded[:, dy:dy + h, dx:dx + w], out)]
    assert len(found) <= 1
    return found[0] if found else None


def test_the_modes_are_the_ones_tested_here():
    assert set(AUGMENTS) == {"crop-flip", "crop", "flip", "none"}


def test_none_is_the_identity():
    x = images()
    assert torch.equal(augment_batch(x, "none", 4, gen()), x)


def test_flip_mirrors_some_samples_left_right_and_leaves_the_rest():
    x = images()
    out = augment_batch(x, "flip", 4, gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    flipped = [bool(torch.equal(o, xi.flip(-1))) for o, xi in zip(out, x)]
    kept = [bool(torch.equal(o, xi)) for o, xi in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))  # each sample is exactly one of the two
    assert 0 < sum(flipped) < len(x)
    assert torch.equal(out.flip(-1)[torch.tensor(flipped)], x[torch.tensor(flipped)])


@pytest.mark.parametrize("pad", [1, 3])
def test_crop_keeps_the_size_and_shifts_the_content_within_the_padding(pad):
    x = images()
    out = augment_batch(x, "crop", pad, gen())
    assert out.shape == x.shape and out.dtype == x.dtype
    shifts = [crop_shift(o, xi, pad) for o, xi in zip(out, x)]
    assert all(s is not None for s in shifts)  # every sample is a window of its padded image
    assert any(s != (pad, pad) for s in shifts)  # ... and they are moved
    for axis in (0, 1):  # both ways on both axes
        assert any(s[axis] < pad for s in shifts) and any(s[axis] > pad for s in shifts)
    h, w = x.shape[-2:]
    for (dy, dx), o in zip(shifts, out):  # what moved in from beyond the edge is the zero padding
        rows = slice(0, pad - dy) if dy < pad else slice(h - (dy - pad), h)
        cols = slice(0, pad - dx) if dx < pad else slice(w - (dx - pad), w)
        assert (o[:, rows] == 0).all() and (o[:, :, cols] == 0).all()


def test_crop_with_no_padding_is_the_identity():
    x = images()
    assert torch.equal(augment_batch(x, "crop", 0, gen()), x)


def test_crop_flip_is_a_crop_of_the_image_or_of_its_mirror_and_works_on_floats():
    x = images().float() / 255
    out = augment_batch(x, "crop-flip", 2, gen())
    assert out.shape == x.shape and out.dtype == torch.float32
    plain = [crop_shift(o, xi, 2) is not None for o, xi in zip(out, x)]
    mirrored = [crop_shift(o, xi.flip(-1), 2) is not None for o, xi in zip(out, x)]
    assert all(p or m for p, m in zip(plain, mirrored))
    assert any(m and not p for p, m in zip(plain, mirrored)) and any(p and not m for p, m in zip(plain, mirrored))


@pytest.mark.parametrize("mode", ["crop", "flip", "crop-flip"])
def test_augmentation_is_fixed_by_the_generator(mode):
    x = images()
    a, b = augment_batch(x, mode, 2, gen(5)), augment_batch(x, mode, 2, gen(5))
    assert torch.equal(a, b)
    assert not torch.equal(a, augment_batch(x, mode, 2, gen(6)))


@pytest.mark.parametrize("mode", ["crop", "flip", "crop-flip"])
@pytest.mark.parametrize("parts", [[13], [7, 6], [5, 4, 4], [4, 3, 3, 3], [1] * 13])
def test_each_rank_gets_exactly_its_slice_of_the_whole_batch_draws(mode, parts):
    x = images(n=13)
    whole = augment_batch(x, mode, 2, gen(3))
    offset, pieces = 0, []
    for n in parts:
        piece = augment_batch(x[offset:offset + n], mode, 2, gen(3), offset=offset, total=len(x))
        assert torch.equal(piece, whole[offset:offset + n]), (mode, parts, offset)
        pieces.append(piece)
        offset += n
    assert torch.equal(torch.cat(pieces), whole)
    if len(parts) > 1:  # without offset/total a rank would draw as if its part were the whole batch
        tail = x[parts[0]:]
        assert not torch.equal(augment_batch(tail, mode, 2, gen(3)), whole[parts[0]:])


# ---- the ensemble's accuracies (DFND's Q) ---------------------------------------------------


def card(accuracy=None, class_accuracy=None) -> ModelCard:
    return ModelCard(Path("t.yaml"), 3, InputSpec(size=(8, 8), channels=1, mean=[0.5], std=[0.5]),
                     accuracy=accuracy, class_accuracy=class_accuracy)


# DFND's per_class_accuracy: false reads the scalar accuracy of a card that has both (as
# `dfkd eval --write-card` writes them).


def test_ensemble_accuracy_is_the_per_class_mean_when_every_teacher_has_class_accuracy():
    got = ensemble_accuracy([card(0.9, [1.0, 0.8, 0.6]), card(0.7, [0.5, 0.6, 1.0])])
    assert got["class_accuracy"] == pytest.approx([0.75, 0.7, 0.8])
    assert ensemble_accuracy([card(0.9, [1.0, 0.8, 0.6])])["class_accuracy"] == pytest.approx([1.0, 0.8, 0.6])


def test_ensemble_accuracy_keeps_the_mean_scalar_beside_the_per_class_mean():
    got = ensemble_accuracy([card(0.9, [1.0, 0.8, 0.6]), card(0.7, [0.5, 0.6, 1.0])])
    assert got["accuracy"] == pytest.approx(0.8)
    assert ensemble_accuracy([card(0.9, [1.0, 0.8, 0.6])])["accuracy"] == pytest.approx(0.9)


def test_ensemble_accuracy_falls_back_to_the_mean_scalar_when_one_teacher_lacks_class_accuracy():
    got = ensemble_accuracy([card(0.9, [1.0, 0.8, 0.6]), card(0.6), card(0.75)])
    assert got["class_accuracy"] is None and got["accuracy"] == pytest.approx(0.75)


@pytest.mark.parametrize("cards", [[card(0.9), card()], [card(None, [1.0, 0.8, 0.6]), card(0.8)], [card()]])
def test_ensemble_accuracy_is_unknown_unless_every_teacher_has_one(cards):
    assert ensemble_accuracy(cards) == {"class_accuracy": None, "accuracy": None}


# ---- DFND: per_class_accuracy: false ---------------------------------------------------------

INFO = {"class_accuracy": [0.9, 0.6, 0.7], "accuracy": 0.8}


def test_per_class_accuracy_false_puts_the_scalar_accuracy_on_q_diagonal():
    per_class = build_objective("noisy", 3, {}, INFO)
    scalar = build_objective("noisy", 3, {"per_class_accuracy": False}, INFO)
    assert torch.diagonal(per_class.noise_adaptation()).tolist() == pytest.approx([0.9, 0.6, 0.7])
    q = scalar.noise_adaptation()
    assert torch.diagonal(q).tolist() == pytest.approx([0.8] * 3)
    assert q.sum(1).tolist() == pytest.approx([1.0] * 3)
    off = q[~torch.eye(3, dtype=torch.bool)]
    assert off.tolist() == pytest.approx([0.1] * 6)  # θ = 0: (1 − a)/(k − 1)
    assert "card accuracy" in scalar.describe() and "class_accuracy" not in scalar.describe()
    assert "card class_accuracy" in per_class.describe()
    # the option as a command line gives it (--set objective.per_class_accuracy=false)
    assert torch.equal(build_objective("noisy", 3, {"per_class_accuracy": "false"}, INFO).diagonal(), scalar.diagonal())


@pytest.mark.parametrize("per_class, diagonal", [(True, [0.9, 0.6, 0.7]),
                                                 (False, [0.8] * 3)])
def test_distill_takes_q_diagonal_from_the_card_as_per_class_accuracy_says(tmp_path, pattern_folder, random_teacher,
                                                                          per_class, diagonal):
    update_card(random_teacher, **INFO)  # a card with both accuracies, as `dfkd eval --write-card` leaves it
    c = default_config()
    c.update(method="noisy", steps=1, batch_size=8, amp=False, objective={"per_class_accuracy": per_class})
    r = distill(load_card(random_teacher), "resnet8", [str(pattern_folder)], tmp_path / "s", c, workers=0,
                device="cpu")
    state = torch.load(tmp_path / "s" / "checkpoints" / "last.pt", weights_only=True)["objective"]
    assert state["base.diag"].tolist() == pytest.approx(diagonal)
    assert ("from card class_accuracy" in r.description) == per_class
