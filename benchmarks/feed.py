"""The epoch data path alone, no model: the resident path against the streaming path.

    python benchmarks/feed.py [--walks 200000] [--batches 3000] [--storage DIR]

On the anchor corpus (n 500, w 64, L 256: 3 windows of 65 tokens per walk, 600,000
windows for 200,000 walks), side by side in one run:
  * resident: the windows read once from the materialised Ray Data window dataset into
    one int16 tensor (the one-off load time), then batches of 64 gathered by the epoch's
    permutation (drawn from (seed, epoch) on the CPU) and widened to int64;
  * streaming: Ray Data's `random_shuffle` of the same materialised windows ->
    `streaming_split(1)` -> `iter_torch_batches(64)`, as the streaming path runs it.
Goal: resident >= 50,000 batches/s on this 2-core CPU.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--walks", type=int, default=200_000, help="train walks (the anchor: 200,000)")
    ap.add_argument("--batches", type=int, default=3000, help="streaming batches timed (resident: a whole epoch)")
    ap.add_argument("--storage", help="where the corpus goes (default: a temp dir; reused when there)")
    args = ap.parse_args()
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
