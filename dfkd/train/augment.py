"""Batch augmentation on the device: random crop with zero padding and horizontal flip."""
from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTS = ("crop-flip", "crop", "flip", "none")


def augment_batch(x: torch.Tensor, mode: str, pad: int, generator: torch.Generator, *,
                  offset: int = 0, total: int | None = None) -> torch.Tensor:
    """Augment a uint8 or float N×C×H×W batch; every sample gets its own crop offset and flip.

    ``x`` may be the part ``offset:offset+N`` of a batch of ``total`` (one rank's share): the
    draws are made for the whole batch, so each sample is augmented as in one process.
    """
    if mode == "none" or x.shape[0] == 0:
        return x
    n, _, h, w = x.shape
    total = n if total is None else total
    part = slice(offset, offset + n)
    if "crop" in mode and pad > 0:
        shift = torch.randint(0, 2 * pad + 1, (2, total), generator=generator)[:, part].to(x.device)
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = (shift[0, :, None] + torch.arange(h, device=x.device))[:, :, None]
        cols = (shift[1, :, None] + torch.arange(w, device=x.device))[:, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if "flip" in mode:
        flip = (torch.rand(total, generator=generator)[part] < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(flip, x.flip(3), x)
    return x.contiguous()
