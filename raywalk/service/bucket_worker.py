"""The function Ray Train runs for a bucket: one worker, k experiments in one batched step.

Each member is an experiment on disk as `raywalk train` leaves it: its checkpoints
(today's format, written here straight into `ROOT/<experiment_id>/checkpoints`, the
newest KEEP plus the gate's kept), its result.json (with a `bucket` block), its resume
records, its trackers. The bucket's own Ray run holds no checkpoint: where it goes on
from is read off the members' directories, the newest point (epoch, step) at which
every active member has an intact checkpoint. Members step in lockstep, so after a
kill that is the last epoch (or just-in-time) checkpoint they all finished writing.
Every member is gated in one batched pass (science/bucket_gate.py); the rest of an
epoch's end, and the reclaim-notice watcher, are the solo run's (service/epoch_end.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from raywalk.config import ConfigError
from raywalk.records import checkpoints as ckpt
from raywalk.records.layout import BUCKETS
from raywalk.records.result import ResultWriter
from raywalk.records.corpus import Corpus
from raywalk.records.errors import byte_size
from raywalk.records.storage import Store
from raywalk.science.batches import ResidentWindows, token_dtype
from raywalk.records import result
from raywalk.science.bucket import BucketState, BucketWindows, run_bucket_epoch, settle_members
from raywalk.science.bucket_gate import gate_members
from raywalk.science.gate import Gate
from raywalk.science.loop import TrainingState
from raywalk.service import checkpointing, stops
from raywalk.service.dataset import free_memory, load_resident
from raywalk.service.epoch_end import Console, Experiment, NoticeWatch, finish_epoch, step_callbacks
from raywalk.service.trackers import open_trackers
from raywalk.service.worker import WorkerSpec, _setup


@dataclass(frozen=True)
class BucketSpec:
    """What the driver hands the bucket's one worker: each member's WorkerSpec, and the bucket's identity."""
    bucket_id: str
    members: tuple[WorkerSpec, ...]
    progress: bool = True
    verbose: bool = False
    driver_token: str = ""

    @property
    def config(self):   # what the worker's set-up reads (threads, device, determinism): shared by every member
        return self.members[0].config

    @property
    def experiment_id(self) -> str:   # where a storage stop is said to be (stops.guarded_loop)
        return f"{BUCKETS}/{self.bucket_id}"

    @property
    def block(self) -> dict[str, Any]:
        """result.json's `bucket` block."""
        return {"id": self.bucket_id, "members": [m.experiment_id for m in self.members]}


def _load(ios: list["_MemberIO"], point: tuple[int, int], say) -> list[dict[str, Any]]:
    """Every member's state at `point` (its newest, already read, where that is the point)."""
    name = ckpt.dir_name(*point)
    states = []
    for io in ios:
        try:
            states.append(io.newest[0] if io.newest[1] == name else ckpt.read(io.run.sub(name)))
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"checkpoint {io.run.child_uri(name)} is unusable: {e}") from None
    stream = [io.run.child_uri(name) for io, s in zip(ios, states) if s.get("data_path") == "stream"]
    if stream:
        raise ConfigError(f"bucket: {stream[0]} streamed its data (train.data): a bucket trains on the resident "
                          f"path and a run never switches; train it alone (--bucket 1)")
    say(f"bucket: resuming every member from {name}")
    return states


def finished(state: dict[str, Any] | None, member: WorkerSpec) -> bool:
    """A member whose newest checkpoint is its last (gate passed, or max_epochs): it left the bucket before a
    restart, and stays out of it."""
    return state is not None and (state["gate_epoch"] is not None
                                  or int(state["epoch"]) >= member.config.train.max_epochs)


class _MemberIO:
    """One member's records: where its checkpoints go, its result.json writer and its gate."""

    def __init__(self, spec: WorkerSpec, bucket: BucketSpec, root: Store, device: torch.device, newest):
        self.spec, self.eid = spec, spec.experiment_id
        self.run = root.sub(spec.experiment_id, ckpt.RUN_DIR)
        self.newest = newest   # (state, name) of its newest intact checkpoint, (None, None) if none
        self.corpus = Corpus(Store.open(spec.corpus_uri), spec.corpus_manifest)
        self.gate = Gate(spec.gate_starts, self.corpus.rule_table(), spec.config)
        self.writer = ResultWriter(root, spec.experiment_id, spec.config, 1, device.type, bucket.driver_token,
                                   spec.corpus_uri, lease_holder=spec.lease_holder, bucket=bucket.block).start()

    def checkpoint(self, state: BucketState, i: int, step: int = 0) -> str:
        m = state.members[i]
        name = ckpt.dir_name(m.epoch, step)
        checkpointing.check_lease(self.spec)   # never write into a run that another driver has taken over
        ckpt.write(self.run, name, state.member_state(i, step), ckpt.dir_name(m.gate_epoch) if m.gate_epoch else None,
                   corpus=self.corpus.identity)
        return name


def _windows(ios: list[_MemberIO], cfg, device: torch.device, say) -> BucketWindows:
    dtype = token_dtype(cfg.graph.n)
    need = sum(io.spec.n_windows for io in ios) * (cfg.w + 1) * (torch.iinfo(dtype).bits // 8)
    free = free_memory(device)
    if need > free:
        raise ConfigError(f"bucket: the members' windows take {byte_size(need)}, more than the "
                          f"{byte_size(free)} free on {device}; use a smaller --bucket")
    t = time.perf_counter()
    data = BucketWindows([ResidentWindows(load_resident(io.corpus, cfg.w, io.spec.n_windows, dtype, device),
                                          io.spec.config.seed, cfg.train.batch_size) for io in ios])
    say(f"data: resident on {device}, {byte_size(need)} {str(dtype).removeprefix('torch.')} for "
        f"{len(ios)} members, loaded in {time.perf_counter() - t:.1f}s")
    return data


def _record_done(io: _MemberIO, root: Store, device: torch.device) -> None:
    """A member whose newest checkpoint is its last but whose result.json is not (its last write was lost):
    gate the checkpoint's model again (greedy: the same counts) and rewrite its record, as a solo run does."""
    cfg = io.spec.config
    state = TrainingState.create(cfg, io.spec.steps_per_epoch, device)
    state.load_state_dict(io.newest[0])
    exp = Experiment(io.eid, state, io.gate, io.spec.steps_per_epoch, io.writer,
                     open_trackers(cfg, root, io.eid, state.curves))
    exp.rewrite(state.model, device)
    exp.close()


def train_bucket_loop(spec: BucketSpec) -> None:
    import ray.train
    from ray.experimental.tqdm_ray import tqdm

    cfg = spec.config
    _, _, device, say = _setup(spec)
    root = Store.open(cfg.run.storage)
    ios = []
    for m in spec.members:
        newest = ckpt.newest(root.sub(m.experiment_id, ckpt.RUN_DIR), say)
        if not finished(newest[0], m):
            ios.append(_MemberIO(m, spec, root, device, newest))
        elif result.read_finished(root.sub(m.experiment_id), log=lambda s: None) is None:
            _record_done(_MemberIO(m, spec, root, device, newest), root, device)   # before the bucket seeds its rows
    if not ios:
        return
    steps = spec.members[0].steps_per_epoch
    state = BucketState([io.spec.config for io in ios], steps, device, [io.eid for io in ios])
    point = ckpt.common_point([io.run for io in ios])
    if point is not None:
        state.load_members(_load(ios, point, say))
    exps = []
    for io, m in zip(ios, state.members):
        io.newest = None   # loaded into the rows: not kept beside them
        if point is not None:
            io.writer.resumed(ckpt.dir_name(*point), m.epoch + 1, point[1])
        exps.append(Experiment(io.eid, m, io.gate, steps, io.writer, open_trackers(m.cfg, root, io.eid, m.curves)))
    data = _windows(ios, cfg, device, say)
    step0 = point[1] if point else 0

    def save_now(st: BucketState):   # a reclaim notice: every member's just-in-time checkpoint
        return [(io.writer, name, io.run.child_uri(name))
                for io, name in zip(ios, [io.checkpoint(st, i, st.step) for i, io in enumerate(ios)])]

    def save(metrics: dict) -> None:   # the epoch's checkpoints, each in its member's run; then one report
        for i, io in enumerate(ios):
            io.checkpoint(state, i)
        ray.train.report(metrics)

    console = Console(say, spec.bucket_id, spec.verbose)
    watch = NoticeWatch(cfg.run.preemption_check_seconds, steps, save_now, say)
    stop_poll = stops.StopPoll(spec.driver_token)   # a lost lease the driver recorded (a Tune trial's)
    previous_end = None
    while state.k:
        t0 = time.perf_counter()
        bar = tqdm(total=steps, desc=f"bucket {spec.bucket_id} epoch {state.epoch + 1}", unit="step") \
            if spec.progress else None
        callbacks, progress = step_callbacks(stop_poll, watch, step0, bar)
        run = run_bucket_epoch(state, data.epoch(state.epoch, step0, steps), step0, callbacks, previous_end)
        if progress is not None:
            progress.close(state)
        gates = [x.gate for x in exps]
        t = time.perf_counter()
        counts = gate_members(state, gates)   # every member's greedy walks in one batched pass
        ends = settle_members(state, run, gates, counts, time.perf_counter() - t)
        finish_epoch(exps, run, ends, save, console, t0)
        leaving = [i for i, m in enumerate(state.members) if m.done]
        for i in leaving:
            exps[i].close()
            console.left(exps[i])
        state.drop(leaving)
        data.keep([i for i in range(len(ios)) if i not in leaving])
        ios = [io for i, io in enumerate(ios) if i not in leaving]
        exps = [x for i, x in enumerate(exps) if i not in leaving]
        step0, previous_end = 0, run.ended
