"""`ray job submit` for real: a `ray start --head` cluster on 127.0.0.1, the quickstart (shrunk) through the Jobs API.

The cluster is started with `--block` in its own session and stopped by PID
(SIGTERM, then SIGKILL of whatever is left in that session: a SIGKILLed driver's
DashboardAgent/RuntimeEnvAgent orphans). Not `ray stop`: that stops every Ray
on the machine, including other people's runs on this shared box.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, kill_session, session_pids, tiny_overrides


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # RAY_DASHBOARD_STARTUP_TIMEOUT_S: on a loaded shared box the dashboard can take over the default 60 s.
    env.update({"RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "240"},
               **extra)
    return env


class LocalCluster:
    """`ray start --head --block` on 127.0.0.1 with its own ports and temp dir; stop() cleans up by PID."""

    def __init__(self, temp_dir: Path, num_cpus: int = 4):
        self.temp_dir = Path(temp_dir)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        (self.port, self.dashboard_port, self.client_port, self.agent_listen, self.agent_grpc, self.rte_port,
         self.metrics_port, self.nm_port, self.om_port) = free_ports(9)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = open(self.temp_dir / "ray-start.log", "w+")
        cmd = ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", f"--port={self.port}",
               f"--num-cpus={num_cpus}", "--disable-usage-stats", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={self.client_port}", f"--dashboard-agent-listen-port={self.agent_listen}",
               f"--dashboard-agent-grpc-port={self.agent_grpc}", f"--runtime-env-agent-port={self.rte_port}",
               f"--metrics-export-port={self.metrics_port}", f"--node-manager-port={self.nm_port}",
               f"--object-manager-port={self.om_port}", f"--temp-dir={self.temp_dir / 'ray'}"]
        self.proc = subprocess.Popen(cmd, cwd=self.temp_dir, env=cli_env(), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        """Until `ray job list` answers. The CLI, not an in-process client: ray reads RAY_AUTH_MODE once, at import."""
        deadline = time.monotonic() + timeout
        err = ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            p = subprocess.run(["ray", "job", "list", "--address", self.address], env=cli_env(),
                               capture_output=True, text=True, cwd=self.temp_dir)
            if p.returncode == 0:
                return
            err = (p.stdout + p.stderr)[-500:]
            time.sleep(2)
        self.log.seek(0)
        raise RuntimeError(f"ray start --head did not come up ({err}):\n{self.log.read()[-3000:]}")

    def stop(self) -> None:
        sid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)      # --block: ray stops what it started
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        kill_session(sid)                              # orphans (agents, workers), by PID
        self.proc.wait()
        self.log.close()


def submit_cmd(address: str, storage: str, *train_args: str, no_wait: bool = False) -> list[str]:
    return ["ray", "job", "submit", "--address", address, "--working-dir", ".",
            "--runtime-env", "runtime_env.yaml", *(["--no-wait"] if no_wait else []),
            "--", "raywalk", "train", "configs/quickstart.yaml", "--storage", storage, *train_args]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    old = os.environ.get("RAY_AUTH_MODE")
    c = LocalCluster(tmp_path_factory.mktemp("head"))
    try:
        c.wait_ready()
        yield c
    finally:
        sid = c.proc.pid
        c.stop()
        if old is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old
        assert session_pids(sid) == [], "processes of the test cluster survived"


def test_quickstart_through_ray_job_submit(cluster, tmp_path):
    storage = tmp_path / "store"      # the cluster is this machine: a local path is shared storage here
    sets = [s for s in tiny_overrides("unused") if not s.startswith("run.storage=")]
    sets += ["train.max_epochs=2", "gate.sequences=50", "run.cpus_per_worker=0.5"]
    args = [a for s in sets for a in ("--set", s)]
    t0 = time.monotonic()
    p = subprocess.run(submit_cmd(cluster.address, str(storage), *args), cwd=ROOT, env=cli_env(),
                       capture_output=True, text=True, timeout=420)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower(), out[-3000:]
    job_id = next(line.split("'")[1] for line in out.splitlines() if "submitted successfully" in line)

    # Status and logs through the CLI as a user would (an in-process client reads RAY_AUTH_MODE once, at
    # ray's import, so it cannot be switched to token auth inside a test process that already imported ray).
    def job(*a: str) -> str:
        q = subprocess.run(["ray", "job", *a, "--address", cluster.address, job_id], cwd=ROOT, env=cli_env(),
                           capture_output=True, text=True, timeout=120)
        assert q.returncode == 0, q.stdout + q.stderr
        return q.stdout + q.stderr

    assert "succeeded" in job("status").lower()
    logs = job("logs")
    # The job's own logs carry the per-epoch summary lines, nothing needed from the head's files.
    epochs = [line for line in logs.splitlines() if line.startswith("epoch ") and " loss " in line]
    assert len(epochs) >= 1 and epochs[0].startswith("epoch 1/2"), logs[-3000:]
    assert "result: " in logs
    # Ray Train's PreemptionWatcher (on here, as on any cluster) makes its core worker log an error
    # line about its constructor arguments; raywalk keeps it off the console (ray_env._NOISE)
    assert "PreemptionWatcher" not in out + logs and "Traceback" not in out + logs, (out + logs)[-3000:]

    [exp] = [d for d in storage.iterdir() if d.name != "corpora"]
    r = json.loads((exp / "result.json").read_text())
    assert r["status"] in ("passed", "failed") and r["epochs_trained"] == len(epochs)
    assert len(r["curves"]["edge_compliance"]) == r["epochs_trained"]
    assert r["environment"]["ray"] == "2.60.0"

    sys.stderr.write(f"ray job submit -> SUCCEEDED in {time.monotonic() - t0:.1f}s\n")


def test_the_working_dir_upload_excludes_outputs_and_caches(tmp_path):
    """The package Ray would upload for `--working-dir . --runtime-env runtime_env.yaml` skips them."""
    import yaml
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    excludes = yaml.safe_load((ROOT / "runtime_env.yaml").read_text())["excludes"]
    made_dir = not (ROOT / "results").exists()
    decoy = ROOT / "results" / ".raywalk-upload-probe"
    decoy.parent.mkdir(exist_ok=True)
    decoy.write_text("x")
    try:
        seen: list[Path] = []
        # include_gitignore=False: runtime_env.yaml's excludes alone must keep them out.
        _dir_travel(ROOT, [_get_excludes(ROOT, excludes)], lambda p: seen.append(p.relative_to(ROOT)),
                    include_gitignore=False)
    finally:
        decoy.unlink()
        if made_dir:
            decoy.parent.rmdir()
    top = {p.parts[0] for p in seen if p.parts}
    assert "results" not in top and "corpora" not in top and ".hypothesis" not in top
    assert not any("__pycache__" in p.parts for p in seen)
    assert "raywalk" in top and "configs" in top
