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

from raywalk.records.lease import LeaseLost
from raywalk.records.errors import unwritable
from raywalk.records.storage import Store
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


def guarded_loop(spec: Any, loop: Callable[[Any], None]) -> None:
    """The worker loop, with unfixable faults turned into one recorded stop (see the module doc)."""
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

