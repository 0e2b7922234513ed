"""The CUDA paths (autocast, channels_last, pinned memory, worker processes, GPU-resident data).
Skipped without a GPU; run them with `pytest -m gpu` on a machine that has one."""
import pytest

from dfkd.cards import load_card
from dfkd.distill.run import default_config, distill
from dfkd.evaluate import evaluate
from dfkd.select import select_pool

pytestmark = pytest.mark.gpu


@pytest.mark.slow
def test_select_on_cuda_matches_cpu_ranking(tmp_path, digits_folders, digits_teacher):
    card = load_card(digits_teacher)
    gpu = select_pool(card, digits_folders[1], tmp_path / "gpu", num_images=100, device="cuda", amp=False, workers=2)
    cpu = select_pool(card, digits_folders[1], tmp_path / "cpu", num_images=100, device="cpu", amp=False, workers=0)
    assert gpu.class_counts == cpu.class_counts
    assert gpu.score_quantiles["median"] == pytest.approx(cpu.score_quantiles["median"], rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_distill_on_cuda_with_autocast_learns(tmp_path, digits_folders, digits_teacher):
    train, test = digits_folders
    card = load_card(digits_teacher)
    cfg = {**default_config(), "method": "noisy", "epochs": 6, "batch_size": 64, "lr": 0.05, "amp": True}
    r = distill(card, "resnet8", [str(train)], tmp_path / "s", cfg, device="cuda", workers=2)
    assert evaluate(load_card(r.card), test, device="cuda").top1 > 0.5


@pytest.mark.slow
def test_write_card_and_select_auto_on_cuda_match_cpu(tmp_path, digits_folders, digits_teacher):
    """The Mahalanobis fit of eval --write-card and select's distances, under CUDA autocast."""
    import shutil

    train, test = digits_folders
    card_path = tmp_path / "t" / "model.yaml"
    card_path.parent.mkdir()
    shutil.copy(digits_teacher, card_path)
    shutil.copy(load_card(digits_teacher).weights, card_path.parent / load_card(digits_teacher).weights.name)
    evaluate(card_path, train, device="cuda", workers=2, write_card=True)
    card = load_card(card_path)
    gpu = select_pool(card, test, tmp_path / "gpu", num_images="auto", dedup="off", device="cuda", workers=2)
    cpu = select_pool(card, test, tmp_path / "cpu", num_images="auto", dedup="off", device="cpu", amp=False, workers=0)
    assert gpu.estimate.method == cpu.estimate.method == "mahalanobis"
    assert abs(gpu.estimate.count - cpu.estimate.count) <= 0.02 * cpu.estimate.scored, (gpu.estimate, cpu.estimate)
