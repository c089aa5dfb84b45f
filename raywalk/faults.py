"""Fault injection for tests and benchmarks: hooks the driver hands to the workers.

A hook factory travels in the WorkerSpec; each worker asks it for its own hooks
(`for_worker`), and the epoch runner calls `before_step(epoch, step)`. Nothing
here is on the path of a normal run (no hooks: no calls).
"""
from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from . import checkpoint as ckpt
from .storage import Store


@dataclass(frozen=True)
class WorkerKill:
    """SIGKILL worker `rank` once, just before step `step` (0-based) of epoch `epoch` (1-based).

    `marker` records the kill (pid, time) so the restarted worker group does not kill again;
    after the kill, rank 0 writes `<marker>.resumed` (time, epoch, step) at its first step,
    which is how benchmarks/resume.py times kill -> training again. With `truncate_latest`
    the newest checkpoint's state file is first cut in half, as a kill during its upload
    would leave it. `delay` lets the controller register the last report first (SPEC §9: ~2 s).
    """
    rank: int
    epoch: int
    step: int
    marker: str
    delay: float = 0.0
    truncate_latest: bool = False

    def for_worker(self, rank: int, checkpoints: Store) -> "_KillHook | _FirstStepProbe | None":
        if os.path.exists(self.marker):
            return _FirstStepProbe(f"{self.marker}.resumed") if rank == 0 else None
        return _KillHook(self, checkpoints) if rank == self.rank else None


@dataclass
class _KillHook:
    spec: WorkerKill
    checkpoints: Store

    def before_step(self, epoch: int, step: int) -> None:
        s = self.spec
        if (epoch, step) != (s.epoch, s.step) or os.path.exists(s.marker):
            return
        with open(s.marker, "w") as f:
            f.write(f"{os.getpid()} {time.time()}\n")
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
