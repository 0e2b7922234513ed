"""Run directories: one run at a time (a lock), one set of inputs (``run.json``), a manifest.

Every command that writes into ``--out`` opens it with :func:`open_run`:

* **Lock.** ``OUT/.lock`` is held with ``flock`` for the whole run by rank 0 (the job holds it,
  not each rank). A second run into the same directory fails at once, naming the process that
  holds it. The kernel drops the lock when its process dies, so a lock left by a killed run is
  simply taken over.
* **Inputs.** ``OUT/run.json`` records the command and the identity of its inputs (content
  hashes of cards, weights and index files, the listing of a folder, the config). A later run
  with the same identity resumes; with another it is refused, unless ``--overwrite`` clears
  the run's state first. A key that a later version added to the identity (``added``: its path
  and the value that behaves as before) is taken at that value in a run recorded without it, so
  a finished run stays finished and a killed one resumes across the upgrade.
* Temporary files left by a killed atomic write (``.NAME.*.tmp``) are removed.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from . import __version__
from .dist import SINGLE, Ranks
from .errors import DfkdError
from .events import OnEvent, Opened
from .io import file_sha256, write_json

# What a run keeps between attempts; --overwrite removes it after the outputs, run.json last.
STATE = ("checkpoints", "metrics.jsonl", ".scoring", "run.json")
# What every command writes besides its declared outputs (dfkd.lifecycle.Command.outputs);
# --overwrite removes them first: the manifest (the mark of a finished run) and the report.
FINISHED = ("manifest.json", "report.html")


def input_hashes(paths: dict[str, str | Path | None]) -> dict[str, dict]:
    """SHA-256 of each input file (index files, cards, weights); directories are named only."""
    out = {}
    for name, p in paths.items():
        if p is None:
            continue
        if isinstance(p, str) and p.startswith(("http://", "https://", "pipe:")):  # streamed shards
            out[name] = {"path": p, "sha256": None}
            continue
        p = Path(p)
        out[name] = {"path": str(p.resolve()), "sha256": file_sha256(p) if p.is_file() else None}
    return out


class RunDir:
    """An opened ``--out``: locked by rank 0 until :meth:`close`."""

    def __init__(self, path: Path, command: str, ranks: Ranks, outputs: Iterable[str] = ()):
        self.path, self.command, self.ranks, self.outputs = path, command, ranks, tuple(outputs)
        self._lock = None
        self.resumed = False
        self._created: Path | None = None  # the top folder of --out that this run created

    def _acquire(self) -> None:
        out = self.path
        if out.exists() and not out.is_dir():
            raise DfkdError(f"--out {out}: is a file, not a directory")
        try:
            missing = [p for p in (out, *out.parents) if not p.exists()]
            self._created = missing[-1] if missing else None
            out.mkdir(parents=True, exist_ok=True)
            f = open(out / ".lock", "a+", encoding="utf-8")
        except OSError as e:
            raise DfkdError(f"--out {out}: cannot write there ({e.strerror})") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise DfkdError(f"--out {out}: another dfkd run is using this directory ({holder});"
                            " wait for it to finish or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, dfkd {self.command},"
                f" since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._lock = f
        for sub in (out, out / "checkpoints"):
            for tmp in sub.glob(".*.tmp") if sub.is_dir() else ():
                tmp.unlink(missing_ok=True)

    def claim(self, identity: dict, overwrite: bool = False, added: dict[tuple[str, ...], Any] | None = None,
              on_event: OnEvent | None = None) -> bool:
        """Bind the directory to ``identity`` (JSON-able); True when it already was (a resume).
        ``added``: identity keys newer than some runs (path → the value that behaves as before).
        ``on_event`` then hears :class:`~dfkd.events.Opened` (on rank 0)."""
        error = None
        if self.ranks.main:
            try:
                self.resumed = self._claim(json.loads(json.dumps(identity, default=str)), overwrite, added or {})
            except DfkdError as e:
                error = str(e)
        self.ranks.agree(error)
        self.resumed = self.ranks.broadcast(self.resumed)
        if on_event and self.ranks.main:
            on_event(Opened())
        return self.resumed

    def _claim(self, identity: dict, overwrite: bool, added: dict[tuple[str, ...], Any]) -> bool:
        saved_path = self.path / "run.json"
        record = {"command": self.command, "inputs": identity}
        if saved_path.is_file():
            try:
                saved = json.loads(saved_path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError):
                saved = None
            if not (isinstance(saved, dict) and isinstance(saved.get("command"), str)
                    and isinstance(saved.get("inputs"), dict)):
                if not overwrite:
                    raise DfkdError(f"{saved_path}: damaged (not the JSON record dfkd writes of a run's inputs);"
                                    f" --overwrite starts this run afresh there, or use another --out")
                saved = {}
            if saved.get("inputs") is not None:
                saved["inputs"] = _with_added(saved["inputs"], added)
            if saved == record:
                return True
            other = saved.get("command") if isinstance(saved, dict) else None
            if isinstance(other, str) and other != self.command:
                raise DfkdError(f"--out {self.path}: holds a run of dfkd {other}, which --overwrite does not"
                                f" clear (it starts afresh only a run of dfkd {self.command}); use another --out")
            if not overwrite:
                what = "a run of another command" if other != self.command else \
                    "a run with other inputs (" + ", ".join(_differences(saved.get("inputs") or {}, identity)) + ")"
                raise DfkdError(f"--out {self.path}: holds {what}; use another --out, or --overwrite to"
                                " start this run afresh there")
        if overwrite:
            self.clear()
        write_json(saved_path, record)
        return False

    def clear(self) -> None:
        """Remove this command's run: the marks of a finished run, its outputs, its state, run.json last."""
        for name in (*FINISHED, *self.outputs, *STATE):
            p = self.path / name
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)

    def close(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, kind, *exc) -> None:
        empty = False
        if kind is not None and self._created is not None and self._lock is not None:
            try:  # failed before writing anything: the lock goes while still held (no one else's)
                if [p.name for p in self.path.iterdir()] == [".lock"]:
                    (self.path / ".lock").unlink()
                    empty = True
            except OSError:
                pass
        self.close()
        if empty:  # then the folders this run created, as long as nothing else came into them
            try:
                for folder in (self.path, *self.path.parents):
                    folder.rmdir()
                    if folder == self._created:
                        break
            except OSError:
                pass


def _with_added(inputs: dict, added: dict[tuple[str, ...], Any]) -> dict:
    """``inputs`` with each key of ``added`` that it lacks (under a parent it has) set to its value."""
    for path, value in added.items():
        node = inputs
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] not in node:
            node[path[-1]] = value
    return inputs


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The keys whose values differ, nested ones dotted (``config.lr``); at most four."""
    out = []
    for k in sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], f"{prefix}{k}.")
        else:
            out.append(prefix + k)
    return out[:4] if prefix else out[:4] or ["unknown"]


def open_run(out: str | Path, command: str, ranks: Ranks = SINGLE,
             reads: Iterable[tuple[str, str | Path | None]] = (), outputs: Iterable[str] = ()) -> RunDir:
    """Lock ``out`` for this run (rank 0); every rank fails together when it cannot. ``reads``:
    the (flag, path) of everything the run reads: ``out`` must not be inside a folder of them,
    nor hold a file of them. ``outputs``: the command's files, which ``--overwrite`` clears.
    Commands open their run through :meth:`dfkd.lifecycle.Command.execute`."""
    run = RunDir(Path(out), command, ranks, outputs)
    error = None
    if ranks.main:
        try:
            _check_outside(Path(out), reads)
            run._acquire()
        except DfkdError as e:
            error = str(e)
    ranks.agree(error)
    return run


def _check_outside(out: Path, reads: Iterable[tuple[str, str | Path | None]]) -> None:
    """``out`` apart from the run's inputs: a run's files inside a folder it reads would be read as
    its images by the next run, and an input file inside ``out`` could be written over by an
    output of the same name or cleared by ``--overwrite``."""
    real = Path(os.path.realpath(out))
    for flag, source in reads:
        if source is None:
            continue
        given = Path(source)
        if given.is_dir():
            root = Path(os.path.realpath(given))
            if real == root or root in real.parents:
                raise DfkdError(f"--out {out}: is inside {flag} {source}, whose images the next run would"
                                " read with this run's files among them; use an --out outside it")
        elif given.is_file() and real in Path(os.path.realpath(given)).parents:
            raise DfkdError(f"--out {out}: holds {flag} {source}, which this run's outputs could write over"
                            " (or --overwrite clear); use an --out that holds none of the run's inputs")


def write_manifest(out: str | Path, command: str, options: dict[str, Any],
                   inputs: dict[str, str | Path | None], *, input_spec: dict, **extra: Any) -> Path:
    """``input_spec``: how the run fed its model(s), and where that came from
    (:func:`dfkd.cards.input_record`); every command records it as ``input``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        torchvision = version("torchvision")  # importing torchvision here would cost seconds
    except PackageNotFoundError:
        torchvision = None
    manifest = {
        "command": command,
        "argv": sys.argv,
        "options": options,
        "inputs": input_hashes(inputs),
        "input": input_spec,
        "versions": {"dfkd": __version__, "torch": torch.__version__, "torchvision": torchvision,
                     "python": platform.python_version()},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    return write_json(Path(out) / "manifest.json", manifest)
