"""Fault injection for tests and benchmarks: hooks the driver hands to the workers.

A hook factory travels in the WorkerSpec; each worker asks it for its own hooks
(`for_worker`), and the epoch runner calls `before_step(epoch, step)`. Nothing
here is on the path of a normal run (no hooks: no calls).

It lives with the tests, not in the package, so Ray workers cannot import it by name (a local
Ray gives workers the driver's cwd, not pytest's tests/ on sys.path): each factory registers this
module with Ray's cloudpickle to travel by value, so its classes go inside the pickled WorkerSpec.
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from raywalk.records import checkpoints as ckpt
from raywalk.records.storage import Store


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


def _hook_for(spec, rank: int, checkpoints: Store, hook):
    """The faulting rank's hook until the fault has fired (`spec.marker` exists); after it, a normal
    run, timed from rank 0's first step (`<marker>.resumed`)."""
    if os.path.exists(spec.marker):
        return _FirstStepProbe(f"{spec.marker}.resumed") if rank == 0 else None
    return hook(spec, checkpoints) if rank == spec.rank else None


@dataclass(frozen=True)
class WorkerKill:
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

    def __post_init__(self) -> None:
        _by_value()

    def for_worker(self, rank: int, checkpoints: Store) -> "_KillHook | _FirstStepProbe | None":
        return _hook_for(self, rank, checkpoints, _KillHook)


@dataclass
class _KillHook:
    spec: WorkerKill
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


@dataclass
class _FirstStepProbe:
    path: str
    done: bool = False

    def before_step(self, epoch: int, step: int) -> None:
        if not self.done:
            with open(self.path, "w") as f:
                f.write(f"{time.time()} {epoch} {step}\n")
            self.done = True


@dataclass(frozen=True)
class Preempt:
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

    def __post_init__(self) -> None:
        _by_value()

    def for_worker(self, rank: int, checkpoints: Store) -> "_PreemptHook | _FirstStepProbe | None":
        return _hook_for(self, rank, checkpoints, _PreemptHook)


@dataclass
class _PreemptHook:
    spec: Preempt
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
class Faults:
    """Several of the faults above in one run, each firing once at its own (epoch, step)."""
    faults: tuple

    def __post_init__(self) -> None:
        _by_value()

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

    def __post_init__(self) -> None:
        _by_value()

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
