"""WebDataset tar shards: pools written by img2dataset / webdataset, as rows of images.

A pool may be a brace pattern as webdataset writes them (``shards/{000000..000099}.tar``,
also ``{a,b}`` lists), a single ``.tar``, or a folder holding ``.tar`` files among its images.
Each image member of a shard is one row, its path ``SHARD.tar#MEMBER`` (the ``#`` form is the
index-file contract for a member; a file that really exists under that name stays a file).
Members that are not images (the ``.json``, ``.txt``, ``.cls`` sidecars of a sample) are not
rows. An image member that is a link (hard or symbolic), or whose name an index file cannot hold
(a tab or newline), is recorded as skipped. A pattern names at most :data:`MAX_SHARDS` shards,
counted before any is listed.

Reading goes through the shard's own member table (one pass over its headers, kept per
process for the last few shards), then a seek to the member's data: rows in shard order read
each tar front to back. The headers are read by a small scanner of our own (name, size, type;
ustar prefixes, pax and GNU long names): with the standard ``tarfile`` module, which parses
every header field in Python, ``select`` from shards ran at 0.68 of the same images as a folder;
with the scanner at 1.00 (bench/shards.py).
"""
from __future__ import annotations

import io
import itertools
import math
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from . import remote
from .errors import DfkdError

SEP = "#"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff")
_BRACE = re.compile(r"\{([^{}]*)\}")
_OPEN: "OrderedDict[str, tuple[BinaryIO, dict[str, tuple[int, int]], str | None]]" = OrderedDict()
KEEP_OPEN = 16
BLOCK = 512
MAX_SHARDS = 1_000_000  # a brace pattern naming more is refused before it is expanded
LINKS = (b"1", b"2")  # tar member types: hard link, symbolic link
ZERO_BLOCK = bytes(BLOCK)
NAMES = (b"x", b"L")  # pax extended header, GNU long name: they name the next member
MEMBERS = (b"0", b"\0", b"7", *LINKS)  # regular files (and links, recorded as such)


def expand_braces(pattern: str) -> list[str]:
    """``a/{000..002}.tar`` → a/000.tar, a/001.tar, a/002.tar (zero-padding kept); ``{x,y}`` lists.
    More than :data:`MAX_SHARDS` names are refused before any is made."""
    parts, last, choices = [], 0, []
    for m in _BRACE.finditer(pattern):
        parts.append(pattern[last:m.start()])
        body = m.group(1)
        ends = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if ends:
            lo, hi = ends.groups()
            width = len(lo) if lo.startswith("0") else 0
            if int(hi) < int(lo):
                raise DfkdError(f"{pattern}: the range {{{body}}} is empty (write it low..high)")
            choices.append((int(lo), int(hi), width))
        else:
            choices.append(body.split(","))
        last = m.end()
    parts.append(pattern[last:])
    count = math.prod(c[1] - c[0] + 1 if isinstance(c, tuple) else len(c) for c in choices)
    if count > MAX_SHARDS:
        raise DfkdError(f"{pattern}: names {count} shards, more than dfkd takes from one pattern ({MAX_SHARDS});"
                        " check the ranges")
    choices = [[str(i).zfill(c[2]) for i in range(c[0], c[1] + 1)] if isinstance(c, tuple) else c for c in choices]
    out = []
    for picks in itertools.product(*choices):
        out.append("".join(p + c for p, c in zip(parts, picks)) + parts[-1])
    return out


def shard_list(source: str | Path, flag: str) -> list[str] | None:
    """The shards a pool argument names (a brace pattern or one ``.tar``), or None if it names none."""
    text = os.fspath(source)
    if remote.is_remote(text):
        try:
            return remote.shard_list(text)
        except DfkdError as e:
            raise DfkdError(f"{flag} {e}") from None
    if not text.endswith(".tar") or os.path.isdir(text):
        return None
    try:
        shards = expand_braces(text) if _BRACE.search(text) and not os.path.exists(text) else [text]
    except DfkdError as e:
        raise DfkdError(f"{flag} {e}") from None
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise DfkdError(f"{flag} {text}: shard {missing[0]} not found"
                        f"{f' ({len(missing)} of {len(shards)} missing)' if len(missing) > 1 else ''}")
    return [os.path.abspath(s) for s in shards]


def split_member(path: str) -> tuple[str, str] | None:
    """(shard, member) for a ``SHARD.tar#MEMBER`` row path (``URL#MEMBER``, ``pipe:CMD#MEMBER``
    for a streamed shard), else None."""
    if remote.is_remote(path):
        return tuple(path.split(SEP, 1)) if SEP in path else None
    if SEP not in path or ".tar" + SEP not in path or os.path.exists(path):
        return None
    shard, member = path.split(".tar" + SEP, 1)
    return shard + ".tar", member


def members(shard: str, note: Callable[[str, str], None]) -> Iterator[str]:
    """The row paths of a shard's image members, in the shard's order. A shard that cannot be
    read is noted; one cut off or damaged part-way is noted, and the members before it kept. An
    image member that is a link, or whose name holds a tab or newline, is noted instead of listed."""
    if remote.is_remote(shard):
        yield from remote.members(shard, note)
        return
    try:
        _, table, problem = _table(shard)
    except OSError as e:
        note(shard, f"tar shard not readable ({e.strerror or e})")
        return
    if problem:
        note(shard, unreadable(problem, len(table)))
    yield from member_rows(shard, table.items(), note)


def unreadable(problem: str, members_before: int) -> str:
    """skipped.tsv's reason for a shard that could not be read whole."""
    return f"tar shard not readable ({problem})" if not members_before else \
        f"tar shard not readable past its first {members_before} members ({problem}): the rest left out"


def member_rows(shard: str, table: Iterable[tuple[str, object]], note: Callable[[str, str], None]) -> Iterator[str]:
    """The row paths of the image members among ``(name, where)`` (``where`` None: a link)."""
    for name, where in table:
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        row = f"{shard}{SEP}{name}"
        if where is None:
            note(row, "a link inside the tar (hard or symbolic), not an image's bytes: left out")
        elif any(c in name for c in "\t\n\r"):
            note(row, "member name holds a tab or newline, which an index file cannot hold: left out")
        else:
            yield row


def read_member(shard: str, member: str) -> bytes:
    """A member's bytes; FileNotFoundError if the shard or member is not there."""
    if remote.is_remote(shard):
        return remote.read_member(shard, member)
    f, table, _ = _table(shard)
    where = table.get(member)
    if where is None:
        raise FileNotFoundError(f"{member} is not in {shard}" if member not in table else
                                f"{member} is a link inside {shard}, not an image's bytes")
    f.seek(where[0])
    return f.read(where[1])


def read_bytes(path: str) -> bytes:
    """A row's bytes: the file's, or a shard member's (OSError when it is not there)."""
    member = split_member(path)
    if member:
        return read_member(*member)
    with open(path, "rb") as f:
        return f.read()


def source(path: str) -> str | io.BytesIO:
    """What ``PIL.Image.open`` takes for a row path: the path, or a shard member's bytes."""
    member = split_member(path)
    return io.BytesIO(read_member(*member)) if member else path


def identity(path: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, or of the shard that holds a member; None if missing."""
    split = split_member(path)
    if remote.is_remote(path):
        return remote.identity(split[0] if split else path)
    try:
        st = os.stat(split[0] if split else path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _table(shard: str) -> tuple[BinaryIO, dict[str, tuple[int, int] | None], str | None]:
    """The open shard, its regular files' (data offset, size) by name (None for a link), and
    what stopped the scan early if anything did (kept open for the next rows)."""
    key = f"{os.getpid()}:{shard}"  # a forked decoding worker opens its own
    if key in _OPEN:
        _OPEN.move_to_end(key)
        return _OPEN[key]
    f = open(shard, "rb")
    try:
        _OPEN[key] = (f, *_scan(f, os.fstat(f.fileno()).st_size))
    except BaseException:
        f.close()
        raise
    while len(_OPEN) > KEEP_OPEN:
        _OPEN.popitem(last=False)[1][0].close()
    return _OPEN[key]


def _scan(f: BinaryIO, length: int) -> tuple[dict[str, tuple[int, int] | None], str | None]:
    """One pass over a tar's headers (ustar, pax and GNU long names), seeking past the data.
    Returns the members found (links as None) and, if the tar ends early or a header is damaged
    (a negative size too: the scan only moves forward), why.

    ``tarfile`` parses every header field in Python; this reads only the name, size and type,
    which made listing and reading a shard several times faster."""
    table, pos, long_name = {}, 0, None
    while True:
        f.seek(pos)
        block = f.read(BLOCK)
        if block == ZERO_BLOCK or (not block and pos > 0):
            return table, None  # the end-of-archive marker (or a tar that omits it)
        if len(block) < BLOCK:
            return table, f"cut off at byte {pos}" if pos else "empty or not a tar"
        head = parse_header(block)
        if head is None:
            return table, f"bad header at byte {pos}" if pos else "not a tar"
        kind, size, name = head
        data = pos + BLOCK
        if data + size > length:
            return table, f"cut off in the member at byte {pos}"
        if kind in NAMES:  # pax extended header / GNU long name: the next member's name
            f.seek(data)
            long_name = long_name_of(kind, f.read(size))
        elif kind in MEMBERS:
            table[long_name or name] = None if kind in LINKS else (data, size)
            long_name = None
        else:
            long_name = None
        pos = data + -(-size // BLOCK) * BLOCK


def parse_header(block: bytes) -> tuple[bytes, int, str] | None:
    """A tar header block's (type, data size, name with its ustar prefix); None if the checksum
    fails or the size is negative (a scan only moves forward)."""
    try:
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        stored = block[148:156].split(b"\0", 1)[0].strip()
        ok = int(stored or b"-1", 8) == sum(block[:148]) + 256 + sum(block[156:])
    except ValueError:
        ok = False
    if not ok or size < 0:
        return None
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
    if prefix:
        name = prefix.decode("utf-8", "replace") + "/" + name
    return block[156:157], size, name


def long_name_of(kind: bytes, payload: bytes) -> str | None:
    """The next member's name from a pax extended header (``x``) or a GNU long name (``L``)."""
    return _pax_path(payload) if kind == b"x" else payload.rstrip(b"\0").decode("utf-8", "replace")


def _pax_path(payload: bytes) -> str | None:
    """The ``path`` record of a pax header ("LEN path=NAME\\n" records), if any."""
    i = 0
    while i < len(payload):
        space = payload.find(b" ", i)
        if space < 0:
            break
        try:
            length = int(payload[i:space])
        except ValueError:
            return None  # a damaged record: the member keeps its header name
        if length <= 0:
            return None
        record = payload[space + 1:i + length - 1]
        if record.startswith(b"path="):
            return record[5:].decode("utf-8", "replace")
        i += length
    return None
