"""A real 2-point sweep on the local Ray: Tune trials, result.json per point, summary, rerun skips."""
from __future__ import annotations

import json

import pytest

from raywalk.storage import Store
from raywalk.sweep import parse_sweep, read_csv
from raywalk.tune import run_sweep
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("local_ray")


def tiny_sweep(storage) -> dict:
    base = json.loads(json.dumps(TINY))
    base["train"]["max_epochs"] = 1
    base["gate"]["sequences"] = 32
    base["run"].update(storage=str(storage), cpus_per_worker=0.5)
    # Point 1 (n=32) gets gate.rule = 32 // 32 = 1: "rule > 1.0" can never pass, so it fails by design
    # and must be listed as excluded from SVD analysis; point 0 gets gate.rule = 0.
    return {"name": "tiny-test", "base": base, "grid": {"graph.n": [16, 32]}, "derived": {"gate.rule": "n // 32"}}


def test_two_point_sweep_then_rerun_trains_nothing(tmp_path):
    sweep = parse_sweep(tiny_sweep(tmp_path / "results"))
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
