"""Preemption: real SIGKILLs of workers and drivers; the run continues bit-for-bit.

One local Ray for the module; the CLI drivers join it through RAY_ADDRESS, as on a cluster (a killed
driver's Ray Train actors and placement group go with it). Several ranks: tests/test_preemption.py."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from raywalk.records import checkpoints as ckpt
from raywalk.records.lease import LEASE
from raywalk.records.storage import Store
from raywalk.service.driver import train
from raywalk.science.loop import rng_state, set_rng_state
from tests.faults import WorkerKill, instrumented
from tests.conftest import LONG, QUICKSTART, kill_session, tiny_config, tiny_overrides
from tests.helpers import comparable, expected, mlflow_runs, mlflow_scalars, tb_scalars

TRACKED = {"run.trackers": ["tensorboard", "mlflow"]}   # streamed curves hold every point once across the kills


def final_weights(r: dict) -> dict[str, torch.Tensor]:
    return ckpt.read(Store.open(r["checkpoints"]["latest"]))["model"]



def check_tracked(root: Path, r: dict) -> None:
    """TensorBoard's and MLflow's own readers give back result.json's curves: every point once."""
    eid = r["experiment_id"]
    assert tb_scalars(root / eid / "tensorboard") == expected(r["curves"], f32=True)
    c, runs = mlflow_runs(root, eid)
    assert len(runs) == 1 and mlflow_scalars(c, runs[0].info.run_id) == expected(r["curves"], f32=False)


# Workers SIGKILLed mid-run, the run continued bit for bit: here (rank 0, its newest checkpoint torn),
# tests/test_storage_faults.py (rank 0, between a temp write and its rename, three times) and, with their
# node and with tracked curves, tests/test_preemption.py.


def test_torn_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, long_reference, capfd):
    ref = long_reference
    cfg = tiny_config(tmp_path, **LONG)
    marker = tmp_path / "killed"
    # delay: Train registers epoch_0002 first (it polls every 0.5 s in tests, conftest)
    with instrumented(WorkerKill(rank=0, epoch=3, step=2, marker=str(marker), truncate_latest=True, delay=2)):
        r = train(cfg, progress=False, log=lambda s: None)
    assert marker.exists() and r["restarts"] == 1
    err = capfd.readouterr().err
    assert "skipping checkpoint" in err and "epoch_0002" in err and "truncated" in err, err[-4000:]
    assert "resuming from" in err and "epoch_0001" in err
    assert comparable(r) == comparable(ref)
    a, b = final_weights(r), final_weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _cli(storage: Path) -> list[str]:
    args = [sys.executable, "-m", "raywalk.cli", "train", str(QUICKSTART), "--no-progress"]
    for o in tiny_overrides(storage, **LONG, **TRACKED):
        args += ["--set", o]
    return args


def test_driver_sigkill_then_rerun_resumes_the_same_experiment(tmp_path, long_reference, local_ray):
    """Also the lease's real-driver cases: a second driver is refused while the first runs, and the killed
    driver's stale lease is taken over by the rerun, which releases it at the end."""
    ref = long_reference
    cfg = tiny_config(tmp_path, **LONG)
    exp = tmp_path / cfg.experiment_id()
    result = exp / "result.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAYWALK_LEASE_STALE_AFTER_S": "3",   # the killed driver's lease
           "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    first = subprocess.Popen(_cli(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.time() + 900   # generous: a bound on a hang, not a timing check
        while not (exp / LEASE).exists():
            assert first.poll() is None and time.time() < deadline, first.stdout.read().decode()
            time.sleep(0.1)
        refused = subprocess.run(_cli(tmp_path), capture_output=True, text=True, env=env, cwd=tmp_path,
                                 start_new_session=True, timeout=120)
        assert first.poll() is None, "the first driver should still be running"
        err = refused.stderr.strip().splitlines()
        assert refused.returncode == 3, refused.stdout + refused.stderr
        assert len(err) == 1 and f"experiment {cfg.experiment_id()} is already being run by another driver" in err[0]
        assert f"pid {first.pid}" in err[0] and "last heartbeat" in err[0] and "started" in err[0]
        assert "Ray" not in refused.stdout + refused.stderr         # refused before it joined Ray
        while time.time() < deadline:
            if result.exists() and json.loads(result.read_text())["epochs_trained"] >= 2:
                break
            assert first.poll() is None, first.stdout.read().decode()
            time.sleep(0.2)
        else:
            pytest.fail("the first run never finished epoch 2")
    finally:
        kill_session(first.pid)
        first.wait()
    killed = json.loads(result.read_text())
    assert killed["epochs_trained"] == 2 and killed["status"] == "running"
    # SIGKILL: no release, the lease stays behind...
    held = json.loads((exp / LEASE).read_text())
    assert held["pid"] == first.pid and held["stale_after_s"] == 3.0
    while time.time() - held["heartbeat_unix"] < held["stale_after_s"] + 0.5:
        time.sleep(0.2)              # ...goes stale: the rerun takes it over
    second = subprocess.run(_cli(tmp_path), capture_output=True, text=True, env=env, cwd=tmp_path,
                            start_new_session=True, timeout=400)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out
    assert f"taking over experiment {cfg.experiment_id()}" in out and f"pid {first.pid}" in out
    assert not (exp / LEASE).exists()      # released at the end
    assert "resuming from" in out and "continuing at epoch" in out
    assert "epoch 1/3" not in out                # nothing already done is trained again
    r = json.loads(result.read_text())
    assert comparable(r) == comparable(ref)
    a, b = final_weights(r), final_weights(ref)
    assert all(torch.equal(a[k], b[k]) for k in a)
    check_tracked(tmp_path, r)   # the killed driver's run continued by the rerun, nothing twice

    # --fresh starts over, and says where the earlier run went
    third = subprocess.run(_cli(tmp_path) + ["--fresh"], capture_output=True, text=True, env=env, cwd=tmp_path,
                           start_new_session=True, timeout=400)
    assert third.returncode == 0, third.stdout + third.stderr
    moved = [p for p in tmp_path.iterdir() if p.name.startswith(cfg.experiment_id() + ".old-")]
    assert len(moved) == 1 and (moved[0] / "result.json").exists()
    assert f"moved the earlier run to {moved[0]}" in third.stdout + third.stderr
    assert comparable(json.loads(result.read_text())) == comparable(ref)
    check_tracked(tmp_path, json.loads(result.read_text()))   # a new MLflow run; the old one kept aside
    assert len(mlflow_runs(tmp_path, f"{cfg.experiment_id()} (superseded)")[1]) == 1


def test_rng_state_roundtrips_as_plain_data():
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    s = rng_state()
    buf = io.BytesIO()
    torch.save(s, buf)
    restored = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(restored)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]
