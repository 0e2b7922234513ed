"""Ranks under torchrun: joining the process group, who writes, and the few collectives dfkd uses.

torchrun (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
variables) starts N copies of the same command. :func:`join` joins them into one group (NCCL
on CUDA, gloo on CPU). Every rank computes; rank 0 alone writes files and prints. Without a
launcher there is one rank and every collective is a no-op.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import DfkdError, PeerError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, checkpoints, progress and stdout."""
        return self.rank == 0

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, error: str | None) -> None:
        """Raise the first rank's error on every rank, so that all ranks stop together (on the
        others as a :class:`~dfkd.errors.PeerError`)."""
        errors = [e for e in self.all_gather(error) if e]
        if errors:
            raise DfkdError(error) if error else PeerError(errors[0])

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t


SINGLE = Ranks()


def launched() -> bool:
    """True inside a process started by torchrun (or a launcher with the same variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device_name: str) -> tuple[Ranks, torch.device | None]:
    """Join the torchrun group (once per process); returns the ranks and, for CUDA, this rank's GPU."""
    if not launched():
        return SINGLE, None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name != "cpu" and torch.cuda.is_available()
    device = None
    if cuda:
        if device_name not in ("auto", "cuda"):
            raise DfkdError(f"--device {device_name}: under torchrun each rank takes the GPU of its LOCAL_RANK;"
                            " use --device cuda (or auto)")
        if local >= torch.cuda.device_count():
            raise DfkdError(f"LOCAL_RANK {local}: this node has {torch.cuda.device_count()} GPU(s);"
                            " lower --nproc-per-node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device)
        atexit.register(leave)  # a library caller's process too: gloo torn down at interpreter exit can abort
    return Ranks(rank, world, local), device


def leave() -> None:
    """Leave the group (the CLI when a command ends; at exit for every process that joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
