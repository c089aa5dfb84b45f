"""Fault injection and instruments for tests and benchmarks; the runtime knows nothing of them.

`instrumented(...)` wraps `train` calls in this process: it cuts epochs short and hands every
worker a hook before each step, a fixed notice-poll cadence, or a kill between a temp write and
its rename. The faults below are the hooks: each worker asks the factory for its own
(`for_worker`), and `before_step(epoch, step)` runs before every step.

Driver side, `instrumented` swaps two names the driver looks up at every run: `steps_per_epoch`
and the function Ray Train runs on the workers. That function (_InWorker) travels by value in
the pickle (a local Ray gives workers the driver's cwd, not this directory, on sys.path), patches
its worker's process, then runs the real loop: kills stay real SIGKILLs of real workers.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from raywalk.records import checkpoints as ckpt
from raywalk.records.layout import is_temp
from raywalk.records.storage import Store


@contextlib.contextmanager
def instrumented(hooks: Any = None, *, max_steps_per_epoch: int | None = None, notice_every_steps: int | None = None,
                 kill_before_rename: dict[str, str] | None = None):
    """While inside, `train` in this process runs instrumented (never a real run).

    hooks: a fault below (or Faults of several); its hook runs first among each step's callbacks.
    max_steps_per_epoch: epochs cut short (benchmarks time a few steps); the schedule is planned for them.
    notice_every_steps: workers poll for a reclaim notice every that many steps, not every
      run.preemption_check_seconds calibrated into steps (which needs that many seconds of steps).
    kill_before_rename: {substring: marker}: a worker SIGKILLs itself between writing a temp file and
      renaming it over a destination containing substring, once per entry (while marker does not exist).
    """
    from raywalk.service import driver, worker

    if max_steps_per_epoch is not None and (isinstance(max_steps_per_epoch, bool)
                                            or not isinstance(max_steps_per_epoch, int) or max_steps_per_epoch < 1):
        raise ValueError(f"max_steps_per_epoch: {max_steps_per_epoch!r} is invalid: must be a whole number >= 1")
    saved = driver.steps_per_epoch, worker.train_loop_per_worker
    if max_steps_per_epoch is not None:
        planned = driver.steps_per_epoch
        driver.steps_per_epoch = lambda cfg, n_windows: min(planned(cfg, n_windows), max_steps_per_epoch)
    in_worker = _InWorker(hooks, notice_every_steps, tuple((kill_before_rename or {}).items()))
    if in_worker.patches_anything():
        _by_value()
        worker.train_loop_per_worker = in_worker
    try:
        yield
    finally:
        driver.steps_per_epoch, worker.train_loop_per_worker = saved


@dataclass(frozen=True)
class _InWorker:
    """The loop Ray Train runs on each worker under `instrumented`: patches this worker's process, runs the real one."""
    hooks: Any
    notice_every_steps: int | None
    kill_before_rename: tuple[tuple[str, str], ...]

    def patches_anything(self) -> bool:
        return self.hooks is not None or bool(self.notice_every_steps) or bool(self.kill_before_rename)

    def __call__(self, spec) -> None:
        from raywalk.service import worker   # this worker's own module: the real loop, unpatched

        saved = worker.run_epoch, worker.NoticeWatch, os.replace
        if self.hooks is not None:
            checkpoints = Store.open(spec.config.run.storage).sub(spec.experiment_id, ckpt.RUN_DIR)
            worker.run_epoch = _hooked(worker.run_epoch, self.hooks, checkpoints)
        if self.notice_every_steps:
            worker.NoticeWatch = _polling_every(worker.NoticeWatch, self.notice_every_steps)
        if self.kill_before_rename:
            os.replace = _killed_before_rename(os.replace, self.kill_before_rename)
        try:
            worker.train_loop_per_worker(spec)
        finally:
            worker.run_epoch, worker.NoticeWatch, os.replace = saved


def _hooked(run_epoch, hooks, checkpoints: Store):
    """run_epoch with this worker's hook (made at its first epoch, once per worker start) as the first callback."""
    made: dict = {}

    def hooked(state, batches, steps, rank=0, net=None, callbacks=(), previous_end=None):
        if "hook" not in made:
            made["hook"] = hooks.for_worker(rank, checkpoints)
        hook = made["hook"]
        if hook is not None:   # TrainingState: epochs done, steps of the next
            callbacks = [lambda s: hook.before_step(s.epoch + 1, s.step), *callbacks]
        return run_epoch(state, batches, steps, rank, net, callbacks, previous_end)

    return hooked


def _polling_every(notice_watch: type, n: int) -> type:
    class PollingEvery(notice_watch):
        def start_epoch(self, start: int) -> None:
            self.every = n   # no calibration

    return PollingEvery


def _killed_before_rename(replace, entries: tuple[tuple[str, str], ...]):
    def replace_or_die(src, dst, *args, **kwargs):
        if is_temp(os.path.basename(os.fspath(src))):
            for sub, marker in entries:
                if _fire_once(marker, sub in os.fspath(dst)):
                    os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst, *args, **kwargs)

    return replace_or_die


def _by_value() -> None:
    """Ship this module's classes inside the pickle (ray imported here, after the tests' quiet_defaults)."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _fire_once(marker: str, due: bool) -> bool:
    """True the first time `due` holds, across worker-group restarts: `marker` (pid, time) records it."""
    if not due or os.path.exists(marker):
        return False
    with open(marker, "w") as f:
        f.write(f"{os.getpid()} {time.time()}\n")
    return True


@dataclass
class _FirstStepProbe:
    path: str
    done: bool = False

    def before_step(self, epoch: int, step: int) -> None:
        if not self.done:
            with open(self.path, "w") as f:
                f.write(f"{time.time()} {epoch} {step}\n")
            self.done = True


class _OnOneRank:
    """A fault one rank's hook fires once (`marker` records it); after it, a normal run, timed from rank 0's
    first step (`<marker>.resumed`). Subclasses: dataclasses with `rank` and `marker`, and their HOOK."""
    HOOK: ClassVar[type]

    def for_worker(self, rank: int, checkpoints: Store):
        if os.path.exists(self.marker):
            return _FirstStepProbe(f"{self.marker}.resumed") if rank == 0 else None
        return self.HOOK(self, checkpoints) if rank == self.rank else None


@dataclass
class _KillHook:
    spec: "WorkerKill"
    checkpoints: Store

    def before_step(self, epoch: int, step: int) -> None:
        s = self.spec
        if not _fire_once(s.marker, (epoch, step) == (s.epoch, s.step)):
            return
        time.sleep(s.delay)
        if s.truncate_latest:
            newest = ckpt.candidates(self.checkpoints, None)[0]
            data = self.checkpoints.read_bytes(f"{newest}/{ckpt.STATE}")
            self.checkpoints.write_bytes(f"{newest}/{ckpt.STATE}", data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class WorkerKill(_OnOneRank):
    """SIGKILL worker `rank` once, just before step `step` (0-based) of epoch `epoch` (1-based).

    `marker` records the kill (pid, time) so the restarted worker group does not kill again;
    after the kill, rank 0 writes `<marker>.resumed` (time, epoch, step) at its first step,
    which is how benchmarks/resume.py times kill -> training again. With `truncate_latest`
    the newest checkpoint's state file is first cut in half, as a kill during its upload
    would leave it. `delay` lets the controller register the last report first (about 2 s here).
    """
    rank: int
    epoch: int
    step: int
    marker: str
    delay: float = 0.0
    truncate_latest: bool = False

    HOOK: ClassVar[type] = _KillHook


@dataclass
class _PreemptHook:
    spec: "Preempt"
    checkpoints: Store
    started: bool = False
    jit_seen_at: float | None = None

    def before_step(self, epoch: int, step: int) -> None:
        s = self.spec
        if not self.started:
            if (epoch, step) != (s.epoch, s.step):
                return
            self.started = True
            import ray

            node = ray.get_runtime_context().get_node_id()
            if s.notice:
                drain_node(ray.get_runtime_context().gcs_address, node, s.deadline_s)
            with open(s.marker, "w") as f:
                f.write(f"{node} {os.getpid()} {time.time()}\n")
        with open(f"{s.marker}.progress", "w") as f:   # how far the doomed worker got, for benchmarks
            f.write(f"{epoch} {step} {time.time()}\n")
        time.sleep(s.slow_s)
        if s.kill_after_jit:
            if self.jit_seen_at is None and any(self._own_jit(n) for n in self.checkpoints.listdir()):
                self.jit_seen_at = time.time()
            if self.jit_seen_at is not None and time.time() - self.jit_seen_at >= s.settle_s:
                os.kill(os.getpid(), signal.SIGKILL)

    def _own_jit(self, name: str) -> bool:
        """A just-in-time checkpoint of this fault's epoch, complete (an earlier fault's may still be kept)."""
        return (ckpt.is_mid_epoch(name) and ckpt.position(name)[0] == self.spec.epoch - 1
                and self.checkpoints.is_file(f"{name}/{ckpt.MANIFEST}"))


@dataclass(frozen=True)
class Preempt(_OnOneRank):
    """A spot reclaim, as a test stages it on a local multi-node cluster.

    Just before step `step` of epoch `epoch`, rank `rank` drains its own node with reason
    PREEMPTION and a `deadline_s` (what the autoscaler does on a reclaim notice; with
    notice=False nothing is drained: a node about to vanish unannounced), writes its node
    id to `marker`, then slows every further step by `slow_s`, so the test can kill the node
    mid-epoch. With `kill_after_jit`, the worker SIGKILLs itself once a just-in-time
    checkpoint of this epoch is on disk and `settle_s` have passed (for Ray to register it).
    """
    epoch: int
    step: int
    marker: str
    rank: int = 0
    notice: bool = True
    deadline_s: float = 120.0
    slow_s: float = 0.4
    kill_after_jit: bool = False
    settle_s: float = 3.0

    HOOK: ClassVar[type] = _PreemptHook


@dataclass(frozen=True)
class Faults:
    """Several of the faults above in one run, each firing once at its own (epoch, step)."""
    faults: tuple

    def for_worker(self, rank: int, checkpoints: Store) -> "_Chain | None":
        hooks = [h for f in self.faults if (h := f.for_worker(rank, checkpoints)) is not None]
        return _Chain(hooks) if hooks else None


@dataclass
class _Chain:
    hooks: list

    def before_step(self, epoch: int, step: int) -> None:
        for h in self.hooks:
            h.before_step(epoch, step)


def drain_node(gcs_address: str, node_id: str, deadline_s: float) -> None:
    """Ask the GCS to drain a node for preemption, as the autoscaler does on a spot reclaim notice."""
    import ray
    from ray.core.generated import autoscaler_pb2

    ok, why = ray._raylet.GcsClient(address=gcs_address).drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "raywalk test: spot reclaim",
        int((time.time() + deadline_s) * 1000))
    if not ok:
        raise RuntimeError(f"drain of node {node_id} refused: {why}")


@dataclass(frozen=True)
class FillDisk:
    """Fill the local filesystem holding `path` just before step `step` of epoch `epoch` (1-based), leaving
    `leave` bytes free, so that the next checkpoint write finds it full (what a shared disk filling up
    under a run looks like). The filler is `<path>/filler`; `marker` makes it happen once."""
    epoch: int
    step: int
    path: str
    marker: str
    leave: int = 4096

    def for_worker(self, rank: int, checkpoints: Store) -> "_FillHook | None":
        return _FillHook(self) if rank == 0 and not os.path.exists(self.marker) else None


@dataclass
class _FillHook:
    spec: FillDisk

    def before_step(self, epoch: int, step: int) -> None:
        s = self.spec
        if not _fire_once(s.marker, (epoch, step) == (s.epoch, s.step)):
            return
        st = os.statvfs(s.path)
        size = max(0, st.f_bavail * st.f_frsize - s.leave)
        with open(os.path.join(s.path, "filler"), "wb") as f:
            while size > 0:
                n = min(size, 1 << 20)
                f.write(b"\0" * n)
                size -= n


@dataclass(frozen=True)
class LoseLease:
    """Remove the experiment's lease file (as a takeover ends it) before step `step` of epoch 1, then slow
    each step by `pause` s and note in `marker` the last step begun: how far training went on without it."""
    lease: str
    marker: str
    step: int = 2
    pause: float = 0.1

    def __post_init__(self) -> None:
        _by_value()

    def for_worker(self, rank: int, checkpoints: Store) -> "_LoseLeaseHook | None":
        return _LoseLeaseHook(self) if rank == 0 else None


@dataclass
class _LoseLeaseHook:
    spec: LoseLease

    def before_step(self, epoch: int, step: int) -> None:
        s = self.spec
        if (epoch, step) < (1, s.step):
            return
        if (epoch, step) == (1, s.step):
            os.remove(s.lease)
        with open(s.marker, "w") as f:
            f.write(f"{epoch} {step}\n")
        time.sleep(s.pause)
