"""Trial concurrency and placement (pure), and a real 2-point sweep on the local Ray: Tune trials,
result.json per point, summary, rerun skips."""
from __future__ import annotations

import dataclasses
import json

import pytest

from raywalk.records.storage import Store
from raywalk.service.sweep import parse_sweep
from raywalk.service.sweep_summary import read_csv
from raywalk.service.tune import (DATA_CPU, DRIVER_RESOURCE, TRIAL_CPU, capacity_from_autoscaling_config, concurrency,
                          default_concurrency, monitor_config_path, run_sweep, trial_resources)
from tests.conftest import TINY


def tiny_sweep(storage) -> dict:
    base = json.loads(json.dumps(TINY))
    base["train"]["max_epochs"] = 1
    base["gate"]["sequences"] = 32
    base["run"].update(storage=str(storage), cpus_per_worker=0.5)
    # Point 1 (n=32) gets gate.rule = 32 // 32 = 1: "rule > 1.0" can never pass, so it fails by design
    # and must be listed as excluded from SVD analysis; point 0 gets gate.rule = 0.
    return {"name": "tiny-test", "base": base, "grid": {"graph.n": [16, 32]}, "derived": {"gate.rule": "n // 32"}}


def points(n: int, **dotted):
    sweep = parse_sweep(tiny_sweep("unused"))
    return [dataclasses.replace(sweep.points[0], cfg=sweep.points[0].cfg.replace(**dotted))] * n


def test_concurrency_on_a_laptop_is_as_before():
    ps = points(2)                              # 1 worker x 0.5 CPU + the driver's 0.1 CPU
    assert default_concurrency(2, ps) == 1      # floor((2 - 1) / 0.6)
    assert default_concurrency(4, ps) == 5
    assert default_concurrency(0, ps) == 1      # never 0
    assert trial_resources(False) == {"CPU": TRIAL_CPU}


def test_concurrency_from_what_an_autoscaling_cluster_can_grow_to():
    cfg = {"max_workers": 5, "head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 0, DRIVER_RESOURCE: 3}, "max_workers": 0},
        "small": {"resources": {"CPU": 2}, "max_workers": 4},
        "big": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 2},
        "capped": {"resources": {"CPU": 1}}}}   # no max_workers of its own: the global one
    cap = capacity_from_autoscaling_config(cfg)
    # CPU: 2 big (16) + 3 of the 4 small (6), the global max_workers 5 reached; GPU: the 2 big.
    assert cap == {"CPU": 22.0, "GPU": 2.0, DRIVER_RESOURCE: 3.0}
    ps = points(2, **{"run.cpus_per_worker": 2.0})
    # Drivers on the head take no CPU: floor((22 - 1) / 2) = 10, but the head has 3 driver slots.
    assert concurrency(cap, ps, on_head=True, driver_slots=3) == 3
    assert concurrency(cap, ps, on_head=True, driver_slots=1000) == 10
    assert concurrency(cap, ps) == 10         # drivers on CPU: (22 - DATA_CPU) / 2.1 = 10 exactly
    gpu = points(2, **{"run.gpus_per_worker": 1.0, "run.cpus_per_worker": 1.0})
    assert concurrency(cap, gpu, on_head=True, driver_slots=1000) == 2      # the GPUs decide
    assert trial_resources(True) == {"CPU": 0.0, DRIVER_RESOURCE: 1.0}


def test_the_autoscaling_config_is_found_from_this_clusters_monitor(tmp_path):
    proc = tmp_path / "proc"

    def process(pid: int, *argv: str) -> None:
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")

    mon = "/usr/lib/python3/site-packages/ray/autoscaler/_private/monitor.py"
    process(10, "python", "-u", mon, "--logs-dir=/x", "--gcs-address=10.0.0.2:6379", "--autoscaling-config=/a.yaml")
    process(11, "python", "-u", mon, "--gcs-address=10.0.0.2:6380", "--autoscaling-config=~/ray_bootstrap_config.yaml")
    process(12, "raylet", "--gcs-address=10.0.0.2:6381", "--autoscaling-config=/not-a-monitor.yaml")
    process(13, "python", "-u", mon, "--gcs-address=10.0.0.2:6382")        # a monitor without a config
    (proc / "self").mkdir()
    assert monitor_config_path("10.0.0.2:6379", proc) == "/a.yaml"
    assert monitor_config_path("127.0.0.1:6380", proc).endswith("/ray_bootstrap_config.yaml")
    assert "~" not in monitor_config_path("127.0.0.1:6380", proc)
    for other in ("10.0.0.2:6381", "10.0.0.2:6382", "10.0.0.2:7000"):
        assert monitor_config_path(other, proc) is None
    assert monitor_config_path("10.0.0.2:6379", tmp_path / "no-proc") is None


@pytest.mark.usefixtures("local_ray")
def test_two_point_sweep_then_rerun_trains_nothing(tmp_path):
    spec = tiny_sweep(tmp_path / "results")
    spec["base"]["run"]["trackers"] = ["mlflow"]   # each trial's MLflow run carries its sweep and grid point
    sweep = parse_sweep(spec)
    summary = run_sweep(sweep, max_concurrent=2, log=lambda s: None)
    root = Store.open(str(tmp_path / "results"))
    sd = root.sub("sweeps", sweep.sweep_id)
    assert summary["trials_run"] == 2 and summary["max_concurrent"] == 2

    results = {}
    for p in sweep.points:
        assert root.is_file(f"{p.experiment_id}/result.json"), p.experiment_id
        results[p.experiment_id] = root.read_json(f"{p.experiment_id}/result.json")
    disk = sd.read_json("summary.json")
    assert disk == json.loads(json.dumps(summary))
    assert len(disk["rows"]) == 2
    for row in disk["rows"]:
        r = results[row["experiment_id"]]
        assert row["grid"] == {"graph.n": r["config"]["graph"]["n"]}
        assert row["status"] == r["status"] in ("passed", "failed")
        assert row["epochs_trained"] == r["epochs_trained"] == (r["gate"]["epoch"] or 1)
        assert row["final_edge_compliance"] == r["gate"]["final_edge_compliance"]
        assert row["final_rule_compliance"] == r["gate"]["final_rule_compliance"]
        assert row["gate_epoch"] == r["gate"]["epoch"]
        assert row["svd_eligible"] == r["svd_eligible"]
        assert row["wall_time_s"] > 0 and row["trained_now"]
        assert r["config"]["run"]["storage"] == root.uri
    failing = sweep.points[1]
    assert results[failing.experiment_id]["status"] == "failed"
    assert failing.experiment_id in [e["experiment_id"] for e in disk["excluded_from_svd"]]
    excluded = {e["experiment_id"] for e in disk["excluded_from_svd"]}
    assert excluded == {eid for eid, r in results.items() if not r["svd_eligible"]}

    from tests.helpers import mlflow_runs
    for p in sweep.points:
        c, runs = mlflow_runs(tmp_path / "results", p.experiment_id)
        assert len(runs) == 1 and runs[0].data.tags["raywalk.sweep_id"] == sweep.sweep_id
        assert runs[0].data.tags["raywalk.grid.graph.n"] == str(p.grid["graph.n"])
        steps = sorted(m.step for m in c.get_metric_history(runs[0].info.run_id, "train_loss"))
        assert steps == list(range(1, len(results[p.experiment_id]["curves"]["train_loss"]) + 1))

    rows = read_csv(sd.read_bytes("summary.csv").decode())
    assert [c["experiment_id"] for c in rows] == [r["experiment_id"] for r in disk["rows"]]
    for c, r in zip(rows, disk["rows"]):
        assert int(c["graph.n"]) == r["grid"]["graph.n"] and c["status"] == r["status"]
        assert c["svd_eligible"] == str(r["svd_eligible"])
        assert float(c["final_rule_compliance"]) == r["final_rule_compliance"]

    # Rerun: nothing trains, result.json untouched, the summary is the same.
    mtimes = {e: root.fs.get_file_info(root.path(f"{e}/result.json")).mtime for e in results}
    again = run_sweep(sweep, max_concurrent=2, log=lambda s: None)
    assert again["trials_run"] == 0
    assert {e: root.fs.get_file_info(root.path(f"{e}/result.json")).mtime for e in results} == mtimes
    strip = ("trained_now",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in again["rows"]] == \
           [{k: v for k, v in r.items() if k not in strip} for r in disk["rows"]]
    assert not any(r["trained_now"] for r in again["rows"])

    from raywalk.plot import plot_sweep
    png = plot_sweep(again, tmp_path / "sweep.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_summary_line_joins_an_s3_root_with_a_query_string():
    import io

    from raywalk.service.sweep_summary import build_summary, summary_row
    from raywalk.service.tune import print_summary

    sweep = parse_sweep(tiny_sweep("unused"))
    rows = [summary_row(p, None, None, None) for p in sweep.points]
    summary = build_summary(sweep, rows, storage="s3://b/x", wall_time_s=1.0, max_concurrent=1, trials_run=0)
    out = io.StringIO()
    print_summary(summary, "s3://b/x?endpoint_override=http://127.0.0.1:9000", out=out)
    assert (f"summary: s3://b/x/sweeps/{sweep.sweep_id}/summary.json?endpoint_override=http://127.0.0.1:9000 "
            f"(and summary.csv)") in out.getvalue()


def test_a_local_ray_for_a_sweep_gets_cpus_for_its_trials_and_the_data(monkeypatch):
    import ray

    from raywalk.service import ray_env
    from raywalk.service.tune import ensure_sweep_ray

    asked = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_env, "ensure_ray_cpus", lambda need, verbose=False: asked.append(need))
    sweep = parse_sweep(tiny_sweep("unused"))           # a trial: 0.1 driver CPU + 1 x 0.5 worker CPU
    assert ensure_sweep_ray(sweep, 70, verbose=False) is True
    assert asked == [pytest.approx(70 * 0.6 + DATA_CPU)]   # no cap from a config field's range
    assert ray_env.run_cpus(2, 1.5) == 4.0
