import pickle
from pathlib import Path

import pytest
import torch
import yaml

from dfkd.cards import build_arch, load_card, load_model, save_card
from dfkd.errors import DfkdError
from dfkd.images import InputSpec
from dfkd.models import ARCHS


def write_card(path: Path, **data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))
    return path


def test_saved_card_loads_the_same_model(random_teacher: Path):
    card = load_card(random_teacher)
    assert (card.arch, card.num_classes, card.input.size, card.input.channels) == ("resnet8", 3, (16, 16), 1)
    assert card.classes == ["bars_h", "bars_v", "blob"]
    model = load_model(card)
    torch.manual_seed(0)
    fresh = ARCHS.get("resnet8")(num_classes=3, in_channels=1).eval()
    x = torch.randn(2, 1, 16, 16)
    assert torch.allclose(model(x), fresh(x))


def test_card_errors_name_the_problem(tmp_path: Path, random_teacher: Path):
    with pytest.raises(DfkdError, match="model card not found"):
        load_card(tmp_path / "missing.yaml")
    with pytest.raises(DfkdError, match=r"unknown arch 'resnet9'; known: .*resnet8"):
        load_card(write_card(tmp_path / "a.yaml", arch="resnet9", num_classes=3))
    with pytest.raises(DfkdError, match="weights file .* not found"):
        load_card(write_card(tmp_path / "b.yaml", arch="resnet8", num_classes=3, weights="nope.pt"))
    with pytest.raises(DfkdError, match="lists 2 classes but num_classes is 3"):
        load_card(write_card(tmp_path / "c.yaml", arch="resnet8", num_classes=3, classes=["a", "b"]))
    with pytest.raises(DfkdError, match="num_classes"):
        load_card(write_card(tmp_path / "d.yaml", arch="resnet8"))
    (tmp_path / "e.yaml").write_text("arch: [unclosed\n")
    with pytest.raises(DfkdError, match="not a valid YAML"):
        load_card(tmp_path / "e.yaml")
    with pytest.raises(DfkdError, match="resize 'zoom' is not one of"):
        load_card(write_card(tmp_path / "f.yaml", arch="resnet8", num_classes=3, input={"resize": "zoom"}))


def test_state_dict_that_does_not_fit_is_refused(tmp_path: Path, random_teacher: Path):
    weights = random_teacher.with_suffix(".pt")
    card = write_card(tmp_path / "ten.yaml", arch="resnet8", num_classes=10, weights=str(weights),
                      input={"size": 16, "channels": 1})
    with pytest.raises(DfkdError, match="does not fit arch resnet8 with 10 classes and 1 input channels"):
        load_model(load_card(card))
    card = write_card(tmp_path / "wide.yaml", arch="resnet8x4", num_classes=3, weights=str(weights),
                      input={"size": 16, "channels": 1})
    with pytest.raises(DfkdError, match="does not fit"):
        load_model(load_card(card))


def test_weights_are_loaded_without_unpickling_code(tmp_path: Path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"x": Evil()}))
    card = write_card(tmp_path / "evil.yaml", arch="resnet8", num_classes=3, weights="evil.pt")
    with pytest.raises(DfkdError, match="holds pickled code or objects") as e:
        load_model(load_card(card))
    assert "weights_only=False" not in str(e.value)  # no hint to switch the protection off
    (tmp_path / "evil.pt").write_bytes(bytes(range(256)) * 8)  # not a pickle at all: not "pickled code"
    with pytest.raises(DfkdError, match="evil.pt: not a PyTorch weights file"):
        load_model(load_card(card))
    torch.save(build_arch("resnet8", 3, 3).state_dict(), tmp_path / "evil.pt")
    whole = (tmp_path / "evil.pt").read_bytes()
    (tmp_path / "evil.pt").write_bytes(whole[: len(whole) // 2])  # a copy cut off
    with pytest.raises(DfkdError, match="evil.pt: a damaged or cut-off weights file"):
        load_model(load_card(card))


def test_python_arches_run_only_with_trust_code(tmp_path: Path, pattern_folder: Path, monkeypatch):
    """A downloaded card must not run code: `arch: python:os:system` is never called unless trusted."""
    from typer.testing import CliRunner

    from dfkd.cli import app

    monkeypatch.delenv("DFKD_TRUST_CODE", raising=False)
    marker = tmp_path / "pwned"
    card = write_card(tmp_path / "evil.yaml", arch="python:os:system", num_classes=2,
                      arch_args={"command": f"touch {marker}"})
    with pytest.raises(DfkdError, match="--trust-code"):
        load_card(card)
    res = CliRunner().invoke(app, ["eval", "--model", str(card), "--data", str(tmp_path)])
    assert res.exit_code == 2 and "--trust-code" in res.stderr and not marker.exists()
    res = CliRunner().invoke(app, ["train", "--arch", "python:os:system", "--data", str(pattern_folder), "--out",
                                   str(tmp_path / "t")])
    assert res.exit_code == 2 and "--trust-code" in res.stderr and not marker.exists()


def test_torchvision_python_and_torchscript_models(tmp_path: Path, random_teacher: Path, monkeypatch):
    tv = load_model(load_card(write_card(tmp_path / "tv.yaml", arch="torchvision:resnet18", num_classes=4)))
    assert tv(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    monkeypatch.setenv("DFKD_TRUST_CODE", "1")
    py = load_model(load_card(write_card(tmp_path / "py.yaml", arch="python:dfkd.models.resnet:CifarResNet",
                                         num_classes=5, arch_args={"blocks": [1], "widths": [8]})))
    assert py(torch.zeros(1, 3, 8, 8)).shape == (1, 5)
    model = load_model(load_card(random_teacher))
    script = tmp_path / "teacher.ts"
    torch.jit.trace(model, torch.zeros(1, 1, 16, 16)).save(str(script))
    card = load_card(script, {"size": 16, "channels": 1, "mean": [0.5], "std": [0.5]})
    assert card.num_classes == 3 and card.torchscript == script
    x = torch.randn(2, 1, 16, 16)
    assert torch.allclose(load_model(card)(x), model(x), atol=1e-6)
    (tmp_path / "junk.ts").write_bytes(b"not a model")
    with pytest.raises(DfkdError, match="neither a YAML model card"):
        load_card(tmp_path / "junk.ts")


def test_width_option_gives_wide_variants():
    small = ARCHS.get("resnet8")(num_classes=10)
    wide = ARCHS.get("resnet8x4")(num_classes=10)
    assert (small.feature_dim, wide.feature_dim) == (64, 256)
    assert ARCHS.get("resnet8")(num_classes=10, width=2).feature_dim == 128
    assert ARCHS.get("resnet18")(num_classes=10, in_channels=1)(torch.zeros(1, 1, 20, 20)).shape == (1, 10)


def test_checkpoints_saved_under_ddp_or_lightning_load_and_misfits_name_keys(tmp_path: Path, random_teacher: Path):
    card = load_card(random_teacher)
    state = torch.load(card.weights, weights_only=True)
    x = torch.randn(2, 1, 16, 16)
    want = load_model(card)(x)
    for name, wrapped in (("ddp.pt", {f"module.{k}": v for k, v in state.items()}),
                          ("lightning.ckpt", {"state_dict": {f"model.{k}": v for k, v in state.items()},
                                              "epoch": 3}),
                          ("compiled-ddp.pt", {f"module._orig_mod.{k}": v for k, v in state.items()})):
        torch.save(wrapped, tmp_path / name)
        other = write_card(tmp_path / f"{name}.yaml", arch="resnet8", num_classes=3, weights=name,
                           input={"size": 16, "channels": 1})
        assert torch.allclose(load_model(load_card(other))(x), want, atol=1e-6), name
    wrong = write_card(tmp_path / "wrong.yaml", arch="resnet14", num_classes=3, weights=str(card.weights),
                       input={"size": 16, "channels": 1})
    with pytest.raises(DfkdError, match=r"missing layer1\.1\.conv1\.weight, .* \(\+\d+ more\)$") as e:
        load_model(load_card(wrong))
    assert len(str(e.value)) < 400


def test_a_teacher_without_weights_is_refused_unless_said_on_purpose(tmp_path: Path):
    from dfkd.teacher import load_teacher

    missing = write_card(tmp_path / "a.yaml", arch="resnet8", num_classes=3)
    with pytest.raises(DfkdError, match="weights: none if an untrained model is meant"):
        load_teacher(load_card(missing), torch.device("cpu"))
    meant = write_card(tmp_path / "b.yaml", arch="resnet8", num_classes=3, weights="none")
    assert load_teacher(load_card(meant), torch.device("cpu")).card.weights is None


def test_torchvision_arch_on_one_channel_images_gets_a_one_channel_stem(tmp_path: Path, pattern_folder: Path):
    from typer.testing import CliRunner

    from dfkd.cli import app

    res = CliRunner().invoke(app, ["train", "--arch", "torchvision:resnet18", "--data", str(pattern_folder),
                                   "--out", str(tmp_path / "tv"), "--steps", "2", "--batch-size", "8",
                                   "--val-split", "0", "--workers", "0"])
    assert res.exit_code == 0, res.output
    model = load_model(load_card(tmp_path / "tv" / "model.yaml"))
    assert model.conv1.in_channels == 1 and model(torch.zeros(2, 1, 16, 16)).shape == (2, 3)


def test_list_goes_to_stdout_for_pipes_and_version():
    from typer.testing import CliRunner

    import dfkd
    from dfkd.cli import app

    res = CliRunner().invoke(app, ["list", "policies"])
    assert res.exit_code == 0 and res.stdout.splitlines()[0].startswith("policies\tdiverse\t")
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"dfkd {dfkd.__version__}"


@pytest.mark.slow
def test_timm_teacher_takes_timms_input_config_and_trains(tmp_path: Path, pattern_folder: Path):
    pytest.importorskip("timm")
    from typer.testing import CliRunner

    from dfkd.cli import app

    torch.manual_seed(0)
    net = build_arch("timm:resnet18", 4, 3)
    torch.save(net.state_dict(), tmp_path / "tm.pt")
    card = load_card(write_card(tmp_path / "tm.yaml", arch="timm:resnet18", num_classes=4, weights="tm.pt"))
    assert card.input.size == (224, 224) and card.input.mean == pytest.approx([0.485, 0.456, 0.406])
    assert load_model(card)(torch.zeros(2, 3, 224, 224)).shape == (2, 4)
    with pytest.raises(DfkdError, match="unknown timm model 'resnet_nope'"):
        load_card(write_card(tmp_path / "bad.yaml", arch="timm:resnet_nope", num_classes=4))
    res = CliRunner().invoke(app, ["train", "--arch", "timm:resnet18", "--data", str(pattern_folder), "--out",
                                   str(tmp_path / "run"), "--steps", "2", "--batch-size", "8", "--val-split", "0",
                                   "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert load_model(load_card(tmp_path / "run" / "model.yaml"))(torch.zeros(2, 1, 16, 16)).shape == (2, 3)
