"""WebDataset tar shards: pools written by img2dataset / webdataset, read with ``tarfile``.

A pool may be a brace pattern as webdataset writes them (``shards/{000000..000099}.tar``,
also ``{a,b}`` lists), a single ``.tar``, or a folder holding ``.tar`` files among its images.
Each image member of a shard is one row, its path ``SHARD.tar#MEMBER`` (the ``#`` form is the
index-file contract for a member; a file that really exists under that name stays a file).
Members that are not images (the ``.json``, ``.txt``, ``.cls`` sidecars of a sample) are not
rows.

Reading goes through the shard's own member table (one pass over its headers, kept per
process for the last few shards), then a seek to the member's data: rows in shard order read
each tar front to back.
"""
from __future__ import annotations

import io
import itertools
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator

from .errors import DfkdError

SEP = "#"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff")
_BRACE = re.compile(r"\{([^{}]*)\}")
_OPEN: "OrderedDict[str, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]]" = OrderedDict()
KEEP_OPEN = 4


def expand_braces(pattern: str) -> list[str]:
    """``a/{000..002}.tar`` → a/000.tar, a/001.tar, a/002.tar (zero-padding kept); ``{x,y}`` lists."""
    parts, last, choices = [], 0, []
    for m in _BRACE.finditer(pattern):
        parts.append(pattern[last:m.start()])
        body = m.group(1)
        ends = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if ends:
            lo, hi = ends.groups()
            width = len(lo) if lo.startswith("0") else 0
            if int(hi) < int(lo):
                raise DfkdError(f"{pattern}: the range {{{body}}} is empty")
            choices.append([str(i).zfill(width) for i in range(int(lo), int(hi) + 1)])
        else:
            choices.append(body.split(","))
        last = m.end()
    parts.append(pattern[last:])
    out = []
    for picks in itertools.product(*choices):
        out.append("".join(p + c for p, c in zip(parts, picks)) + parts[-1])
    return out


def shard_list(source: str | Path, flag: str) -> list[str] | None:
    """The shards a pool argument names (a brace pattern or one ``.tar``), or None if it names none."""
    text = os.fspath(source)
    if not text.endswith(".tar") or os.path.isdir(text):
        return None
    shards = expand_braces(text) if _BRACE.search(text) and not os.path.exists(text) else [text]
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise DfkdError(f"{flag} {text}: shard {missing[0]} not found"
                        f"{f' ({len(missing)} of {len(shards)} missing)' if len(missing) > 1 else ''}")
    return [os.path.abspath(s) for s in shards]


def split_member(path: str) -> tuple[str, str] | None:
    """(shard, member) for a ``SHARD.tar#MEMBER`` row path, else None."""
    if SEP not in path or ".tar" + SEP not in path or os.path.exists(path):
        return None
    shard, member = path.split(".tar" + SEP, 1)
    return shard + ".tar", member


def members(shard: str, note: Callable[[str, str], None]) -> Iterator[str]:
    """The row paths of a shard's image members, in the shard's order; a broken tar is noted."""
    try:
        for _, info in _table(shard)[1].items():
            if info.name.lower().endswith(IMAGE_SUFFIXES):
                yield f"{shard}{SEP}{info.name}"
    except (OSError, tarfile.TarError) as e:
        note(shard, f"tar shard not readable ({e})")


def read_member(shard: str, member: str) -> bytes:
    """A member's bytes; FileNotFoundError if the shard or member is not there."""
    tar, table = _table(shard)
    info = table.get(member)
    if info is None:
        raise FileNotFoundError(f"{member} is not in {shard}")
    f = tar.extractfile(info)
    return f.read() if f is not None else b""


def source(path: str) -> str | io.BytesIO:
    """What ``PIL.Image.open`` takes for a row path: the path, or a shard member's bytes."""
    member = split_member(path)
    return io.BytesIO(read_member(*member)) if member else path


def identity(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, or of the shard that holds a member; None if missing."""
    split = split_member(path)
    try:
        st = os.stat(split[0] if split else path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _table(shard: str) -> tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]:
    """The open shard and its regular-file members by name (kept open for the next rows)."""
    key = f"{os.getpid()}:{shard}"  # a forked decoding worker opens its own
    if key in _OPEN:
        _OPEN.move_to_end(key)
        return _OPEN[key]
    tar = tarfile.open(shard, "r:")
    table = {m.name: m for m in tar if m.isfile()}
    _OPEN[key] = (tar, table)
    while len(_OPEN) > KEEP_OPEN:
        _OPEN.popitem(last=False)[1][0].close()
    return tar, table
