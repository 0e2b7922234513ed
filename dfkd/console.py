"""Terminal output: progress bars and tables on stderr (stdout is for what pipelines read)."""
from __future__ import annotations

import contextlib
import os
import time
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


class PlainProgress:
    """Progress as plain lines, for stderr that is not a terminal (a log file, a batch job):
    one line every ``DFKD_PROGRESS_SECONDS`` (default 10) and one at the end, with rate and ETA."""

    def __init__(self, description: str, unit: str):
        self.description, self.unit = description, unit
        self.every = float(os.environ.get("DFKD_PROGRESS_SECONDS", "10") or 10)
        self.start: tuple[float, int] | None = None
        self.last_line, self.total, self.info, self.done, self.printed = 0.0, None, "", 0, None

    def __call__(self, done: int, total: int | None = None, info: str | None = None, log: str | None = None) -> None:
        now = time.monotonic()
        if self.start is None or done < self.done or (total is not None and total != self.total):
            self.start, self.last_line = (now, done), now  # a new phase (decoding, then training)
        self.done, self.total = done, total if total is not None else self.total
        self.info = self.info if info is None else info
        if log:
            err.print(log, highlight=False)
        if now - self.last_line >= self.every:
            self.line(now)

    def line(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.last_line, self.printed = now, self.done
        t0, d0 = self.start or (now, self.done)
        rate = (self.done - d0) / (now - t0) if now > t0 else 0.0
        of = f"/{self.total} ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = f" eta {_hms((self.total - self.done) / rate)}" if self.total and rate > 0 else ""
        err.print(f"{self.description} {self.done}{of} {rate:,.1f} {self.unit}/s elapsed {_hms(now - t0)}{eta}"
                  f"{' ' + self.info if self.info else ''}", highlight=False, soft_wrap=True)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@contextlib.contextmanager
def progress(description: str, unit: str = "img"):
    """Yield ``update(done, total, **fields)``; shows count, rate, elapsed and ETA on stderr (a
    live bar on a terminal, plain lines at a steady interval otherwise)."""
    if not err.is_terminal:
        plain = PlainProgress(description, unit)
        yield plain
        if plain.start is not None and plain.printed != plain.done:
            plain.line()
        return
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
