"""The training service end to end on a real local Ray (tiny configs)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raywalk.records import checkpoints as ckpt
from raywalk.service.corpus import build_corpus, ray_mapper
from raywalk.records.storage import Store
from raywalk.service.driver import train
from raywalk.config import Config
from tests.conftest import LONG, PASSING, reference_run, tiny_config

pytestmark = pytest.mark.usefixtures("local_ray")
quiet = dict(progress=False, log=lambda s: None)


def test_corpus_is_identical_whatever_the_parallelism(tmp_path):
    a, _ = build_corpus(tiny_config(tmp_path / "a"), Store.open(str(tmp_path / "a")), mapper=ray_mapper(1), **quiet)
    b, _ = build_corpus(tiny_config(tmp_path / "b"), Store.open(str(tmp_path / "b")), mapper=ray_mapper(3), **quiet)
    s, _ = build_corpus(tiny_config(tmp_path / "s"), Store.open(str(tmp_path / "s")), **quiet)
    assert a.manifest["checksums"] == b.manifest["checksums"] == s.manifest["checksums"]
    assert len(a.files("train")) > 1      # really several shards


def test_window_dataset_yields_int64_windows(tmp_path):
    from raywalk.service.dataset import load_resident, window_dataset
    from raywalk.service.windows import walks_to_windows

    cfg = tiny_config(tmp_path)
    corpus, _ = build_corpus(cfg, Store.open(str(tmp_path)), **quiet)
    ds = window_dataset(corpus, cfg.w, materialize=True)   # as the streaming path builds it
    rows = ds.take_all()
    k = cfg.corpus.walk_length // (cfg.w + 1)
    assert len(rows) == cfg.corpus.corpus_size * k
    got = np.stack([r["tokens"] for r in rows])
    assert np.array_equal(got, walks_to_windows(corpus.walks("train"), cfg.w))   # every window, in corpus order
    # read to its end: a half-read Ray Data iterator leaves its executor thread running past ray.shutdown()
    (batch,) = list(ds.limit(8).iter_torch_batches(batch_size=8, dtypes=torch.long))
    assert batch["tokens"].dtype == torch.int64 and batch["tokens"].shape == (8, cfg.w + 1)
    # the resident path reads the shards itself: the same windows in the same order
    resident = load_resident(corpus, cfg.w, len(rows), torch.int16, torch.device("cpu"))
    assert resident.dtype == torch.int16 and np.array_equal(resident.numpy().astype(got.dtype), got)


def check_result(r: dict, cfg) -> None:
    """result.json is complete and consistent with itself."""
    for key in ("experiment_id", "config", "gate", "status", "failure", "svd_eligible", "curves", "epochs_trained",
                "steps_per_epoch", "checkpoints", "environment", "restarts"):
        assert key in r, key
    e = r["epochs_trained"]
    assert len(r["curves"]["train_loss"]) == e * r["steps_per_epoch"]
    assert len(r["curves"]["edge_compliance"]) == len(r["curves"]["rule_compliance"]) == e
    assert set(r["curves"]) == {"train_loss", "edge_compliance", "rule_compliance"}
    g = r["gate"]
    assert g["final_edge_compliance"] == r["curves"]["edge_compliance"][-1]
    assert g["final_rule_compliance"] == r["curves"]["rule_compliance"][-1]
    passed_now = g["n_rule_checks"] > 0 and g["final_edge_compliance"] > g["edge_threshold"] \
        and g["final_rule_compliance"] > g["rule_threshold"]
    assert g["passed"] == passed_now == (r["status"] == "passed") == r["svd_eligible"]
    if g["passed"]:
        assert g["epoch"] == e and r["failure"] is None
    assert r["config"] == cfg.to_dict() | {"run": r["config"]["run"]}
    assert r["environment"]["workers"] == cfg.run.workers


def test_two_workers_end_to_end(tmp_path_factory):
    r = reference_run(tmp_path_factory, **PASSING)     # the session's passing run, also test_analysis'
    cfg = Config.from_dict(r["config"])
    exp = Path(cfg.run.storage) / cfg.experiment_id()
    check_result(r, cfg)
    assert r["status"] == "passed", r["gate"]          # the tiny task is learnable
    assert cfg.run.workers == 2
    on_disk = json.loads((exp / "result.json").read_text())
    assert on_disk == r
    ck = sorted(p.name for p in (exp / "checkpoints").glob("epoch_*"))
    assert 1 <= len(ck) <= 3 and ck[-1] == f"epoch_{r['epochs_trained']:04d}"
    assert r["checkpoints"]["gate"].endswith(ck[-1]) and r["checkpoints"]["latest"].endswith(ck[-1])
    # the gate checkpoint is plain data and holds everything a resume needs
    state = ckpt.read(Store.open(r["checkpoints"]["gate"]))
    assert state["epoch"] == r["epochs_trained"] and state["gate_epoch"] == r["gate"]["epoch"]
    assert {"model", "optimizer", "scheduler", "rng", "curves"} <= set(state)
    assert len(state["rng"]) == 2            # one RNG state per worker
    assert state["curves"]["train_loss"].tolist() == r["curves"]["train_loss"]
    # steps the scheduler took = optimizer steps trained
    assert state["scheduler"]["last_epoch"] == r["epochs_trained"] * r["steps_per_epoch"]
    # a finished experiment rerun reports, it does not train again
    again = train(cfg, **quiet)
    assert again["curves"] == r["curves"] and again["epochs_trained"] == r["epochs_trained"]


def test_a_config_that_cannot_pass_is_flagged_failed(tmp_path_factory):
    # the session's never-passing run (rule must be > 1.0); the streaming path's own runs: test_preemption
    r = reference_run(tmp_path_factory, **LONG)
    cfg = Config.from_dict(r["config"])
    check_result(r, cfg)
    assert r["data_path"] == "resident"
    assert r["status"] == "failed" and r["svd_eligible"] is False and r["gate"]["passed"] is False
    assert r["epochs_trained"] == 3 and r["gate"]["epoch"] is None
    f = r["failure"]
    assert "gate not passed after 3 epochs" in f["reason"]
    assert f["final_rule_compliance"] == r["curves"]["rule_compliance"][-1]
    assert len(list((Path(cfg.run.storage) / cfg.experiment_id() / "checkpoints").glob("epoch_*"))) == 3


def test_a_lease_lost_while_fit_runs_off_the_main_thread_stops_it_promptly(tmp_path, monkeypatch):
    """As in a Tune trial: train() in a thread, where Ray installs no Ctrl-C handler. The lease removed a few
    steps into the epoch stops the fit within a poll or two (not at the epoch's checkpoint, 73 steps on) and
    the caller gets the driver's one line."""
    import threading

    from raywalk.records.lease import LEASE, LeaseLost
    from tests.faults import LoseLease, instrumented

    monkeypatch.setenv("RAYWALK_LEASE_HEARTBEAT_S", "0.5")   # the loss is seen within half a second
    cfg = tiny_config(tmp_path, **{"train.max_epochs": 1})
    marker = tmp_path / "last-step"
    lose = LoseLease(lease=str(tmp_path / cfg.experiment_id() / LEASE), marker=str(marker), step=2, pause=0.1)
    got: dict = {}

    def trial() -> None:
        try:
            got["result"] = train(cfg, **quiet)
        except BaseException as e:
            got["error"] = e

    with instrumented(lose):
        t = threading.Thread(target=trial)
        t.start()
        t.join(timeout=600)
    e = got.get("error")
    assert isinstance(e, LeaseLost), got
    assert str(e) == (f"lost the lease on experiment {cfg.experiment_id()}: it was removed; this driver stopped "
                      f"training and writes nothing more"), e
    epoch, step = map(int, marker.read_text().split())
    assert epoch == 1 and step < 40, step       # of the epoch's 75 steps
    assert not (tmp_path / cfg.experiment_id() / "checkpoints" / "epoch_0001").exists()
