"""Ray Data over the train split: each walk becomes floor(L / (w+1)) windows of w+1 tokens."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .corpus import Corpus


def walks_to_windows(walks: np.ndarray, w: int) -> np.ndarray:
    """(N, L) walks -> (N * floor(L/(w+1)), w+1) non-overlapping windows, walk-major."""
    n, L = walks.shape
    k = L // (w + 1)
    return walks[:, : k * (w + 1)].reshape(n * k, w + 1)


def _batch_to_windows(batch: pa.Table, w: int) -> dict[str, np.ndarray]:
    col = batch.column("walk").combine_chunks()
    L = len(col[0]) if len(col) else 0
    walks = col.flatten().to_numpy().reshape(-1, L).astype(np.int64)
    return {"tokens": walks_to_windows(walks, w)}


def window_dataset(corpus: Corpus, w: int):
    """A Ray Dataset with one int64 column `tokens` of shape (w+1,): input [:-1], target [1:]."""
    import ray.data

    ds = ray.data.read_parquet(corpus.files("train"), filesystem=corpus.store.fs).select_columns(["walk"])
    return ds.map_batches(_batch_to_windows, fn_kwargs={"w": w}, batch_format="pyarrow", zero_copy_batch=True)


def windows_per_epoch(corpus: Corpus, w: int) -> int:
    return corpus.manifest["splits"]["train"]["walks"] * (corpus.manifest["walk_length"] // (w + 1))
