"""The train split's windows for the workers: a Ray Data dataset (streamed), or read straight into a tensor
(resident); and the plan that picks one. Each walk becomes floor(L / (w+1)) windows (windows.py)."""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, replace

import torch

from raywalk.records.errors import byte_size
from raywalk.science.batches import fill_windows, token_dtype
from raywalk.config import ConfigError, TrainConfig
from raywalk.records.corpus import Corpus
from raywalk.science.loop import epoch_seed
from raywalk.service.windows import batch_to_windows, windows_per_walk


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
        ds = ds.map_batches(batch_to_windows, fn_kwargs={"w": w}, batch_format="pyarrow", zero_copy_batch=True)
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


# ---- the data path: resident on the device, or streamed by Ray Data -------------------

def free_memory(device: torch.device) -> int:
    """Bytes free for the resident windows: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class DataPlan:
    """Which data path a worker takes, and why (train.data, memory, or the run's recorded choice)."""
    path: str                 # "resident" | "stream"
    why: str
    nbytes: int               # the windows in the resident dtype
    dtype: torch.dtype
    device: torch.device
    fits: bool | None = None  # auto only: within the budget on this rank (every rank must agree)

    def agreed(self, every_rank_fits: bool) -> "DataPlan":
        if every_rank_fits or self.path == "stream":
            return self
        return replace(self, path="stream", why="another rank has too little memory")

    def describe(self) -> str:
        if self.path == "resident":
            return (f"resident on {self.device}, {byte_size(self.nbytes)} {str(self.dtype).removeprefix('torch.')}"
                    f" ({self.why})")
        return f"streaming ({self.why})"


def plan_data(train: TrainConfig, n_windows: int, width: int, n_vertices: int, device: torch.device,
              recorded: str | None = None, free: int | None = None) -> DataPlan:
    """The path for this run: a recorded one (resume, rerun) is kept; else train.data decides.

    Both paths draw a fresh uniform permutation per epoch, but not the same one, so a run
    never switches: a resume that cannot keep the resident windows is refused.
    """
    dtype = token_dtype(n_vertices)
    nbytes = n_windows * width * (torch.iinfo(dtype).bits // 8)
    free = free_memory(device) if free is None else free
    budget = train.data_budget * free
    plan = lambda path, why, fits=None: DataPlan(path, why, nbytes, dtype, device, fits)   # noqa: E731
    if recorded == "stream":
        return plan("stream", "kept from the run's first start")
    if recorded == "resident" or train.data == "resident":
        if nbytes > free:
            field = "the run's recorded data path" if recorded else "train.data"
            raise ConfigError(f"{field}: 'resident' is invalid on {device}: the windows take {byte_size(nbytes)}, "
                              f"more than the {byte_size(free)} free there"
                              + ("; resume on a worker with more memory (the path a run took is kept so its "
                                 "epoch order never changes)" if recorded else "; use train.data=stream or auto"))
        return plan("resident", "kept from the run's first start" if recorded else "train.data=resident")
    if train.data == "stream":
        return plan("stream", "train.data=stream")
    fits = nbytes <= budget
    if fits:
        return plan("resident", f"within budget {byte_size(budget)}", fits)
    return plan("stream", f"windows {byte_size(nbytes)} > budget {byte_size(budget)}", fits)


def load_resident(corpus: Corpus, w: int, n_windows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The train split's windows in corpus order, as one (N, w+1) tensor on the device.

    Read straight from the Parquet shards, one at a time: the same windows, in the same order, as
    `window_dataset`, without starting a Ray Data pipeline (about 10 s of a small run's start-up).
    """
    import pyarrow.parquet as pq

    chunks = (batch_to_windows(pq.read_table(f, columns=["walk"], filesystem=corpus.store.fs), w)["tokens"]
              for f in corpus.files("train"))
    return fill_windows(chunks, n_windows, w + 1, dtype, device)


def epoch_stream(windows, cfg, epoch: int, start: int, rank: int, world: int, device: torch.device):
    """The streaming path: this rank's batches of the epoch's Ray Data shuffle, from step `start` on
    (the skipped ones are read, not trained on: a Ray Data iterator cannot seek)."""
    it = epoch_shard(windows, cfg.seed, epoch, rank, world).iter_torch_batches(
        batch_size=cfg.train.batch_size // world, dtypes=torch.long, drop_last=True, device=str(device))
    return (b["tokens"] for b in itertools.islice(it, start, None))
