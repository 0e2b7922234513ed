"""Terminal output: progress bars and tables on stderr (stdout is for what pipelines read)."""
from __future__ import annotations

import contextlib
import os
from typing import Iterable

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

MAIN = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 prints
err = Console(stderr=True, highlight=False, quiet=not MAIN)


def emit(text: object) -> None:
    """Write what a shell pipeline reads (a path) to stdout: rank 0 only."""
    if MAIN:
        print(text, flush=True)


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} {self.unit}/s" if task.speed else f"- {self.unit}/s", style="cyan")


@contextlib.contextmanager
def progress(description: str, unit: str = "img"):
    """Yield ``update(done, total, **fields)``; shows count, rate, elapsed and ETA on stderr."""
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                   RateColumn(unit), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"), console=err, transient=False)
    task = bar.add_task(description, total=None, info="")
    with bar:
        def update(done: int, total: int | None = None, info: str | None = None, log: str | None = None) -> None:
            kw = {"info": info} if info is not None else {}
            bar.update(task, completed=done, total=total, **kw)
            if log:
                bar.console.print(log, highlight=False)

        try:
            yield update
        except BaseException:
            bar.update(task, visible=False)  # an error line alone, not a half-drawn bar above it
            raise


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[object]]) -> Table:
    t = Table(title=title, title_justify="left", title_style="bold")
    rows = [list(r) for r in rows]
    for i, c in enumerate(columns):
        numeric = i > 0 and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows)
        t.add_column(c, justify="right" if numeric else "left")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t


def fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
