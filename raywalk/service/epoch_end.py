"""What happens between a worker's epochs, once for both engines (a solo run, a bucket of k members).

After an engine has trained an epoch and gated it (science/loop.epoch_end for a solo run,
science/bucket_gate.bucket_epoch_end for a bucket: each returns one EpochEnd per experiment),
`finish_epoch` does the rest in one order: report to Ray Train (each experiment's loss and
compliance in the metrics, with the checkpoint(s) the engine saves), result.json, the trackers,
the console. `NoticeWatch` polls for a spot reclaim notice between steps and has the engine save
a just-in-time checkpoint of every experiment it trains. `Progress` is the epoch's bar.

An engine differs only in how it saves (a solo run's checkpoint goes through ray.train.report;
a bucket writes each member's into its own run directory, then reports once) and in what its
console says (a bucket of 64 members prints a line for the bucket, not 64).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from raywalk.records.result import ResultWriter
from raywalk.science.gate import Gate, GateCounts
from raywalk.science.loop import EpochEnd, EpochRun


@dataclass
class Experiment:
    """One experiment a worker trains (a solo run, or a bucket member) and where its epochs are recorded."""
    eid: str
    record: Any                     # its TrainingState or bucket Member: curves, timing, epoch, gate_epoch, data_path
    gate: Gate
    steps_per_epoch: int
    writer: ResultWriter | None     # rank 0's
    tracking: Any = None            # rank 0's trackers, or None

    def write(self, counts: GateCounts) -> None:
        """The record as it now stands: result.json, then the trackers (which log only what is new)."""
        r = self.record
        if self.writer is not None:
            self.writer.epoch_done(r.curves, counts.comp, r.gate_epoch, r.epoch, self.gate.n_distinct,
                                   self.steps_per_epoch, by_r=counts.by_r, timing=r.timing, data=r.data_path)
        if self.tracking is not None:
            self.tracking.epoch_end(r.curves)

    def rewrite(self, model: torch.nn.Module, device: torch.device) -> None:
        """A run restored already done whose last record was lost: its model gated again (greedy: the same
        counts; a collective, so every rank takes part) and the record written from it."""
        self.write(Gate.reduce(self.gate.evaluate(model), device))

    def close(self) -> None:
        if self.tracking is not None:
            self.tracking.close()


def metrics(exps: Sequence[Experiment], run: EpochRun, ends: Sequence[EpochEnd], batch: int, w: int) -> dict[str, Any]:
    """What an epoch is reported to Ray Train with: each experiment's figures under `experiments` (Ray's and
    Tune's tools see every member's curve), a solo run's also at the top, and the engine's pace. Tokens are
    those trained in this process: after a mid-epoch resume, the remaining steps' over their time."""
    each = {x.eid: {"loss": e.loss, "edge": e.comp.edge, "rule": e.comp.rule, "rule_checks": e.comp.rule_total,
                    "gate_passed": e.passed} for x, e in zip(exps, ends)}
    out: dict[str, Any] = {"epoch": exps[0].record.epoch, "experiments": each, "members": len(exps),
                           "passed": sum(e.passed for e in ends), "train_seconds": run.train_seconds,
                           "first_batch_seconds": run.first_batch_seconds,
                           "tokens_per_second": run.steps * batch * w * len(exps) / max(run.train_seconds, 1e-9)}
    if len(exps) == 1:
        out.update(each[exps[0].eid])
    return out


def finish_epoch(exps: Sequence[Experiment], run: EpochRun, ends: Sequence[EpochEnd],
                 save: Callable[[dict[str, Any]], None], console: "Console", started: float) -> None:
    """Report and checkpoint (the engine's `save`), then every experiment's result.json and trackers, then
    the console. Each experiment's checkpoint_seconds is the engine's save wall, as train_ and gate_seconds
    are the shared step and gate walls."""
    cfg = exps[0].record.cfg
    t = time.perf_counter()
    save(metrics(exps, run, ends, cfg.train.batch_size, cfg.w))
    seconds = time.perf_counter() - t
    for x, e in zip(exps, ends):
        x.record.timing.checkpoint_seconds.append(seconds)
        x.write(GateCounts(e.comp, e.by_r))
    console.epoch(exps, ends, time.perf_counter() - started)


def line(x: Experiment, e: EpochEnd, seconds: float | None = None) -> str:
    r = x.record
    return (f"epoch {r.epoch}/{r.cfg.train.max_epochs}  loss {e.loss:.3f}  edge {e.comp.edge:.3f}  "
            f"rule {e.comp.rule:.3f}  gate {'PASS' if e.passed else 'no'}"
            + (f"  {seconds:.0f}s" if seconds is not None else ""))


@dataclass
class Console:
    """What an epoch prints: a solo run one line; a bucket one line for the bucket (members, passed, the
    spread of loss and rule compliance) and one when a member leaves; each member's under --verbose."""
    say: Callable[[str], None]
    bucket: str | None = None       # the bucket's id; None: a solo run
    verbose: bool = False

    def epoch(self, exps: Sequence[Experiment], ends: Sequence[EpochEnd], seconds: float) -> None:
        if self.bucket is None:
            self.say(line(exps[0], ends[0], seconds))
            return
        if self.verbose:
            for x, e in zip(exps, ends):
                self.say(f"[{x.eid}] {line(x, e)}")
        r = exps[0].record
        self.say(f"bucket {self.bucket} epoch {r.epoch}/{r.cfg.train.max_epochs}: {len(exps)} member(s), "
                 f"{sum(e.passed for e in ends)} passed  loss {_spread([e.loss for e in ends])}  "
                 f"rule {_spread([e.comp.rule for e in ends])}  {seconds:.0f}s")

    def left(self, x: Experiment) -> None:
        r = x.record
        self.say(f"[{x.eid}] leaves the bucket: gate {'PASSED at epoch ' + str(r.gate_epoch) if r.gate_epoch else 'not passed'}"
                 f" after {r.epoch} epoch(s)")


def _spread(v: list[float]) -> str:
    return f"{v[0]:.3f}" if len(v) == 1 else f"{min(v):.3f}-{max(v):.3f} (median {statistics.median(v):.3f})"


# ---- between steps -------------------------------------------------------------------------------

class Progress:
    """rank 0's tqdm bar, redrawn a few times a second at most (never per step)."""
    EVERY_S = 0.25

    def __init__(self, bar, start: int):
        self.bar, self.shown, self.next = bar, start, time.perf_counter() + self.EVERY_S
        if start:
            bar.update(start)

    def __call__(self, state: Any) -> None:
        now = time.perf_counter()
        if now >= self.next:
            self.bar.update(state.step - self.shown)
            self.shown, self.next = state.step, now + self.EVERY_S

    def close(self, state: Any) -> None:
        self.bar.update(state.step - self.shown)
        self.bar.close()


def step_callbacks(stop_poll: Any, watch: "NoticeWatch", start: int, bar: Any = None) -> tuple[list, Progress | None]:
    """An epoch's step callbacks, in order: the stop poll (None on ranks that wait for rank 0's), the notice
    watch (its cadence from step `start`), the bar (a tqdm, or None); and the bar's Progress to close."""
    callbacks = [stop_poll] if stop_poll is not None else []
    if watch.active:
        watch.start_epoch(start)
        callbacks.append(watch)
    progress = Progress(bar, start) if bar is not None else None
    if progress is not None:
        callbacks.append(progress)
    return callbacks, progress


Saved = list[tuple[ResultWriter | None, str, str]]
"""A just-in-time save: per experiment, (its writer, the checkpoint's name, its URI)."""


class NoticeWatch:
    """Polls for a spot reclaim notice and, once per notice, has the engine save a just-in-time checkpoint of
    every experiment at that step (`save(state)`), recorded in each one's notices.

    A poll is a barrier, so every rank must poll at the same steps. The cadence is in seconds
    (run.preemption_check_seconds; Ray's watcher refreshes every 5 s, faster gains nothing),
    turned into steps once per epoch: after CALIBRATE steps the ranks agree, in one tiny
    all-reduce, on the slowest rank's step time.
    """
    CALIBRATE = 16

    def __init__(self, seconds: float, steps: int, save: Callable[[Any], Saved], say):
        # no watcher, no notices (ensure_ray turns it off for a laptop's embedded Ray): no polls
        watching = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1") != "0"
        self.seconds = seconds if watching else 0.0
        self.active = bool(self.seconds)
        self.steps, self.save, self.say = steps, save, say
        self.every, self.calibrate_at, self.t0 = 0, None, 0.0
        self.seen: set = set()

    def start_epoch(self, start: int) -> None:
        self.every, self.calibrate_at = 0, start + self.CALIBRATE

    def __call__(self, state: Any) -> None:
        step = state.step
        if self.calibrate_at is not None:
            if step == self.calibrate_at - self.CALIBRATE:
                self.t0 = time.perf_counter()
            elif step == self.calibrate_at:
                self.every = self._agree(state, (time.perf_counter() - self.t0) / self.CALIBRATE)
                self.calibrate_at = None
        if not self.every or step % self.every or step == self.steps:
            return   # at the epoch's end the regular checkpoint follows at once
        self.poll(state)

    def _agree(self, state: Any, per_step: float) -> int:
        t = torch.tensor([per_step], dtype=torch.float64, device=state.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return max(1, round(self.seconds / max(float(t.item()), 1e-9)))

    def poll(self, state: Any) -> None:
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None:
            return
        key = (tuple(info.preempted_node_ids), info.deadline_ms)
        if key in self.seen:
            return
        self.seen.add(key)
        left = (info.deadline_ms / 1000 - time.time()) if info.deadline_ms else None
        saved = self.save(state)
        for writer, name, _ in saved:
            if writer is not None:
                writer.notice(notice_record(info, state.epoch + 1, state.step, name))
        where = saved[0][2] if len(saved) == 1 else f"of {len(saved)} experiments ({saved[0][2]}, ...)"
        self.say(f"preemption notice: node(s) {', '.join(n[:8] for n in info.preempted_node_ids)} "
                 f"(ranks {info.preempted_ranks}) reclaimed"
                 + (f" in {left:.0f}s" if left is not None else "")
                 + f"; just-in-time checkpoint {where} at epoch {state.epoch + 1} "
                   f"step {state.step}; training on until the node goes")


def notice_record(info: Any, epoch: int, step: int, checkpoint: str) -> dict[str, Any]:
    """What a reclaim notice leaves in the run's records (ResultWriter.notice): where it came and what it saved."""
    return {"at_step": step, "epoch": epoch, "checkpoint": checkpoint, "nodes": info.preempted_node_ids,
            "ranks": info.preempted_ranks, "deadline_ms": info.deadline_ms}
