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


# Lines Ray prints that say nothing a user can act on, each matched on its own (a line, or one message Ray
# pushes to the driver, however many lines it spans). Ray Train's PreemptionCallback creates its
# PreemptionWatcher actor with max_restarts=-1 and the worker actors' handles as constructor arguments; an
# actor handle carries an ObjectRef (distributed ref counting), so those arguments go by reference through the
# object store, and the core worker logs that once per worker group (ray-project/ray#53727; measured here: an
# actor made with max_restarts=-1 logs it for a handle in its arguments and not for a small plain dict).
# The others come with a node or worker lost to a preemption or a crash, which raywalk's own lines report
# (the notice, "preemption (restart N)" or "failure (restart N)", where the run goes on); Ray keeps them in its
# log files, and --verbose prints them:
_NOISE = re.compile("|".join((
    r"Actor with class name: 'PreemptionWatcher' and ID: '\w+' has constructor arguments in the object store "
    r"and max_restarts > 0",
    # the watcher's WARNING on a drain (raywalk's "preemption notice: ..." says it)
    r"PreemptionWatcher: preemption detected",
    # pushed by the lost node's agents: the raylet is gone, with the last 20 lines of its log (state dumps)
    r"^Raylet is terminated\.",
    # pushed by the GCS once the lost node misses its health checks
    r"has been marked dead because the detector has missed too many heartbeats",
    # pushed by a raylet for each worker process that died with its node, or was killed
    r"^A worker died or was killed while executing a task by an unexpected system error",
    # the GCS's error log: it cannot release the lost node's placement-group bundles
    r"gcs_placement_group_scheduler\.cc:\d+: Failed to remove \d+ bundle\(s\) for placement group",
    # the GCS's error log: it cannot kill an actor whose node is already gone (seen now and then, by timing)
    r"gcs_actor_scheduler\.cc:\d+: Failed to kill actor \w+, return status: Invalid: KillActor RPC failed",
)))


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
    """Ray Train's console lines off: its controller's and workers' `ray.train` logs stay in the run's
    logs/train files. Nothing it logs there below CRITICAL is for a raywalk user: an error that ends the run
    comes back to the driver from fit() (and raywalk reports it); those it logs on the way are the tracebacks of
    a worker group lost to a preemption or a crash that the run survives ("Graceful shutdown of backend
    failed ... ActorDiedError" from the controller, "Error in training function" from the ranks whose peer
    died)."""
    import ray.train

    return ray.train.LoggingConfig(log_level="CRITICAL")


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
    ray_private.filter_console_lines(lambda ln: not _NOISE.search(ln))
