"""The `ray start --head` cluster the tests run against, written once (conftest's shared `head`: test_jobs and
test_pg_cleaner; test_autoscaling's own).

`ray start --head --block` on 127.0.0.1 in its own process session, with its own
ports and temp dir. Stopped by PID: SIGKILL of everything in that session (the
head, its agents, workers and any node the autoscaler's monitor spawned, which
re-parent but stay in the session). Not `ray stop`: that stops every Ray on the
machine, including other people's runs on this shared box. No graceful SIGTERM
first either: nothing a test reads afterwards needs Ray's own shutdown, and
`--block`'s graceful stop waits up to half a minute.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.conftest import ROOT, kill_session, session_pids


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
    """`ray start --head --block` on 127.0.0.1; `args`/`env` add to the command line and its environment.

    Ray's own temp dir (`ray_dir`) is a short fresh /tmp/rw-* directory, removed on stop: the dashboard's
    module sockets live under it and AF_UNIX paths end at 107 bytes. Under pytest's
    /tmp/pytest-of-root/pytest-NNN/<name>0/ they pass that limit once NNN reaches three digits, and the
    dashboard then fails to start ("Module MetricsHead failed to start. Received EOF from pipe").
    """

    def __init__(self, temp_dir: Path, num_cpus: int = 4, args: tuple[str, ...] = (), env: dict | None = None,
                 port: int | None = None):
        self.temp_dir = Path(temp_dir)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.ray_dir = Path(tempfile.mkdtemp(prefix="rw-", dir="/tmp"))
        (self.port, self.dashboard_port, self.client_port, self.agent_listen, self.agent_grpc, self.rte_port,
         self.metrics_port, self.nm_port, self.om_port) = free_ports(9)
        self.port = port or self.port          # chosen by the caller when its config names it
        self.gcs = f"127.0.0.1:{self.port}"
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = open(self.temp_dir / "ray-start.log", "w+")
        cmd = ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", f"--port={self.port}",
               f"--num-cpus={num_cpus}", "--disable-usage-stats", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--ray-client-server-port={self.client_port}", f"--dashboard-agent-listen-port={self.agent_listen}",
               f"--dashboard-agent-grpc-port={self.agent_grpc}", f"--runtime-env-agent-port={self.rte_port}",
               f"--metrics-export-port={self.metrics_port}", f"--node-manager-port={self.nm_port}",
               f"--object-manager-port={self.om_port}", f"--temp-dir={self.ray_dir}", *args]
        self.proc = subprocess.Popen(cmd, cwd=self.temp_dir, env=cli_env(**(env or {})), stdout=self.log,
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
            time.sleep(1)
        self.log.seek(0)
        raise RuntimeError(f"ray start --head did not come up ({err}):\n{self.log.read()[-3000:]}")

    def stop(self) -> None:
        kill_session(self.proc.pid)
        self.proc.wait()
        self.log.close()
        shutil.rmtree(self.ray_dir, ignore_errors=True)

    def state(self, what: str, *filters: str) -> list[dict]:
        """`ray list WHAT` on the cluster, as a user would (the CLI, token auth on)."""
        cmd = ["ray", "list", what, "--address", self.address, "--format", "json", "--detail", "--limit", "10000"]
        for f in filters:
            cmd += ["--filter", f]
        p = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert p.returncode == 0, p.stdout + p.stderr
        return json.loads(p.stdout)


def stop_checked(c: LocalCluster) -> None:
    """Stop c, with nothing of it left alive."""
    sid = c.proc.pid
    c.stop()
    assert session_pids(sid) == [], "processes of the test cluster survived"


def running(c: LocalCluster):
    """Generator body of a cluster fixture: ready, yielded, then stopped with nothing of it left alive."""
    try:
        c.wait_ready()
        yield c
    finally:
        stop_checked(c)
