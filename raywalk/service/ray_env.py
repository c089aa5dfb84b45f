"""Joining or starting Ray, and keeping its console quiet unless asked (--verbose).

The quiet settings are environment variables Ray reads at import time, so
`quiet_defaults()` runs before anything imports ray.
"""
from __future__ import annotations

import logging
import os
import re

from raywalk.config import Config

_QUIET = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",       # no duplicated worker prints
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",     # Ray Data's own bars
    "RAY_DISABLE_WORKER_LOG_PREFIX": "1",      # our epoch lines read as ours, not "(RayTrainWorker pid=...)"
    "RAY_DEDUP_LOGS": "0",
    "RAY_COLOR_PREFIX": "0",
    "RAY_DATA_LOG_LEVEL": "ERROR",             # the driver materialises the window dataset
}


def quiet_defaults(verbose: bool = False) -> None:
    if verbose:
        return
    for k, v in _QUIET.items():
        os.environ.setdefault(k, v)


def worker_env(verbose: bool) -> dict[str, str]:
    """Environment for every Ray process of the job (workers, Ray Data coordinators, controller)."""
    if verbose:
        return {}
    return {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            "RAY_DATA_LOG_LEVEL": "ERROR"}   # else it warns that its (disabled) bars are disabled


def _plain_worker_bars() -> None:
    """Draw the rank-0 epoch bar without Ray's "(pid=...)" prefix: there is only one bar to tell apart."""
    from ray.experimental import tqdm_ray

    mgr = tqdm_ray.instance()
    if getattr(mgr, "_raywalk_plain", False):
        return
    update = mgr.process_state_update

    def plain(state):
        state["ip"], state["pid"] = mgr.ip, mgr.pid
        update(state)

    mgr.process_state_update = plain
    mgr._raywalk_plain = True


# Error-level lines Ray prints that say nothing a user can act on. Ray Train's PreemptionCallback
# creates its PreemptionWatcher actor with max_restarts=-1 and the worker actors' handles as
# constructor arguments; an actor handle carries an ObjectRef (distributed ref counting), so
# those arguments go by reference through the object store, and the core worker logs that
# once per worker group (ray-project/ray#53727). Measured here: an actor made with
# max_restarts=-1 logs it for a handle in its arguments and not for a small plain dict.
_NOISE = re.compile(r"Actor with class name: 'PreemptionWatcher' and ID: '\w+' has constructor arguments in the "
                    r"object store and max_restarts > 0")


def _drop_noise() -> None:
    """Filter _NOISE out of the worker log lines Ray forwards to this driver's console.

    Private Ray API (ray._private.ray_logging's dispatcher): Ray has no public hook to filter
    forwarded worker lines; the line comes from the controller's process, not ours.
    """
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    with dispatcher._lock:
        handlers = dispatcher.handlers
        if any(name == "raywalk_quiet" for name, _ in handlers):
            return

        def wrap(handle):
            def quiet(data):
                lines = [ln for ln in data.get("lines", []) if not _NOISE.search(ln)]
                if lines:
                    handle({**data, "lines": lines})
            return quiet

        dispatcher.handlers = [(name, wrap(h)) if name == "ray_print_logs" else (name, h) for name, h in handlers]
        dispatcher.handlers.append(("raywalk_quiet", lambda data: None))


def pin_ray_address() -> None:
    """Ray worker-process setup hook: point RAY_ADDRESS at the cluster this worker belongs to.

    Ray Train's PlacementGroupCleaner (a detached actor in its own worker process)
    finds its cluster for the state API from RAY_ADDRESS, else by scanning this
    machine for GCS processes: with another Ray here that scan raises "Found
    multiple active Ray instances" and the cleaner's thread dies. Never raises:
    a failing hook would take the worker down.
    """
    try:
        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    except Exception:
        pass


def job_runtime_env(env: dict[str, str]) -> dict:
    """runtime_env for ray.init: quiet variables plus the address pin in every worker process."""
    return {"env_vars": env, "worker_process_setup_hook": f"{__name__}.pin_ray_address"}


def quiet_train_logging():
    import ray.train

    return ray.train.LoggingConfig(log_level="WARNING")


def ensure_ray(cfg: Config, verbose: bool = False) -> None:
    """Join the cluster given by RAY_ADDRESS (or the `ray job submit` job), else start a local Ray."""
    quiet_defaults(verbose)
    import ray

    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.WARNING
    if not verbose:
        # ray.init's notice that local token auth is on: expected here, nothing to act on.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    env = worker_env(verbose)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=level, log_to_driver=True,
                 runtime_env=job_runtime_env(env))
    else:
        # Training workers must not take every CPU, or Ray Data gets none and the pipeline stalls.
        need = cfg.run.workers * cfg.run.cpus_per_worker + 1
        if not verbose:
            env = {**env, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}   # no spot preemption on a laptop
        ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), logging_level=level,
                 log_to_driver=True, runtime_env=job_runtime_env(env))
        # The driver's own address lookups (state API) get the same pin as the workers' (pin_ray_address).
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    if not verbose:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray").setLevel(logging.WARNING)
        _plain_worker_bars()
        _drop_noise()
