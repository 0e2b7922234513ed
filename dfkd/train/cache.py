"""The decoded-image cache: a training set too large for memory, decoded once to disk.

One entry, ``CACHE_DIR/<key>/``:

* ``images.u8``: raw uint8 rows, N×C×H×W in the index's order (``numpy.memmap`` opens it);
* ``digests.u8``: a BLAKE2b digest of each row (:data:`DIGEST` bytes), written with the row;
* ``meta.json``, written last: the shape, the input spec, and the rows that failed to decode.

The key hashes the input spec and the rows' identity (each file's path, size and mtime), so
another index, another input size or an edited file gets its own entry, and a finished entry
is reused by every later run and every rank. Remove the folder to clear it.

**Building.** The rows are cut into chunks of :data:`CHUNK`; under torchrun rank r decodes the
chunks c with c mod N = r and writes their rows in place into ``images.u8.partial`` (so every
rank must see the same cache folder: on several nodes, a shared filesystem). A finished chunk
leaves ``parts/<c>.json`` (its failures): a killed build resumes with the chunks still
missing. When every chunk is there, rank 0 writes ``meta.json`` and renames the file into
place. Rank 0 holds ``<key>.lock`` meanwhile, so two jobs never build one entry together.

**Reading.** Each requested row is read with ``os.preadv`` into the batch and checked against
its digest: a damaged entry (bytes changed on disk, same size) is refused with one line naming
the folder to remove, never trained on. The operating system's page cache, not the process,
holds the file: a run's resident memory does not grow with the set (a memory map's touched
pages would count as the process's own).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .. import shards
from ..dist import Ranks
from ..errors import DfkdError
from ..images import ImageDataset, InputSpec
from ..io import write_json
from ..runtime import loader

CHUNK = 4096
DIGEST = 8  # bytes of BLAKE2b per row


def row_digest(row: np.ndarray) -> bytes:
    return hashlib.blake2b(row, digest_size=DIGEST).digest()


def default_cache_dir() -> Path:
    """``$DFKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/dfkd``, else ``~/.cache/dfkd``."""
    if os.environ.get("DFKD_CACHE_DIR"):
        return Path(os.environ["DFKD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dfkd"


def cache_key(paths: Sequence[str], spec: InputSpec) -> str:
    """SHA-256 over the input spec and every row's path, size and mtime (missing files included)."""
    h = hashlib.sha256(json.dumps({"version": 2, "spec": spec.to_dict()}, sort_keys=True).encode())
    for p in paths:
        known = shards.identity(p)
        h.update(f"{p}\t{known[0]}\t{known[1]}\n".encode() if known else f"{p}\t-\n".encode())
    return h.hexdigest()[:32]


class DiskImages:
    """Rows of a finished cache entry (``rows`` selects and orders them); read by position."""

    def __init__(self, file: Path, shape: tuple[int, int, int], rows: torch.Tensor, digests: np.ndarray):
        self.file, self.row_shape, self.rows, self.digests = file, tuple(shape), rows, digests
        self.row_bytes = int(np.prod(shape))
        self._fd: int | None = None
        self._pid = -1

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.row_shape)

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx: torch.Tensor) -> "DiskImages":
        return DiskImages(self.file, self.row_shape, self.rows[idx], self.digests)

    def read(self, idx: torch.Tensor) -> torch.Tensor:
        """uint8 len(idx)×C×H×W, read row by row from the file, each checked against its digest."""
        if self._pid != os.getpid():  # a descriptor is not shared with a forked process
            self._fd, self._pid = os.open(self.file, os.O_RDONLY), os.getpid()
        out = np.empty((len(idx), self.row_bytes), dtype=np.uint8)
        for j, row in enumerate(self.rows[idx].tolist()):
            if os.preadv(self._fd, [out[j]], row * self.row_bytes) != self.row_bytes:
                raise DfkdError(f"{self.file}: shorter than its meta.json says (cut off?); remove the folder")
            if row_digest(out[j]) != self.digests[row].tobytes():
                raise DfkdError(f"{self.file}: row {row} is damaged (its bytes changed since it was decoded);"
                                f" remove {self.file.parent} to decode the set again")
        return torch.from_numpy(out).view(len(idx), *self.row_shape)

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


def cached_images(paths: Sequence[str], spec: InputSpec, cache_dir: str | Path | None, *, batch_size: int, workers: int,
                  ranks: Ranks, on_progress: Callable[[int, int], None] | None = None
                  ) -> tuple[DiskImages, list[tuple[int, str]]]:
    """Every row of ``paths`` in the cache (built or finished first); returns the images and
    the (row, reason) of the files that failed to decode."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = ranks.broadcast(cache_key(paths, spec) if ranks.main else None)
    entry = root / key
    shape = (spec.channels, *spec.size)
    meta = entry / "meta.json"
    if not meta.is_file():
        lock = _lock(root, key) if ranks.main else None
        try:
            ranks.all_gather(None)  # the others wait for rank 0's lock
            if not meta.is_file():
                _build(entry, paths, spec, shape, batch_size, workers, ranks, on_progress)
        finally:
            if lock is not None:
                lock.close()
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DfkdError(f"{meta}: unreadable cache entry ({e}); remove {entry}") from None
    if info.get("rows") != len(paths) or tuple(info.get("shape", ())) != shape:
        raise DfkdError(f"{meta}: does not describe this data ({info.get('rows')} rows of {info.get('shape')},"
                        f" expected {len(paths)} of {list(shape)}); remove {entry}")
    file, want = entry / "images.u8", len(paths) * int(np.prod(shape))
    size = file.stat().st_size if file.is_file() else None
    if size != want:
        raise DfkdError(f"{file}: holds {size} bytes, its meta.json says {want} (cut off?); remove {entry}")
    digests = np.fromfile(entry / "digests.u8", dtype=np.uint8) if (entry / "digests.u8").is_file() else None
    if digests is None or len(digests) != len(paths) * DIGEST:
        raise DfkdError(f"{entry / 'digests.u8'}: missing or cut off; remove {entry}")
    images = DiskImages(file, shape, torch.arange(len(paths)), digests.reshape(len(paths), DIGEST))
    return images, [(int(r), str(reason)) for r, reason in info["failed"]]


def _lock(root: Path, key: str):
    try:
        root.mkdir(parents=True, exist_ok=True)
        f = open(root / f"{key}.lock", "a+")
    except OSError as e:
        raise DfkdError(f"--cache-dir {root}: cannot be used ({e.strerror})") from None
    fcntl.flock(f, fcntl.LOCK_EX)  # another job building the same entry: wait for it
    return f


def _build(entry: Path, paths: Sequence[str], spec: InputSpec, shape: tuple[int, ...], batch_size: int,
           workers: int, ranks: Ranks, on_progress: Callable[[int, int], None] | None) -> None:
    row_bytes = int(np.prod(shape))
    partial, parts = entry / "images.u8.partial", entry / "parts"
    digests = entry / "digests.u8.partial"
    if ranks.main:
        parts.mkdir(parents=True, exist_ok=True)
        for name, part, size in (("images.u8", partial, row_bytes), ("digests.u8", digests, DIGEST)):
            if (entry / name).is_file():  # killed between the renames and meta.json
                os.replace(entry / name, part)
            with open(part, "ab") as f:  # kept from a killed build: its finished chunks stay valid
                f.truncate(len(paths) * size)
    ranks.all_gather(None)
    chunks = range(0, (len(paths) + CHUNK - 1) // CHUNK)
    error = None
    try:
        fd, dfd = os.open(partial, os.O_WRONLY), os.open(digests, os.O_WRONLY)
        try:
            done = 0
            for c in chunks[ranks.rank::ranks.world]:
                start, stop = c * CHUNK, min(len(paths), (c + 1) * CHUNK)
                if not (parts / f"{c}.json").is_file():
                    failed = []
                    for x, _, pos, errors in loader(ImageDataset(paths[start:stop], spec), batch_size, workers,
                                                    torch.device("cpu")):
                        data = np.ascontiguousarray(x.numpy())
                        for j, p in enumerate(pos.tolist()):
                            os.pwrite(fd, data[j].tobytes(), (start + p) * row_bytes)
                            os.pwrite(dfd, row_digest(data[j]), (start + p) * DIGEST)
                        failed += [(start + p, err) for p, err in zip(pos.tolist(), errors) if err]
                    os.fsync(fd)
                    os.fsync(dfd)
                    write_json(parts / f"{c}.json", failed)
                done += stop - start
                if on_progress:
                    on_progress(min(len(paths), done * ranks.world), len(paths))
        finally:
            os.close(fd)
            os.close(dfd)
    except OSError as e:
        error = f"--cache-dir {entry.parent}: cannot write the decoded images ({e.strerror})"
    ranks.agree(error)
    if ranks.main:
        failed = []
        for c in chunks:
            try:
                failed += json.loads((parts / f"{c}.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                error = (f"--cache-dir {entry.parent}: chunk {c} of {entry.name} is missing after the build;"
                         " on several nodes the cache folder must be on a filesystem they all share")
                break
        if error is None:
            os.replace(partial, entry / "images.u8")
            os.replace(digests, entry / "digests.u8")
            write_json(entry / "meta.json", {"rows": len(paths), "shape": list(shape), "spec": spec.to_dict(),
                                             "failed": failed})
            for c in chunks:
                (parts / f"{c}.json").unlink()
            parts.rmdir()
    ranks.agree(error)
