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
# Passes its gate (the tiny task is learnable), on two ranks: test_driver's end-to-end run, test_analysis' passed one.
PASSING = {"run.workers": 2}

_references: dict[str, dict] = {}


def reference_run(tmp_path_factory, **dotted) -> dict:
    """The uninterrupted run of tiny_config(**dotted) that interrupted runs must equal and other tests read
    (never change): trained once per test session, on the Ray of the first module that asks (a result is files
    and numbers, the same from any Ray: what test_resume, test_storage_faults and test_preemption prove), and
    kept for the session."""
    from raywalk.service.driver import train

    key = json.dumps(dotted, sort_keys=True)
    if key not in _references:
        ctrl_c = signal.getsignal(signal.SIGINT)
        r = train(tiny_config(tmp_path_factory.mktemp("reference"), **dotted), progress=False, log=lambda s: None)
        assert signal.getsignal(signal.SIGINT) is ctrl_c   # the run's Ctrl-C handler (and its controller) went with it
        assert r["restarts"] == 0 and r["resumes"] == []
        assert r["status"] == "passed" or r["epochs_trained"] == r["config"]["train"]["max_epochs"]
        _references[key] = r
    return _references[key]


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory, local_ray):
    """The session's uninterrupted LONG run on the local Ray: what an interrupted LONG run must equal."""
    return reference_run(tmp_path_factory, **LONG)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The tiny config (2 epochs) and its corpus, built in this process (no Ray)."""
    from raywalk.records.storage import Store
    from raywalk.service.corpus import build_corpus

    root = tmp_path_factory.mktemp("corpus")
    cfg = tiny_config(root, **{"train.max_epochs": 2})
    c, _ = build_corpus(cfg, Store.open(str(root)), progress=False, log=lambda s: None)
    return cfg, c


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


class Shared:
    """A costly test resource kept across modules: started by the first module that asks for `fixture`,
    stopped after the last one in run order that does (pytest_collection_modifyitems runs them together),
    or at the session's end."""

    def __init__(self, fixture: str, start, stop, alive=lambda value: True):
        self.fixture, self._start, self._stop, self._alive = fixture, start, stop, alive
        self.value = None

    def get(self, request):
        if self.value is not None and not self._alive(self.value):   # stopped under us (a test's ray.shutdown)
            self.value = None
        if self.value is None:
            self.value = self._start(request)
        return self.value

    def release(self) -> None:
        value, self.value = self.value, None
        if value is not None:
            self._stop(value)

    def done_with(self, request) -> None:
        """At a module's end: release unless a later test in this session asks for the fixture too."""
        items = request.session.items
        last = max(i for i, it in enumerate(items) if it.module is request.module)
        if not any(self.fixture in it.fixturenames for it in items[last + 1:]):
            self.release()


def _start_local_ray(request):
    """Like a laptop's embedded Ray, no preemption watcher (ray_env.ensure_ray): one actor less per fit;
    notices are test_preemption's. Started with s3_server's fake credentials (CREDS) in its environment
    (Ray's workers inherit it), so any module's runs, and CLI drivers that join it, reach that bucket."""
    from raywalk.service.ray_env import quiet_defaults
    quiet_defaults()
    import ray

    # For the processes ray.init starts, not for this one after. Only these keys go back: ray.init sets variables
    # of its own here (the auth token the CLI drivers that join read), so no whole-environment restore.
    saved = {k: os.environ.get(k) for k in CREDS}
    os.environ.update(CREDS)
    try:
        ray.init(num_cpus=4, logging_level="WARNING",
                 runtime_env={"env_vars": {"RAY_DATA_LOG_LEVEL": "ERROR", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    return ray


LOCAL_RAY = Shared("local_ray", _start_local_ray, lambda ray: ray.shutdown(), alive=lambda ray: ray.is_initialized())


@pytest.fixture(scope="module")
def local_ray(request):
    """The session's one real local Ray (a start costs seconds, and a fresh Ray's first fit seconds more)."""
    yield LOCAL_RAY.get(request)
    LOCAL_RAY.done_with(request)


@pytest.fixture(scope="module")
def without_local_ray():
    """For a module that puts this process on another Ray: the shared local Ray is stopped first."""
    LOCAL_RAY.release()
    yield


def _start_head(request):
    from tests.clusters import LocalCluster

    c = LocalCluster(request.getfixturevalue("tmp_path_factory").mktemp("head"))
    try:
        c.wait_ready()
    except BaseException:
        c.stop()
        raise
    return c


def _stop_head(c) -> None:
    from tests.clusters import stop_checked

    stop_checked(c)


HEAD = Shared("head", _start_head, _stop_head)


@pytest.fixture(scope="module")
def head(request):
    """The session's 4-CPU `ray start --head` cluster (tests/clusters.py), for the modules that drive a cluster
    from outside: `ray job submit` (test_jobs) and a driver SIGKILLed from it (test_pg_cleaner)."""
    yield HEAD.get(request)
    HEAD.done_with(request)


# Run order: the modules on the shared local Ray, then those on both, then those on the shared head, then the
# rest; test_preemption (which puts this process on its own multi-node cluster) last. Each shared resource then
# starts once.
_LAST = ("tests/test_preemption.py",)


def _run_group(module: str, uses: set[str]) -> int:
    if module in _LAST:
        return 4
    if "local_ray" in uses:
        return 1 if "head" in uses else 0
    return 2 if "head" in uses else 3


def pytest_collection_modifyitems(session, config, items):
    uses: dict[str, set[str]] = {}
    for it in items:
        uses.setdefault(it.nodeid.split("::")[0], set()).update(it.fixturenames)
    order = {m: i for i, m in enumerate(uses)}

    def key(it) -> tuple[int, int]:
        m = it.nodeid.split("::")[0]
        return _run_group(m, uses[m]), order[m]

    items.sort(key=key)


@pytest.fixture(scope="session", autouse=True)
def _release_shared():
    yield
    HEAD.release()
    LOCAL_RAY.release()


# ---- a real S3-compatible server (moto, threaded, in this process) for the tests that need one -------------
# Fake credentials in the environment only, the endpoint in the storage URI's query string.

BUCKET = "raywalk-test"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
         "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3_server():
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    old = {k: os.environ.get(k) for k in CREDS}
    os.environ.update(CREDS)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    _, port = server.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield {"port": port, "client": client,
           "uri": lambda prefix, bucket=BUCKET: f"s3://{bucket}/{prefix}?endpoint_override=127.0.0.1:{port}&scheme=http"}
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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
