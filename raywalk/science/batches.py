"""An epoch's batches on the resident data path: every train window in one tensor on the device.

Epoch e's order is a uniform permutation of all windows drawn from (seed, e) with a
CPU generator, so it is the same on CPU and GPU, on every rank and after any resume;
it crosses to the device once per epoch. Global batch s is perm[s*B:(s+1)*B] and rank r
takes its contiguous B/world slice. A mid-epoch resume recomputes the permutation and
starts at its step, reading nothing it skips. No Ray here: dataset.py fills the tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from raywalk.science.loop import epoch_seed


def token_dtype(n_vertices: int) -> torch.dtype:
    """The smallest integer dtype that holds every vertex id (embedding lookups widen per batch)."""
    return torch.int16 if n_vertices <= torch.iinfo(torch.int16).max + 1 else torch.int32


def epoch_permutation(n_windows: int, seed: int, epoch: int) -> torch.Tensor:
    """The windows' order in epoch `epoch` (0-based), drawn on the CPU: device-independent."""
    g = torch.Generator(device="cpu").manual_seed(epoch_seed(seed, epoch, 0))
    return torch.randperm(n_windows, generator=g, device="cpu")


@dataclass
class ResidentWindows:
    """All train windows, (N, w+1) in a small integer dtype, on the training device."""
    windows: torch.Tensor
    seed: int
    batch_size: int          # global batch, in windows
    rank: int = 0
    world: int = 1

    @property
    def nbytes(self) -> int:
        return self.windows.numel() * self.windows.element_size()

    def steps(self) -> int:
        return len(self.windows) // self.batch_size

    CHUNK = 128   # batches gathered and widened by one pair of ops: per-op overhead, not bytes, bounds a batch

    def epoch(self, epoch: int, start: int = 0, steps: int | None = None) -> Iterator[torch.Tensor]:
        """This rank's (B/world, w+1) int64 batches of epoch `epoch` (0-based), from step `start` on."""
        steps = self.steps() if steps is None else steps
        B, b = self.batch_size, self.batch_size // self.world
        perm = epoch_permutation(len(self.windows), self.seed, epoch)[: steps * B].view(steps, B)
        mine = perm[:, self.rank * b:(self.rank + 1) * b].to(self.windows.device, non_blocking=True)
        for s0 in range(start, steps, self.CHUNK):
            rows = torch.index_select(self.windows, 0, mine[s0:s0 + self.CHUNK].reshape(-1))   # 3x w[idx] on CPU
            yield from rows.long().view(-1, b, self.windows.size(1)).unbind(0)


def fill_windows(chunks, n_windows: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Copy numpy chunks of windows (in corpus order) into one preallocated device tensor."""
    out = torch.empty((n_windows, width), dtype=dtype, device=device)
    at = 0
    for c in chunks:
        c = np.asarray(c)
        out[at:at + len(c)] = torch.from_numpy(np.require(c, np.int32, ["W"])).to(device).to(dtype)
        at += len(c)
    if at != n_windows:
        raise ValueError(f"the window dataset gave {at} windows, the corpus manifest says {n_windows}")
    return out
