"""Joining or starting Ray, and keeping its console quiet unless asked (--verbose).

The quiet settings are environment variables Ray reads at import time, so
`quiet_defaults()` runs before anything imports ray.
"""
from __future__ import annotations

import logging
import os
import re

from raywalk.config import Config
from raywalk.service import ray_private

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


# Error-level lines Ray prints that say nothing a user can act on. Ray Train's PreemptionCallback
# creates its PreemptionWatcher actor with max_restarts=-1 and the worker actors' handles as
# constructor arguments; an actor handle carries an ObjectRef (distributed ref counting), so
# those arguments go by reference through the object store, and the core worker logs that
# once per worker group (ray-project/ray#53727). Measured here: an actor made with
# max_restarts=-1 logs it for a handle in its arguments and not for a small plain dict.
_NOISE = re.compile(r"Actor with class name: 'PreemptionWatcher' and ID: '\w+' has constructor arguments in the "
                    r"object store and max_restarts > 0")


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


def run_cpus(workers: int, cpus_per_worker: float) -> float:
    """CPUs a local Ray needs for one run: its training workers' plus one, so that Ray Data gets
    one (workers holding every CPU stall the pipeline)."""
    return workers * cpus_per_worker + 1


def ensure_ray(cfg: Config, verbose: bool = False) -> None:
    """Join the cluster given by RAY_ADDRESS (or the `ray job submit` job), else start a local Ray for cfg's run."""
    ensure_ray_cpus(run_cpus(cfg.run.workers, cfg.run.cpus_per_worker), verbose)


def ensure_ray_cpus(need: float, verbose: bool = False) -> None:
    """ensure_ray, a local Ray getting at least `need` logical CPUs (above the core count: bookkeeping)."""
    quiet_defaults(verbose)
    import ray

    if ray.is_initialized():
        return
    level = logging.INFO if verbose else logging.WARNING
    if not verbose:
        # ray.init's notice that local token auth is on: expected here, nothing to act on.
        ray_private.quiet_auth_notice()
    env = worker_env(verbose)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=level, log_to_driver=True,
                 runtime_env=job_runtime_env(env))
    else:
        if not verbose:
            env = {**env, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}   # no spot preemption on a laptop
        ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), logging_level=level,
                 log_to_driver=True, runtime_env=job_runtime_env(env))
        # The driver's own address lookups (state API) get the same pin as the workers' (pin_ray_address).
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    if not verbose:
        _quiet_console()


def _quiet_console() -> None:
    """After ray.init: no Ray Data bars, WARNING and up from Ray, the one epoch bar plain, no _NOISE."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray").setLevel(logging.WARNING)
    ray_private.plain_worker_bars()   # one bar to tell apart: no "(pid=...)" prefix
    ray_private.filter_forwarded_lines(lambda ln: not _NOISE.search(ln))
