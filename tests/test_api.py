"""The Python API as a user calls it: card paths where cards go, plain dicts where configs go,
the trained model one call away, and one-line errors naming the API's parameters."""
import pytest
import torch

import dfkd


def test_card_paths_dicts_and_the_model_back(tmp_path, pattern_folder, random_teacher):
    card = str(random_teacher)  # a path, not a loaded card, everywhere
    sel = dfkd.select_pool(card, pattern_folder, tmp_path / "select", num_images=6, device="cpu", workers=0)
    assert sel.selected == 6
    ev = dfkd.evaluate_model(random_teacher, pattern_folder, device="cpu", workers=0)
    assert ev.top1 == dfkd.evaluate_model(dfkd.load_card(card), pattern_folder, device="cpu", workers=0).top1
    exported = dfkd.export_model(card, "torchscript", tmp_path / "t.pt")
    assert exported.max_abs_diff < 1e-4
    run = dfkd.distill_student(card, "resnet8", [sel.files["selected"]], tmp_path / "student",
                               {"method": "kd", "steps": 2, "batch_size": 4, "amp": False}, device="cpu", workers=0)
    student = dfkd.load_model(run.card)
    assert isinstance(student, torch.nn.Module) and not student.training
    assert student(torch.zeros(2, 1, 16, 16)).shape == (2, 3)
    trained = dfkd.train_classifier("resnet8", pattern_folder, tmp_path / "train", {"steps": 1, "batch_size": 4},
                                    device="cpu", workers=0)
    assert not dfkd.load_model(trained.card).training


def test_api_errors_are_one_line_naming_the_parameter(tmp_path, pattern_folder, random_teacher):
    with pytest.raises(dfkd.DfkdError, match=r"^teachers: expected a model card .* got int$"):
        dfkd.select_pool(3, pattern_folder, tmp_path / "s")
    with pytest.raises(dfkd.DfkdError, match=r"^config: unknown config key 'stepz'; known: .*steps"):
        dfkd.train_classifier("resnet8", pattern_folder, tmp_path / "t", {"stepz": 1})
    with pytest.raises(dfkd.DfkdError, match=r"^config: epochs='x': expected a number"):
        dfkd.distill_student(random_teacher, "resnet8", [pattern_folder], tmp_path / "d", {"epochs": "x"})
    with pytest.raises(dfkd.DfkdError, match="model card not found"):
        dfkd.load_model(tmp_path / "nothing.yaml")
