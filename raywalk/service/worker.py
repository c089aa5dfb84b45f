"""The function Ray Train runs on every worker: a thin shell around science/loop.py.

It sets the worker up (threads, device, determinism), restores the resume
point (Ray's latest registered checkpoint, service/checkpointing.py), then per
epoch: feed this worker's batches to `run_epoch`, gate with `epoch_end`, and
hand the rest (report + checkpoint, result.json, trackers, the console line) to
service/epoch_end.py, which a bucket's worker (service/bucket_worker.py) shares. It
stops once the gate passes or the epochs run out. The science lives in science/loop.py and never sees Ray.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from raywalk.science.gate import Gate
from raywalk.service import checkpointing, ray_private, stops
from raywalk.config import Config
from raywalk.records import checkpoints as ckpt
from raywalk.records.corpus import Corpus
from raywalk.records.result import ResultWriter
from raywalk.messages import quiet, tell
from raywalk.records.layout import RUN_DIR
from raywalk.records.storage import Store
from raywalk.science.batches import ResidentWindows
from raywalk.service.dataset import DataPlan, epoch_stream, load_resident, plan_data, window_dataset
from raywalk.science.loop import TrainingState, check_precision, compiled, epoch_end, run_epoch, set_determinism
from raywalk.service.epoch_end import (Console, Experiment, NoticeWatch, Progress, Saved, finish_epoch,
                                       step_callbacks)
from raywalk.service.trackers import open_trackers


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
    """train.data=stream: the train split's (w+1)-token windows as a materialised Ray Dataset (corpus order),
    built by the driver once for every restart; otherwise None (auto builds it on rank 0 if it streams)."""
    n_windows: int = 0
    """How many windows that dataset holds (the resident path's tensor rows)."""
    progress: bool = True
    """Draw rank 0's per-epoch progress bar."""
    verbose: bool = False
    """Keep Ray Train's own INFO logs."""
    lease_holder: str = ""
    """The driver's lease id: workers write only while it holds a live lease (stops.py)."""


def torch_threads(cpus_per_worker: float) -> int:
    """Intra-op threads = the CPUs this worker reserved, not the node's core count."""
    return max(1, math.floor(cpus_per_worker))


def _quiet_logs() -> None:
    logging.getLogger("ray.train").setLevel(logging.WARNING)   # per-report INFO lines
    ray_private.quiet_train_reports()   # "Reporting training result N: ..."


def _setup(spec: WorkerSpec):
    import ray.train
    import ray.train.torch

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
    say = tell if rank == 0 else quiet   # rank 0 speaks for the run
    return rank, world, device, say


def _agree_fits(fits: bool, device: torch.device) -> bool:
    """The resident path only where it fits on every rank."""
    t = torch.tensor([int(fits)], dtype=torch.int64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def _data(spec: WorkerSpec, corpus: Corpus, state: TrainingState, rank: int, world: int, say):
    """Choose the data path (once per run: a restored choice is kept) and make its batch source."""
    cfg = spec.config
    plan: DataPlan = plan_data(cfg.train, spec.n_windows, cfg.w + 1, cfg.graph.n, state.device,
                               recorded=state.data_path)
    if plan.fits is not None:   # auto: a collective, so every rank takes part, whatever its own answer
        plan = plan.agreed(_agree_fits(plan.fits, state.device))
    state.data_path = plan.path
    if plan.path == "stream":
        say(f"data: {plan.describe()}")
        windows = spec.windows
        if windows is None and rank == 0:   # only rank 0 shuffles and splits the epoch (dataset.epoch_shard)
            windows = window_dataset(corpus, cfg.w, materialize=True)
        return lambda epoch, start: epoch_stream(windows, cfg, epoch, start, rank, world, state.device)
    t = time.perf_counter()
    resident = ResidentWindows(load_resident(corpus, cfg.w, spec.n_windows, plan.dtype, state.device),
                               cfg.seed, cfg.train.batch_size, rank, world)
    say(f"data: {plan.describe()}, loaded in {time.perf_counter() - t:.1f}s")
    return lambda epoch, start: resident.epoch(epoch, start, spec.steps_per_epoch)


def _net(state: TrainingState, cfg: Config) -> torch.nn.Module:
    """What runs forward/backward: the model, DDP-wrapped across ranks, compiled with train.compile."""
    import ray.train.torch

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    net = ray.train.torch.prepare_model(state.model) if distributed else state.model
    return compiled(net, state.device) if cfg.train.compile else net


def _announce_resume(writer: ResultWriter | None, restored: str | None, state: TrainingState, run: Store,
                     say) -> None:
    """Rank 0 records a resume (or a restart with nothing to resume from) and says where it goes on."""
    if writer is None or (restored is None and not writer.restarts_this_run):
        return
    r = writer.resumed(restored, state.epoch + 1, state.step)
    at = f"continuing at epoch {state.epoch + 1}" + (f" step {state.step}" if state.step else "")
    say(f"{r['reason']} (restart {writer.restarts}): " + (
        f"resuming from {run.child_uri(restored)} (epoch {state.epoch} done), {at}" if restored
        else "no checkpoint yet, starting at epoch 1"))


@dataclass
class _Worker:
    """One worker's run: what every epoch uses."""
    spec: WorkerSpec
    rank: int
    say: Any
    run: Store                       # the checkpoints' run directory
    state: TrainingState
    gate: Gate                       # this rank's share of the gate
    batches: Any                     # (epoch, start step) -> this rank's batches
    net: torch.nn.Module
    exp: Experiment                  # the run's records (rank 0 writes them)
    watch: NoticeWatch
    stop_poll: stops.StopPoll        # a lost lease recorded by the driver (rank 0 polls)
    console: Console
    previous_end: float | None = None

    def save(self, metrics: dict[str, Any], upload_async: bool = False) -> str:
        """Checkpoint the state where it stands and report it to Ray Train with `metrics`; its name."""
        return checkpointing.report(self.state, self.spec, self.rank, metrics, upload_async=upload_async)

    def save_epoch(self, metrics: dict[str, Any]) -> None:
        """The epoch's checkpoint (uploaded in the background to remote storage). A bucket member going on
        alone: the bucket's checkpoints, which Ray never registered, are kept as Ray keeps its own."""
        self.save(metrics, upload_async=not self.run.local)
        solo_from = ((self.exp.writer.bucket or {}).get("continued_solo_from_epoch")
                     if self.exp.writer is not None else None)
        if solo_from:
            gate = self.state.gate_epoch
            ckpt.prune(self.run, ckpt.dir_name(gate) if gate else None, before_epoch=solo_from)

    def save_now(self, state: TrainingState) -> Saved:
        """A just-in-time checkpoint (a reclaim notice), synchronous: it must be stored before the node goes."""
        name = self.save({"epoch": state.epoch, "step": state.step, "preemption": True})
        return [(self.exp.writer, name, self.run.child_uri(name))]


def _start(spec: WorkerSpec) -> _Worker:
    """Set up, restore the resume point, open the records and choose the data path."""
    cfg = spec.config
    rank, world, device, say = _setup(spec)
    root = Store.open(cfg.run.storage)
    run = root.sub(spec.experiment_id, RUN_DIR)
    corpus = Corpus(Store.open(spec.corpus_uri), spec.corpus_manifest)
    gate = Gate(spec.gate_starts, corpus.rule_table(), cfg).shard(rank, world)   # this rank's share
    state = TrainingState.create(cfg, spec.steps_per_epoch, device)
    restored = checkpointing.restore(state, run, rank, world, say)
    writer = ResultWriter(root, spec.experiment_id, cfg, world, device.type, spec.driver_token, spec.corpus_uri,
                          lease_holder=spec.lease_holder).start() if rank == 0 else None
    _announce_resume(writer, restored, state, run, say)
    batches = _data(spec, corpus, state, rank, world, say)
    # rank 0 streams result.json's curves to run.trackers
    tracking = open_trackers(cfg, root, spec.experiment_id, state.curves) if rank == 0 else None
    exp = Experiment(spec.experiment_id, state, gate, spec.steps_per_epoch, writer, tracking)
    w = _Worker(spec, rank, say, run, state, gate, batches, _net(state, cfg), exp, None,
                stops.StopPoll(spec.driver_token), Console(say))
    w.watch = NoticeWatch(cfg.run.preemption_check_seconds, spec.steps_per_epoch, w.save_now, say)
    return w


def _callbacks(w: _Worker) -> tuple[list, Progress | None]:
    """This epoch's step callbacks: rank 0 polls for stops (the others wait for it in the step's collectives)
    and draws the bar."""
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=w.spec.steps_per_epoch, desc=f"epoch {w.state.epoch + 1}/{w.spec.config.train.max_epochs}",
               unit="step") if w.rank == 0 and w.spec.progress else None
    return step_callbacks(w.stop_poll if w.rank == 0 else None, w.watch, w.state.step, bar)


def _epoch(w: _Worker) -> None:
    """Train, gate, checkpoint and record one epoch (or the rest of one, after a just-in-time checkpoint)."""
    state, spec, t0 = w.state, w.spec, time.perf_counter()
    callbacks, progress = _callbacks(w)
    run = run_epoch(state, w.batches(state.epoch, state.step), spec.steps_per_epoch, w.rank, w.net, callbacks,
                    w.previous_end)
    if progress is not None:
        progress.close(state)
    end = epoch_end(state, run, w.gate)
    finish_epoch([w.exp], run, [end], w.save_epoch, w.console, t0)
    w.previous_end = run.ended


def _record_done(w: _Worker) -> None:
    """A run restored already done (its last record was lost: a failed write, a kill after the checkpoint):
    gate the restored model again (greedy generation: the same counts) and rewrite result.json and the trackers
    from it, as its last epoch did."""
    w.exp.rewrite(w.state.model, w.state.device)


def train_loop_per_worker(spec: WorkerSpec) -> None:
    w = _start(spec)
    if w.state.done:
        _record_done(w)
    while not w.state.done:
        _epoch(w)
    w.exp.close()
