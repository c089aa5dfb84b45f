"""Ray Train's placement-group cleaner with another Ray on the machine.

The cleaner is a detached actor; its monitor thread asks the state API whether
the Train controller still lives and resolves the cluster from RAY_ADDRESS,
else by scanning the machine's GCS processes. With two Rays here that scan
raises "Found multiple active Ray instances", the thread dies, and the actor
stays up forever instead of releasing a dead driver's placement group.
raywalk pins RAY_ADDRESS in every worker process (ray_env.pin_ray_address).

`target` is the session's `ray start --head` cluster (own ports, temp dir and
session, stopped by PID, tests/clusters.py) that a driver joins and is then
SIGKILLed from; the session's local Ray is the other Ray on the machine. The
embedded run's case: tests/test_storage_faults.py.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.clusters import cli_env
from tests.conftest import ROOT, kill_session, tiny_overrides

MULTI = "Found multiple active Ray instances"


@pytest.fixture(scope="module")
def target(local_ray, head):
    """The cluster a driver joins and is SIGKILLed from (conftest's shared `head`), with another Ray on the
    machine beside it: the session's local Ray, which this process holds."""
    return head


def train_cmd(storage, *sets: str) -> list[str]:
    args = [s for s in tiny_overrides(storage) if not s.startswith("run.storage=") and not s.endswith("=")]
    args += ["run.cpus_per_worker=0.5", "gate.sequences=32", *sets]
    return ["raywalk", "train", "configs/quickstart.yaml", "--storage", str(storage), "--no-progress",
            *[a for s in args for a in ("--set", s)]]


# An embedded (laptop) run with another Ray on the machine, whose cleaner must not hit MULTI either:
# tests/test_storage_faults.py's paused driver (an embedded CLI run beside the module's local Ray).


def test_sigkilled_driver_placement_groups_are_released_by_the_cleaner(target, tmp_path):
    storage = tmp_path / "store"
    env = cli_env(RAY_ADDRESS=f"127.0.0.1:{target.port}")
    log = open(tmp_path / "driver.log", "w+")
    # A gate it cannot pass (rule must be > 1.0): the run is still training whenever the test looks.
    p = subprocess.Popen(train_cmd(storage, "train.max_epochs=50", "gate.rule=1.0"), cwd=ROOT, env=env, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        pgs: list[dict] = []
        while time.monotonic() < deadline and p.poll() is None:    # training has its placement group
            log.seek(0)
            if any(line.startswith("epoch 1/50 ") for line in log.read().splitlines()):
                pgs = [g for g in target.state("placement-groups") if g["state"] == "CREATED"]
                if pgs:
                    break
            time.sleep(1)
        log.seek(0)
        assert pgs and p.poll() is None, log.read()[-4000:]
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        kill_session(p.pid)
        log.close()

    ids = {g["placement_group_id"] for g in pgs}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = {g["placement_group_id"]: g["state"] for g in target.state("placement-groups")}
        cleaners = target.state("actors", "class_name=PlacementGroupCleaner")
        if all(now.get(i) == "REMOVED" for i in ids) and cleaners and all(a["state"] == "DEAD" for a in cleaners):
            break
        time.sleep(2)
    assert all(now.get(i) == "REMOVED" for i in ids), now
    # The cleaner saw the controller die, released the group and exited (a dead monitor thread never exits).
    assert cleaners and all(a["state"] == "DEAD" for a in cleaners), cleaners
    logs = "".join(f.read_text(errors="replace") for f in target.ray_dir.glob("session_*/logs/worker-*"))
    assert MULTI not in logs
