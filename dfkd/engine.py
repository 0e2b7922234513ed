"""The scoring engine: stream rows of images through a model, sharded over ranks, in order.

``select``, ``expand`` and ``eval`` are policies over it. The rows ``start:stop`` of a source
are cut into blocks of ``batch_size``; block ``b`` is decoded and scored by rank ``b % world``
(and, inside a rank, by one of its decoding workers in turn). After every step the ranks'
per-row results are gathered so that rank 0 receives them in row order, exactly as one
process would produce them: the same blocks go through the model whatever the world size.
Bad files come back as rows with a reason; an error on any rank stops every rank.

:class:`RowFile` keeps a command's per-row results on disk (one line per row, flushed each
step), so that scoring resumes where it stopped and selection can read the rows back in one
streaming pass.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from . import gpu_decode
from .errors import DfkdError, PeerError, out_of_memory
from .images import BadImage, InputSpec, image_tensor, normalize
from .io import write_json
from .lifecycle import Run
from .pool import Listing, as_source, list_pool
from .remote import is_remote
from .runtime import Runtime, autocast, loader

# (outputs[n, ...] float32 CPU, labels[n], paths, errors) -> one tuple per row
RowFn = Callable[[torch.Tensor, torch.Tensor, list[str], list[str]], list[tuple]]


class _Blocks(torch.utils.data.IterableDataset):
    """This rank's blocks of rows, decoded: items ``(block, images, labels, paths, errors, raw)``,
    ``raw`` the (position, bytes) of the JPEGs left for the GPU to decode (dfkd/gpu_decode.py)."""

    def __init__(self, rows: Callable[[], Iterator[dict]], batch_size: int, spec: InputSpec, rank: int, world: int,
                 gpu_jpeg: bool = False):
        self.rows, self.batch_size, self.spec, self.rank, self.world = rows, batch_size, spec, rank, world
        self.gpu_jpeg = gpu_jpeg  # JPEGs travel as bytes, for dfkd/gpu_decode.py

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, me = (info.num_workers, info.id) if info else (1, 0)
        rows = self.rows()
        for b in itertools.count():
            chunk = list(itertools.islice(rows, self.batch_size))
            if not chunk:
                return
            if b % self.world == self.rank and (b // self.world) % workers == me:
                yield (b, *self._decode(chunk))

    def _decode(self, chunk: list[dict]):
        images = torch.zeros(len(chunk), self.spec.channels, *self.spec.size, dtype=torch.uint8)
        errors, raw = [""] * len(chunk), []
        for i, row in enumerate(chunk):
            jpeg = gpu_decode.read_jpeg(row["path"]) if self.gpu_jpeg else None
            if jpeg is not None:
                raw.append((i, jpeg))
                continue
            try:
                images[i] = image_tensor(row["path"], self.spec)
            except BadImage as e:
                errors[i] = str(e)
        labels = torch.tensor([int(r.get("label") or -1) for r in chunk], dtype=torch.long)
        return images, labels, [r["path"] for r in chunk], errors, raw


def _on_device(images: torch.Tensor, raw: list, paths: list[str], errors: list[str], spec: InputSpec,
               device: torch.device) -> torch.Tensor:
    """The block's images on the device, its JPEGs decoded there (a file the GPU rejects: the CPU)."""
    images = images.to(device, non_blocking=True)
    if raw:
        for (i, _), img in zip(raw, gpu_decode.decode([r for _, r in raw], spec, device)):
            if img is None:
                try:
                    img = image_tensor(paths[i], spec)
                except BadImage as e:
                    errors[i] = str(e)
                    continue
            images[i] = img.to(device)
    return images


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise DfkdError(f"--batch-size {batch_size}: must be at least 1")


def stream(model: nn.Module, spec: InputSpec, rows: Callable[[], Iterator[dict]], count: int, row_fn: RowFn,
           rt: Runtime, *, batch_size: int = 256,
           forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> Iterator[list[tuple]]:
    """Yield, once per step, the per-row results of the next rows (in row order on rank 0; an
    empty list on the other ranks). ``rows()`` streams the ``count`` rows to score."""
    check_batch_size(batch_size)
    ranks = rt.ranks
    if not isinstance(model, torch.jit.ScriptModule):
        model = model.to(memory_format=torch.channels_last)
    blocks = math.ceil(count / batch_size)
    data = loader(_Blocks(rows, batch_size, spec, ranks.rank, ranks.world, gpu_decode.enabled(rt.device)),
                  None, rt.workers, rt.device)
    batches = iter(data)
    for step in range(math.ceil(blocks / ranks.world)):
        b = step * ranks.world + ranks.rank
        payload, own_bug = None, None
        if b < blocks:
            try:  # a decoding worker that died (killed for memory) raises here too
                got, images, labels, paths, errors, raw = next(batches)
                assert got == b, f"block {got} arrived for {b}"
                errors = list(errors)
                with torch.inference_mode():
                    x = normalize(_on_device(images, raw, paths, errors, spec, rt.device), spec, rt.device, True)
                    with autocast(rt.device, rt.amp):
                        out = forward(model, x) if forward else model(x)
                    payload = (row_fn(out.float().cpu(), labels, paths, errors), None)
            except Exception as e:  # told to every rank, so that all stop together
                known = e if isinstance(e, DfkdError) else out_of_memory(e)
                if known is None and ranks.world == 1:
                    raise
                own_bug = None if known else e
                payload = (None, str(known) if known else f"rank {ranks.rank}: {type(e).__name__}: {e}")
        gathered = ranks.all_gather(payload)
        error = next((p[1] for p in gathered if p and p[1]), None)
        if error:
            if own_bug is not None:
                raise own_bug  # this rank's own bug keeps its traceback; the others end with one line
            raise DfkdError(error) if payload and payload[1] else PeerError(error)
        yield [r for p in gathered if p for r in p[0]] if ranks.main else []


def _cell(v) -> str:
    if isinstance(v, float):
        return repr(v)
    return str(v).replace("\t", " ").replace("\n", " ").replace("\r", " ")


class RowFile:
    """Per-row results on disk, one tab-separated line per row in row order (rank 0 writes)."""

    def __init__(self, path: Path, types: Sequence[type]):
        self.path, self.types = Path(path), list(types)

    def done(self) -> int:
        """Rows already written by an earlier attempt; a torn last line is dropped."""
        if not self.path.is_file():
            return 0
        with open(self.path, "r+b") as f:
            data = f.read()
            keep = data.rfind(b"\n") + 1
            if keep != len(data):
                f.truncate(keep)
        return data.count(b"\n", 0, keep)

    def append(self, rows: list[tuple]) -> None:
        if not rows:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join("\t".join(_cell(v) for v in r) + "\n" for r in rows))
            f.flush()

    def __iter__(self) -> Iterator[tuple]:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                cells = line.rstrip("\n").split("\t")
                yield tuple(t(c) for t, c in zip(self.types, cells))


@dataclass
class Segment:
    """Rows ``lo:hi`` of a listing and their scores: one run, or one shard of a merge."""

    listing: Listing
    lo: int
    hi: int
    rows: RowFile

    def __iter__(self) -> Iterator[tuple[dict, tuple]]:
        return zip(self.listing.rows(self.lo, self.hi), self.rows)


def score_run(run: Run, pool: str | Path, flag: str, identity: dict, model: nn.Module,
              spec: InputSpec, row_fn: RowFn, types: Sequence[type], *, batch_size: int,
              shard: tuple[int, int] | None = None, info: dict | None = None,
              forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None) -> Segment:
    """List ``pool`` (or slice ``i`` of ``n``) and score it into ``run``'s ``.scoring/``.

    The run is bound to ``identity`` plus the pool's digest and the shard; a run with the same
    identity resumes from the rows already written."""
    out, rt = run.out, run.rt
    ranks = rt.ranks
    check_batch_size(batch_size)  # before the run is bound to its inputs
    i, n = shard or (0, 1)
    fresh = out / ".pool-listing.tsv"
    listing = list_pool(pool, fresh, flag) if ranks.main else None
    columns, count, digest, problems = ranks.broadcast(
        None if listing is None else (listing.columns, listing.count, listing.digest, listing.problems))
    identity = {**identity, "pool": digest, "shard": [i, n] if shard else None}
    try:
        resumed = run.claim(identity)
    except DfkdError:
        fresh.unlink(missing_ok=True)
        raise
    state = out / ".scoring"
    rows = RowFile(state / "rows.tsv", types)
    if ranks.main:
        state.mkdir(exist_ok=True)
        if not resumed:
            rows.path.unlink(missing_ok=True)
        os.replace(fresh, state / "pool.tsv")
        where = pool if is_remote(pool) else str(Path(pool).resolve())
        write_json(state / "shard.json", {"shard": [i, n], "count": count, "pool": where,
                                          "identity": identity, "problems": problems, **(info or {})})
    lo, hi = i * count // n, (i + 1) * count // n
    done = ranks.broadcast(rows.done() if ranks.main else None)
    listing = Listing(state / "pool.tsv", columns, count, digest, as_source(pool), problems)
    run.progress(done, hi - lo)
    for got in stream(model, spec, lambda: listing.rows(lo + done, hi), hi - lo - done, row_fn, rt,
                      batch_size=batch_size, forward=forward):
        if ranks.main:
            rows.append(got)
            done += len(got)
            run.progress(done, hi - lo)
    return Segment(listing, lo, hi, rows)
