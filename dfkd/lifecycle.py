"""One lifecycle for every command: a command is a declaration plus a body.

The declaration (:class:`Command`) names the command, the files it writes into ``--out`` and its
typed config; a call declares the files it reads (:class:`Input`: the manifest's key, the flag,
the path). :meth:`Command.execute` then runs the body with a :class:`Run`, and is the one place
that

* opens ``--out``: the lock, ``--out`` apart from every declared input (:mod:`dfkd.rundir`);
* binds it to the run's identity (``run.json``): a resume, a refusal, or ``--overwrite``;
* lets rank 0 alone write: :meth:`Run.write_index`, :meth:`Run.write_text`,
  :meth:`Run.write_json` and :meth:`Run.manifest` ask the rank question where the file is
  written, and return the path on every rank;
* writes ``manifest.json`` from the declared inputs (their hashes), the options and the input
  spec the models were fed;
* ends every rank together: what only rank 0 can compute (from the rows and files it alone
  holds) is :meth:`Run.on_main`, whose result, or error line, every rank gets. A rank that fails
  elsewhere leaves; torchrun then ends the others.

Every rank runs the same body and returns the same result; a body never asks which rank it is.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from .cards import ModelCard
from .errors import DfkdError, PeerError, out_of_memory
from .events import Event, OnEvent
from .index import write_index
from .io import write_json, write_text
from .rundir import RunDir, open_run, write_manifest
from .runtime import Runtime

R = TypeVar("R")


@dataclass(frozen=True)
class Input:
    """A file or folder a command reads: ``name`` is its key in ``manifest.json``'s ``inputs``,
    ``flag`` names it in errors (``--out`` may not be inside it nor hold it)."""

    name: str
    flag: str
    path: str | Path | None


def card_inputs(flag: str, cards: Sequence[ModelCard], name: str = "teacher") -> list[Input]:
    """The files model cards are read from: ``teacher0`` (the card, or the model file given in
    its place), ``teacher0_weights`` (or ``_torchscript``, ``_onnx``, a Hugging Face folder's
    ``_config.json``, ...), ``teacher1``, ...; with another ``name`` and one card, unnumbered
    (``model``, ``model_weights``)."""
    numbered = name == "teacher" or len(cards) > 1
    out = []
    for i, c in enumerate(cards):
        key = f"{name}{i if numbered else ''}"
        kinds = {c.weights: "weights", c.torchscript: "torchscript", c.onnx: "onnx", c.mahalanobis: "mahalanobis"}
        out.append(Input(key, flag, c.path))
        out += [Input(f"{key}_{kinds.get(f) or f.name}", flag, f) for f in c.files if f != c.path]
    return out


@dataclass(frozen=True)
class Command:
    """A command's declaration: its name, the files it writes into ``--out`` (which ``--overwrite``
    clears) and its typed config (a dataclass, layered by :func:`dfkd.config.resolve`)."""

    name: str
    outputs: tuple[str, ...]
    config: type | None = None

    def execute(self, out: str | Path | None, rt: Runtime, inputs: Iterable[Input], body: Callable[["Run"], R], *,
                identity: dict | None = None, overwrite: bool = False, added: dict | None = None,
                on_event: OnEvent | None = None, on_progress: Callable[[int, int], None] | None = None) -> R:
        """Open ``out`` for this run (none: a run that writes nothing), bind it to ``identity``
        unless the body does so itself (:meth:`Run.claim`, once it knows the pool's digest), run
        ``body`` on every rank and return its result. ``on_event`` hears the training commands'
        events, ``on_progress`` the scoring commands' (done, total); both on rank 0 only."""
        inputs = [i for i in inputs if i.path is not None]
        with contextlib.ExitStack() as stack:
            folder = None
            if out is not None:
                folder = stack.enter_context(open_run(out, self.name, rt.ranks, [(i.flag, i.path) for i in inputs],
                                                      self.outputs))
            run = Run(self, folder, rt, inputs, overwrite, on_event, on_progress)
            if identity is not None and folder is not None:
                run.claim(identity, added)
            return body(run)


class Run:
    """What a command's body is given: where it writes, how it runs its models (``rt``), and
    the writes that only rank 0 makes."""

    def __init__(self, command: Command, folder: RunDir | None, rt: Runtime, inputs: list[Input], overwrite: bool,
                 on_event: OnEvent | None = None, on_progress: Callable[[int, int], None] | None = None):
        self.command, self.folder, self.rt, self.inputs = command, folder, rt, inputs
        self.overwrite = overwrite
        self.resumed = False
        self._on_event, self._on_progress = on_event, on_progress

    @property
    def out(self) -> Path:
        if self.folder is None:
            raise AssertionError(f"dfkd {self.command.name}: this run has no --out to write into")
        return self.folder.path

    @property
    def on_event(self) -> OnEvent | None:
        """Where progress goes: the caller's listener on rank 0, nowhere on the others."""
        return self._on_event if self.rt.ranks.main else None

    def event(self, event: Event) -> None:
        if self.on_event:
            self.on_event(event)

    def progress(self, done: int, total: int) -> None:
        if self._on_progress and self.rt.ranks.main:
            self._on_progress(done, total)

    def claim(self, identity: dict, added: dict | None = None) -> bool:
        """Bind ``--out`` to ``identity`` (run.json); True when it already was (a resume)."""
        self.resumed = self.folder.claim(identity, self.overwrite, added, self.on_event)
        return self.resumed

    def _write(self, name: str, write: Callable[[Path], Any]) -> Path:
        path = self.out / name
        if self.rt.ranks.main:
            write(path)
        return path

    def write_index(self, name: str, rows: Iterable[dict], columns: Sequence[str]) -> Path:
        return self._write(name, lambda p: write_index(p, rows, columns))

    def write_text(self, name: str, text: str) -> Path:
        return self._write(name, lambda p: write_text(p, text))

    def write_json(self, name: str, obj: Any) -> Path:
        return self._write(name, lambda p: write_json(p, obj))

    def write(self, name: str, write: Callable[[Path], Any]) -> Path:
        """Any other file: ``write(path)`` on rank 0 (atomically, as dfkd.io does)."""
        return self._write(name, write)

    def manifest(self, options: dict, input_spec: dict, **extra: Any) -> Path:
        """``manifest.json``, the mark of a finished run: the declared inputs' hashes, ``options``,
        how the models were fed (``input_spec``: :func:`dfkd.cards.input_record`) and ``extra``."""
        inputs = {i.name: i.path for i in self.inputs}
        return self._write("manifest.json", lambda p: write_manifest(p.parent, self.command.name, options, inputs,
                                                                     input_spec=input_spec, **extra))

    def on_main(self, compute: Callable[[], R]) -> R:
        """``compute()`` on rank 0 alone (it reads what only rank 0 holds: the scored rows, the
        files it wrote); every rank returns its result, or ends with its error: rank 0 with the
        error itself, the others with its line."""
        ranks = self.rt.ranks
        if ranks.world == 1:
            return compute()
        value, failure, line = None, None, None
        if ranks.main:
            try:
                value = compute()
            except Exception as e:  # noqa: BLE001 - told to every rank, raised here as it was
                failure = e
                known = e if isinstance(e, DfkdError) else out_of_memory(e)
                line = str(known) if known else f"rank 0: {type(e).__name__}: {e}"
        value, line = ranks.broadcast((value, line))
        if failure is not None:
            raise failure
        if line is not None:
            raise PeerError(line)
        return value
