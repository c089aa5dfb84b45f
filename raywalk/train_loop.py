"""The function Ray Train runs on every worker: a thin shell around training.py.

It sets the worker up (threads, device, determinism), restores the newest
checkpoint that verifies, then per epoch: feed this worker's Ray Data shard to
`run_epoch`, gate with `epoch_end`, report metrics + checkpoint, rewrite
result.json (rank 0), print one line. It stops once the gate passes or the
epochs run out. The science lives in training.py and never sees Ray.
"""
from __future__ import annotations

import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import gate
from .config import Config
from .corpus import Corpus
from .result import ResultWriter
from .storage import Store
from .training import (TrainingState, check_precision, epoch_end, epoch_seed, gather_rng, run_epoch,
                       set_determinism)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything the driver hands every worker (pickled once by Ray)."""
    config: Config
    """The experiment's validated config (run.storage absolute)."""
    experiment_id: str
    """Directory of the experiment under run.storage."""
    corpus_uri: str
    """The corpus directory (local path or s3://...)."""
    corpus_manifest: dict[str, Any]
    """Its verified manifest, so workers do not re-read it."""
    gate_starts: tuple[int, ...]
    """The start tokens of the gate's sequences, in order."""
    steps_per_epoch: int
    """Optimizer steps per epoch, the same on every rank."""
    driver_token: str
    """Identifies this driver run, to count worker-group restarts under it."""
    progress: bool = True
    """Draw rank 0's per-epoch progress bar."""
    verbose: bool = False
    """Keep Ray Train's own INFO logs."""
    hooks: Any = None
    """A fault-injection factory (faults.py) for tests and benchmarks; None in real runs."""


def torch_threads(cpus_per_worker: float) -> int:
    """Intra-op threads = the CPUs this worker reserved, not the node's core count."""
    return max(1, math.floor(cpus_per_worker))


def _quiet_logs() -> None:
    logging.getLogger("ray.train").setLevel(logging.WARNING)   # per-report INFO lines
    from ray.train.v2._internal.execution import context as _ctx   # its logger is named by file path
    logging.getLogger(_ctx.__file__).setLevel(logging.WARNING)   # "Reporting training result N: ..."


def _restore(state: TrainingState, checkpoints: Store, rank: int, world: int, say) -> str | None:
    import ray.train

    latest = ray.train.get_checkpoint()
    if latest is None and not checkpoints.exists():
        return None
    name = latest.path.rstrip("/").rsplit("/", 1)[-1] if latest else None
    s, name = ckpt.find_resume_state(checkpoints, name, say)
    if s is not None:
        state.load_state_dict(s, rank, world)   # the model is on its device already
    return name


def train_loop_per_worker(spec: WorkerSpec) -> None:
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm

    cfg = spec.config
    if not spec.verbose:
        _quiet_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(torch_threads(cfg.run.cpus_per_worker))
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)   # object collectives use the current device
    check_precision(cfg.train.precision, device)
    set_determinism(cfg.run.deterministic)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if rank == 0 else (lambda s: None)

    root = Store.open(cfg.run.storage)
    checkpoints = root.sub(spec.experiment_id, ckpt.RUN_DIR)
    corpus = Corpus(Store.open(spec.corpus_uri), spec.corpus_manifest)
    table = corpus.rule_table()
    share = gate.share(np.asarray(spec.gate_starts, dtype=np.int64), rank, world)

    state = TrainingState.create(cfg, spec.steps_per_epoch, device)
    restored = _restore(state, checkpoints, rank, world, say)
    writer = ResultWriter(root, spec.experiment_id, cfg, world, device.type, spec.driver_token, spec.corpus_uri) \
        if rank == 0 else None
    why = f"worker group restart {writer.restarts}" if writer and writer.restarts_this_run else "rerun"
    if restored is not None:
        say(f"{why}: resuming from {checkpoints.child_uri(restored)} (epoch {state.epoch} done), continuing at "
            f"epoch {state.epoch + 1}")
    elif writer and writer.restarts_this_run:
        say(f"{why}: no checkpoint yet, starting at epoch 1")

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    net = ray.train.torch.prepare_model(state.model) if distributed else state.model
    hooks = spec.hooks.for_worker(rank, checkpoints) if spec.hooks is not None else None
    shard = ray.train.get_dataset_shard("train")
    per_rank_batch = cfg.train.batch_size // world
    max_epochs = cfg.train.max_epochs

    while not state.done:
        e, t0 = state.epoch, time.perf_counter()
        bar = tqdm(total=spec.steps_per_epoch, desc=f"epoch {e + 1}/{max_epochs}", unit="step") \
            if rank == 0 and spec.progress else None
        batches = shard.iter_torch_batches(batch_size=per_rank_batch, dtypes=torch.long, drop_last=True,
                                           local_shuffle_buffer_size=cfg.train.shuffle_buffer,
                                           local_shuffle_seed=epoch_seed(cfg.seed, e, rank) % 2**31,
                                           device=str(device))
        run = run_epoch(state, batches, spec.steps_per_epoch, rank, net, hooks, bar)
        if bar is not None:
            bar.close()
        end = epoch_end(state, run, share, table)
        rng = gather_rng()
        metrics = {"epoch": state.epoch, "loss": end.loss, "edge": end.comp.edge, "rule": end.comp.rule,
                   "rule_checks": end.comp.rule_total, "gate_passed": end.passed,
                   "train_seconds": run.train_seconds, "first_batch_seconds": run.first_batch_seconds,
                   "tokens_per_second": spec.steps_per_epoch * cfg.train.batch_size * cfg.w / run.train_seconds}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                ckpt.save(tmp, state.state_dict(rng, spec.experiment_id))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=ckpt.dir_name(state.epoch))
        if writer is not None:
            writer.epoch_done(state.curves, end.comp, state.gate_epoch, state.epoch, share.n_distinct,
                              spec.steps_per_epoch, by_r=end.by_r)
        say(f"epoch {state.epoch}/{max_epochs}  loss {end.loss:.3f}  edge {end.comp.edge:.3f}  "
            f"rule {end.comp.rule:.3f}  gate {'PASS' if end.passed else 'no'}  "
            f"{time.perf_counter() - t0:.0f}s")
