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
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import gate, stops
from .config import Config
from .corpus import Corpus
from .result import ResultWriter
from .storage import Store
from .dataset import epoch_shard
from .training import (TrainingState, check_precision, epoch_end, gather_epoch_losses, gather_rng, run_epoch,
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
    windows: Any
    """The train split's (w+1)-token windows as a Ray Dataset (materialised, corpus order)."""
    progress: bool = True
    """Draw rank 0's per-epoch progress bar."""
    verbose: bool = False
    """Keep Ray Train's own INFO logs."""
    hooks: Any = None
    """A fault-injection factory (faults.py) for tests and benchmarks; None in real runs."""
    lease_holder: str = ""
    """The driver's lease id: workers write only while it holds a live lease (stops.py)."""


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


def _report(state: TrainingState, spec: WorkerSpec, rank: int, metrics: dict[str, Any]) -> str:
    """Checkpoint the state where it stands (epoch end or mid-epoch) and report it; returns its name."""
    import ray.train

    mid = state.step > 0
    losses = gather_epoch_losses(state) if mid else None   # collectives: every rank takes part
    rng = gather_rng()
    name = ckpt.dir_name(state.epoch, state.step)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            stops.check_lease(spec)   # never write into a run that another driver has taken over
            ckpt.save(tmp, state.state_dict(rng, spec.experiment_id, losses))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        with stops.checkpoint_upload(spec, name, uploading=rank == 0):   # a full disk: one clear stop
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    return name


class NoticeWatch:
    """Polls for a spot reclaim notice every `every` steps (the same steps on every rank: it is a
    barrier) and, once per notice, saves and reports a just-in-time checkpoint at that step."""

    def __init__(self, spec: WorkerSpec, rank: int, steps: int, checkpoints: Store, writer: ResultWriter | None,
                 say):
        self.spec, self.rank, self.steps, self.checkpoints, self.writer, self.say = \
            spec, rank, steps, checkpoints, writer, say
        # no watcher, no notices (ensure_ray turns it off for a laptop's embedded Ray): no polls
        watching = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1") != "0"
        self.every = spec.config.run.preemption_check_steps if watching else 0
        self.seen: set = set()

    def __call__(self, state: TrainingState) -> None:
        if not self.every or state.step % self.every or state.step == self.steps:
            return   # at the epoch's end the regular checkpoint follows at once
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return
        key = (tuple(info.preempted_node_ids), info.deadline_ms)
        if key in self.seen:
            return
        self.seen.add(key)
        left = (info.deadline_ms / 1000 - time.time()) if info.deadline_ms else None
        name = _report(state, self.spec, self.rank, {"epoch": state.epoch, "step": state.step, "preemption": True})
        if self.writer is not None:
            self.writer.notice({"at_step": state.step, "epoch": state.epoch + 1, "checkpoint": name,
                                "nodes": info.preempted_node_ids, "ranks": info.preempted_ranks,
                                "deadline_ms": info.deadline_ms})
        self.say(f"preemption notice: node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} "
                 f"(ranks {info.preempted_ranks}) reclaimed"
                 + (f" in {left:.0f}s" if left is not None else "")
                 + f"; just-in-time checkpoint {self.checkpoints.child_uri(name)} at epoch {state.epoch + 1} "
                   f"step {state.step}; training on until the node goes")


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
    writer = ResultWriter(root, spec.experiment_id, cfg, world, device.type, spec.driver_token, spec.corpus_uri,
                          lease_holder=spec.lease_holder) if rank == 0 else None
    if writer is not None and (restored is not None or writer.restarts_this_run):
        r = writer.resumed(restored, state.epoch + 1, state.step)
        at = f"continuing at epoch {state.epoch + 1}" + (f" step {state.step}" if state.step else "")
        say(f"{r['reason']} (restart {writer.restarts}): " + (
            f"resuming from {checkpoints.child_uri(restored)} (epoch {state.epoch} done), {at}" if restored
            else "no checkpoint yet, starting at epoch 1"))

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    net = ray.train.torch.prepare_model(state.model) if distributed else state.model
    hooks = spec.hooks.for_worker(rank, checkpoints) if spec.hooks is not None else None
    watch = NoticeWatch(spec, rank, spec.steps_per_epoch, checkpoints, writer, say)
    per_rank_batch = cfg.train.batch_size // world
    max_epochs = cfg.train.max_epochs

    while not state.done:
        e, t0 = state.epoch, time.perf_counter()
        bar = tqdm(total=spec.steps_per_epoch, desc=f"epoch {e + 1}/{max_epochs}", unit="step") \
            if rank == 0 and spec.progress else None
        batches = epoch_shard(spec.windows, cfg.seed, e, rank, world).iter_torch_batches(
            batch_size=per_rank_batch, dtypes=torch.long, drop_last=True, device=str(device))
        run = run_epoch(state, batches, spec.steps_per_epoch, rank, net, hooks, bar, after_step=watch)
        if bar is not None:
            bar.close()
        end = epoch_end(state, run, share, table)
        metrics = {"epoch": state.epoch, "loss": end.loss, "edge": end.comp.edge, "rule": end.comp.rule,
                   "rule_checks": end.comp.rule_total, "gate_passed": end.passed,
                   "train_seconds": run.train_seconds, "first_batch_seconds": run.first_batch_seconds,
                   "tokens_per_second": spec.steps_per_epoch * cfg.train.batch_size * cfg.w / run.train_seconds}
        _report(state, spec, rank, metrics)
        if writer is not None:
            writer.epoch_done(state.curves, end.comp, state.gate_epoch, state.epoch, share.n_distinct,
                              spec.steps_per_epoch, by_r=end.by_r)
        say(f"epoch {state.epoch}/{max_epochs}  loss {end.loss:.3f}  edge {end.comp.edge:.3f}  "
            f"rule {end.comp.rule:.3f}  gate {'PASS' if end.passed else 'no'}  "
            f"{time.perf_counter() - t0:.0f}s")
