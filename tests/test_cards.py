import json
import pickle
import re
from pathlib import Path

import pytest
import torch
import yaml

from dfkd.cards import build_arch, load_card, load_model, save_card
from dfkd.errors import DfkdError
from dfkd.images import InputSpec
from dfkd.models import ARCHS


GREY16 = {"size": 16, "channels": 1, "mean": [0.5], "std": [0.5]}
RGB32 = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def flat(text: str) -> str:
    """A rich table's text with the cell borders and line wraps as single spaces."""
    return re.sub(r"[\s│┃]+", " ", text)


def write_card(path: Path, **data) -> Path:
    """A card of ``data``; its input is RGB32 unless ``data`` says one (input=None: none)."""
    data.setdefault("input", RGB32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
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
        load_card(write_card(tmp_path / "f.yaml", arch="resnet8", num_classes=3, input={**RGB32, "resize": "zoom"}))


def test_state_dict_that_does_not_fit_is_refused(tmp_path: Path, random_teacher: Path):
    weights = random_teacher.with_suffix(".pt")
    card = write_card(tmp_path / "ten.yaml", arch="resnet8", num_classes=10, weights=str(weights),
                      input=GREY16)
    with pytest.raises(DfkdError, match="does not fit arch resnet8 with 10 classes and 1 input channels"):
        load_model(load_card(card))
    card = write_card(tmp_path / "wide.yaml", arch="resnet8x4", num_classes=3, weights=str(weights),
                      input=GREY16)
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
                           input=GREY16)
        assert torch.allclose(load_model(load_card(other))(x), want, atol=1e-6), name
    wrong = write_card(tmp_path / "wrong.yaml", arch="resnet14", num_classes=3, weights=str(card.weights),
                       input=GREY16)
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
    spec = yaml.safe_load((tmp_path / "tv" / "model.yaml").read_text())["input"]  # train writes the input
    manifest = json.loads((tmp_path / "tv" / "manifest.json").read_text())
    assert manifest["input"] == {**spec, "source": "training images"} and spec["size"] == [16, 16]
    assert "input 1x16x16, mean [" in flat(res.stderr)


def test_list_goes_to_stdout_for_pipes_and_version():
    from typer.testing import CliRunner

    import dfkd
    from dfkd.cli import app

    res = CliRunner().invoke(app, ["list", "policies"])
    assert res.exit_code == 0 and res.stdout.splitlines()[0].startswith("policies\tdiverse\t")
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"dfkd {dfkd.__version__}"


@pytest.mark.slow
def test_timm_teacher_loads_and_trains(tmp_path: Path, pattern_folder: Path):
    pytest.importorskip("timm")
    from typer.testing import CliRunner

    from dfkd.cli import app

    torch.manual_seed(0)
    net = build_arch("timm:resnet18", 4, 3)
    torch.save(net.state_dict(), tmp_path / "tm.pt")
    card = load_card(write_card(tmp_path / "tm.yaml", arch="timm:resnet18", num_classes=4, weights="tm.pt"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(load_model(card)(x), net.eval()(x))
    with pytest.raises(DfkdError, match="unknown timm model 'resnet_nope'"):
        load_card(write_card(tmp_path / "bad.yaml", arch="timm:resnet_nope", num_classes=4))
    res = CliRunner().invoke(app, ["train", "--arch", "timm:resnet18", "--data", str(pattern_folder), "--out",
                                   str(tmp_path / "run"), "--steps", "2", "--batch-size", "8", "--val-split", "0",
                                   "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert load_model(load_card(tmp_path / "run" / "model.yaml"))(torch.zeros(2, 1, 16, 16)).shape == (2, 3)


def test_a_card_without_input_is_refused_with_a_line_to_write(tmp_path: Path):
    """No silent default input (it was 32 px, mean/std 0.5, stretched): the line says what to write."""
    for arch, example in (("resnet8", "input: {size: 32, mean: [0.4914"),
                          ("torchvision:resnet18", "input: {size: 224, mean: [0.485, 0.456, 0.406]")):
        card = write_card(tmp_path / f"{arch[:5]}.yaml", arch=arch, num_classes=3, input=None)
        with pytest.raises(DfkdError) as e:
            load_card(card)
        assert str(e.value).startswith(f"{card}: input: no size, mean, std given, and dfkd assumes none")
        assert example in str(e.value) and "\n" not in str(e.value)
    half = write_card(tmp_path / "half.yaml", arch="resnet8", num_classes=3, input={"size": 64, "channels": 3})
    with pytest.raises(DfkdError, match=r"half.yaml: input: no mean, std given"):
        load_card(half)


def test_input_from_flags_and_where_it_came_from_is_recorded(tmp_path: Path):
    from dfkd.cards import input_record

    card = load_card(write_card(tmp_path / "a.yaml", arch="resnet8", num_classes=3, input={**GREY16, "resize": "pad"}))
    assert input_record(card) == {"size": [16, 16], "channels": 1, "mean": [0.5], "std": [0.5], "resize": "pad",
                                  "source": "card"}
    card = load_card(write_card(tmp_path / "b.yaml", arch="resnet8", num_classes=3, input=None),
                     {"size": 20, "mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]})
    assert (card.input.size, card.input.channels, card.input_source) == ((20, 20), 3, "flags")
    card = load_card(write_card(tmp_path / "c.yaml", arch="resnet8", num_classes=3), {"size": 24})
    assert (card.input.size, card.input.mean, card.input_source) == ((24, 24), RGB32["mean"], "card, flags for size")


@pytest.mark.slow
def test_a_timm_card_without_input_is_refused_with_timms_pretrained_config_as_the_example(tmp_path: Path):
    """timm's pretrained config describes timm's weights, not the card's (trained at 64 px, say)."""
    pytest.importorskip("timm")
    card = write_card(tmp_path / "tm.yaml", arch="timm:resnet18", num_classes=4, input=None)
    with pytest.raises(DfkdError, match=r"e\.g\. input: \{size: 224, mean: \[0\.485, 0\.456, 0\.406\], std: .*"
                                        r"resize: crop\} if they were trained as timm's pretrained resnet18"):
        load_card(card)
    card = load_card(write_card(tmp_path / "tm64.yaml", arch="timm:resnet18", num_classes=4,
                                input={**RGB32, "size": 64}))
    assert card.input.size == (64, 64) and card.input.mean == [0.5, 0.5, 0.5] and card.input_source == "card"


NONE_MODULE = "def build(**kwargs):\n    return None\n"
BAD_FIELDS = [  # issue 25 case 9: each ends with one line naming the card and the field, exit 2
    ("arch: resnet8\narch_args: {bogus: 1}\n", "arch_args"),
    ("arch: resnet8\ninput: [1, 2]\n", "input: expected a mapping"),
    ("arch: resnet8\ninput: {size: big, mean: [0.5], std: [0.5]}\n", "input: size 'big'"),
    ("arch: 5\n", "arch: 5 is not an architecture name"),
    ("arch: resnet8\nnum_classes: 1e9\n", "num_classes: '1e9' is not a whole number"),
    ("arch: resnet8\nnum_classes: 1.0e+9\n", "num_classes: 1000000000.0 is not a whole number"),
    ("arch: resnet8\nnum_classes: 1000000000\n", "num_classes: 1000000000 is out of range"),
    ("arch: resnet8\nnum_classes: 10.7\n", "num_classes: 10.7 is not a whole number"),
    ("arch: resnet8\ninput: {size: 60000, mean: [0.5], std: [0.5]}\n", "input: size 60000: each side must be"),
    ("arch: resnet8\ninput: {size: [32, 60000], mean: [0.5], std: [0.5]}\n", "input: size [32, 60000]"),
    ("arch: python:nonemodule:build\n", "arch python:nonemodule:build returned None, not a torch.nn.Module"),
    ("arch: resnet8\nnum_classes: 0\n", "num_classes: 0 is out of range"),
    ("arch: resnet8\nnum_classes: -1\n", "num_classes: -1 is out of range"),
    ("arch: resnet8\nclasses: {a: 1}\n", "classes: expected a list"),
    ("arch: resnet8\naccuracy: high\n", "accuracy: 'high' is not an accuracy"),
    ("arch: resnet8\nweights: [a.pt]\n", "weights: ['a.pt'] is not a file name"),
    ("arch: resnet8\nmahalanobis: 5\n", "mahalanobis: 5 is not what dfkd eval --write-card writes"),
    ("arch: resnet8\nmahalanobis: {file: gone.npz}\n", "mahalanobis file"),
]


@pytest.mark.parametrize("text,fragment", BAD_FIELDS, ids=[f[1][:30] for f in BAD_FIELDS])
def test_a_bad_card_field_is_one_line_naming_the_card_and_field(tmp_path: Path, pattern_folder: Path, monkeypatch,
                                                                text: str, fragment: str):
    from typer.testing import CliRunner

    from dfkd.cli import app

    (tmp_path / "nonemodule.py").write_text(NONE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    defaults = {"num_classes": "num_classes: 3\n", "weights": "weights: none\n",
                "input": "input: {size: 16, mean: [0.5], std: [0.5]}\n"}
    text += "".join(line for key, line in defaults.items() if f"{key}:" not in text)
    card = tmp_path / "card.yaml"
    card.write_text(text)
    res = CliRunner().invoke(app, ["--trust-code", "eval", "--model", str(card), "--data", str(pattern_folder),
                                   "--workers", "0"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dfkd eval: error: ") and f"{card}: " in lines[0], res.stderr
    assert fragment in lines[0], res.stderr


def test_every_command_records_and_prints_the_input_it_fed(tmp_path: Path, pattern_folder: Path,
                                                            random_teacher: Path):
    from typer.testing import CliRunner

    from dfkd.cli import app

    want = {"size": [16, 16], "channels": 1, "mean": [0.5], "std": [0.5], "resize": "stretch", "source": "card"}
    res = CliRunner().invoke(app, ["select", "--teacher", str(random_teacher), "--pool", str(pattern_folder),
                                   "--out", str(tmp_path / "s"), "--num-images", "3", "--workers", "0"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["input"] == want
    assert "teacher input: 1x16x16, mean [0.5], std [0.5], resize stretch (from card)" in res.stderr
    res = CliRunner().invoke(app, ["eval", "--model", str(random_teacher), "--data", str(pattern_folder),
                                   "--out", str(tmp_path / "e"), "--workers", "0", "--input-size", "12"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["input"] == {
        **want, "size": [12, 12], "source": "card, flags for size"}
    assert "input 1x12x12, mean [0.5], std [0.5], resize stretch (from card, flags for size)" in flat(res.stderr)


def test_write_card_keeps_the_users_comments_and_layout(tmp_path):
    """eval --write-card adds the accuracies without losing the rest of the user's card (it was
    rewritten by yaml.safe_dump, comments stripped; issue 23)."""
    import yaml as _yaml

    from dfkd.cards import update_card

    card = tmp_path / "teacher.yaml"
    head = ("# our production teacher, trained 2026-10 on the private set\n"
            "arch: resnet8   # the small one\n"
            "num_classes: 3\n"
            "class_accuracy:\n- 0.1\n- 0.2\n- 0.3\n"
            "input:\n  size: 16  # as trained\n  mean: [0.5]\n  std: [0.5]\n")
    card.write_text(head + "# kept last\nweights: t.pt\n")
    update_card(card, accuracy=0.75, class_accuracy=[0.5, 0.75, 1.0])
    text = card.read_text()
    for kept in ("# our production teacher", "# the small one", "size: 16  # as trained", "# kept last\nweights: t.pt"):
        assert kept in text, text
    data = _yaml.safe_load(text)
    assert data["accuracy"] == 0.75 and data["class_accuracy"] == [0.5, 0.75, 1.0] and data["input"]["size"] == 16
    update_card(card, accuracy=0.8)  # again: replaced where it stands, not added twice
    assert card.read_text().count("accuracy: ") == 2 and _yaml.safe_load(card.read_text())["accuracy"] == 0.8
