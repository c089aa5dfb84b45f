"""A sweep on a cold autoscaling cluster, on this machine.

The cluster is Ray's own fake multi-node autoscaler, set up as
`ray.cluster_utils.AutoscalingCluster` does (its config; `RAY_FAKE_CLUSTER=1`
and a 1 s autoscaler interval), but started and stopped here: its `start()` and
`shutdown()` run `ray stop --force`, which ends every Ray on the machine. The
head (tests/clusters.py's `ray start --head --block`, own ports, temp dir and process session)
has 0 CPUs and the `raywalk_driver` resource, as in cluster.yaml; one worker
type (2 CPUs) scales from 0 to MAX_WORKERS. Worker nodes are raylets the
autoscaler's monitor spawns on this machine, so they live in the head's
session and are stopped with it, by PID.

`raywalk tune` runs as a user would run it (a subprocess with RAY_ADDRESS set).
From cold: the autoscaler adds nodes, the corpus shards run on them, two
trials overlap, their drivers run on the head, and every point ends with its
result.json; in the same sweep, once a checkpoint is written, the worker node
hosting a training worker is SIGKILLed mid-trial (its raylet and everything
under it): the sweep still completes every point, the killed run resumed from
its checkpoint.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml

from raywalk.records.layout import parse_utc
from tests.clusters import LocalCluster, cli_env, free_ports, running
from tests.conftest import ROOT, kill_session, session_pids

FAKE_HEAD_NODE_ID = "f" * 51 + "00000"     # ray.autoscaler._private.fake_multi_node.node_provider
WORKER_TYPE = "ray.worker.cpu"
WORKER_CPUS = 2
MAX_WORKERS = 3
OBJECT_STORE = 80 * 2**20                    # per node; the tiny sweep needs almost none


def autoscaling_config(gcs_port: int) -> dict:
    """AutoscalingCluster._generate_config's result, written out: the example.yaml it starts from is not
    shipped in the ray 2.60 wheel, and provider type `fake_multinode` loads it for defaults, so the
    same FakeMultiNodeProvider is named as an `external` provider (whose defaults are built in)."""
    return {
        "cluster_name": "raywalk-fake",
        "max_workers": MAX_WORKERS,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,           # no node leaves while the sweep runs
        "provider": {
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",     # its default is port 6379: someone else's Ray
        },
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0, "raywalk_driver": 1000}, "node_config": {},
                                 "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": WORKER_CPUS, "object_store_memory": OBJECT_STORE},
                          "node_config": {}, "min_workers": 0, "max_workers": MAX_WORKERS},
        },
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def proc_info(pid: int) -> tuple[int, list[str]] | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return ppid, argv


class FakeAutoscalingCluster(LocalCluster):
    def __init__(self, temp_dir: Path):
        temp_dir = Path(temp_dir)
        self.config_file = temp_dir / "autoscaling.json"
        gcs_port = free_ports(1)[0]
        self.config_file.write_text(json.dumps(autoscaling_config(gcs_port)))
        super().__init__(temp_dir, num_cpus=0, port=gcs_port,
                         args=("--resources", json.dumps({"raywalk_driver": 1000}),
                               f"--autoscaling-config={self.config_file}", f"--object-store-memory={OBJECT_STORE}"),
                         env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})   # as AutoscalingCluster

    def worker_raylets(self) -> dict[int, str]:
        """pid -> socket name of every worker node's raylet (the head's socket is `raylet`)."""
        out = {}
        for pid in session_pids(self.proc.pid):
            info = proc_info(pid)
            if info and info[1][0].endswith("/raylet"):
                sock = next((a.split("=", 1)[1] for a in info[1] if a.startswith("--raylet_socket_name=")), "")
                if not sock.endswith("/raylet"):
                    out[pid] = sock
        return out

    def kill_node_of(self, proctitle_prefix: str) -> int | None:
        """SIGKILL the worker node hosting a process titled `proctitle_prefix` (its raylet and all under it)."""
        raylets = self.worker_raylets()
        for pid in session_pids(self.proc.pid):
            info = proc_info(pid)
            if info and info[1][0].startswith(proctitle_prefix) and info[0] in raylets:
                node = info[0]
                victims = [node] + [p for p in session_pids(self.proc.pid) if (proc_info(p) or (0,))[0] == node]
                for v in victims:
                    try:
                        os.kill(v, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return node
        return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running(FakeAutoscalingCluster(tmp_path_factory.mktemp("autoscaling")))


class NodeWatch:
    """Samples the worker raylets while a sweep runs: when each node appeared (seconds from start)."""

    def __init__(self, cluster: FakeAutoscalingCluster):
        self.cluster, self.seen, self.t0 = cluster, {}, time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in self.cluster.worker_raylets():
                self.seen.setdefault(pid, round(time.monotonic() - self.t0, 1))
            self.stop.wait(0.5)

    def done(self) -> dict[int, float]:
        self.stop.set()
        self.thread.join()
        return self.seen


def write_sweep(path: Path, name: str, gate: dict | None = None, **train) -> Path:
    sweep = yaml.safe_load((ROOT / "configs" / "sweep_tiny.yaml").read_text())
    sweep["name"] = name
    sweep["base"]["train"].update(train)
    sweep["base"]["gate"].update({"sequences": 32, **(gate or {})})
    path.write_text(yaml.safe_dump(sweep))
    return path


def tune(cluster: FakeAutoscalingCluster, sweep: Path, storage: Path, log: Path) -> subprocess.Popen:
    f = open(log, "w")
    return subprocess.Popen(["raywalk", "tune", str(sweep), "--storage", str(storage)], cwd=ROOT,
                            env=cli_env(RAY_ADDRESS=cluster.gcs), stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(p: subprocess.Popen, log: Path, timeout: float) -> str:
    try:
        p.wait(timeout=timeout)
    finally:
        kill_session(p.pid)
    return log.read_text()


def results(storage: Path, sweep_file: Path) -> tuple[list[dict], dict[str, dict]]:
    from raywalk.service.sweep import load_sweep

    sweep = load_sweep(str(sweep_file))
    rows = []
    for p in sweep.points:
        f = storage / p.experiment_id / "result.json"
        assert f.is_file(), f"no result.json for point {p.index} ({p.experiment_id})"
        rows.append(json.loads(f.read_text()))
    trials = {p.experiment_id: json.loads((storage / "sweeps" / sweep.sweep_id / "trials" /
                                           f"{p.experiment_id}.json").read_text()) for p in sweep.points}
    return rows, trials


def test_sweep_from_cold_scales_out_and_survives_a_lost_node(cluster, tmp_path):
    """One sweep proves both: from cold the autoscaler adds nodes and two trials overlap; a worker node
    hosting a training worker is SIGKILLed mid-trial and every point still finishes, resumed."""
    storage = tmp_path / "store"
    assert cluster.worker_raylets() == {}, "not cold: worker nodes before the sweep"
    # A gate no point can pass (rule must be > 1.0): every trial trains all 4 epochs, so whichever
    # training worker is killed after a first checkpoint is mid-trial (a passed gate would end it).
    sweep = write_sweep(tmp_path / "sweep.yaml", "cold-lost-node", gate={"rule": 1.0}, max_epochs=4)
    from raywalk.service.sweep import load_sweep

    exps = [storage / q.experiment_id / "checkpoints" for q in load_sweep(str(sweep)).points]
    t0 = time.monotonic()
    watch = NodeWatch(cluster)
    log = tmp_path / "tune.log"
    p = tune(cluster, sweep, storage, log)
    killed = None
    try:
        deadline = time.monotonic() + 400
        while killed is None and time.monotonic() < deadline and p.poll() is None:
            if any(any(d.glob("epoch_0001*")) for d in exps if d.is_dir()):    # a checkpoint to resume from
                killed = cluster.kill_node_of("ray::RayTrainWorker")
            time.sleep(0.5)
        assert killed is not None, log.read_text()[-3000:]
        out = finish(p, log, timeout=420)
    finally:
        kill_session(p.pid)
    nodes = watch.done()
    wall = time.monotonic() - t0
    assert p.returncode == 0, out[-5000:]
    assert "up to 2 trial(s) at once" in out and str(cluster.config_file) in out, out[-3000:]
    rows, trials = results(storage, sweep)
    assert all(r["status"] == "failed" and r["epochs_trained"] == 4 for r in rows), \
        [(r["status"], r["epochs_trained"]) for r in rows]
    assert sum(r["restarts"] for r in rows) >= 1, [r["restarts"] for r in rows]
    assert len(nodes) >= 2, f"the autoscaler added {len(nodes)} node(s)"
    starts = [parse_utc(t["started_at"]) for t in trials.values()]
    ends = [parse_utc(t["finished_at"]) for t in trials.values()]
    assert max(starts) < min(ends), f"trials did not overlap: {trials}"
    assert {t["driver_node_id"] for t in trials.values()} == {FAKE_HEAD_NODE_ID}, trials
    shards = cluster.state("tasks", "name=write_shard")
    assert shards and all(t["node_id"] and t["node_id"] != FAKE_HEAD_NODE_ID for t in shards), shards

    print(f"\n[autoscaling] sweep from cold with a node killed: {wall:.0f}s, worker nodes added at "
          f"{sorted(nodes.values())} s, trials overlapped {min(ends) - max(starts):.0f}s")
