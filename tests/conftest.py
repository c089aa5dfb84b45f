"""Shared test helpers: tiny configs and cleanup of the processes a test starts."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from raywalk.config import Config

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"

# Small enough for seconds per epoch on 2 cores, big enough to have rule checks.
TINY = {
    "seed": 3, "w": 4,
    "graph": {"n": 16, "K": 2, "p_in": 0.9, "p_out": 0.3, "n_jumpers_per_block": 1, "r_scales": [0.5, 1.0]},
    "corpus": {"walk_length": 15, "corpus_size": 1600, "shard_size": 512},
    "model": {"d_model": 16, "n_layers": 1, "n_heads": 1, "dropout": 0.0},
    "train": {"batch_size": 64, "lr": 1.0e-2, "max_epochs": 5},
    "gate": {"sequences": 64, "edge": 0.95, "rule": 0.80},
    "run": {"workers": 1, "storage": "results", "max_failures": 2, "cpus_per_worker": 1.0},
}


def tiny_config(storage: str | Path, **dotted) -> Config:
    cfg = Config.from_dict({**TINY, "run": {**TINY["run"], "storage": str(storage)}})
    return cfg.replace(**dotted) if dotted else cfg


# Never passes (rule must be > 1.0): every run trains exactly 3 epochs, so an interrupted run's curves and
# weights compare with an uninterrupted one's (reference_run).
LONG = {"gate.rule": 1.0, "train.max_epochs": 3}

_references: dict[str, dict] = {}


def reference_run(tmp_path_factory, **dotted) -> dict:
    """The uninterrupted run of tiny_config(**dotted) that interrupted runs must equal: trained once per test
    session, on the Ray of the first module that asks (a result is files and numbers, the same from any Ray:
    what test_resume, test_storage_faults and test_preemption prove), and kept for the session."""
    from raywalk.service.driver import train

    key = json.dumps(dotted, sort_keys=True)
    if key not in _references:
        r = train(tiny_config(tmp_path_factory.mktemp("reference"), **dotted), progress=False, log=lambda s: None)
        assert r["restarts"] == 0 and r["resumes"] == [] and r["epochs_trained"] == r["config"]["train"]["max_epochs"]
        _references[key] = r
    return _references[key]


EMPTY = "''"   # YAML for an empty string (a bare `key=` reads as null)


def tiny_overrides(storage: str | Path, **dotted) -> list[str]:
    """`--set` arguments turning configs/quickstart.yaml into the tiny config."""
    cfg = tiny_config(storage, **dotted).to_dict()
    out = []
    for section, values in cfg.items():
        if isinstance(values, dict):
            out += [f"{section}.{k}={v if v != '' else EMPTY}" for k, v in values.items()]
        else:
            out.append(f"{section}={values}")
    return out


def session_pids(sid: int) -> list[int]:
    """Every live process in session `sid` (a subprocess started with start_new_session=True).

    Zombies are not live: a killed process stays in /proc until its parent (or init) reaps it,
    and waiting for that cost kill_session its whole 4 s loop after every SIGKILL of a tree."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if os.getsid(int(p.name)) == sid and (p / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(p.name))
            except (ProcessLookupError, PermissionError, FileNotFoundError, IndexError):
                pass
    return pids


def kill_session(sid: int) -> None:
    """SIGKILL a subprocess and everything it left behind (Ray agents re-parent, not re-session)."""
    for _ in range(20):
        pids = session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def pytest_configure(config):
    # Ray Train's controller polls its workers every 2 s by default: each fit's end, each dead worker and
    # each registered checkpoint waits for the next poll. Ray Train copies this variable from the driver's
    # environment to its controller (train/v2/_internal/constants.py ENV_VARS_TO_PROPAGATE), and every Ray
    # and CLI a test starts inherits it. A slow poll is only awaited on the next round (hanging polls count
    # as dead after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min), so 0.5 s is safe. Here, not at import:
    # benchmarks import test modules and keep Ray's default.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="module")
def local_ray():
    """One real local Ray for a whole test module (start-up costs seconds)."""
    yield from running_local_ray()


def running_local_ray():
    """Generator body of a local-Ray fixture. Like a laptop's embedded Ray, no preemption watcher
    (ray_env.ensure_ray): one actor less per fit; notices are test_preemption's."""
    from raywalk.service.ray_env import quiet_defaults

    quiet_defaults()
    import ray

    ray.init(num_cpus=4, logging_level="WARNING",
             runtime_env={"env_vars": {"RAY_DATA_LOG_LEVEL": "ERROR", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                       "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}})
    yield ray
    ray.shutdown()


@contextlib.contextmanager
def mounted_tmpfs(d: Path, size: str):
    """A real tmpfs of `size` (e.g. "4m") mounted at the existing directory d, lazily unmounted at the end;
    skips the test where mounting is not allowed (needs root or CAP_SYS_ADMIN; CI runs as root)."""
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {(p.stderr or p.stdout).strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
