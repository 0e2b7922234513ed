"""Pools at any size: walking folders safely and listing a pool to disk as a stream.

A pool is a folder (scanned recursively) or an index file. :func:`list_pool` writes its rows,
in a fixed order, to a listing file (an index file with absolute paths) and returns their
count and a digest, reading one row at a time: memory does not grow with the pool. Folders are
walked with symlinks followed, each real directory once; a symlink loop, an unreadable folder
or a file name an index cannot hold is recorded as a problem, never walked forever or dropped
in silence.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import remote, shards
from .errors import DfkdError
from .index import open_index, write_index


def _printable(path: str) -> str:
    """``path`` as text an index file can hold (tabs, newlines and undecodable bytes escaped)."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return text.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def walk_files(root: str | Path, problems: list[dict] | None = None) -> Iterator[str]:
    """Every non-hidden file below ``root``: a folder's files (sorted), then its sub-folders.

    Symlinks are followed; a real directory is entered once (a loop or a second link to it is
    recorded, not followed), and a file once: a symlink to a file of the pool, or a second hard
    link, is recorded instead. A ``.tar`` file gives its image members (dfkd/shards.py).
    Problems go to ``problems`` as ``{"path", "reason"}`` rows.
    """
    seen: set[tuple[int, int]] = set()  # real directories: O(folders), not O(files)
    seen_files: set[tuple[int, int]] = set()  # only files with several names (hard links, links from outside)

    def note(path: str, reason: str) -> None:
        if problems is not None:
            problems.append({"path": _printable(path), "reason": reason})

    def visit(folder: str) -> Iterator[str]:
        try:
            st = os.stat(folder)
        except OSError as e:
            note(folder, f"folder not readable ({e.strerror})")
            return
        if (st.st_dev, st.st_ino) in seen:
            note(folder, "symlink to a folder already listed (a loop or a second link): not followed")
            return
        seen.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as e:
            note(folder, f"folder not readable ({e.strerror})")
            return
        subfolders = []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append(e.path)
            elif _printable(e.path) != e.path:
                note(e.path, "file name holds a tab, newline or bytes that are not UTF-8: rename it")
            elif e.name.endswith(".tar"):
                yield from shards.members(e.path, note)
            elif _new_file(e):
                yield e.path
            else:
                note(e.path, "the same file as one listed before (a symlink or hard link): counted once")
        for sub in subfolders:
            yield from visit(sub)

    def _new_file(entry: os.DirEntry) -> bool:
        """False for a second name of a file already listed (or listed under its own name)."""
        link = entry.is_symlink()
        if link:
            rel = os.path.relpath(os.path.realpath(entry.path), real_root)
            inside = rel != ".." and not rel.startswith(".." + os.sep)
            if inside and not any(part.startswith(".") for part in rel.split(os.sep)) and entry.is_file():
                return False  # its target is in the pool: listed under its own name
        try:
            st = entry.stat()  # follows a symlink
        except OSError:
            return True  # gone or unreadable: decoding records why
        if st.st_nlink < 2 and not link:
            return True  # the only name of its file: no need to remember it
        if (st.st_dev, st.st_ino) in seen_files:
            return False
        seen_files.add((st.st_dev, st.st_ino))
        return True

    real_root = os.path.realpath(root)
    yield from visit(os.path.abspath(root))


@dataclass
class Listing:
    """A pool listed to ``path``: ``count`` rows with ``columns``; ``digest`` names its content."""

    path: Path
    columns: list[str]
    count: int
    digest: str
    source: Path | str  # str: streamed shards (dfkd/remote.py)
    problems: list[dict] = field(default_factory=list)

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, str]]:
        """Rows ``start:stop`` of the listing, streamed."""
        _, rows = open_index(self.path)
        for i, row in enumerate(rows):
            if stop is not None and i >= stop:
                return
            if i >= start:
                yield row


def as_source(source: str | Path) -> str | Path:
    """A pool argument as a Path, or as the text it is for streamed shards (a Path would fold
    ``https://`` to ``https:/``)."""
    return source if remote.is_remote(source) else Path(source)


def pool_rows(source: str | Path, flag: str, problems: list[dict]) -> tuple[list[str], Iterator[dict]]:
    """The columns and streamed rows of a pool folder or index file."""
    tars = shards.shard_list(source, flag)
    if tars is not None:
        note = lambda path, reason: problems.append({"path": _printable(path), "reason": reason})  # noqa: E731
        return ["path"], _shard_rows(tars, note, flag)
    source = Path(source)
    if source.is_dir():
        return ["path"], ({"path": p} for p in walk_files(source, problems))
    if source.is_file():
        return open_index(source)
    raise DfkdError(f"{flag} {source}: no such directory or index file")


def _shard_rows(tars: list[str], note, flag: str) -> Iterator[dict]:
    try:
        for tar in tars:
            for p in shards.members(tar, note):
                yield {"path": p}
    except DfkdError as e:  # a streamed shard that cannot be opened
        raise DfkdError(f"{flag} {e}") from None


def list_pool(source: str | Path, dest: str | Path, flag: str = "--pool") -> Listing:
    """Write the pool's rows to ``dest`` (atomically) and count and digest them, streaming.

    The digest covers each row and, for a folder, each file's size and modification time, so
    a pool whose files changed is a new pool.
    """
    problems = []
    tars = shards.shard_list(source, flag)
    streamed = tars is not None and remote.is_remote(tars[0])  # digested whole, after the listing pass
    source = as_source(source)
    columns, rows = pool_rows(source, flag, problems)
    h, count = hashlib.sha256(), 0
    stat_rows = not streamed and (source.is_dir() or tars is not None)

    def counted() -> Iterator[dict]:
        nonlocal count
        for row in rows:
            h.update("\t".join(row.get(c, "") for c in columns).encode("utf-8", "surrogateescape"))
            if stat_rows:
                known = shards.identity(row["path"])  # None: gone since the walk, decoding records it
                if known is not None:
                    h.update(f"\0{known[0]}\0{known[1]}".encode())
            h.update(b"\n")
            count += 1
            yield row

    write_index(dest, counted(), columns)
    for tar in tars if streamed else ():
        h.update(f"shard\0{tar}\0{shards.identity(tar)}\n".encode())
    for p in problems:
        h.update(f"problem\0{p['path']}\0{p['reason']}\n".encode())
    if count == 0:
        raise DfkdError(f"{flag} {source}: the pool is empty (no files found)")
    return Listing(Path(dest), columns, count, h.hexdigest(), source, problems)


def data_digest(path: str | Path) -> str:
    """Identity of training data: an index file's bytes, or a folder's files (path, size, mtime)."""
    from .io import file_sha256

    tars = shards.shard_list(path, "--data")
    path = Path(path)
    if path.is_file() and tars is None:
        return file_sha256(path)
    h = hashlib.sha256()
    for f in tars or walk_files(path):
        known = shards.identity(f)
        if known is not None:
            name = os.path.relpath(f, path)
            h.update(f"{name}\0{known[0]}\0{known[1]}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
