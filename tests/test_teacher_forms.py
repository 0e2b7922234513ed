"""Every form of teacher a user may already have (issue 23): an ONNX file, a Hugging Face model
folder, a whole pickled model (refused, with what to do), and students from torchvision and timm.

Each form must score a pool with the noise values of the equivalent PyTorch model."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dfkd.cards import load_card, load_model
from dfkd.cli import app
from dfkd.errors import DfkdError
from dfkd.images import image_tensor, normalize, pool_paths
from dfkd.select.scores import noise_value
from dfkd.teacher import load_teacher


def pool_noise(teacher_path: Path, pool: Path, **overrides) -> torch.Tensor:
    """The noise values a teacher (any form, through the one loader) gives the pool's images."""
    teacher = load_teacher(load_card(teacher_path, overrides), torch.device("cpu"))
    spec = teacher.card.input
    images = torch.stack([image_tensor(p, spec) for p in pool_paths(pool).paths])
    with torch.inference_mode():
        return noise_value(teacher.model(normalize(images, spec, torch.device("cpu"))))


def one_error_line(res, *fragments: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "error: " in lines[0], res.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def scores(run: Path) -> dict[str, float]:
    with open(run / "scores.tsv", encoding="utf-8") as f:
        return {r["path"]: float(r["score"]) for r in csv.DictReader(f, delimiter="\t")}


# ---- ONNX ----------------------------------------------------------------------------------

def export_onnx(card: Path, out: Path) -> Path:
    res = CliRunner().invoke(app, ["export", "--model", str(card), "--format", "onnx", "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


def test_an_exported_onnx_file_feeds_itself_and_scores_like_the_pytorch_model(tmp_path, random_teacher,
                                                                               pattern_folder):
    pytest.importorskip("onnxruntime")
    onnx_file = export_onnx(random_teacher, tmp_path / "t.onnx")
    card, torch_card = load_card(onnx_file), load_card(random_teacher)
    assert (card.form, card.input, card.classes, card.num_classes) == ("onnx", torch_card.input, torch_card.classes, 3)
    assert card.input_source == "ONNX file"
    got, want = pool_noise(onnx_file, pattern_folder), pool_noise(random_teacher, pattern_folder)
    diff = float((got - want).abs().max())
    print(f"ONNX teacher: largest noise-value difference {diff:.3g} over {len(got)} images")
    assert len(got) == 18 and diff < 1e-5 and float(want.std()) > 0  # the values differ between images

    # the same from the CLI: select with the file alone, no flags
    runner = CliRunner()
    for name, teacher in (("onnx", onnx_file), ("torch", random_teacher)):
        res = runner.invoke(app, ["select", "--teacher", str(teacher), "--pool", str(pattern_folder), "--out",
                                  str(tmp_path / name), "--num-images", "4", "--workers", "0"])
        assert res.exit_code == 0, res.output
    a, b = scores(tmp_path / "onnx"), scores(tmp_path / "torch")
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-5  # scores.tsv holds 6 digits
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["input"]["source"] == "ONNX file" and manifest["inputs"]["teacher0"]["sha256"]


def test_an_onnx_file_with_a_fixed_batch_runs_in_chunks(tmp_path, random_teacher):
    pytest.importorskip("onnxruntime")
    model = load_model(load_card(random_teacher))
    torch.onnx.export(model, (torch.zeros(2, 1, 16, 16),), str(tmp_path / "b2.onnx"), dynamo=False)
    onnx_model = load_model(load_card(tmp_path / "b2.onnx", {"mean": [0.5], "std": [0.5]}))
    x = torch.randn(5, 1, 16, 16)
    with torch.inference_mode():
        assert torch.allclose(onnx_model(x), model(x), atol=1e-5)


def test_an_onnx_card_and_bad_onnx_files_end_with_one_line_naming_the_file(tmp_path, random_teacher,
                                                                           pattern_folder):
    pytest.importorskip("onnxruntime")
    onnx_file = export_onnx(random_teacher, tmp_path / "t.onnx")
    spec = {"size": 16, "mean": [0.5], "std": [0.5]}
    (tmp_path / "good.yaml").write_text(yaml.safe_dump({"onnx": "t.onnx", "num_classes": 3, "input": spec}))
    assert load_card(tmp_path / "good.yaml").onnx == onnx_file

    class TwoOutputs(torch.nn.Module):
        def forward(self, x):
            f = x.mean((2, 3))
            return f @ torch.ones(1, 3), f

    torch.onnx.export(TwoOutputs(), (torch.zeros(1, 1, 16, 16),), str(tmp_path / "two.onnx"), dynamo=False,
                      input_names=["input"], output_names=["logits", "features"])
    torch.onnx.export(torch.nn.Conv2d(1, 3, 3), (torch.zeros(1, 1, 16, 16),), str(tmp_path / "map.onnx"),
                      dynamo=False)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    (tmp_path / "five.yaml").write_text(yaml.safe_dump({"onnx": "t.onnx", "num_classes": 5, "input": spec}))
    flags = ["--input-mean", "0.5", "--input-std", "0.5"]
    runner = CliRunner()
    for bad, fragments in ((tmp_path / "two.onnx", ("two.onnx: has 2 outputs (logits, features)",)),
                           (tmp_path / "map.onnx", ("map.onnx: its output", "N x classes")),
                           (tmp_path / "junk.onnx", ("junk.onnx: not an ONNX model",)),
                           (tmp_path / "five.yaml", ("t.onnx: gives 3 logits per image", "num_classes: 5"))):
        res = runner.invoke(app, ["select", "--teacher", str(bad), "--pool", str(pattern_folder), "--out",
                                  str(tmp_path / "run"), "--workers", "0", *flags])
        one_error_line(res, *fragments)
    res = runner.invoke(app, ["eval", "--model", str(onnx_file), "--data", str(pattern_folder), "--input-size", "20"])
    one_error_line(res, "t.onnx: takes 16x16 images (fixed in the file)")
    assert not (tmp_path / "run").exists()


def test_an_onnx_teacher_distills_and_pu_train_refuses_it(tmp_path, random_teacher, pattern_folder):
    pytest.importorskip("onnxruntime")
    onnx_file = export_onnx(random_teacher, tmp_path / "t.onnx")
    runner = CliRunner()
    res = runner.invoke(app, ["distill", "--teacher", str(onnx_file), "--method", "kd", "--data", str(pattern_folder),
                              "--student", "resnet8", "--out", str(tmp_path / "d"), "--steps", "2", "--batch-size", "4",
                              "--workers", "0"])
    assert res.exit_code == 0, res.output
    student = load_card(tmp_path / "d" / "student.yaml")
    assert student.num_classes == 3 and student.classes == ["bars_h", "bars_v", "blob"]
    res = runner.invoke(app, ["pu-train", "--teacher", str(onnx_file), "--positive", str(pattern_folder / "blob"),
                              "--unlabeled", str(pattern_folder), "--prior", "0.3", "--out", str(tmp_path / "pu")])
    one_error_line(res, "t.onnx: is an ONNX model, whose stages dfkd cannot tap", "--backbone")
    with pytest.raises(DfkdError, match="an ONNX model .its logits only.: its features cannot be read"):
        from dfkd.models.features import FeatureTap

        FeatureTap(load_model(load_card(onnx_file)), "--teacher")


# ---- Hugging Face ----------------------------------------------------------------------------

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def hf_folder(root: Path, processor: dict | None = None):
    """A tiny random ResNet image classifier saved as save_pretrained does, with a ViT-style
    preprocessor config (16×16, stretched); returns (folder, the module)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    names = ["bars_h", "bars_v", "blob"]
    config = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    try:
        model = transformers.ResNetForImageClassification(config).eval()
    except ImportError as e:  # transformers 5 needs PyTorch 2.6 (the low end of dfkd's range is 2.5)
        pytest.skip(f"transformers {transformers.__version__} cannot build models with torch {torch.__version__}: {e}")
    model.save_pretrained(str(root))
    pp = processor or {"do_resize": True, "size": {"height": 16, "width": 16}, "do_rescale": True,
                       "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN, "image_std": STD}
    (root / "preprocessor_config.json").write_text(json.dumps(pp))
    return root, model


def test_a_hugging_face_folder_scores_like_its_module_fed_by_hand(tmp_path, pattern_folder):
    folder, model = hf_folder(tmp_path / "hf")
    card = load_card(folder)
    assert (card.form, card.num_classes, card.classes) == ("huggingface", 3, ["bars_h", "bars_v", "blob"])
    assert (card.input.size, card.input.resize, card.input_source) == ((16, 16), "stretch", "preprocessor_config.json")
    got = pool_noise(folder, pattern_folder)
    # by hand: the same pixels, normalised as the preprocessor says (p·rescale − mean)/std, through the module
    pixels = torch.stack([image_tensor(p, card.input) for p in pool_paths(pattern_folder).paths]).float()
    x = (pixels / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        want = noise_value(model(pixel_values=x).logits)
    diff = float((got - want).abs().max())
    print(f"Hugging Face teacher: largest noise-value difference {diff:.3g} over {len(got)} images")
    assert diff < 1e-5 and float(want.std()) > 0


def test_the_preprocessor_config_gives_the_input():
    from dfkd.hf_model import preprocessor_input

    convnext = {"size": {"shortest_edge": 224}, "crop_pct": 0.875, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    assert preprocessor_input(convnext, Path("p")) == {"size": [224, 224], "resize": "crop", "mean": [0.5] * 3,
                                                       "std": [0.5] * 3}
    cropped = {"size": {"shortest_edge": 256}, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
               "do_rescale": False, "image_mean": [127.5] * 3, "image_std": [127.5] * 3}
    got = preprocessor_input(cropped, Path("p"))  # pixels fed unscaled: mean/std in 0..255 units
    assert got["size"] == [224, 224] and got["resize"] == "crop" and got["mean"] == pytest.approx([0.5] * 3)
    assert preprocessor_input({"do_normalize": False, "size": 32}, Path("p"))["std"] == pytest.approx([1.0] * 3)
    assert "size" not in preprocessor_input({"size": {"shortest_edge": 224}, "image_mean": [0.5] * 3,
                                             "image_std": [0.5] * 3}, Path("p"))  # no fixed size: flags must say


def test_bad_hugging_face_folders_end_with_one_line_naming_the_file(tmp_path, pattern_folder):
    from safetensors.torch import load_file, save_file

    folder, _ = hf_folder(tmp_path / "hf")
    runner = CliRunner()

    def refused(path: Path, *fragments: str) -> None:
        res = runner.invoke(app, ["eval", "--model", str(path), "--data", str(pattern_folder)])
        one_error_line(res, *fragments)

    import shutil

    no_pp = Path(shutil.copytree(folder, tmp_path / "no_pp"))
    (no_pp / "preprocessor_config.json").unlink()
    refused(no_pp, f"{no_pp / 'preprocessor_config.json'}: not found", "--input-size")
    no_config = Path(shutil.copytree(folder, tmp_path / "no_config"))
    (no_config / "config.json").unlink()
    refused(no_config, f"{no_config / 'config.json'}: not found")
    keys = Path(shutil.copytree(folder, tmp_path / "keys"))
    state = load_file(str(keys / "model.safetensors"))
    state["head.extra"] = torch.zeros(2)
    del state["classifier.1.bias"]
    save_file(state, str(keys / "model.safetensors"))
    refused(keys, f"{keys / 'model.safetensors'}: does not fit ResNetForImageClassification",
            "missing classifier.1.bias", "unexpected head.extra")
    res = runner.invoke(app, ["pu-train", "--teacher", str(folder), "--positive", str(pattern_folder / "blob"),
                              "--unlabeled", str(pattern_folder), "--prior", "0.3", "--out", str(tmp_path / "pu")])
    one_error_line(res, "is a Hugging Face model, whose stages dfkd cannot tap")


# ---- a whole pickled model, students from torchvision and timm --------------------------------

def test_a_whole_pickled_model_says_how_to_save_a_state_dict(tmp_path, pattern_folder):
    from dfkd.models import ARCHS

    torch.save(ARCHS.get("resnet8")(num_classes=3, in_channels=1), tmp_path / "whole.pt")
    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump({"arch": "resnet8", "num_classes": 3, "weights": "whole.pt",
                                    "input": {"size": 16, "mean": [0.5], "std": [0.5]}}))
    runner = CliRunner()
    for given in (tmp_path / "whole.pt", card):  # as the teacher itself, and as a card's weights
        res = runner.invoke(app, ["eval", "--model", str(given), "--data", str(pattern_folder)])
        one_error_line(res, "whole.pt: holds a pickled dfkd.models.resnet.CifarResNet",
                       "torch.save(model.state_dict(), 'weights.pt')", "TorchScript")


@pytest.mark.parametrize("student", ["torchvision:resnet18", "timm:mobilenetv3_small_100"])
def test_students_from_torchvision_and_timm_take_the_teachers_classes(tmp_path, random_teacher, pattern_folder,
                                                                      student):
    if student.startswith("timm:"):
        pytest.importorskip("timm")
    res = CliRunner().invoke(app, ["distill", "--teacher", str(random_teacher), "--method", "kd", "--data",
                                   str(pattern_folder), "--student", student, "--out", str(tmp_path / "d"),
                                   "--steps", "2", "--batch-size", "6", "--lr", "0.01", "--workers", "0"])
    assert res.exit_code == 0, res.output
    card = load_card(tmp_path / "d" / "student.yaml")
    assert (card.arch, card.num_classes, card.input.channels) == (student, 3, 1)
    with torch.inference_mode():
        out = load_model(card)(torch.zeros(2, 1, 16, 16))
    assert out.shape == (2, 3) and bool(torch.isfinite(out).all())
