"""The one exception type the CLI turns into a one-line message and a non-zero exit."""
from __future__ import annotations

import re


class DfkdError(Exception):
    """Bad input a user can act on: say what was wrong, which file or flag, and what to do."""


class PeerError(DfkdError):
    """Another rank's error, told to this one so that every rank stops together: rank 0 shows
    it; the rank that met it shows its own line."""


# What gloo and NCCL say when a rank of the group has gone (it ended on an error of its own).
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted",
              "remote process exited or there was a network error")


def peer_gone(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank of the group has ended."""
    return isinstance(error, RuntimeError) and any(t in str(error) for t in _PEER_GONE)


# What PyTorch's allocators (CPU and CUDA) and the DataLoader say when memory runs out.
_OOM_TEXT = ("out of memory", "can't allocate memory", "is killed by signal: Killed")


def out_of_memory(error: BaseException) -> DfkdError | None:
    """``error`` as the one line a user can act on when it is running out of memory (Python's
    MemoryError, torch's CPU or CUDA allocator, a loader worker killed by the kernel), else None."""
    text = str(error)
    if not (isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and any(t in text for t in _OOM_TEXT))):
        return None
    asked = re.search(r"tried to allocate ([0-9.]+) ?(bytes|[KMGT]iB)", text)
    if asked:
        size, unit = float(asked.group(1)), asked.group(2)
        what = f"{size / 2**30:.1f} GiB" if unit == "bytes" else f"{size:g} {unit}"
        where = "on the GPU" if isinstance(error, torch_oom()) or "CUDA" in text else "in memory"
        first = f"{what} more {where} could not be had"
    else:
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)[:160]
    return DfkdError(f"out of memory ({first}): lower --batch-size (memory grows with it), or --workers")


def torch_oom() -> type:
    """torch's CUDA out-of-memory exception type (imported only when one is being reported)."""
    import torch

    return torch.OutOfMemoryError
