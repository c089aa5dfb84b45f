"""The epoch data path alone, no model: the resident path against the streaming path.

    python benchmarks/feed.py [--walks 200000] [--batches 3000] [--storage DIR]
    python benchmarks/feed.py --rss [--walks 200000] [--storage DIR]

On the anchor corpus (n 500, w 64, L 256: 3 windows of 65 tokens per walk, 600,000
windows for 200,000 walks), side by side in one run:
  * resident: the windows read once from the materialised Ray Data window dataset into
    one int16 tensor (the one-off load time), then batches of 64 gathered by the epoch's
    permutation (drawn from (seed, epoch) on the CPU) and widened to int64;
  * streaming: Ray Data's `random_shuffle` of the same materialised windows ->
    `streaming_split(1)` -> `iter_torch_batches(64)`, as the streaming path runs it.
Goal: resident >= 50,000 batches/s on this 2-core CPU.

--rss: the resident path's host memory in a real run. `raywalk.train` (one CPU worker, train.data=resident,
one epoch cut to a few steps, a small gate) on the corpus of --walks walks, then on a 50,000-walk one (the least corpus_size allows at n = 500); a step
hook on the worker reads its peak RSS (VmHWM). The difference is what the windows cost the worker's host
memory, set against their size in the resident tensor: 1x means they are held once (a rough figure: the
smaller run's peak moves by some 20-40 MiB from run to run; twice would add 56 MiB more). The object store's
bytes in use (the driver's materialised window dataset, if any) are reported beside it. Last, a resident
run stopped in epoch 2 and rerun with train.data=stream: the run keeps its path, so the windows the driver
would build for streaming only take host memory beside the worker's tensor.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raywalk.science.batches import ResidentWindows, token_dtype  # noqa: E402
from raywalk.config import Config  # noqa: E402
from raywalk.service.corpus import build_corpus, ray_mapper  # noqa: E402
from raywalk.service.dataset import epoch_order, load_resident, window_dataset, windows_per_epoch  # noqa: E402
from raywalk.service.ray_env import ensure_ray  # noqa: E402
from raywalk.records.storage import Store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class PeakRss:
    """A step hook factory (tests.faults.instrumented): rank 0 writes its process's VmHWM (bytes) and the object
    store's bytes in use to `path`, before every step."""

    def __init__(self, path: str):
        self.path = path

    def for_worker(self, rank: int, checkpoints):
        return self if rank == 0 else None

    def before_step(self, epoch: int, step: int) -> None:
        import ray

        with open("/proc/self/status") as f:
            hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        key = "object_store_memory"
        used = ray.cluster_resources().get(key, 0) - ray.available_resources().get(key, 0)
        Path(self.path).write_text(f"{hwm} {int(used)}")


class StopAt:
    """A step hook factory: rank 0 raises at the start of epoch `epoch` (with run.max_failures=0 the run stops
    there, unfinished, its path recorded)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def for_worker(self, rank: int, checkpoints):
        return self if rank == 0 else None

    def before_step(self, epoch: int, step: int) -> None:
        if epoch == self.epoch:
            raise RuntimeError("benchmark: stopped here on purpose")


def rerun_streaming_over_resident(walks: int, storage: str) -> tuple[int, int]:
    """(rank 0's peak RSS, the object store's bytes in use) when a run that took the resident path is rerun
    with train.data=stream (the path it took is kept: it goes on resident)."""
    from raywalk.service.driver import train
    from tests.faults import instrumented

    cfg = Config.load(ROOT / "configs" / "anchor.yaml", [
        f"run.storage={storage}", f"corpus.corpus_size={walks}", "train.data=resident", "train.max_epochs=2",
        "gate.sequences=8", "run.max_failures=0"])
    try:
        with instrumented(StopAt(2), max_steps_per_epoch=8):
            train(cfg, fresh=True, progress=False, log=lambda s: None)
    except Exception:
        pass   # stopped in epoch 2, as meant
    probe = Path(tempfile.mkdtemp(prefix="raywalk-rss-")) / "rss"
    with instrumented(PeakRss(str(probe)), max_steps_per_epoch=8):
        train(cfg.replace(**{"train.data": "stream"}), progress=False, log=lambda s: None)
    hwm, used = (int(x) for x in probe.read_text().split())
    return hwm, used


def worker_rss(walks: int, storage: str) -> tuple[int, int, int]:
    """(rank 0's peak RSS, the resident windows' bytes, the object store's bytes in use) in a short resident
    run (one epoch of 8 steps, an 8-sequence gate) on a corpus of `walks` walks."""
    from raywalk.service.driver import train
    from raywalk.service.windows import windows_per_walk
    from tests.faults import instrumented

    cfg = Config.load(ROOT / "configs" / "anchor.yaml", [
        f"run.storage={storage}", f"corpus.corpus_size={walks}", "train.data=resident", "train.max_epochs=1",
        "gate.sequences=8"])
    probe = Path(tempfile.mkdtemp(prefix="raywalk-rss-")) / "rss"
    with instrumented(PeakRss(str(probe)), max_steps_per_epoch=8):
        train(cfg, fresh=True, progress=False, log=lambda s: None)
    hwm, used = (int(x) for x in probe.read_text().split())
    n = walks * windows_per_walk(cfg.corpus.walk_length, cfg.w)
    return hwm, n * (cfg.w + 1) * torch.tensor([], dtype=token_dtype(cfg.graph.n)).element_size(), used


def rss_main(args) -> None:
    tmp = args.storage or tempfile.mkdtemp(prefix="raywalk-bench-feed-")
    ensure_ray(Config.load(ROOT / "configs" / "anchor.yaml", [f"run.storage={tmp}"]))
    rows = [(w, *worker_rss(w, tmp)) for w in (50_000, args.walks)]   # the least corpus_size allows
    mb = lambda b: f"{b / 2**20:7.1f} MiB"   # noqa: E731
    for w, hwm, nb, used in rows:
        print(f"{w:>9,} walks: rank 0 peak RSS {mb(hwm)}   resident windows {mb(nb)}   object store in use {mb(used)}")
    (_, hwm0, nb0, _), (_, hwm1, nb1, _) = rows
    print(f"the windows' share of the worker's peak RSS: {mb(hwm1 - hwm0)} for {mb(nb1 - nb0)} of windows "
          f"= {(hwm1 - hwm0) / (nb1 - nb0):.2f}x")
    hwm, used = rerun_streaming_over_resident(args.walks, tmp)
    print(f"{args.walks:>9,} walks, a resident run rerun with train.data=stream (goes on resident): rank 0 peak RSS "
          f"{mb(hwm)}   object store in use {mb(used)}   host memory {mb(hwm + used)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--walks", type=int, default=200_000, help="train walks (the anchor: 200,000)")
    ap.add_argument("--batches", type=int, default=3000, help="streaming batches timed (resident: a whole epoch)")
    ap.add_argument("--storage", help="where the corpus goes (default: a temp dir; reused when there)")
    ap.add_argument("--rss", action="store_true", help="the resident path's worker peak RSS in a real run")
    args = ap.parse_args()
    if args.rss:
        return rss_main(args)
    tmp = args.storage or tempfile.mkdtemp(prefix="raywalk-bench-feed-")
    cfg = Config.load(ROOT / "configs" / "anchor.yaml", [f"run.storage={tmp}", f"corpus.corpus_size={args.walks}"])
    torch.set_num_threads(1)   # a worker's threads: its reserved CPUs (run.cpus_per_worker = 1)
    ensure_ray(cfg)
    t = time.perf_counter()
    corpus, summary = build_corpus(cfg, Store.open(tmp), mapper=ray_mapper(), progress=False)
    print(f"corpus {'reused' if summary['reused'] else 'built'} in {time.perf_counter() - t:.1f}s")
    n = windows_per_epoch(corpus, cfg.w)
    ds = window_dataset(corpus, cfg.w, materialize=True)
    B = cfg.train.batch_size

    t = time.perf_counter()
    feed = ResidentWindows(load_resident(corpus, cfg.w, n, token_dtype(cfg.graph.n), torch.device("cpu")),
                           cfg.seed, B)
    load_s = time.perf_counter() - t
    rates = []
    for epoch in range(2):
        t = time.perf_counter()
        k = sum(1 for _ in feed.epoch(epoch))
        rates.append(k / (time.perf_counter() - t))

    t = time.perf_counter()
    it = epoch_order(ds, cfg.seed, 0).streaming_split(1, equal=True)[0].iter_torch_batches(
        batch_size=B, dtypes=torch.long, drop_last=True)
    first = None
    k = 0
    for _ in it:
        k += 1
        if first is None:
            first, t1 = time.perf_counter() - t, time.perf_counter()
        if k > args.batches:
            break
    stream = (k - 1) / (time.perf_counter() - t1)

    print(f"anchor corpus: {n:,} windows of {cfg.w + 1} tokens, batch {B}, {feed.steps():,} batches per epoch")
    print(f"{'path':<11s} {'batches/s':>11s}  notes")
    print(f"{'resident':<11s} {min(rates):11,.0f}  whole epochs {', '.join(f'{r:,.0f}' for r in rates)}; one-off "
          f"load {load_s:.2f}s, {feed.nbytes / 1e6:.0f} MB {str(feed.windows.dtype).removeprefix('torch.')}")
    print(f"{'streaming':<11s} {stream:11,.0f}  {args.batches:,} batches after the first, which came after "
          f"{first:.2f}s")
    print(f"resident / streaming: {min(rates) / stream:.1f}x; goal resident >= 50,000 batches/s: "
          f"{'met' if min(rates) >= 50_000 else 'NOT met'}")


if __name__ == "__main__":
    main()
