"""Every private Ray API raywalk uses, each behind one small function (checked against Ray 2.60).

Nothing else in the package imports a private Ray module or names a private Ray logger
(tests/test_layering.py checks); each function says why no public API serves. Ray is
imported inside the functions, so importing this module costs nothing.
"""
from __future__ import annotations

import logging
from typing import Any, Callable


# ---- the GCS key-value store (stops.py's record of a stop) ------------------------------

def kv_put(key: bytes, value: str, namespace: str) -> None:
    """Store value under key unless the key is taken (the first writer wins)."""
    # No public KV: ray.experimental.internal_kv offers only these underscored functions.
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(key, value, overwrite=False, namespace=namespace)


def kv_get(key: bytes, namespace: str) -> bytes | None:
    # No public KV (see kv_put).
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(key, namespace=namespace)


def kv_del(key: bytes, namespace: str) -> None:
    # No public KV (see kv_put).
    from ray.experimental import internal_kv

    internal_kv._internal_kv_del(key, namespace=namespace)


# ---- the autoscaler's reported cluster config (tune.py's concurrency) ---------------------

def autoscaler_max_resources() -> dict[str, float] | None:
    """The most of each resource the autoscaler's reported cluster config can grow to; None without one."""
    # No public API reads it: ray.autoscaler.sdk takes a config file, not the GCS's copy; Ray Data
    # and Train V2 read it through this same call.
    import ray._private.state as ray_state

    try:
        reported = ray_state.state.get_max_resources_from_cluster_config()
    except Exception:
        return None
    return {k: float(v) for k, v in reported.items()} if reported else None


# ---- console: forwarded worker lines, progress bars, log noise ----------------------------

def filter_console_lines(keep: Callable[[str], bool]) -> None:
    """Drop, from what Ray prints on this driver's console for other processes, every line for which keep(line)
    is false; a later call replaces the filter (it lasts for the process, across ray.shutdown and ray.init).

    Two streams reach the console, and both print through `ray._private.worker.print_worker_logs`, looked up
    at each call: the log monitor's (the workers' and actors' stdout/stderr, raylet*.err, gcs_server*.err;
    handed to the "ray_print_logs" handler of the driver's stdstream dispatcher) and the errors Ray pushes to
    every driver (listen_error_messages: "(raylet) Raylet is terminated ...", "(raylet) The node ... has been
    marked dead ..."), printed straight to stdout.
    """
    # No public hook does this: log_to_driver=False drops raywalk's own lines, which rank 0 prints and the log
    # monitor forwards, and leaves the pushed errors on (no option turns listen_error_messages off);
    # RAY_DEDUP_LOGS_SKIP_REGEX is read only with deduplication on, which folds raywalk's alike lines from
    # different worker processes (an epoch line just after a restart) into "[repeated Nx across cluster]".
    import ray._private.worker as ray_worker

    print_logs = getattr(ray_worker.print_worker_logs, "raywalk_unfiltered", ray_worker.print_worker_logs)

    def print_kept(data, print_file, ignore_prefix: bool = False):
        lines = [ln for ln in data.get("lines", []) if keep(ln)]
        if lines:
            print_logs({**data, "lines": lines}, print_file, ignore_prefix)

    print_kept.raywalk_unfiltered = print_logs
    ray_worker.print_worker_logs = print_kept


def plain_worker_bars() -> None:
    """Draw worker tqdm_ray bars without Ray's "(pid=...)" prefix (rank 0 draws the only one)."""
    # tqdm_ray's public part is its tqdm class; the bar manager that adds the prefix has no option.
    from ray.experimental import tqdm_ray

    mgr: Any = tqdm_ray.instance()
    if getattr(mgr, "_raywalk_plain", False):
        return
    update = mgr.process_state_update

    def plain(state):
        state["ip"], state["pid"] = mgr.ip, mgr.pid
        update(state)

    mgr.process_state_update = plain
    mgr._raywalk_plain = True


def quiet_auth_notice() -> None:
    """Mute ray.init's notice that local token auth is on (expected, nothing to act on)."""
    # No option turns the notice off; only its private module's logger.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def quiet_train_reports() -> None:
    """Mute Ray Train's per-report INFO line ("Reporting training result N: ...") in this worker."""
    # LoggingConfig sets levels for "ray.train" only; this logger is named by its private file's path.
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def quiet_train_function_errors() -> None:
    """Mute Ray Train's ERROR traceback of a raising train function in this (ending) worker process."""
    # Train has no option for it; the line comes from its private util module's logger.
    logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)


# ---- Ray Train's checkpoint accounting file (bucket_driver.py) ----------------------------

def train_snapshot_file() -> str:
    """The name of the file in which Ray Train keeps a run's registered checkpoints (its run directory)."""
    # No public name: a bucket writes its members' checkpoints itself, and a solo run's snapshot left in a
    # member's run directory would make a later solo rerun resume from Ray's older registered checkpoint.
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    return CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
