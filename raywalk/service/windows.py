"""Walks cut into non-overlapping (w+1)-token windows: input [:-1], target [1:].

numpy and pyarrow only, no torch: every Ray Data worker that cuts windows for the
streaming path imports this module, and a torch import costs each one seconds.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def windows_per_walk(walk_length: int, w: int) -> int:
    """Non-overlapping (w+1)-token windows cut from one walk (the one formula for it)."""
    return walk_length // (w + 1)


def planned_windows(cfg) -> int:
    """The train windows a config's corpus will give (before it is built: its planned walks)."""
    return cfg.corpus.corpus_size * windows_per_walk(cfg.corpus.walk_length, cfg.w)


def walks_to_windows(walks: np.ndarray, w: int) -> np.ndarray:
    """(N, L) walks -> (N * floor(L/(w+1)), w+1) non-overlapping windows, walk-major."""
    n, L = walks.shape
    k = windows_per_walk(L, w)
    return walks[:, : k * (w + 1)].reshape(n * k, w + 1)


def batch_to_windows(batch: pa.Table, w: int) -> dict[str, np.ndarray]:
    """A Parquet batch of walks (column `walk`) -> its windows (column `tokens`)."""
    col = batch.column("walk").combine_chunks()
    flat = col.flatten().to_numpy()
    if len(col) == 0:   # Ray Data may hand over an empty block
        return {"tokens": flat.reshape(0, w + 1)}
    walks = flat.reshape(len(col), -1)
    return {"tokens": walks_to_windows(walks, w)}   # int32 on the wire; batches arrive as int64
