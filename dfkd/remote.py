"""Tar shards read as a stream: over HTTP(S) or from a command's stdout (``pipe:CMD``).

WebDataset users stream web-scale pools: ``https://host/shards/{000000..000099}.tar`` (brace
patterns as for local shards) or ``pipe:curl -s https://host/shards/000000.tar``. A streamed
shard is read front to back, never seeked: its members in order.

* **Listing** (:func:`members`) is one pass over each shard: the image members' names become
  rows ``SOURCE#MEMBER`` with the local-shard rules (links, names with a tab or newline and a
  shard cut off part-way are recorded; the members before the cut are kept), and the pass
  digests the shard's bytes: SHA-256 and length are its :func:`identity`, so a resumed run
  whose shards changed is a new pool.
* **Reading** (:func:`read_member`) keeps one open stream per shard and process, and moves it
  forward to the member asked for: rows in shard order (scoring) read each shard once. A member
  behind the stream is read with an HTTP Range request from the offset the stream saw, or, for
  a server that ignores ranges and for ``pipe:``, by streaming the shard again.
* **Failures**: a shard that cannot be opened (HTTP 404, no connection, a command that fails
  before writing anything) is an error naming it; a stream that stops part-way (a dropped
  connection, a command that exits early) is a shard cut off. Every read has a timeout
  (``DFKD_REMOTE_TIMEOUT`` seconds, default 60): a server that stalls is an error, not a hang.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections import OrderedDict
from typing import Callable, Iterator

from . import shards
from .errors import DfkdError

SCHEMES = ("http://", "https://", "pipe:")
KEEP_OPEN = 4  # streams kept open per process (the shards being read)
CHUNK = 1 << 20
_IDENTITY: dict[str, tuple[int, int]] = {}  # shard -> (length, digest prefix), from a whole pass
_OPEN: "OrderedDict[str, _Cursor]" = OrderedDict()


def is_remote(text: object) -> bool:
    """Whether a pool argument or row path names a streamed shard (``http(s)://``, ``pipe:``)."""
    return isinstance(text, str) and text.startswith(SCHEMES)


def timeout() -> float:
    return float(os.environ.get("DFKD_REMOTE_TIMEOUT", "60"))


def shard_list(text: str) -> list[str]:
    """The shards a remote pool argument names (brace patterns expanded, at most shards.MAX_SHARDS)."""
    if shards.SEP in text:
        raise DfkdError(f"{text}: a streamed shard's name cannot hold '{shards.SEP}' (rows name a member"
                        f" as SHARD{shards.SEP}MEMBER)")
    return shards.expand_braces(text) if shards._BRACE.search(text) else [text]


class Cut(Exception):
    """The tar on a stream ends early or is damaged; the message says where."""


class _Stream:
    """A shard's bytes in order: ``read(n)`` returns fewer only at the end (or where it broke,
    ``broken`` then says why); ``pos`` counts the bytes read, ``digest`` hashes them if asked."""

    def __init__(self, source: str, offset: int = 0, hashing: bool = False):
        self.source, self.pos, self.broken = source, 0, None
        self.digest = hashlib.sha256() if hashing else None
        self._proc = self._err = None
        if source.startswith("pipe:"):
            self._err = tempfile.TemporaryFile()
            self._proc = subprocess.Popen(source[5:], shell=True, stdout=subprocess.PIPE, stderr=self._err,
                                          stdin=subprocess.DEVNULL)
            self._raw = self._proc.stdout
        else:
            self._raw = _http_open(source, offset)
            if offset and getattr(self._raw, "status", 200) == 206:
                self.pos = offset  # the server sent the range asked for
        self.ranged = self.pos == offset

    def read(self, n: int) -> bytes:
        parts, left = [], n
        while left > 0 and self.broken is None:
            try:
                got = self._raw.read(min(left, CHUNK))
            except http.client.IncompleteRead as e:
                got, self.broken = e.partial, "the connection was closed part-way"
            except OSError as e:  # a timeout, a reset connection
                got, self.broken = b"", f"{type(e).__name__}: {e}"
            if not got:
                self._ended()
                break
            parts.append(got)
            left -= len(got)
        data = b"".join(parts)
        self.pos += len(data)
        if self.digest is not None:
            self.digest.update(data)
        return data

    def skip(self, n: int) -> int:
        """Read past ``n`` bytes; how many there were."""
        done = 0
        while done < n:
            got = len(self.read(min(CHUNK, n - done)))
            if not got:
                break
            done += got
        return done

    def _ended(self) -> None:
        short = getattr(self._raw, "length", None)  # HTTP: bytes of the Content-Length not received
        if short and self.broken is None:
            self.broken = f"the connection was closed {short} bytes before the end"
        if self._proc is not None and self.broken is None:
            code = self._proc.wait(timeout=timeout())
            if code:
                self._err.seek(0)
                lines = self._err.read().decode("utf-8", "replace").strip().splitlines()
                self.broken = f"the command exited with status {code}" + (f": {lines[-1]}" if lines else "")

    def close(self) -> None:
        self._raw.close()
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            self._err.close()


def _http_open(url: str, offset: int = 0):
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        return urllib.request.urlopen(request, timeout=timeout())
    except urllib.error.HTTPError as e:
        e.close()
        error = FileNotFoundError if e.code in (404, 410) else OSError
        raise error(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise OSError(f"{url}: cannot connect ({getattr(e.reason, 'strerror', None) or e.reason})") from None
    except (OSError, http.client.HTTPException) as e:
        raise OSError(f"{url}: {type(e).__name__}: {e}") from None


def entries(stream: _Stream, keep: Callable[[str], bool]) -> Iterator[tuple[str, tuple[int, int] | None, bytes | None]]:
    """The members of the tar on ``stream``, in order: (name, (data offset, size) or None for a
    link, the data if ``keep(name)``). Raises :class:`Cut` where the tar ends early or a header is
    damaged; :func:`shards._scan`'s rules, without seeking."""
    long_name = None
    while True:
        pos = stream.pos
        block = stream.read(shards.BLOCK)
        if block == shards.ZERO_BLOCK or (not block and pos > 0 and stream.broken is None):
            return  # the end-of-archive marker (or a tar that omits it)
        if len(block) < shards.BLOCK:
            raise Cut(f"cut off at byte {pos}" + (f", {stream.broken}" if stream.broken else "") if pos else
                      stream.broken or "empty or not a tar")
        head = shards.parse_header(block)
        if head is None:
            raise Cut(f"bad header at byte {pos}" if pos else "not a tar")
        kind, size, name = head
        padded = -(-size // shards.BLOCK) * shards.BLOCK
        wanted = kind in shards.NAMES or (kind in shards.MEMBERS and kind not in shards.LINKS
                                          and keep(long_name or name))
        data = stream.read(padded) if wanted else None
        got = len(data) if wanted else stream.skip(padded)
        if got < size:
            raise Cut(f"cut off in the member at byte {pos}" + (f", {stream.broken}" if stream.broken else ""))
        if kind in shards.NAMES:
            long_name = shards.long_name_of(kind, data[:size])
        elif kind in shards.MEMBERS:
            yield long_name or name, None if kind in shards.LINKS else (pos + shards.BLOCK, size), \
                data[:size] if wanted else None
            long_name = None
        else:
            long_name = None


def members(shard: str, note: Callable[[str, str], None]) -> Iterator[str]:
    """The row paths of a streamed shard's image members (one pass, which also digests the shard
    for :func:`identity`). A shard that cannot be opened raises DfkdError naming it."""
    try:
        stream = _Stream(shard, hashing=True)
    except OSError as e:
        raise DfkdError(f"{e}" if str(e).startswith(shard) else f"{shard}: {e}") from None
    table: list[tuple[str, tuple[int, int] | None]] = []

    def listed() -> Iterator[tuple[str, tuple[int, int] | None]]:
        for name, where, _ in entries(stream, lambda _: False):
            table.append((name, where))
            yield name, where

    try:
        yield from shards.member_rows(shard, listed(), note)
        stream.skip(1 << 62)  # the rest (the end blocks), so that the digest covers every byte
        if stream.broken:
            raise Cut(f"cut off at byte {stream.pos}, {stream.broken}")
    except Cut as e:
        if not table and stream.pos == 0 and stream._proc is not None and stream.broken:
            raise DfkdError(f"{shard}: {stream.broken}") from None  # the command failed before any output
        note(shard, shards.unreadable(str(e), len(table)))
    finally:
        stream.close()
    _IDENTITY[shard] = (stream.pos, int(stream.digest.hexdigest()[:15], 16))


def identity(shard: str) -> tuple[int, int] | None:
    """(length, digest prefix) of a streamed shard, from this process's pass over it (one more
    pass when there was none); None when it cannot be read."""
    if shard not in _IDENTITY:
        try:
            for _ in members(shard, lambda path, reason: None):
                pass
        except DfkdError:
            return None
    return _IDENTITY.get(shard)


class _Cursor:
    """One open stream of a shard, moved forward to the members asked for."""

    def __init__(self, shard: str):
        self.shard, self.seen, self.stream, self.it = shard, {}, None, None
        self.want = None

    def read(self, member: str) -> bytes:
        if self.it is not None and member in self.seen:  # behind the stream
            data = self._range(member)
            if data is not None:
                return data
            self.close()
        if self.it is None:
            self.stream = _Stream(self.shard)
            self.it = entries(self.stream, lambda name: name == self.want)
            self.seen = {}
        self.want = member
        try:
            for name, where, data in self.it:
                self.seen[name] = where
                if name == member:
                    if where is None:
                        raise FileNotFoundError(f"{member} is a link inside {self.shard}, not an image's bytes")
                    return data
        except Cut as e:
            self.it = iter(())
            raise OSError(f"{self.shard}: {e}") from None
        raise FileNotFoundError(f"{member} is not in {self.shard}")

    def _range(self, member: str) -> bytes | None:
        """A member behind the stream, by an HTTP Range request (None: not possible)."""
        where = self.seen[member]
        if where is None or self.shard.startswith("pipe:"):
            return None
        try:
            stream = _Stream(self.shard, offset=where[0])
        except OSError:
            return None
        try:
            if not stream.ranged:
                return None
            data = stream.read(where[1])
            return data if len(data) == where[1] else None
        finally:
            stream.close()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.stream = self.it = None


def read_member(shard: str, member: str) -> bytes:
    """A member's bytes, read from the shard's stream (FileNotFoundError if it is not there,
    OSError if the stream fails)."""
    key = f"{os.getpid()}:{shard}"  # a forked decoding worker opens its own
    cursor = _OPEN.get(key)
    if cursor is None:
        cursor = _OPEN[key] = _Cursor(shard)
        while len(_OPEN) > KEEP_OPEN:
            _OPEN.popitem(last=False)[1].close()
    _OPEN.move_to_end(key)
    return cursor.read(member)
