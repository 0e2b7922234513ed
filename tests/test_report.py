"""``dfkd report``: one self-contained HTML page for select / expand / training runs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dfkd.errors import DfkdError
from dfkd.index import write_index

pytest.importorskip("matplotlib")
from dfkd.report import write_report  # noqa: E402

PNG = '<img src="data:image/png;base64,'


def _text(page: str) -> str:
    """The page without its embedded images (base64 can hold any short word by chance)."""
    return re.sub(r'<img [^>]*>', '', page)


def _select_run(root: Path) -> Path:
    """A tiny select run: 12 generated images in 3 teacher classes, one missing file, one skipped."""
    run, pool = root / "sel", root / "pool"
    pool.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        path = pool / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(path)
        rows.append({"path": path, "label": i % 3, "score": float(rng.random()), "confidence": 0.5})
    rows.append({"path": pool / "gone.png", "label": 0, "score": 0.01, "confidence": 0.9})  # deleted since
    columns = ["path", "label", "score", "confidence"]
    write_index(run / "scores.tsv", rows, columns)
    write_index(run / "selected.tsv", sorted(rows, key=lambda r: r["score"])[:6], columns)
    write_index(run / "skipped.tsv", [{"path": pool / "bad.jpg", "reason": "cannot identify image file"}],
                ["path", "reason"])
    card = root / "teacher.yaml"
    card.write_text("arch: resnet20\nnum_classes: 3\nclasses: [cat, dog, bird]\n")
    (run / "manifest.json").write_text(json.dumps({
        "command": "select", "argv": ["dfkd", "select", "--num", "6"], "options": {"num": 6, "score": "noise"},
        "inputs": {"teacher0": {"path": str(card)}}, "summary": {"pool": 14}}))
    return run


def test_select_report(tmp_path):
    run = _select_run(tmp_path)
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text(encoding="utf-8")
    for title in ("Selection", "Scores", "Images per teacher class", "Best- and worst-ranked images per class",
                  "Skipped files", "cannot identify image file", "dfkd select --num 6", "cat", "dog", "bird"):
        assert title in _text(page), title
    # 2 plots + 13 thumbnails (the missing file gets a placeholder tile)
    assert page.count(PNG) == 2 + 13
    assert "unreadable" in page
    assert "training: no data" in page


def test_training_and_eval_report(tmp_path):
    run = tmp_path / "d"
    run.mkdir()
    records = [{"step": s, "epoch": s / 10, "lr": 0.1 / s, "images_per_s": 100.0, "loss": 2.0 / s, "kd": 1.0 / s,
                **({"val_top1": 0.1 * s / 10} if s % 10 == 0 else {})} for s in range(1, 31)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "manifest.json").write_text(json.dumps({"command": "distill", "options": {"method": "kd"},
                                                   "objective": "KD T=4"}))
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps({
        "num_images": 10, "top1": 0.7, "top5": None, "class_accuracy": [0.8, None], "classes": ["a", "b"],
        "confusion": [[4, 1], [2, 3]]}))
    page = write_report(run, tmp_path / "r.html").read_text(encoding="utf-8")
    for title in ("Training", "Evaluation", "best val top-1 (step)", "KD T=4", "last kd"):
        assert title in page
    text = _text(page)
    assert re.search(r"<td>top-1</td><td>0\.7</td>", text) and "<td>0.3000 (30)</td>" in text, text[-3000:]
    assert page.count(PNG) == 2
    assert "select: no data" in page


def test_expand_report(tmp_path):
    """The files ``dfkd expand`` writes: pool rows with label -1 and the teacher's class in teacher_label."""
    _select_run(tmp_path)  # for its images in tmp_path/pool
    run, columns = tmp_path / "pool", ["path", "label", "score", "source", "teacher_label"]
    scores = [{"path": f"{i:02d}.png", "label": -1, "score": i - 6.0, "source": "pool", "teacher_label": i % 3}
              for i in range(12)]
    write_index(run / "pu_scores.tsv", scores, columns)
    write_index(run / "expanded.tsv", [{"path": "00.png", "label": 1, "source": "positive"}, *scores[7:]], columns)
    (run / "manifest.json").write_text(json.dumps({"command": "expand", "options": {"threshold": 0.0}}))
    page = write_report(run).read_text(encoding="utf-8")
    for title in ("PU expansion", "expanded.tsv source", "PU score (higher = more like the positives)",
                  "4 images", "no skipped.tsv"):
        assert title in page
    assert page.count(PNG) == 2 + 12  # histogram, class bars, 3 teacher classes x 4 images


def test_empty_or_missing_dir_raises(tmp_path):
    with pytest.raises(DfkdError, match="nothing to report"):
        write_report(tmp_path)
    with pytest.raises(DfkdError, match="not found"):
        write_report(tmp_path / "nope")


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(DfkdError, match="pip install matplotlib"):
        write_report(_select_run(tmp_path))


@pytest.mark.slow
def test_pipeline_report_from_real_cli_outputs(tmp_path, pattern_folder, random_teacher):
    """pipelines/dfnd.sh's OUT (select/, distill/, eval/) as one page, teacher against student on top."""
    from typer.testing import CliRunner

    from dfkd.cli import app

    run, runner = tmp_path / "dfnd", CliRunner()
    for args in (["select", "--teacher", str(random_teacher), "--pool", str(pattern_folder), "--out",
                  str(run / "select"), "--num-images", "9", "--workers", "0"],
                 ["distill", "--teacher", str(random_teacher), "--student", "resnet8", "--data",
                  str(run / "select" / "selected.tsv"), "--method", "kd", "--steps", "2", "--batch-size", "4",
                  "--out", str(run / "distill"), "--workers", "0"],
                 ["eval", "--model", str(run / "distill" / "student.yaml"), "--data", str(pattern_folder),
                  "--out", str(run / "eval"), "--workers", "0"],
                 ["pu-train", "--teacher", str(random_teacher), "--positive", str(pattern_folder), "--unlabeled",
                  str(pattern_folder), "--prior", "0.5", "--steps", "2", "--batch-size", "8", "--out",
                  str(tmp_path / "pu" / "pu"), "--workers", "0"],
                 ["expand", "--pu", str(tmp_path / "pu" / "pu" / "pu.yaml"), "--positive", str(pattern_folder),
                  "--unlabeled", str(pattern_folder), "--out", str(tmp_path / "pu" / "expand"), "--workers", "0"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
    manifest = json.loads((run / "eval" / "manifest.json").read_text())  # eval's run has one too (issue 22)
    assert manifest["command"] == "eval" and manifest["input"]["size"] == [16, 16]
    assert manifest["inputs"]["model"]["path"] == str((run / "distill" / "student.yaml").resolve())
    res = runner.invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    page = (run / "report.html").read_text()
    assert page.index("step select") < page.index("step distill") < page.index("step eval")
    assert "teacher against student" in page and "student.yaml" in page and "bars_h" in page
    # one manifest scheme: every command names its teacher card teacher0, with its hash
    for step in (run / "select", run / "distill", tmp_path / "pu" / "pu", tmp_path / "pu" / "expand"):
        inputs = json.loads((step / "manifest.json").read_text())["inputs"]
        assert inputs["teacher0"]["path"] == str(random_teacher.resolve()), step
        assert len(inputs["teacher0"]["sha256"]) == 64
    res = runner.invoke(app, ["report", str(tmp_path / "pu")])
    assert res.exit_code == 0, res.output
    assert "step expand" in (tmp_path / "pu" / "report.html").read_text()


def test_pipeline_report_pairs_each_student_with_its_own_eval(tmp_path):
    """Two distill steps and two evals: each student's top-1 is the eval.json that names it
    (every distill row used to get the first eval.json found, issue 22)."""
    run = tmp_path / "two"
    teacher = tmp_path / "teacher.yaml"
    teacher.write_text("arch: resnet8\nnum_classes: 2\naccuracy: 0.9\n")
    for name, top1 in (("distill-a", 0.61), ("distill-b", 0.83)):
        step = run / name
        step.mkdir(parents=True)
        (step / "metrics.jsonl").write_text(json.dumps({"step": 1, "epoch": 1, "lr": 0.1, "loss": 1.0}) + "\n")
        (step / "manifest.json").write_text(json.dumps({"command": "distill", "inputs": {
            "teacher0": {"path": str(teacher)}}}))
        ev = run / f"eval-{name[-1]}"
        ev.mkdir()
        (ev / "eval.json").write_text(json.dumps({
            "num_images": 10, "top1": top1, "top5": None, "class_accuracy": [top1, top1], "classes": ["a", "b"],
            "confusion": [[4, 1], [2, 3]], "model": str((step / "student.yaml").resolve())}))
    page = write_report(run).read_text(encoding="utf-8")
    table = page[page.index("teacher against student"):]
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)[1:3]
    assert "0.6100" in rows[0] and "0.8300" in rows[1], rows
