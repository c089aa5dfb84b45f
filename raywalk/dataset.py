"""Ray Data over the train split: each walk becomes floor(L / (w+1)) windows of w+1 tokens."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from .corpus import Corpus
from .training import epoch_seed


def windows_per_walk(walk_length: int, w: int) -> int:
    """Non-overlapping (w+1)-token windows cut from one walk (the one formula for it)."""
    return walk_length // (w + 1)


def walks_to_windows(walks: np.ndarray, w: int) -> np.ndarray:
    """(N, L) walks -> (N * floor(L/(w+1)), w+1) non-overlapping windows, walk-major."""
    n, L = walks.shape
    k = windows_per_walk(L, w)
    return walks[:, : k * (w + 1)].reshape(n * k, w + 1)


def _batch_to_windows(batch: pa.Table, w: int) -> dict[str, np.ndarray]:
    col = batch.column("walk").combine_chunks()
    L = len(col[0]) if len(col) else 0
    walks = col.flatten().to_numpy().reshape(-1, L)
    return {"tokens": walks_to_windows(walks, w)}   # int32 on the wire; batches arrive as int64


def window_dataset(corpus: Corpus, w: int, materialize: bool = False):
    """A Ray Dataset with one column `tokens` of shape (w+1,): input [:-1], target [1:].

    With `materialize`, the windows are computed once, in corpus order, and held
    in the object store, so epochs stream from memory instead of re-reading and
    re-cutting the Parquet shards while the model trains.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    keep = ctx.execution_options.preserve_order
    # A dataset copies the context when created: order must be set before, not at materialize().
    ctx.execution_options.preserve_order = True   # same block order on every run
    try:
        ds = ray.data.read_parquet(corpus.files("train"), filesystem=corpus.store.fs).select_columns(["walk"])
        ds = ds.map_batches(_batch_to_windows, fn_kwargs={"w": w}, batch_format="pyarrow", zero_copy_batch=True)
        return ds.materialize() if materialize else ds
    finally:
        ctx.execution_options.preserve_order = keep


def epoch_order(windows, seed: int, epoch: int):
    """The windows in epoch `epoch`'s order: a fresh uniform permutation drawn from (seed, epoch).

    Ray Data's all-to-all shuffle (it spills to disk when the corpus outgrows memory); an
    integer seed makes it the same permutation on every execution, so a resumed epoch sees
    exactly the batches the interrupted one did.
    """
    return windows.random_shuffle(seed=epoch_seed(seed, epoch, 0))


def epoch_shard(windows, seed: int, epoch: int, rank: int, world: int):
    """This rank's share of the epoch's order (rank 0 splits it once; every rank gets its iterator)."""
    import ray
    import ray.train.collective

    # what travels is a reference (in a list, so it arrives as one), not the iterators themselves
    ref = [ray.put(epoch_order(windows, seed, epoch).streaming_split(world, equal=True))] if rank == 0 else None
    return ray.get(ray.train.collective.broadcast_from_rank_zero(ref)[0])[rank]


def windows_per_epoch(corpus: Corpus, w: int) -> int:
    return corpus.manifest["splits"]["train"]["walks"] * windows_per_walk(corpus.manifest["walk_length"], w)
