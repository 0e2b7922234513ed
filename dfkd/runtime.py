"""Devices, autocast and data loading settings shared by every command that runs a model."""
from __future__ import annotations

import contextlib
import os

from dataclasses import dataclass

import torch

from .dist import Ranks, join
from .errors import DfkdError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DfkdError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise DfkdError(f"--device {name!r}: expected auto, cpu or cuda[:N]")
    return torch.device(name)


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CPU and on CUDA devices that support it (else fp16), or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def default_workers(device: torch.device) -> int:
    """Decoding worker processes: a few on GPU; none on a CPU of 2 cores or fewer, where a worker
    only takes a core from the model (bench/select_throughput.py: no gain from 1 or 2 workers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return min(8, max(1, cores - 1))
    return 0 if cores <= 2 else min(4, cores // 2)


def loader(dataset, batch_size: int, workers: int, device: torch.device, **kw) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=False, prefetch_factor=4 if workers else None, **kw)


@dataclass(frozen=True)
class Runtime:
    """Where and how a command runs its models: device, autocast, decoding workers, ranks."""

    device: torch.device
    amp: bool
    workers: int
    ranks: Ranks

    def options(self) -> dict:
        return {"device": str(self.device), "amp": self.amp, "workers": self.workers, "ranks": self.ranks.world}


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is fast here: CUDA, or a CPU with native bf16 (AVX512-BF16 or AMX).

    On a CPU without them (AVX2 only) bf16 is emulated: a resnet20 training step ran 10x slower
    than fp32 (34 against 363 img/s on a 2-core AMD EPYC with AVX2)."""
    if device.type == "cuda":
        return True
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def setup(device: str = "auto", amp: bool | None = None, workers: int | None = None, *,
          training: bool = False) -> Runtime:
    """The one place a command's device, autocast and workers are decided; under torchrun it
    joins the group and takes this rank's GPU. Autocast by default: for inference on CUDA (bf16
    changes CPU scores in the last bits), for training wherever bf16 is fast."""
    if workers is not None and workers < 0:
        raise DfkdError(f"--workers {workers}: must be 0 or more")
    ranks, rank_device = join(device)
    dev = rank_device or resolve_device(device)
    if amp is None:
        amp = fast_bf16(dev) if training else dev.type == "cuda"
    return Runtime(dev, amp, default_workers(dev) if workers is None else workers, ranks)
