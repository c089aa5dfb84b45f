"""Trial concurrency and placement, and the sweep's local Ray (pure). The real sweep on the local Ray,
bucketed, is tests/test_bucket_runs.py."""
from __future__ import annotations

import dataclasses
import json

import pytest

from raywalk.service.sweep import parse_sweep
from raywalk.service.tune import (DATA_CPU, DRIVER_RESOURCE, TRIAL_CPU, capacity_from_autoscaling_config, concurrency,
                          default_concurrency, monitor_config_path, trial_resources)
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
