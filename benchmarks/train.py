"""Ray's overhead on training: the same loop plainly in PyTorch and under TorchTrainer.

    python benchmarks/train.py [--steps 200] [--storage DIR]

At the anchor model shape (vocab 500, d_model 128, 4 layers, w 64, batch 64) on
a real anchor-shaped corpus (n = 500, L = 256, 50,000 walks), side by side:
  1. raywalk's epoch runner (loop.run_epoch, what every worker runs) fed from
     memory, without Ray;
  2. raywalk's worker loop under TorchTrainer with 1 and with 2 workers (Ray Data
     shard, DDP for 2), epochs cut to the same number of steps.
Tokens/s count training steps only (the gate is measured in model_speed.py).
For the model's own speed against a hand-written-attention baseline, see
benchmarks/model_speed.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raywalk.config import Config  # noqa: E402
from raywalk.service.corpus import build_corpus  # noqa: E402
from raywalk.service.windows import walks_to_windows  # noqa: E402
from raywalk.records.storage import Store  # noqa: E402
from raywalk.science.loop import TrainingState, run_epoch, sync  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def anchor_shaped(storage: str) -> Config:
    return Config.load(ROOT / "configs" / "anchor.yaml", [
        f"run.storage={storage}", "corpus.corpus_size=50000", "train.max_epochs=1", "gate.sequences=8",
        "gate.rule=1.0"])


class StepClock:
    """A step callback that notes when step 1 starts: 'steady' figures leave out the first step."""

    def __init__(self, device: torch.device):
        self.t1, self.device = None, device

    def __call__(self, state: TrainingState) -> None:
        if state.step == 1:
            sync(self.device)
            self.t1 = time.perf_counter()


def plain_loop(cfg: Config, windows: np.ndarray, steps: int, device: str = "cpu") -> tuple[float, float]:
    """raywalk's own epoch runner (loop.run_epoch) over in-memory batches, no Ray."""
    state = TrainingState.create(cfg, steps, device)
    order = np.random.default_rng(0).permutation(len(windows))
    B = cfg.train.batch_size
    batches = (torch.from_numpy(windows[order[s * B:(s + 1) * B]]).long() for s in range(steps))
    clock = StepClock(state.device)
    t0 = time.perf_counter()
    run_epoch(state, batches, steps, callbacks=[clock])   # synchronises the device before it returns
    end = time.perf_counter()
    return steps * B * cfg.w / (end - t0), (steps - 1) * B * cfg.w / (end - clock.t1)


def under_ray(cfg: Config, workers: int, steps: int, tmp: Path, tag: str = "") -> float:
    import ray.train

    from raywalk.service.driver import train
    from tests.faults import instrumented

    class Capture(ray.train.UserCallback):
        def __init__(self, path: str):
            self.path = path

        def after_report(self, run_context, metrics, checkpoint):
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics[0]) + "\n")

    name = f"w{workers}{tag}"
    out = tmp / f"metrics-{name}.jsonl"
    cfg = cfg.replace(**{"run.workers": workers, "run.storage": str(tmp / name)})
    # the corpus is shared: link the built one into this storage root
    (tmp / name).mkdir(exist_ok=True)
    os.symlink(tmp / "corpora", tmp / name / "corpora")
    with instrumented(max_steps_per_epoch=steps):
        train(cfg, progress=False, callbacks=[Capture(str(out))], log=lambda s: None)
    m = json.loads(out.read_text().splitlines()[-1])
    tokens = steps * cfg.train.batch_size * cfg.w
    steady = (tokens - cfg.train.batch_size * cfg.w) / (m["train_seconds"] - m["first_batch_seconds"])
    return tokens / m["train_seconds"], steady, m["first_batch_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--storage", help="where to build the corpus (default: a temp dir)")
    args = ap.parse_args()
    tmp = Path(args.storage or tempfile.mkdtemp(prefix="raywalk-bench-train-"))
    cfg = anchor_shaped(str(tmp))

    from raywalk.service.ray_env import ensure_ray

    ensure_ray(cfg.replace(**{"run.workers": 2}))
    from raywalk.service.corpus import ray_mapper

    t = time.perf_counter()
    corpus, _ = build_corpus(cfg, Store.open(str(tmp)), mapper=ray_mapper(), progress=False)
    print(f"corpus: {corpus.manifest['splits']['train']['walks']:,} walks in {time.perf_counter() - t:.1f}s")
    windows = walks_to_windows(corpus.walks("train"), cfg.w)

    threads = torch.get_num_threads()
    plain, plain_steady = plain_loop(cfg, windows, args.steps)
    print(f"{args.steps} steps each; 'steady' leaves out the first step (for Ray: the wait for the data stream's "
          f"first batch, paid once per epoch)")
    print(f"plain PyTorch loop            {plain:9,.0f} tokens/s, steady {plain_steady:9,.0f}   ({threads} threads)")
    rows = [("TorchTrainer, 1 worker", cfg, 1), ("TorchTrainer, 2 workers (DDP)", cfg, 2),
            ("TorchTrainer, 1 worker, bf16", cfg.replace(**{"train.precision": "bf16"}), 1)]
    for label, c, workers in rows:
        whole, steady, first = under_ray(c, workers, args.steps, tmp, tag=c.train.precision)
        print(f"{label:<29s} {whole:9,.0f} tokens/s, steady {steady:9,.0f}   first batch after {first:.1f}s; "
              f"steady overhead {plain_steady / steady - 1:+.1%} of plain (target < 10%)")


if __name__ == "__main__":
    main()
