"""run.trackers without Ray: the curves streamed epoch by epoch, read back with each library's reader.

The Ray runs that stream for real (and across kills) are in tests/test_resume.py; these check the
bookkeeping that makes a resume neither skip nor repeat a point, and the refusals.
"""
from __future__ import annotations

import importlib.util
import time
from types import SimpleNamespace

import numpy as np
import pytest

from raywalk.service import trackers
from raywalk.config import ConfigError
from raywalk.records.storage import Store
from tests.conftest import QUICKSTART, tiny_config
from tests.helpers import expected, mlflow_runs, mlflow_scalars, tb_scalars



def curves_at(full: dict, epochs: int, spe: int) -> SimpleNamespace:
    return SimpleNamespace(train_loss=full["train_loss"][:epochs * spe],
                           edge_compliance=full["edge_compliance"][:epochs],
                           rule_compliance=full["rule_compliance"][:epochs])


def test_streamed_epoch_by_epoch_and_resumed_without_repeats(tmp_path):
    cfg = tiny_config(tmp_path, **{"run.trackers": ["tensorboard", "mlflow"]})
    root, eid, spe = Store.open(str(tmp_path)), cfg.experiment_id(), 1300   # > one MLflow batch per epoch
    rng = np.random.default_rng(0)
    full = {"train_loss": rng.random(4 * spe).tolist(), "edge_compliance": [0.5, 0.6, 0.7, 0.8],
            "rule_compliance": [0.1, 0.2, 0.3, 0.4]}
    t = trackers.open_trackers(cfg, root, eid, curves_at(full, 0, spe))
    for e in (1, 2):
        t.epoch_end(curves_at(full, e, spe))
    t.epoch_end(curves_at(full, 2, spe))   # nothing new: nothing written
    t.flush()   # its writes land before the "kill" (a real kill stops its writer thread with it)
    # a kill after epoch 3's checkpoint but before its tracker write; the restart restores epoch 3
    t = trackers.open_trackers(cfg, root, eid, curves_at(full, 3, spe))
    t.epoch_end(curves_at(full, 4, spe))   # backfills epoch 3 with epoch 4
    t.close()
    assert tb_scalars(tmp_path / eid / "tensorboard") == expected(full, f32=True)
    c, runs = mlflow_runs(tmp_path, eid)
    assert len(runs) == 1 and mlflow_scalars(c, runs[0].info.run_id) == expected(full, f32=False)
    r = c.get_run(runs[0].info.run_id)
    assert r.info.status == "FINISHED" and r.data.params["model.d_model"] == "16"
    assert r.info.run_name == eid and "lr" not in str(list(r.data.metrics))   # only result.json's curves

    # a rerun from scratch (--fresh) gets a new MLflow run; the old one is kept, marked superseded
    t = trackers.open_trackers(cfg, root, eid, curves_at(full, 0, spe))
    t.epoch_end(curves_at(full, 1, spe))
    t.flush()
    c, runs = mlflow_runs(tmp_path, eid)
    assert len(runs) == 1 and mlflow_scalars(c, runs[0].info.run_id) == expected(curves_at(full, 1, spe).__dict__,
                                                                                 f32=False)
    _, old = mlflow_runs(tmp_path, f"{eid} (superseded)")
    assert len(old) == 1 and old[0].info.status == "KILLED"


class SlowSink:
    """Logs like a sink (how far it reaches, nothing twice) and takes `delay` s per write."""

    def __init__(self, delay: float, fail_at: int | None = None):
        self.delay, self.fail_at, self.logged, self.closed = delay, fail_at, [], False

    def update(self, c: dict) -> None:
        time.sleep(self.delay)
        if len(c["edge_compliance"]) == self.fail_at:
            raise OSError("the tracking server went away")
        self.logged += c["train_loss"][len(self.logged):]

    def close(self) -> None:
        self.closed = True


def test_writes_run_off_the_training_thread_and_every_point_once():
    sink = SlowSink(delay=0.5)
    t = trackers.Trackers([sink])
    full = {"train_loss": list(range(40)), "edge_compliance": [0.5] * 4, "rule_compliance": [0.1] * 4}
    t0 = time.perf_counter()
    for e in range(1, 5):
        t.epoch_end(curves_at(full, e, 10))
    assert time.perf_counter() - t0 < 0.25          # four epochs' writes cost the training thread nothing
    t.close()                                        # waits for the queue
    assert sink.logged == full["train_loss"] and sink.closed

    failing = trackers.Trackers([SlowSink(delay=0.0, fail_at=1)])
    failing.epoch_end(curves_at(full, 1, 10))
    with pytest.raises(OSError, match="went away"):  # a sink's error reaches the training thread
        failing.close()


def test_refused_before_ray_with_the_install_command(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"run.trackers: \['wandb'\] is invalid: each must be one of "
                                          r"tensorboard, mlflow"):
        tiny_config(tmp_path, **{"run.trackers": ["wandb"]})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "mlflow" else real(m, *a))
    with pytest.raises(trackers.TrackerError, match=r"'mlflow' needs the mlflow package, which is not installed: "
                                                    r"pip install 'raywalk\[mlflow\]'"):
        trackers.check(("mlflow",), str(tmp_path))
    from raywalk.cli import main

    assert main(["train", str(QUICKSTART), "--set", "run.trackers=[mlflow]",
                 "--set", f"run.storage={tmp_path}"]) == 2
    assert not any(tmp_path.iterdir())   # nothing created, Ray never started
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(trackers.TrackerError, match="needs MLFLOW_TRACKING_URI"):
        trackers.check(("mlflow",), "s3://bucket/root")
