"""``report``: one self-contained HTML page for a run directory (plots and thumbnails as PNG data URIs).

Shows what the run directory holds: a selection (``scores.tsv``), a PU expansion
(``pu_scores.tsv`` / ``expanded.tsv``), training curves (``metrics.jsonl``) and an evaluation
(``eval.json`` or ``eval/eval.json``). matplotlib is imported lazily, on its Agg canvas.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from . import shards
from .errors import DfkdError
from .index import Index, read_index
from .io import write_text

THUMB = 48          # thumbnail side in pixels
PER_ROW = 8         # best / worst images shown per class
MAX_CLASSES = 30    # classes shown in the thumbnail grid
MAX_SKIPPED = 50
META = ("step", "epoch", "lr", "images_per_s", "val_top1")
NOT_LOSSES = ("worst_index", "clipped")  # logged beside the losses: robust KD's perturbation, nnPU's clipping
CSS = """body{font:14px/1.4 sans-serif;max-width:1150px;margin:1em auto;color:#222}
h1{font-size:20px;word-break:break-all}h2{border-bottom:2px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left;
vertical-align:middle}.plot{max-width:100%}.t{width:48px;height:48px;margin:1px;image-rendering:pixelated;
border:1px solid #999}
.note{color:#8a5a00;font-style:italic}code{background:#f3f3f3;padding:0 3px;white-space:nowrap;line-height:1.7}
small{color:#666}.cmd{white-space:normal;overflow-wrap:anywhere}"""


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DfkdError("dfkd report needs matplotlib: pip install matplotlib") from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _img(picture, cls: str = "plot", title: str = "") -> str:
    """A matplotlib figure or PIL image as an ``<img>`` with a base64 PNG data URI."""
    buf = io.BytesIO()
    if hasattr(picture, "savefig"):
        picture.savefig(buf, format="png")
    else:
        picture.save(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img src="data:image/png;base64,{data}" class="{cls}" title="{html.escape(title)}">'


def _table(header, rows) -> str:
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _thumb(path: str, tip: str) -> str:
    from PIL import Image, ImageDraw, ImageOps

    try:
        with Image.open(shards.source(path)) as im:
            im = ImageOps.pad(im.convert("RGB"), (THUMB, THUMB), color=(255, 255, 255))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        im = Image.new("RGB", (THUMB, THUMB), (225, 225, 225))
        ImageDraw.Draw(im).line([(0, 0), (THUMB, THUMB), (0, THUMB), (THUMB, 0)], fill=(200, 0, 0), width=2)
        tip += f" (unreadable: {type(e).__name__})"
    return _img(im, "t", tip)


def _class_names(manifest: dict, run: Path) -> list[str]:
    """Class names from the teacher card named in the manifest, else from the run's own card."""
    import yaml

    teacher = (manifest.get("inputs", {}).get("teacher0") or {}).get("path")
    for card in [c for c in (teacher,) if c] + [run / "model.yaml", run / "student.yaml"]:
        try:
            classes = (yaml.safe_load(Path(card).read_text(encoding="utf-8")) or {}).get("classes")
        except (OSError, ValueError, AttributeError, yaml.YAMLError):
            continue
        if classes:
            return [str(c) for c in classes]
    return []


def _name(names: list[str], c: int) -> str:
    return "unknown" if c < 0 else names[c] if c < len(names) else str(c)


def _scores(index: Index) -> np.ndarray:
    if "score" not in index.columns:
        raise DfkdError(f"{index.source}: no 'score' column (columns: {', '.join(index.columns)})")
    try:
        return np.array([float(r["score"] or "nan") for r in index.rows])
    except ValueError as e:
        raise DfkdError(f"{index.source}: a score is not a number ({e})") from None


def _histogram(values, chosen, what: str, chosen_name: str, threshold: float | None = None,
               threshold_label: str = "threshold") -> str:
    fig = _figure(11, 3.2)
    ax = fig.add_subplot()
    finite = values[np.isfinite(values)]
    chosen = chosen[np.isfinite(chosen)] if chosen is not None else None
    bins = np.histogram_bin_edges(finite, 80) if len(finite) else 10
    positive = finite[finite > 0]
    if len(positive) and finite.min() >= 0 and positive.max() > 1e3 * positive.min():  # e.g. noise values
        low = positive.min()
        what += f" (log scale; 0 shown at {low:.2g})" if finite.min() == 0 else " (log scale)"
        bins, finite = np.geomspace(low, positive.max(), 81), np.maximum(finite, low)
        chosen = np.maximum(chosen, low) if chosen is not None else None
        ax.set_xscale("log")
    ax.hist(finite, bins, color="#b8b8b8", label=f"pool ({len(finite)})")
    if chosen is not None and len(chosen):
        ax.axvspan(chosen.min(), chosen.max(), color="C0", alpha=0.08, label=f"{chosen_name} range")
        ax.hist(chosen, bins, color="C0", alpha=0.8, label=f"{chosen_name} ({len(chosen)})")
    if threshold is not None:
        ax.axvline(threshold, color="C3", ls="--", label=f"{threshold_label} {threshold:.4g}")
    ax.set(yscale="log", xlabel=what, ylabel="images (log scale)")
    ax.legend(loc="best", fontsize=9)
    return _img(fig)


def _class_bars(groups: dict[str, np.ndarray], names: list[str]) -> str:
    """Horizontal bars of images per class, one panel per group."""
    k = max([1, len(names)] + [max(g, default=-1) + 1 for g in groups.values()])
    fig = _figure(11, max(2.5, 0.22 * min(k, 60) + 1))
    for i, (title, labels) in enumerate(groups.items()):
        ax = fig.add_subplot(1, len(groups), i + 1)
        labels = np.asarray(labels, dtype=int)
        counts = np.bincount(labels[labels >= 0], minlength=k)
        ax.barh(np.arange(k), counts, color=f"C{i}")
        ax.set(title=title, xlabel="images", ylim=(k - 0.5, -0.5), xlim=(0, max(1, counts.max()) * 1.12))
        if k <= 60:
            ax.set_yticks(np.arange(k), [_name(names, c) for c in range(k)], fontsize=8)
            for y, n in enumerate(counts):
                ax.text(n, y, f" {n}", va="center", fontsize=7)
        unknown = int((labels < 0).sum())
        if unknown:
            ax.set_title(f"{title}\n(+{unknown} without a class)")
    return _img(fig)


def _strip(index: Index, values: np.ndarray, start: int, part: np.ndarray) -> str:
    """Thumbnails of ranks ``start + 1 ...`` with their score range below."""
    thumbs = "".join(_thumb(index.rows[i]["path"], f"#{rank}  score {values[i]:.4g}\n{index.rows[i]['path']}")
                     for rank, i in enumerate(part, start + 1))
    return f"{thumbs}<br><small>{values[part[0]]:.3g} … {values[part[-1]]:.3g}</small>"


def _labels(index: Index, column: str) -> np.ndarray:
    """Integer class ids of ``column`` (-1 where missing, empty or not an integer)."""
    cells = [r.get(column, "") for r in index.rows]
    return np.array([int(c) if c.lstrip("-").isdigit() else -1 for c in cells], dtype=int)


def _grid(index: Index, values: np.ndarray, labels: np.ndarray, lower_better: bool, names: list[str]) -> str:
    """Per class: the best- and worst-ranked images, best first, scores in the tooltip."""
    order = np.argsort(values if lower_better else -values, kind="stable")
    classes = sorted(set(labels.tolist()))
    rows = []
    for c in classes[:MAX_CLASSES]:
        ranked = order[labels[order] == c]
        ends = [(0, ranked[:PER_ROW])]
        if len(ranked) > PER_ROW:
            start = max(PER_ROW, len(ranked) - PER_ROW)
            ends.append((start, ranked[start:]))
        cells = [_strip(index, values, start, part) for start, part in ends] + ["—"] * (2 - len(ends))
        rows.append(f"<tr><td>{html.escape(_name(names, c))}<br><small>{len(ranked)} images</small></td>"
                    f"<td>{cells[0]}</td><td>{cells[1]}</td></tr>")
    more = _note(f"showing {MAX_CLASSES} of {len(classes)} classes") if len(classes) > MAX_CLASSES else ""
    return (f"<table><tr><th>teacher class</th><th>best-ranked {PER_ROW}</th><th>worst-ranked {PER_ROW}"
            f"</th></tr>{''.join(rows)}</table>{more}")


def _ranking(scored: Index, chosen: Index | None, names: list[str], *, what: str, lower_better: bool,
             chosen_name: str, threshold: float | None = None, label: str = "label",
             more_groups: dict[str, np.ndarray] | None = None, threshold_label: str = "threshold") -> list[str]:
    """Histogram, per-class counts and the thumbnail grid shared by select and expand."""
    values = _scores(scored)
    chosen_values = _scores(chosen) if chosen is not None and "score" in chosen.columns else None
    parts = ["<h3>Scores</h3>", _histogram(values, chosen_values, what, chosen_name, threshold, threshold_label),
             "<h3>Images per teacher class</h3>"]
    if label not in scored.columns:
        return parts + [_note(f"no {label} column: no per-class counts, and the best and worst images are"
                              " ranked over the whole pool"), "<h3>Best- and worst-ranked images</h3>",
                        _grid(scored, values, np.full(len(values), -1), lower_better, names)]
    groups = {"scored pool (teacher's class)": _labels(scored, label)}
    if chosen is not None and label in chosen.columns:
        groups[chosen_name] = _labels(chosen, label)
    parts.append(_class_bars({**groups, **(more_groups or {})}, names))
    parts.append(f"<h3>Best- and worst-ranked images per class</h3><p><small>ranked by {html.escape(what)};"
                 " hover a thumbnail for its rank, score and path</small></p>")
    return parts + [_grid(scored, values, groups["scored pool (teacher's class)"], lower_better, names)]


def _skipped_section(run: Path) -> list[str]:
    if not (run / "skipped.tsv").is_file():
        return ["<h3>Skipped files</h3>", _note("no skipped.tsv in this run directory")]
    skipped = read_index(run / "skipped.tsv")
    rows = [(r["path"], r.get("reason", "")) for r in skipped.rows[:MAX_SKIPPED]]
    parts = ["<h3>Skipped files</h3>", _table(["path", "reason"], rows) if rows else _note("no file was skipped")]
    if len(skipped) > MAX_SKIPPED:
        parts.append(_note(f"first {MAX_SKIPPED} of {len(skipped)}; all are in {run / 'skipped.tsv'}"))
    return parts


def _count(run: Path, name: str) -> int | str:
    return len(read_index(run / name)) if (run / name).is_file() else f"no {name}"


def _estimate_table(e: dict, cut: float | None) -> list[str]:
    """``select --num-images auto``'s estimate as the manifest stores it (summary.in_distribution),
    and the pool's noise value at that count (the dashed line of the histogram)."""
    share = e.get("share")
    rows = [("estimated in-distribution images", f"{e.get('count')} of {e.get('scored')}"
             + (f" ({share:.1%})" if isinstance(share, (int, float)) else "")),
            ("range", f"{e.get('low')} .. {e.get('high')}"),
            ("method", f"{e.get('method')}: {e.get('detail', '')}")]
    if cut is not None:
        rows.append(("cut", f"score <= {cut:.6g}: the {e['count']} lowest of the scored pool"
                            " (the selection spends that count by its --policy)"))
    return ["<h3>In-distribution estimate (--num-images auto)</h3>", _table(["", ""], rows)]


def _select_section(run: Path, manifest: dict, names: list[str]) -> list[str]:
    scored = read_index(run / "scores.tsv")
    selected = read_index(run / "selected.tsv") if (run / "selected.tsv").is_file() else None
    skipped = _count(run, "skipped.tsv")
    pool = manifest.get("summary", {}).get("pool", len(scored) + (skipped if isinstance(skipped, int) else 0))
    parts = ["<h2>Selection</h2>", _table(["", "images"], [
        ("pool", pool), ("skipped", skipped), ("scored", len(scored)), ("selected", _count(run, "selected.tsv"))])]
    if selected is None:
        parts.append(_note("no selected.tsv in this run directory: the selection is not shown"))
    score = manifest.get("options", {}).get("score", "noise")
    estimate = manifest.get("summary", {}).get("in_distribution")
    cut = None
    if isinstance(estimate, dict):
        values = np.sort(_scores(scored))
        if isinstance(estimate.get("count"), int) and 0 < estimate["count"] <= len(values):
            cut = float(values[estimate["count"] - 1])
        parts += _estimate_table(estimate, cut)
    parts += _ranking(scored, selected, names, what=f"{score} score (lower = better)", lower_better=True,
                      chosen_name="selected", threshold=cut,
                      threshold_label=f"estimated cut ({estimate['count']} lowest)" if cut is not None else "")
    return parts + _skipped_section(run)


def _expand_section(run: Path, manifest: dict, names: list[str]) -> list[str]:
    expanded = read_index(run / "expanded.tsv") if (run / "expanded.tsv").is_file() else None
    scored = read_index(run / "pu_scores.tsv") if (run / "pu_scores.tsv").is_file() else expanded
    threshold = manifest.get("options", {}).get("threshold")
    parts, more = ["<h2>PU expansion</h2>"], {}
    if scored is expanded:
        parts.append(_note("no pu_scores.tsv: the histogram shows the expanded images only"))
    if expanded is None:
        parts.append(_note("no expanded.tsv in this run directory: only the PU scores are shown"))
    elif "source" in expanded.columns:
        sources: dict[str, int] = {}
        for r in expanded.rows:
            sources[r["source"]] = sources.get(r["source"], 0) + 1
        parts.append(_table(["expanded.tsv source", "images"], [*sources.items(), ("total", len(expanded))]))
        positives = Index(expanded.columns, [r for r in expanded.rows if r["source"] == "positive"])
        if positives.rows and "label" in positives.columns:
            more["positives (their own label)"] = _labels(positives, "label")
        # the positives were not scored with the pool: compare the accepted pool images only
        expanded = Index(expanded.columns, [r for r in expanded.rows if r["source"] != "positive"], expanded.source)
    label = "teacher_label" if "teacher_label" in scored.columns else "label"
    parts += _ranking(scored, expanded, names, what="PU score (higher = more like the positives)",
                      lower_better=False, chosen_name="expanded pool images", threshold=threshold, label=label,
                      more_groups=more)
    return parts + _skipped_section(run)


def _training_section(run: Path, manifest: dict) -> list[str]:
    records, bad = [], 0
    for line in filter(str.strip, (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    parts = ["<h2>Training</h2>"] + ([_note(f"{bad} unreadable line(s) in metrics.jsonl skipped")] if bad else [])
    records = [r for r in records if isinstance(r, dict) and "step" in r]
    if not records:
        return parts + [_note("metrics.jsonl holds no records yet")]
    named = list(dict.fromkeys(k for r in records for k, v in r.items()
                               if k not in META and isinstance(v, (int, float))))
    losses = [k for k in named if k not in NOT_LOSSES]
    panels = [("losses", losses), ("other logged values", [k for k in named if k in NOT_LOSSES]),
              ("learning rate", ["lr"]), ("validation top-1", ["val_top1"])]
    panels = [(t, ks) for t, ks in panels if any(k in r for r in records for k in ks)]
    fig = _figure(11, 3.4)
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 40 else None, label=k)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if len(keys) > 1 or keys[0] not in META:
            ax.legend(fontsize=8)
    last, vals = records[-1], [r for r in records if "val_top1" in r]
    rows = [("steps", last["step"]), ("epochs", last.get("epoch", "")),
            ("images/s (median)", float(np.median([r.get("images_per_s", np.nan) for r in records])))]
    rows += [(f"last {k}", float(last[k])) for k in named if isinstance(last.get(k), (int, float))]
    if vals:
        best = max(vals, key=lambda r: r["val_top1"])
        rows += [("last val top-1", float(vals[-1]["val_top1"])), ("best val top-1 (step)",
                                                                   f"{best['val_top1']:.4f} ({best['step']})")]
    else:
        parts.append(_note("no validation top-1 in metrics.jsonl (run with a validation set to get one)"))
    if manifest.get("objective"):
        rows.insert(0, ("objective", manifest["objective"]))
    return parts + [_img(fig), _table(["", "value"], rows)]


def _eval_section(path: Path, names: list[str]) -> list[str]:
    try:
        ev = json.loads(path.read_text(encoding="utf-8"))
        acc = np.array([np.nan if a is None else a for a in ev["class_accuracy"]], dtype=float)
    except (ValueError, KeyError, TypeError) as e:
        raise DfkdError(f"{path}: not an eval.json written by dfkd eval --out ({e})") from None
    names = ev.get("classes") or names
    k = len(acc)
    parts = [f"<h2>Evaluation <small>({html.escape(str(path))})</small></h2>", _table(["", "value"], [
        ("images", ev.get("num_images", "")), ("top-1", ev.get("top1")), ("top-5", "n/a" if ev.get("top5") is None else ev["top5"])])]
    fig = _figure(11, min(11.0, max(4.5, 0.35 * k + 1.5)))
    ax, cx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax.barh(np.arange(k), np.nan_to_num(acc), color="C2")
    if ev.get("top1") is not None:
        ax.axvline(ev["top1"], color="C3", ls="--")
    ax.set(title=f"accuracy per class (dashed: top-1 {ev.get('top1') or 0:.3f})", xlim=(0, 1.1),
           ylim=(k - 0.5, -0.5))
    confusion = np.array(ev.get("confusion") or np.zeros((k, k)), dtype=float)
    rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    im = cx.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    cx.set(title="confusion (row-normalised)", xlabel="predicted", ylabel="true")
    fig.colorbar(im, ax=cx, shrink=0.8)
    if k <= 60:
        labels = [_name(names, c) for c in range(k)]
        ax.set_yticks(np.arange(k), labels, fontsize=8)
        for y, a in enumerate(acc):
            ax.text(np.nan_to_num(a), y, " n/a" if np.isnan(a) else f" {a:.3f}", va="center", fontsize=7,
                    bbox={"fc": "white", "ec": "none", "pad": 0})
        cx.set_yticks(np.arange(k), labels, fontsize=8)
        cx.set_xticks(np.arange(k), labels, fontsize=8, rotation=60, ha="right")
    if k <= 20:
        for (i, j), n in np.ndenumerate(confusion):
            if n:
                cx.text(j, i, f"{n:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    return parts + [_img(fig)]


def _header(run: Path, manifest: dict, has: dict[str, bool]) -> list[str]:
    """Title, the command line and options from manifest.json, and which sections have data."""
    argv = manifest.get("argv") or []
    line = " ".join(["dfkd", *map(str, argv[1:])]) if argv else f"dfkd {manifest.get('command', '?')}"
    options = " ".join(f"<code>{html.escape(f'{k}={v}')}</code>" for k, v in manifest.get("options", {}).items())
    found = " · ".join(f"{k}: {'yes' if v else 'no data'}" for k, v in has.items())
    title = f"<h1>dfkd report: {html.escape(str(run.resolve()))}</h1>"
    if not manifest:
        return [title, _note("no readable manifest.json: command and options unknown"), f"<p>{found}</p>"]
    return [title, f"<p><b>{html.escape(manifest.get('command', '?'))}</b> run, finished "
            f"{html.escape(str(manifest.get('finished', '?')))}<br><code class='cmd'>{html.escape(line)}</code></p>",
            f"<p>options {options or '-'}</p><p>{found}</p>"]


STEPS = ("pu", "expand", "select", "teacher", "distill", "student", "eval")  # a pipeline's order


def _found(run: Path) -> tuple[dict[str, bool], list[Path]]:
    evals = [p for p in (run / "eval.json", run / "eval" / "eval.json") if p.is_file()]
    has = {"select": (run / "scores.tsv").is_file(),
           "expand": (run / "pu_scores.tsv").is_file() or (run / "expanded.tsv").is_file(),
           "training": (run / "metrics.jsonl").is_file(), "eval": bool(evals)}
    return has, evals


def _manifest(run: Path) -> dict:
    try:
        return json.loads((run / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _run_sections(run: Path, heading: bool = False) -> list[str]:
    """The page's sections for one run directory (with a step heading inside a pipeline page)."""
    has, evals = _found(run)
    manifest = _manifest(run)
    names = _class_names(manifest, run)
    parts = _header(run, manifest, has)
    if heading:
        parts[0] = f"<h2>step {html.escape(run.name)}</h2>"
    if has["select"]:
        parts += _select_section(run, manifest, names)
    if has["expand"]:
        parts += _expand_section(run, manifest, names)
    if has["training"]:
        parts += _training_section(run, manifest)
    for path in evals:
        parts += _eval_section(path, names)
    if has["training"] and not evals:
        card = next((c for c in (run / "student.yaml", run / "model.yaml") if c.is_file()), "CARD")
        parts.append(_note(f"no eval.json: run `dfkd eval --model {card} --data TEST --out {run / 'eval'}`"
                           " to add per-class accuracy and a confusion matrix"))
    return parts


def _student_top1(card: Path, steps: list[Path]) -> float | None:
    """The top-1 of the eval.json among ``steps`` that evaluated ``card`` (eval.json names its
    model; one written before it did counts only when it is the pipeline's one eval)."""
    found = []
    for p in (s / "eval.json" for s in steps):
        try:
            found.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    mine = [e for e in found if e.get("model") == str(card.resolve())]
    if not mine and len(found) == 1 and not found[0].get("model"):
        mine = found
    return mine[0].get("top1") if mine else None


def _accuracies(steps: list[Path]) -> list[str]:
    """Teacher against student top-1 on one line: the teacher card's accuracy (dfkd eval
    --write-card) and the student's eval.json, when the pipeline has both."""
    import yaml

    rows = []
    for step in steps:
        manifest = _manifest(step)
        teacher = (manifest.get("inputs", {}).get("teacher0") or {}).get("path")
        if manifest.get("command") != "distill" or not teacher:
            continue
        try:
            accuracy = (yaml.safe_load(Path(teacher).read_text(encoding="utf-8")) or {}).get("accuracy")
        except (OSError, yaml.YAMLError):
            accuracy = None
        student = _student_top1(step / "student.yaml", steps)
        rows.append((Path(teacher).name, accuracy, (step / "student.yaml").name, student))
    if not rows:
        return []
    return ["<h2>teacher against student</h2>", _table(
        ["teacher", "top-1", "student", "top-1"],
        [(t, "-" if a is None else f"{a:.4f}", s, "-" if b is None else f"{b:.4f}") for t, a, s, b in rows])]


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Render ``run_dir``'s select / expand / training / eval outputs into one HTML file; for a
    pipeline's directory (pipelines/dfnd.sh's OUT: select/, distill/, eval/), one page of all steps."""
    run = Path(run_dir)
    if not run.is_dir():
        raise DfkdError(f"{run}: run directory not found")
    has, _ = _found(run)
    own = has["select"] or has["expand"] or has["training"] or (run / "eval.json").is_file()
    steps = [] if own else sorted((d for d in run.iterdir() if d.is_dir() and any(_found(d)[0].values())),
                                  key=lambda d: (STEPS.index(d.name) if d.name in STEPS else len(STEPS), d.name))
    if not steps and not any(has.values()):
        raise DfkdError(f"{run}: nothing to report (no scores.tsv, pu_scores.tsv, expanded.tsv, metrics.jsonl"
                        " or eval.json, here or in its sub-folders); give the --out directory of a select, expand,"
                        " distill or train run, or a pipeline's OUT")
    _figure(1, 1)  # fail early, with the install hint, when matplotlib is missing
    if steps:
        parts = [f"<h1>dfkd pipeline report: {html.escape(str(run.resolve()))}</h1>",
                 f"<p>steps: {', '.join(html.escape(s.name) for s in steps)}</p>", *_accuracies(steps)]
        for step in steps:
            parts += _run_sections(step, heading=True)
    else:
        parts = _run_sections(run)
    page = (f'<!doctype html><html><head><meta charset="utf-8"><title>dfkd report: {html.escape(run.name)}'
            f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    return write_text(Path(out) if out is not None else run / "report.html", page)
