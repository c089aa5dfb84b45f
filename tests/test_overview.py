"""`raywalk ls`: statuses from result.json + lease.json, sweeps, text and --json, local and on S3."""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from types import SimpleNamespace


from raywalk.cli import main
from raywalk.science.compliance import Compliance
from raywalk.records.lease import LeaseInfo
from raywalk.records.overview import format_overview, scan
from raywalk.records.result import NO_LEASE_GRACE_S, EpochFacts, build, status_now
from raywalk.records.storage import Store
from tests.conftest import tiny_config

CURVES = SimpleNamespace(train_loss=[2.0] * 50, edge_compliance=[0.99, 0.999], rule_compliance=[0.5, 0.9],
                         n_rule_checks=[40, 40], n_distinct_sequences=[16, 16])
KINDS = ("passed", "failed", "live", "stale", "no_lease_old", "no_lease_recent")
EXPECTED = {"passed": "passed", "failed": "failed", "live": "running", "stale": "interrupted",
            "no_lease_old": "interrupted", "no_lease_recent": "running"}


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def lease(heartbeat: float, stale_after: float = 60.0) -> dict:
    return {"holder": "ab" * 16, "host": "node-7", "pid": 4242, "started_at": iso(heartbeat - 300),
            "heartbeat_at": iso(heartbeat), "heartbeat_unix": heartbeat, "stale_after_s": stale_after}


def record(cfg, eid: str, gate_epoch: int | None, epochs: int, restarts: int = 0, last=Compliance(999, 1000, 36, 40)):
    e = EpochFacts(CURVES, last, gate_epoch, epochs, 16, 25, by_r={2: (30, 27), 4: (10, 9)})
    return build(cfg, eid, e, checkpoints={}, environment={}, restarts=restarts).to_json()


def populate(root: Store, n: int, now: float) -> dict[str, str]:
    """n experiments made by result.build, cycling through KINDS; returns id -> expected status."""
    expected = {}
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        cfg = tiny_config(root.uri, seed=i)
        eid = cfg.experiment_id()
        exp = root.sub(eid)
        gate_epoch = 2 if kind == "passed" else None
        r = record(cfg, eid, gate_epoch, cfg.train.max_epochs if kind == "failed" else 2, i % 3)
        if kind in ("stale", "no_lease_old"):
            r["updated_at"] = iso(now - 3600)
        exp.write_json("result.json", r)
        if kind == "live":
            exp.write_json("lease.json", lease(now - 5))
        elif kind == "stale":
            exp.write_json("lease.json", lease(now - 600))
        expected[eid] = EXPECTED[kind]
    return expected


def test_status_rules():
    now = time.time()
    def live(d: dict) -> bool:   # the lease as `raywalk ls` reads it: decoded, then the one liveness rule
        info = LeaseInfo.decode(json.dumps(d).encode())
        return info is not None and info.live(now)

    assert status_now("passed", live(lease(now - 999)), now - 999, now) == "passed"
    assert status_now("running", live(lease(now - 10, 60)), None, now) == "running"
    assert status_now("running", live(lease(now - 61, 60)), now, now) == "interrupted"   # a stale lease wins
    assert status_now("running", live({}), now, now) == "interrupted"                    # torn lease: not live
    assert status_now("running", None, now - NO_LEASE_GRACE_S + 5, now) == "running"
    assert status_now("running", None, now - NO_LEASE_GRACE_S - 5, now) == "interrupted"
    assert status_now("running", None, None, now) == "interrupted"
    assert status_now(None, None, now, now) == "running"   # a record without a status: running until the grace ends


def test_two_hundred_local_experiments(tmp_path, capsys):
    root = Store.open(str(tmp_path / "root"))
    now = time.time()
    expected = populate(root, 204, now)
    # things ls must skip or treat apart
    root.sub("corpora", "c1").write_json("manifest.json", {})
    root.write_json("retired.old-20260101-000000/result.json", {"status": "passed"})
    root.makedirs("not_an_experiment")
    root.sub("starting").write_json("lease.json", lease(now))          # no result.json yet, lease live
    root.sub("torn").write_bytes("result.json", b'{"status": "runn')    # torn by hand
    ids = sorted(expected)
    rows = [{"point": i, "experiment_id": e, "status": "not_run"} for i, e in enumerate(ids[:7])]
    rows.append({"point": 7, "experiment_id": "elsewhere-1", "status": "failed"})
    root.sub("sweeps", "grid-1234").write_json("summary.json", {"sweep_id": "grid-1234", "name": "grid",
                                                                "axes": ["seed"], "rows": rows})

    ov = scan(root, now)
    got = {r["experiment_id"]: r["status"] for r in ov["experiments"]}
    assert got == {**expected, "starting": "running", "torn": "unreadable"}
    assert [r["experiment_id"] for r in ov["experiments"]] == sorted(got)
    assert ov["counts"] == {"passed": 34, "failed": 34, "running": 69, "interrupted": 68, "unreadable": 1}
    p = next(r for r in ov["experiments"] if expected.get(r["experiment_id"]) == "passed")
    max_epochs = tiny_config(root.uri).train.max_epochs
    assert (p["epochs_trained"], p["max_epochs"], p["gate_epoch"], p["final_rule_compliance"]) == (2, max_epochs, 2,
                                                                                                   0.9)
    live = [r for r in ov["experiments"] if r["host"]]
    assert live and all(r["status"] == "running" for r in live)
    (sw,) = ov["sweeps"]
    want = {}
    for e in ids[:7]:
        want[expected[e]] = want.get(expected[e], 0) + 1
    want["failed"] = want.get("failed", 0) + 1   # the point not under this root keeps its recorded status
    assert sw["points"] == 8 and sw["counts"] == want

    assert main(["ls", root.uri]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["experiment", "status", "epochs"]
    body = [ln for ln in out[1:] if ln.split()[0] in got]
    assert len(body) == len(got)
    line = next(ln for ln in body if ln.startswith(p["experiment_id"]))
    assert line.split()[1:6] == ["passed", f"2/{max_epochs}", "2", "0.999", "0.900"]
    assert "sweep grid-1234: 8 point(s):" in out[-1]
    assert main(["ls", root.uri, "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert {r["experiment_id"]: r["status"] for r in js["experiments"]} == got


def test_updated_at_falls_back_to_the_file_time(tmp_path):
    root = Store.open(str(tmp_path))
    cfg = tiny_config(root.uri)
    r = record(cfg, "old", None, 1, last=None)
    del r["updated_at"]   # a result.json from before updated_at existed, written just now
    root.sub("old").write_json("result.json", r)
    (row,) = scan(root)["experiments"]
    assert row["status"] == "running" and row["updated_at"] is not None
    assert scan(root, time.time() + 2 * NO_LEASE_GRACE_S)["experiments"][0]["status"] == "interrupted"


def test_ls_on_s3(s3_server, capsys):
    root = Store.open(s3_server["uri"]("ls-root"))
    now = time.time()
    expected = populate(root, 6, now)
    ov = scan(root, now)
    assert {r["experiment_id"]: r["status"] for r in ov["experiments"]} == expected
    assert all(r["result"].startswith("s3://") and r["result"].endswith("scheme=http") for r in ov["experiments"])
    assert main(["ls", root.uri, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["experiments"]) == 6
    empty = Store.open(s3_server["uri"]("nothing-here"))
    assert "0 experiment(s)" in format_overview(scan(empty))


def test_ls_bad_roots(tmp_path, capsys):
    assert main(["ls", str(tmp_path / "missing")]) == 2
    assert main(["ls", "s3://"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no such directory" in err[0] and "no bucket" in err[1]
    assert not (tmp_path / "missing").exists()
