"""Golden values for MEAL V2's ensemble and discriminator and MLKD's align/correlation terms.

Computed by hand once (tests/fixtures/terms_golden.json), with plain math:
* ensemble, T=2, z1=[1,0], z2=[0,2]: softmax(z1/2)=[e^.5,1]/(e^.5+1), softmax(z2/2)=[1,e]/(1+e);
  p = their mean; logits = 2·log p.
* align: rows ([1,0] vs [1,1]) -> ‖[1,0]−[1,1]/√2‖² = 2−√2; ([0,2] vs [0,−1]) -> 4; mean (6−√2)/2.
* correlation, τ=.5: teacher cos = I -> rows softmax([2,0]), softmax([0,2]); student rows [1,0],[1,1]
  -> cos 1/√2 -> rows softmax([2,√2]), softmax([√2,2]); mean over rows of KL(A_T ‖ A_S).
* discriminator D(p)=p0−p1: p_T=softmax([2,0]) -> D=tanh(1); p_S=[.5,.5] -> D=0;
  D's loss = log(1+e^−tanh 1) + log 2; fooling loss = log 2.
"""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from dfkd.teacher import TeacherEnsemble, adapt_input, ensemble_logits
from dfkd.distill.objectives import build_objective, make_extra_optimizers
from dfkd.train.objective import Batch
from dfkd.distill.terms import (TERM_DEFAULTS, WithTerms, align_loss, correlation_loss, discriminator_losses,
                               online_keep)
from dfkd.cards import load_card
from dfkd.errors import DfkdError
from dfkd.select.scores import noise_value
from dfkd.images import InputSpec

G = json.loads((Path(__file__).parent / "fixtures" / "terms_golden.json").read_text())
T = torch.tensor


def test_ensemble_average_golden():
    g = G["ensemble"]
    z = ensemble_logits([T([g["z1"]]), T([g["z2"]])], g["T"])
    assert z[0].tolist() == pytest.approx(g["logits"], rel=1e-6)
    assert torch.softmax(z / g["T"], 1)[0].tolist() == pytest.approx(g["probs"], rel=1e-6)
    one = ensemble_logits([T([g["z1"]])], 1.0).softmax(1)
    assert torch.allclose(one, T([g["z1"]]).softmax(1))  # a single teacher is itself


def test_align_and_correlation_golden():
    a, c = G["align"], G["correlation"]
    assert float(align_loss(T(a["student"]), T(a["teacher"]))) == pytest.approx(a["loss"], rel=1e-6)
    assert float(correlation_loss(T(c["student"]), T(c["teacher"]), c["tau"])) == pytest.approx(c["loss"], rel=1e-5)
    same = torch.randn(5, 7)
    assert float(correlation_loss(same, same, 0.5)) == pytest.approx(0.0, abs=1e-6)


def test_discriminator_losses_golden_and_gradients_reach_the_right_side():
    g = G["discriminator"]
    disc = nn.Linear(2, 1)
    with torch.no_grad():
        disc.weight.copy_(T(g["weight"]))
        disc.bias.copy_(T(g["bias"]))
    s = T(g["student_logits"], requires_grad=True)
    d_loss, fool = discriminator_losses(disc, s, T(g["teacher_logits"]))
    assert (float(d_loss), float(fool)) == pytest.approx((g["d_loss"], g["fool"]), rel=1e-6)
    fool.backward(retain_graph=True)
    assert disc.weight.grad is None and s.grad.abs().sum() > 0  # fooling trains the student only
    s.grad = None
    d_loss.backward()
    assert disc.weight.grad.abs().sum() > 0 and s.grad is None  # D's loss trains D only


def test_adapt_input_resizes_rechannels_renormalises():
    grey = InputSpec(size=(16, 16), channels=1, mean=[0.5], std=[0.5])
    rgb = InputSpec(size=(24, 24), channels=3, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    x = torch.zeros(2, 1, 16, 16)  # normalised 0 = raw 0.5 grey
    y = adapt_input(x, grey, rgb)
    assert y.shape == (2, 3, 24, 24) and torch.allclose(y, torch.full_like(y, 0.5))
    assert adapt_input(x, grey, grey) is x
    ens = TeacherEnsemble([nn.Sequential(nn.Flatten(), nn.LazyLinear(4)), nn.Sequential(nn.Flatten(), nn.LazyLinear(4))],
                          [grey, rgb])
    assert ens(x).shape == (2, 4)


def test_h_and_discriminator_train():
    torch.manual_seed(0)
    terms = {k: dict(v) for k, v in TERM_DEFAULTS.items()}
    terms["align"]["weight"], terms["correlation"]["weight"], terms["discriminator"]["weight"] = 10, 20, 1
    obj = WithTerms(build_objective("kd", 4), 4, terms, student_dim=6, teacher_dim=8)
    assert obj.needs_features and len(obj.student_params()) == 4
    opt = torch.optim.SGD(obj.student_params(), lr=0.1)
    extras = make_extra_optimizers(obj)
    assert len(extras) == 1  # the discriminator's Adam
    s_feat, t_feat = torch.randn(16, 6), torch.randn(16, 8)
    s_logits, t_logits = torch.randn(16, 4), torch.randn(16, 4)
    h0, d0 = obj.h[0].weight.clone(), obj.disc[0].weight.clone()
    first = None
    for _ in range(30):
        out = obj(Batch(s_logits, torch.full((16,), -1), t_logits, (s_feat, t_feat)))
        first = first if first is not None else float(out["align"] + out["correlation"])
        for o in (opt, *extras):
            o.zero_grad()
        out["loss"].backward()
        for o in (opt, *extras):
            o.step()
    assert set(out) >= {"loss", "kd", "align", "correlation", "disc", "fool"}
    assert not torch.equal(h0, obj.h[0].weight) and not torch.equal(d0, obj.disc[0].weight)
    assert float(out["align"] + out["correlation"]) < first  # h learns to match the teacher's features


def test_online_selection_trains_on_the_lowest_noise_share_of_each_batch():
    torch.manual_seed(0)
    t_logits = torch.randn(10, 4) * torch.linspace(0.1, 5, 10)[:, None]  # later rows more confident
    keep = {k: dict(v) for k, v in TERM_DEFAULTS.items()}
    keep["online"].update(keep=0.3, policy="global")
    online = WithTerms(build_objective("kd", 4), 4, keep)
    rows = online.rows(t_logits)
    noise = noise_value(t_logits)
    assert len(rows) == 3 and set(rows.tolist()) == set(noise.argsort()[:3].tolist())
    assert torch.equal(rows, online_keep(t_logits, 0.3, "global")) and WithTerms(build_objective("kd", 4), 4).rows(t_logits) is None
    assert "online selection" in online.describe() and "online" not in WithTerms(build_objective("kd", 4), 4).describe()
    assert len(online_keep(t_logits[:1], 0.01, "global")) == len(online_keep(t_logits[:1], 0.01, "per-class")) == 1
    for bad in (0, 1.5, True):
        keep["online"]["keep"] = bad
        with pytest.raises(DfkdError, match="online.keep"):
            WithTerms(build_objective("kd", 4), 4, keep)
    keep["online"].update(keep=0.3, policy="diverse")  # needs features: not per batch
    with pytest.raises(DfkdError, match="online.policy='diverse'"):
        WithTerms(build_objective("kd", 4), 4, keep)


def test_online_per_class_keeps_a_share_of_every_predicted_class():
    """The collapse of the global rule: the most confident rows are all of one class."""
    t_logits = torch.zeros(12, 3)
    t_logits[:6, 0] = torch.arange(10.0, 16.0)  # rows 0-5: class 0, very confident
    t_logits[6:9, 1] = torch.tensor([1.0, 3.0, 2.0])  # rows 6-8: class 1
    t_logits[9:, 2] = torch.tensor([2.0, 1.0, 0.5])  # rows 9-11: class 2
    assert set(online_keep(t_logits, 0.5, "global").tolist()) == set(range(6))  # global: class 0 only
    rows = online_keep(t_logits, 0.5, "per-class")
    assert sorted(rows.tolist()) == [4, 5, 7, 8, 9, 10]  # the 2 best of each class
    noise = noise_value(t_logits)
    assert torch.equal(noise[rows], noise[rows].sort().values)  # best first
    objective = WithTerms(build_objective("kd", 3), 3, {"online": {"keep": 0.5}})  # per-class: the default
    assert torch.equal(objective.rows(t_logits), rows) and "per predicted class" in objective.describe()


def test_online_per_class_takes_turns_and_prefers_no_class_index():
    """Fewer kept rows than classes: the best row of each class competes, whatever its index (a
    quota of ⌈n/K⌉ would go to classes 0..n-1). With enough rows of every class and n a multiple
    of K, the turns choose what select's per-class quota does."""
    from dfkd.select.policies import POLICIES

    t_logits = torch.zeros(20, 10)
    for i in range(20):  # two rows per class; classes 5..9 hold the confident ones
        c = i % 10
        t_logits[i, c] = (8.0 if c >= 5 else 2.0) + i / 20
    rows = online_keep(t_logits, 0.25, "per-class")  # 5 rows
    assert sorted(t_logits[rows].argmax(1).tolist()) == [5, 6, 7, 8, 9]
    assert len(set(online_keep(t_logits, 0.5, "per-class").tolist())) == 10  # one row of every class
    torch.manual_seed(1)
    for _ in range(5):
        logits = torch.randn(400, 4) * 3
        kept = online_keep(logits, 0.2, "per-class")
        chosen = POLICIES.get("per-class")(noise_value(logits).numpy(), logits.argmax(1).numpy(), 80, 4)
        assert torch.equal(kept, torch.as_tensor(chosen))


def test_online_selection_runs_the_student_on_the_kept_rows_only(tmp_path, pattern_folder, random_teacher, monkeypatch):
    """The loop asks the objective for the rows before the student's forward: the student's
    outputs, the labels and the teacher's logits of each step are those of the kept rows."""
    from dfkd.distill.run import default_config, distill

    seen = []
    rows_of, forward = WithTerms.rows, WithTerms.forward

    def rows(self, t_logits):
        got = rows_of(self, t_logits)
        seen.append([t_logits.clone(), got])
        return got

    def checked_forward(self, batch):
        full, kept = seen[-1]
        seen[-1].append((len(batch.outputs), torch.equal(batch.teacher_logits, full[kept])))
        return forward(self, batch)

    monkeypatch.setattr(WithTerms, "rows", rows)
    monkeypatch.setattr(WithTerms, "forward", checked_forward)
    c = default_config()
    c.update(method="kd", steps=3, batch_size=8, amp=False, online={"keep": 0.25})
    distill(load_card(random_teacher), "resnet8", [str(pattern_folder)], tmp_path / "s", c, workers=0, device="cpu")
    assert len(seen) == 3 and all(len(full) == 8 and s == (2, True) for full, _, s in seen)
