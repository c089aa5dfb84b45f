"""Member-steps/s of a bucket (k experiments in one batched step) against the solo path.

    python benchmarks/bucket.py [--quick] [--sweep] [--steps N]

1. Steps: for each model (the quickstart graph with d_model 8 / one layer, where per-step
   overhead dominates as it does on a GPU, and the quickstart model itself) the solo path
   (TrainingState + run_epoch over ResidentWindows: what a worker runs) and buckets of
   k = 1, 2, 4, 8, 16 (BucketState + run_bucket_epoch over BucketWindows), measured in
   alternating rounds so that noise from other processes hits all alike; plus the
   torch.func alternative (stack_module_state + vmap(functional_call), per-member
   clipping, AdamW over the stacked dict) at k = 8, the design the bucket did not take.
   Ratio = member-steps/s over the solo path's steps/s. Goal: >= 5 at k = 8, d_model 8.
2. --sweep: an 8-point same-shape sweep end to end (`raywalk tune`, quickstart graph,
   d_model 8, one layer, seeds 1-8, 2 epochs), bucketed against --bucket 1: wall times
   and their ratio. Needs Ray; minutes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from raywalk.config import Config  # noqa: E402
from raywalk.science.batches import ResidentWindows  # noqa: E402
from raywalk.science.bucket import BucketState, BucketWindows, run_bucket_epoch  # noqa: E402
from raywalk.science.loop import TrainingState, run_epoch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
QUICKSTART = os.path.join(HERE, "..", "configs", "quickstart.yaml")
MODELS = {"d8/L1": {"model.d_model": 8, "model.n_layers": 1}, "quickstart d64/L2": {}}
KS = (1, 2, 4, 8, 16)


def configs(k: int, over: dict) -> list[Config]:
    base = Config.load(QUICKSTART).replace(**over)
    return [base.replace(seed=s) for s in range(1, k + 1)]


def windows(cfg: Config, steps: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.graph.n, (cfg.train.batch_size * steps, cfg.w + 1), generator=g, dtype=torch.int16)


def solo_epoch(over: dict, steps: int) -> float:
    cfg = configs(1, over)[0]
    s = TrainingState.create(cfg, steps)
    r = run_epoch(s, ResidentWindows(windows(cfg, steps, 0), cfg.seed, cfg.train.batch_size).epoch(0), steps)
    return steps / r.train_seconds


def bucket_epoch(over: dict, steps: int, k: int) -> float:
    cfgs = configs(k, over)
    b = BucketState(cfgs, steps)
    data = BucketWindows([ResidentWindows(windows(c, steps, i), c.seed, c.train.batch_size) for i, c in enumerate(cfgs)])
    r = run_bucket_epoch(b, data.epoch(0))
    return k * steps / r.train_seconds


def vmap_epoch(over: dict, steps: int, k: int) -> float:
    """The torch.func alternative: one GPT vmapped over stacked state (per-member clip by hand)."""
    from torch.func import functional_call, stack_module_state, vmap

    from raywalk.science.model import GPT
    from raywalk.science.schedule import make_scheduler

    cfgs = configs(k, over)
    models = [GPT.from_config(c) for c in cfgs]
    params, _ = stack_module_state(models)
    base = GPT.from_config(cfgs[0]).to("meta")
    c = cfgs[0]
    opt = torch.optim.AdamW(list(params.values()), lr=c.train.lr, weight_decay=c.train.weight_decay,
                            betas=(0.9, 0.95), foreach=True)
    sched = make_scheduler(opt, steps, c.train.warmup_frac, c.train.min_lr_ratio)
    loss_of = vmap(lambda p, tok: functional_call(base, p, (tok[:, :-1], tok[:, 1:]))[1])
    data = BucketWindows([ResidentWindows(windows(cfg, steps, i), cfg.seed, cfg.train.batch_size)
                          for i, cfg in enumerate(cfgs)])
    t = time.perf_counter()
    for tok in data.epoch(0, 0, steps):
        losses = loss_of(params, tok)
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        grads = [p.grad for p in params.values()]
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
        torch._foreach_mul_(grads, [(c.train.grad_clip / (norms + 1e-6)).clamp(max=1.0)
                                    .view(-1, *[1] * (g.dim() - 1)) for g in grads])
        opt.step()
        sched.step()
    return k * steps / (time.perf_counter() - t)


def bench_steps(steps: int, rounds: int) -> None:
    torch.set_num_threads(1)   # a worker with run.cpus_per_worker 1
    print(f"member-steps/s, {steps} steps per measurement, median of {rounds} alternating rounds, 1 thread")
    for name, over in MODELS.items():
        runs = {"solo": lambda: solo_epoch(over, steps)}
        runs.update({f"k={k}": (lambda k=k: bucket_epoch(over, steps, k)) for k in KS})
        runs["vmap k=8"] = lambda: vmap_epoch(over, steps, 8)
        got: dict[str, list[float]] = {n: [] for n in runs}
        for _ in range(rounds):
            for n, f in runs.items():
                got[n].append(f())
        solo = statistics.median(got["solo"])
        print(f"\n{name}")
        print(f"  {'path':<10} {'member-steps/s':>15} {'x solo':>8}")
        for n, v in got.items():
            m = statistics.median(v)
            print(f"  {n:<10} {m:>15.0f} {m / solo:>8.2f}")


def bench_sweep() -> None:
    import subprocess
    import tempfile

    import yaml

    root = tempfile.mkdtemp(prefix="raywalk-bucket-bench-")
    sweep = {"name": "bucket_bench", "base": os.path.abspath(QUICKSTART),
             "set": {"model.d_model": 8, "model.n_layers": 1, "train.max_epochs": 2, "gate.edge": 1.0},
             "grid": {"seed": list(range(1, 9))}}
    path = os.path.join(root, "sweep.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(sweep, f)
    walls = {}
    for k in (8, 1):
        store = os.path.join(root, f"bucket{k}")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "raywalk", "tune", path, "--storage", store, "--bucket", str(k)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls[k] = time.perf_counter() - t
    print(f"\n8-point same-shape sweep (d_model 8, one layer, 2 epochs): --bucket 8 {walls[8]:.0f}s, "
          f"--bucket 1 {walls[1]:.0f}s, ratio {walls[1] / walls[8]:.2f}x  (storage {root})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--sweep", action="store_true", help="also time an 8-point sweep end to end (Ray)")
    a = ap.parse_args()
    bench_steps(a.steps or (40 if a.quick else 150), 1 if a.quick else 3)
    if a.sweep:
        bench_sweep()


if __name__ == "__main__":
    main()
