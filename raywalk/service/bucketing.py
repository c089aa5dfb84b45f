"""A sweep's points grouped into buckets: same-shape points train together, k to a worker.

Points share a bucket when they share the model shape and schedule (science/bucket.py
BUCKET_KEY) and what their one trainer asks of the cluster (bucket_driver.SHARED_RUN,
which fixes the steps per epoch too); points a bucket cannot honour (several workers, dropout,
streamed data: `alone_reason`) are buckets of one and train as today. Buckets are cut in point order, at most
K members each.

The default K: on a GPU worker, the most members whose measured memory
(`member_bytes`: weights, gradient, AdamW moments, saved activations, resident windows)
fits MEMORY_SHARE of the worker's share of the GPU, at most GPU_MAX; on a CPU worker,
CPU_DEFAULT where a member-step costs no more than a solo step (benchmarks/bucket.py: 2.1x at
d_model 8, 1.0x at the quickstart model; the gain flattens by k = 8) and a bucket pays one Ray
Train start for k points; 1 above CPU_BUCKET_FLOPS a member-step, where the step is arithmetic
(the anchor's, batched on a CPU, runs at 0.5-0.9x).
"""
from __future__ import annotations

from typing import Sequence

import torch

from raywalk.config import Config, ConfigError
from raywalk.records.errors import byte_size
from raywalk.science.bucket import bucket_key, key_value, member_bytes
from raywalk.service.bucket_driver import SHARED_RUN, bucket_id
from raywalk.service.dataset import plan_data
from raywalk.service.windows import planned_windows

CPU_DEFAULT = 8
CPU_BUCKET_FLOPS = 2e9   # per member-step: d_model 8 (0.01 GFLOP) 2.1x, the quickstart model (0.7) 1.0x, the anchor (23) <1
GPU_MAX = 64
MEMORY_SHARE = 0.8
# GiB per GPU model (run.accelerator_type); one not listed is taken to be the smallest common one
GPU_GIB = {"T4": 16, "V100": 16, "A10G": 24, "L4": 24, "A100": 40, "A100-80G": 80, "H100": 80, "H200": 141}
UNKNOWN_GPU_GIB = 16


def alone_reason(cfg: Config, host_available: int | None = None) -> str | None:
    """Why this point cannot be a bucket member and trains alone (today's solo path), or None.

    A bucket trains its members on one worker, on resident windows, with one dropout-free batched
    step: a point asking otherwise would have its setting silently ignored in a bucket."""
    if cfg.run.workers != 1:
        return f"run.workers {cfg.run.workers}: a bucket trains on one worker"
    if cfg.model.dropout != 0.0:
        return f"model.dropout {cfg.model.dropout:g}: bucketed members train with dropout 0"
    if cfg.train.data == "stream":
        return "train.data stream: a bucket holds its members' windows resident"
    if host_available is not None and cfg.run.gpus_per_worker == 0 and cfg.train.data == "auto":
        # the solo run's own choice (dataset.plan_data): a point that would stream there streams alone
        plan = plan_data(cfg.train, planned_windows(cfg), cfg.w + 1, cfg.graph.n, torch.device("cpu"),
                         free=host_available)
        if plan.path == "stream":
            return (f"train.data_budget {cfg.train.data_budget:g}: its windows ({byte_size(plan.nbytes)}) exceed the "
                    f"budget ({byte_size(cfg.train.data_budget * host_available)}), so it streams; a bucket holds "
                    f"its members' windows resident")
    return None


def group_key(cfg: Config) -> tuple:
    return (bucket_key(cfg), tuple(key_value(cfg, k) for k in SHARED_RUN))


def budget(cfg: Config, host_available: int) -> tuple[int, str]:
    """(bytes a bucket may take, what that is) on the worker cfg asks for."""
    if cfg.run.gpus_per_worker > 0:
        gib = GPU_GIB.get(cfg.run.accelerator_type, UNKNOWN_GPU_GIB)
        known = cfg.run.accelerator_type in GPU_GIB
        what = (f"{MEMORY_SHARE:g} of {cfg.run.gpus_per_worker:g} x {gib} GiB "
                f"({cfg.run.accelerator_type if known else 'GPU model unknown: assumed'})")
        return int(MEMORY_SHARE * cfg.run.gpus_per_worker * gib * 2**30), what
    return int(cfg.train.data_budget * host_available), f"train.data_budget {cfg.train.data_budget:g} of the host's free memory"


def step_flops(cfg: Config) -> float:
    """One member's training step, about 6 x parameters x tokens (forward and backward)."""
    from raywalk.science.bucket import RowLayout
    from raywalk.science.model import GPT

    import torch

    with torch.device("meta"):
        width = RowLayout.of(GPT.from_config(cfg)).width
    return 6.0 * width * cfg.train.batch_size * cfg.w


def default_k(cfg: Config, host_available: int) -> int:
    if cfg.run.gpus_per_worker == 0:   # a CPU gains only where the step is overhead, not arithmetic
        return CPU_DEFAULT if step_flops(cfg) <= CPU_BUCKET_FLOPS else 1
    room, _ = budget(cfg, host_available)
    return max(1, min(GPU_MAX, room // member_bytes(cfg, planned_windows(cfg))))


def check_fits(members: Sequence[Config], host_available: int) -> None:
    """Refuse a bucket whose estimated memory exceeds its worker's budget (the estimate and the budget)."""
    need = sum(member_bytes(c, planned_windows(c)) for c in members)
    room, what = budget(members[0], host_available)
    if need > room:
        raise ConfigError(f"bucket: {len(members)} members need about {need / 2**30:.2f} GiB (weights, optimizer, "
                          f"activations, windows), more than the {room / 2**30:.2f} GiB budget ({what}); "
                          f"use a smaller --bucket")


def group(points: Sequence, k: int, host_available: int | None = None) -> list[tuple[str, list]]:
    """(bucket id, its points) in point order: same-key points, at most k to a bucket; a point with an
    `alone_reason` is a bucket of one."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"--bucket: {k!r} is invalid: must be a whole number >= 1 (1: one experiment per trial)")
    open_: dict[tuple, list] = {}
    out: list[list] = []
    for p in points:
        if k == 1 or alone_reason(p.cfg, host_available) is not None:
            out.append([p])
            continue
        key = group_key(p.cfg)
        cur = open_.get(key)
        if cur is None or len(cur) == k:
            cur = open_[key] = []
            out.append(cur)
        cur.append(p)
    return [(bucket_id([p.experiment_id for p in b]) if len(b) > 1 else b[0].experiment_id, b) for b in out]
