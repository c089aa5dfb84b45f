"""Spot preemption on a real multi-node Ray cluster on this machine (a 0-CPU head + two worker nodes).

A node is drained with reason PREEMPTION and a deadline (the autoscaler's reaction to a
reclaim notice), then killed; or killed with no notice; or the worker dies right after
its just-in-time checkpoint: all three in one streamed run, which must end bit-identical
to an uninterrupted one and record its resumes. The cluster is `ray.cluster_utils.Cluster`: its shutdown() removes only
its own nodes (never `ray stop`).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch

from raywalk.records import checkpoints as ckpt
from raywalk.records.storage import Store
from raywalk.service.driver import train
from tests.conftest import reference_run, tiny_config
from tests.faults import Faults, Preempt, instrumented
from tests.helpers import comparable, expected, mlflow_runs, mlflow_scalars, tb_scalars

# Never passes (rule must be > 1.0): every run trains exactly 4 epochs; 2 ranks, so the mid-epoch state
# holds both ranks' losses and RNG streams.
LONG = {"run.workers": 2, "gate.rule": 1.0, "train.max_epochs": 4}
# The streaming path (Ray Data's shuffle, split across ranks), two ways in: the reference with train.data=stream,
# where the driver builds the windows dataset once for every worker-group start, and the reclaimed run with auto
# and a budget no corpus fits in, where rank 0 builds it at each of its starts. Both cut the same windows in the
# same order, so the two runs are bit-identical.
STREAM = {**LONG, "train.data": "stream"}
AUTO_STREAM = {**LONG, "train.data_budget": 1e-9}
NODE_CPUS = 3


@pytest.fixture(scope="module")
def cluster(without_local_ray):
    from ray.cluster_utils import Cluster

    from raywalk.service.ray_env import ensure_ray_cpus, quiet_defaults

    quiet_defaults()
    import ray

    # Ray Train's default 2 s poll here, not the suite's 0.5 s (conftest): polled that fast, the controller
    # once saw the drained node's worker die before the GCS recorded the node's preemption, and charged
    # it to max_failures (then 0 in a drain test), so the run failed instead of resuming.
    poll = os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=NODE_CPUS) for _ in range(2)]
    c.wait_for_nodes()
    # Joined as `raywalk train` joins a cluster (RAY_ADDRESS): raywalk's own driver set-up, its console included.
    address = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = c.address
    ensure_ray_cpus(0)
    yield c, nodes
    ray.shutdown()
    c.shutdown()
    if poll is not None:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = poll
    if address is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = address


def final_weights(r: dict) -> dict[str, torch.Tensor]:
    return ckpt.read(Store.open(r["checkpoints"]["latest"]))["model"]


def assert_identical(r: dict, ref: dict) -> None:
    assert comparable(r) == comparable(ref)
    a, b = final_weights(r), final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    return reference_run(tmp_path_factory, **STREAM)   # this module's 2-rank config, trained on its cluster


def jit_checkpoints(root: Path, cfg) -> list[str]:
    run = root / cfg.experiment_id() / ckpt.RUN_DIR
    return sorted(p.name for p in run.glob("epoch_*_step_*") if (p / ckpt.MANIFEST).exists()) if run.exists() else []


class Cloud:
    """This thread as the cloud provider: it kills reclaimed nodes and brings up replacements (Ray starts
    nodes from the main thread only, so the run trains in another thread)."""

    def __init__(self, cluster):
        self.c, self.nodes = cluster
        self.killed: list[str] = []

    def node(self, marker: Path):
        node_id = marker.read_text().split()[0]
        return next(n for n in self.nodes if n.node_id == node_id)

    def reclaim(self, node) -> None:
        self.c.remove_node(node, allow_graceful=False)
        self.nodes.remove(node)

    def kill(self, marker: Path) -> None:
        """Reclaim the node `marker` names, mid-run (recorded)."""
        victim = self.node(marker)
        self.reclaim(victim)
        self.killed.append(victim.node_id)

    def replace(self) -> None:
        """One more worker node that takes work (a drained node takes none while it lingers)."""
        self.nodes.append(self.c.add_node(num_cpus=NODE_CPUS))


def test_three_reclaims_in_one_run_each_resume_from_the_right_checkpoint(cluster, reference, tmp_path, capfd):
    """One 4-epoch run on the streaming path, a reclaim in each of epochs 2 to 4, every one resumed exactly,
    its TensorBoard and MLflow curves holding every point once across the three restarts, its console raywalk's
    own lines (the notices, the resumes, the epochs) and none of Ray's:
    2: the node is drained (a reclaim notice), then killed mid-epoch once its just-in-time checkpoint is in;
    3: the node is drained and the worker dies right after its just-in-time checkpoint (the node lingers);
    4: the node is killed without notice: a failure, resumed from epoch 3's checkpoint.
    max_failures 2: to Ray, 3 (its node outlives the worker) and 4 are failures; 2, a node lost to preemption,
    must not use up the budget, or 4 would end the run."""
    cfg = tiny_config(tmp_path, **AUTO_STREAM, **{"run.max_failures": 2, "run.trackers": ["tensorboard", "mlflow"]})
    m2, m3, m4 = (tmp_path / f"reclaim-epoch-{e}" for e in (2, 3, 4))
    faults = Faults((Preempt(epoch=2, step=5, marker=str(m2)),
                     Preempt(epoch=3, step=5, marker=str(m3), deadline_s=600, kill_after_jit=True),
                     Preempt(epoch=4, step=5, marker=str(m4), notice=False)))
    got: dict = {}

    def training():
        try:
            with instrumented(faults, notice_every_steps=5):   # a notice seen within 5 steps of its drain
                got["result"] = train(cfg, progress=False, log=lambda s: None)
        except BaseException as e:   # re-raised below, in the test's thread
            got["error"] = e

    run = threading.Thread(target=training, daemon=True)
    run.start()
    cloud, drained = Cloud(cluster), None
    since: dict[str, float] = {}   # when each kill's condition began to hold
    deadline = time.time() + 900   # a bound on a hang, not a timing check
    while run.is_alive() and time.time() < deadline:
        now = time.time()
        if m2.exists() and jit_checkpoints(tmp_path, cfg):
            since.setdefault("epoch 2", now)
        # 3 s for Ray to register the just-in-time checkpoint first: an unregistered one is not resumed from
        if now - since.get("epoch 2", now) > 3 and len(cloud.killed) == 0:
            cloud.kill(m2)
            cloud.replace()
        if drained is None and m3.exists():    # the restart needs a node that takes work
            drained = cloud.node(m3)
            cloud.replace()
        if m4.exists():
            since.setdefault("epoch 4", now)
        if now - since.get("epoch 4", now) > 2 and len(cloud.killed) == 1:   # a few slowed steps into epoch 4
            cloud.kill(m4)
            cloud.replace()
        time.sleep(0.2)
    run.join(timeout=5)
    console = capfd.readouterr()
    console = console.out + console.err
    if drained is not None:
        cloud.reclaim(drained)
    assert not run.is_alive(), "the run did not finish"
    if "error" in got:
        raise got["error"]
    got = got["result"]
    assert cloud.killed == [m2.read_text().split()[0], m4.read_text().split()[0]]   # the workers' nodes went
    assert got["data_path"] == reference["data_path"] == "stream"
    assert_identical(got, reference)
    resumes = [(x["reason"], x["epoch"], x["checkpoint"]) for x in got["resumes"]]
    steps = [x["step"] for x in got["resumes"]]
    assert resumes == [("preemption", 2, ckpt.dir_name(1, steps[0])), ("preemption", 3, ckpt.dir_name(2, steps[1])),
                       ("failure", 4, "epoch_0003")], got["resumes"]
    assert 0 < steps[0] < got["steps_per_epoch"] and 0 < steps[1] < got["steps_per_epoch"] and steps[2] == 0
    assert got["restarts"] == 3
    assert not any(n.startswith("epoch_0003_step_") for n in jit_checkpoints(tmp_path, cfg))   # no notice, no JIT
    assert len(got["checkpoints"]["kept"]) <= 3
    eid = got["experiment_id"]
    assert tb_scalars(tmp_path / eid / "tensorboard") == expected(got["curves"], f32=True)
    c, runs = mlflow_runs(tmp_path, eid)
    assert len(runs) == 1 and mlflow_scalars(c, runs[0].info.run_id) == expected(got["curves"], f32=False)
    # Ray's lines about the lost nodes and workers (the controller's traceback of the dead worker group, the
    # raylet log tails and node-death notices pushed to drivers, the GCS's and the watcher's log lines) stay in
    # Ray's log files (--verbose shows them); raywalk's lines, forwarded from rank 0, still reach the console.
    for line in ("preemption notice: node(s)", "preemption (restart 1): resuming from", "preemption (restart 2): "
                 "resuming from", "failure (restart 3): resuming from", "epoch 4/4"):
        assert line in console, f"{line!r} missing from the console:\n{console}"
    noise = [n for n in ("Traceback", "ActorDiedError", "Raylet is terminated", "Last 20 lines of the Raylet logs",
                         "marked dead", "(raylet)", "(gcs_server)", "PreemptionWatcher") if n in console]
    assert not noise, f"Ray's {noise} on the console:\n{console}"
