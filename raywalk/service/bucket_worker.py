"""The function Ray Train runs for a bucket: one worker, k experiments in one batched step.

Each member is an experiment on disk as `raywalk train` leaves it: its checkpoints
(today's format, written here straight into `ROOT/<experiment_id>/checkpoints`, the
newest KEEP plus the gate's kept), its result.json (with a `bucket` block), its resume
records, its trackers. The bucket's own Ray run holds no checkpoint: where it goes on
from is read off the members' directories, the newest point (epoch, step) at which
every active member has an intact checkpoint. Members step in lockstep, so after a
kill that is the last epoch (or just-in-time) checkpoint they all finished writing.
"""
from __future__ import annotations

import os
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
from raywalk.science.bucket import BucketState, BucketWindows, Member, run_bucket_epoch
from raywalk.science.compliance import Compliance
from raywalk.science.gate import Gate
from raywalk.science.loop import record_epoch
from raywalk.service import checkpointing, stops
from raywalk.service.dataset import free_memory, load_resident
from raywalk.service.trackers import open_trackers
from raywalk.service.worker import Progress, WorkerSpec, _setup, notice_record


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
    """One member's records: where its checkpoints go, its result.json writer, its trackers and its gate."""

    def __init__(self, spec: WorkerSpec, bucket: BucketSpec, root: Store, device: torch.device, newest):
        self.spec, self.eid = spec, spec.experiment_id
        self.run = root.sub(spec.experiment_id, ckpt.RUN_DIR)
        self.newest = newest   # (state, name) of its newest intact checkpoint, (None, None) if none
        self.corpus = Corpus(Store.open(spec.corpus_uri), spec.corpus_manifest)
        self.gate = Gate(spec.gate_starts, self.corpus.rule_table(), spec.config)
        self.writer = ResultWriter(root, spec.experiment_id, spec.config, 1, device.type, bucket.driver_token,
                                   spec.corpus_uri, lease_holder=spec.lease_holder, bucket=bucket.block).start()
        self.tracking = None

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


def _gate_member(state: BucketState, i: int, io: _MemberIO, losses: torch.Tensor, train_seconds: float):
    """Member i's gate and its epoch in its own curves (as loop.epoch_end does for a solo run)."""
    m: Member = state.members[i]
    t = time.perf_counter()
    counts = io.gate.evaluate(state.model_of(i))
    passed = io.gate.passes(counts.comp)
    m.epoch += 1
    m.epoch_losses = None
    if passed:
        m.gate_epoch = m.epoch
    record_epoch(m.curves, m.timing, losses.tolist(), counts.comp, io.gate.n_distinct, train_seconds,
                 time.perf_counter() - t)
    return counts, passed


def _say_epoch(say, io: _MemberIO, m: Member, loss: float, comp: Compliance, passed: bool, seconds: float) -> None:
    say(f"[{io.eid}] epoch {m.epoch}/{m.cfg.train.max_epochs}  loss {loss:.3f}  edge {comp.edge:.3f}  "
        f"rule {comp.rule:.3f}  gate {'PASS' if passed else 'no'}  {seconds:.0f}s")


class _Notices:
    """Polls for a spot reclaim notice every run.preemption_check_seconds (one worker: no barrier to agree on)
    and, once per notice, writes every member's just-in-time checkpoint at the step it stands at."""

    def __init__(self, seconds: float, members, say):
        watching = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1") != "0"
        self.seconds = seconds if watching else 0.0
        self.members, self.say, self.next, self.seen = members, say, 0.0, set()

    def __call__(self, state: BucketState, step: int) -> None:
        now = time.monotonic()
        if not self.seconds or step == 0 or now < self.next:
            return   # step 0: the epoch checkpoint just written is this point
        self.next = now + self.seconds
        import ray.train

        info = ray.train.get_preemption_info()
        key = None if info is None else (tuple(info.preempted_node_ids), info.deadline_ms)
        if key is None or key in self.seen:
            return
        self.seen.add(key)
        names = [io.checkpoint(state, i, step) for i, io in enumerate(self.members())]
        for io, name in zip(self.members(), names):
            io.writer.notice(notice_record(info, state.members[0].epoch + 1, step, name))
        self.say(f"preemption notice: node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} reclaimed; "
                 f"just-in-time checkpoint {names[0]} of every member at epoch {state.members[0].epoch + 1} "
                 f"step {step}; training on until the node goes")


def train_bucket_loop(spec: BucketSpec) -> None:
    import ray.train
    from ray.experimental.tqdm_ray import tqdm

    cfg = spec.config
    _, _, device, say = _setup(spec)
    root = Store.open(cfg.run.storage)
    newest = {m.experiment_id: ckpt.newest(root.sub(m.experiment_id, ckpt.RUN_DIR), say) for m in spec.members}
    ios = [_MemberIO(m, spec, root, device, newest[m.experiment_id]) for m in spec.members
           if not finished(newest[m.experiment_id][0], m)]
    if not ios:
        return
    steps = spec.members[0].steps_per_epoch
    state = BucketState([io.spec.config for io in ios], steps, device, [io.eid for io in ios])
    point = ckpt.common_point([io.run for io in ios])
    if point is not None:
        state.load_members(_load(ios, point, say))
    for io in ios:
        io.newest = None   # loaded into the rows: not kept beside them
    for io, m in zip(ios, state.members):
        if point is not None:
            io.writer.resumed(ckpt.dir_name(*point), m.epoch + 1, point[1])
        io.tracking = open_trackers(m.cfg, root, io.eid, m.curves)
    data = _windows(ios, cfg, device, say)
    step0 = point[1] if point else 0
    notices = _Notices(cfg.run.preemption_check_seconds, lambda: ios, say)
    stop_poll = stops.StopPoll(spec.driver_token)   # a lost lease the driver recorded (a Tune trial's)
    while state.k:
        t0, epoch = time.perf_counter(), state.members[0].epoch
        progress = Progress(tqdm(total=steps, desc=f"bucket {spec.bucket_id} epoch {epoch + 1}", unit="step"),
                            step0) if spec.progress else None
        callbacks = [lambda st, s: stop_poll(st), notices] + ([lambda st, s: progress(_Steps(s))] if progress else [])
        run = run_bucket_epoch(state, data.epoch(epoch, step0, steps), step0, callbacks)
        if progress is not None:
            progress.close(_Steps(steps))
        step0, leaving, metrics = 0, [], {"epoch": epoch + 1, "members": state.k, "passed": 0}
        for i, io in enumerate(ios):
            m = state.members[i]
            counts, passed = _gate_member(state, i, io, run.losses[:, i], run.train_seconds)
            t = time.perf_counter()
            io.checkpoint(state, i)
            m.timing.checkpoint_seconds.append(time.perf_counter() - t)
            io.writer.epoch_done(m.curves, counts.comp, m.gate_epoch, m.epoch, io.gate.n_distinct, steps,
                                 by_r=counts.by_r, timing=m.timing, data=m.data_path)
            if io.tracking is not None:
                io.tracking.epoch_end(m.curves)
            _say_epoch(say, io, m, float(run.losses[:, i].mean()), counts.comp, passed, time.perf_counter() - t0)
            metrics["passed"] += int(passed)
            if m.done:
                leaving.append(i)
        ray.train.report(metrics)
        for i in leaving:
            if ios[i].tracking is not None:
                ios[i].tracking.close()
            say(f"[{ios[i].eid}] leaves the bucket: gate {'passed' if state.members[i].gate_epoch else 'not passed'} "
                f"after {state.members[i].epoch} epoch(s)")
        state.drop(leaving)
        data.keep([i for i in range(len(ios)) if i not in leaving])
        ios = [io for i, io in enumerate(ios) if i not in leaving]


@dataclass
class _Steps:
    """What Progress reads of a state: the steps done."""
    step: int
