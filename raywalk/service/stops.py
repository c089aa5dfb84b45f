"""Stops that retrying cannot fix: storage that will not take a write, a lost lease.

Ray Train retries any worker error `max_failures` times, and a full disk would only fill
again. So a worker that meets one records it in Ray's KV store under the driver run's
token. A single worker then just returns (the run ends at once); with several, it raises
(the others wait in collectives, and only a failure makes Ray tear the group down), and the
worker group Ray starts again finds the record and returns at once on every rank, before
it touches storage. The driver reads the record after
fit() and stops with one line (CLI exit 4 for storage, 5 for a lost lease).
"""
from __future__ import annotations

import contextlib
import json
import time
from typing import Any, Callable

from raywalk.records.lease import LeaseLost, check_holder
from raywalk.records.layout import RUN_DIR
from raywalk.records.storage import Store, StorageUnwritable, free_space, will_recur
from raywalk.service import ray_private

NAMESPACE = "raywalk"
STORAGE, LEASE = "storage", "lease"


def _key(token: str) -> bytes:
    return f"stop-{token}".encode()


def record(token: str, kind: str, line: str, detail: dict | None = None) -> None:
    ray_private.kv_put(_key(token), json.dumps({"kind": kind, "line": line, **(detail or {})}),
                       NAMESPACE)   # the first stop is the cause: never overwritten


def recorded(token: str) -> dict[str, Any] | None:
    raw = ray_private.kv_get(_key(token), NAMESPACE)
    return json.loads(raw) if raw else None


def clear(token: str) -> None:
    with contextlib.suppress(Exception):
        ray_private.kv_del(_key(token), NAMESPACE)


class Stopped(RuntimeError):
    """Raised on a worker after recording a stop: ends this worker group without retrying the write."""


def _stop(token: str, kind: str, line: str, detail: dict | None = None) -> Stopped:
    """Record the stop and return the exception that ends this worker. Ray Train logs a raising train
    function's traceback at ERROR ("Error in training function"); this one is recorded and told in one
    line by the driver, so that log is muted in this worker process, which is about to end."""
    record(token, kind, line, detail)
    ray_private.quiet_train_function_errors()   # if raised (world > 1)
    return Stopped(line)


def unwritable(e: BaseException, where: str) -> StorageUnwritable | None:
    """e as a StorageUnwritable (through Ray's task-error wrapping), None if it is not one."""
    x: BaseException | None = e
    seen = set()
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, StorageUnwritable) and getattr(x, "what", None):
            return StorageUnwritable(x.what, x.why, x.free)
        cause = getattr(x, "cause", None)
        x = cause if isinstance(cause, BaseException) else (x.__cause__ or x.__context__)
    why = will_recur(e)
    if why is None:
        return None
    return StorageUnwritable(where, why, free_space(where) if "://" not in where else None)


def guarded_loop(spec: Any, loop: Callable[[Any], None] | None = None) -> None:
    """The worker loop, with unfixable faults turned into one recorded stop (see the module doc)."""
    if loop is None:
        from raywalk.service.worker import train_loop_per_worker as loop
    if recorded(spec.driver_token) is not None:
        return   # restarted after a recorded stop: end at once, on every rank
    try:
        loop(spec)
    except LeaseLost as e:
        stop: Stopped | None = _stop(spec.driver_token, LEASE, str(e))
    except Exception as e:
        u = unwritable(e, Store.open(spec.config.run.storage).child_uri(spec.experiment_id))
        if u is None:
            raise
        stop = _stop(spec.driver_token, STORAGE, u.line(), u.to_dict())
    else:
        return
    import ray.train

    if ray.train.get_context().get_world_size() == 1:
        return   # alone: ending normally ends the run at once (no worker-group restart to sit through)
    raise stop from None   # other ranks wait in collectives: a raise makes Ray tear the group down


class StopPoll:
    """Rank 0's step callback: every EVERY_S, LeaseLost if its driver recorded a lost lease (driver.FitStop,
    for a fit() that runs off the main thread, as in a Tune trial), which guarded_loop turns into the run's end."""
    EVERY_S = 1.0   # one KV read a second: nothing next to a step's time, prompt next to an epoch's

    def __init__(self, token: str):
        self.token, self.next = token, time.monotonic() + self.EVERY_S

    def __call__(self, state: Any) -> None:
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + self.EVERY_S
        stop = recorded(self.token)
        if stop is not None and stop["kind"] == LEASE:
            raise LeaseLost(stop["line"])


def check_lease(spec: Any) -> None:
    """LeaseLost unless this worker's driver still holds the experiment's lease (before a durable write)."""
    holder = getattr(spec, "lease_holder", "")
    if holder:
        check_holder(Store.open(spec.config.run.storage).sub(spec.experiment_id), spec.experiment_id, holder)


@contextlib.contextmanager
def checkpoint_upload(spec: Any, name: str, uploading: bool):
    """Around ray.train.report: a checkpoint whose upload failed for good is removed (it was never
    registered, and a torn copy only takes room), and the error names it."""
    try:
        yield
    except Exception as e:
        if not uploading:
            raise
        ckpts = Store.open(spec.config.run.storage).sub(spec.experiment_id, RUN_DIR)
        u = unwritable(e, ckpts.child_uri(name))
        if u is None:
            raise
        with contextlib.suppress(Exception):
            ckpts.delete_dir(name)
        u = StorageUnwritable(ckpts.child_uri(name), u.why, free_space(ckpts.path(name)) if ckpts.local else None)
        raise u from None
