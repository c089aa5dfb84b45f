"""Storage faults without Ray: temp files no reader sees, torn records skipped, errors that recur classified."""
from __future__ import annotations

import errno
import fnmatch
import glob
import json
import os
import time

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from raywalk.records import checkpoints as ckpt
from raywalk.records.lease import LEASE, Lease, LeaseLost, check_holder, hold
from raywalk.records.overview import experiment_row
from raywalk.records.result import (count_restarts, list_resumes, read_finished, record_resume, record_worker_start,
                                    status_now)
from raywalk.records.errors import StorageUnwritable, will_recur
from raywalk.records.layout import RESULT, is_temp, tmp_name
from raywalk.records.storage import Store
from raywalk.service.driver import finalise, mark_interrupted
from tests.conftest import mounted_tmpfs, tiny_config


@pytest.fixture
def exp(tmp_path) -> Store:
    return Store.open(str(tmp_path / "root")).sub("exp1")


def test_one_temp_name_rule_that_no_reader_matches(tmp_path):
    names = [tmp_name(n) for n in ("result.json", "manifest.json", "state.pt", "part-0000.parquet", LEASE)]
    assert all(is_temp(n) for n in names) and not any(is_temp(n) for n in ("result.json", "a.part", ".x.json"))
    for n in names:
        assert n.startswith(".") and not n.endswith((".json", ".parquet", ".pt"))
        assert not ckpt.CKPT_RE.match(n) and not fnmatch.fnmatch(n, "*.json") and not fnmatch.fnmatch(n, "*.parquet")
    d = tmp_path / "shards"
    d.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), d / "part-0000.parquet")
    (d / tmp_name("part-0001.parquet")).write_bytes(b"torn")          # what a kill mid-write leaves
    assert glob.glob(str(d / "*")) == [str(d / "part-0000.parquet")]
    assert ds.dataset(str(d), format="parquet").to_table().num_rows == 2   # pyarrow's discovery skips it
    assert Store.open(str(d)).listdir() == ["part-0000.parquet"]


def test_a_failed_write_leaves_no_temp_and_names_what_and_why(exp, monkeypatch):
    exp.write_json("result.json", {"status": "running"})
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageUnwritable) as e:
        exp.write_json("result.json", {"status": "passed"})
    monkeypatch.setattr(os, "fsync", real)
    assert e.value.what == exp.child_uri("result.json") and e.value.why == "no space left"
    assert "free of" in e.value.free and e.value.line().startswith("storage unwritable (no space left): could not")
    assert os.listdir(exp.path()) == ["result.json"]                  # no temp left behind
    assert exp.read_json("result.json") == {"status": "running"}      # the old record is intact


def test_errors_that_recur_are_told_from_transient_ones():
    from botocore.exceptions import ClientError

    assert will_recur(OSError(errno.ENOSPC, "x")) == "no space left"
    assert will_recur(OSError(errno.EDQUOT, "x")) == "disk quota exceeded"
    assert will_recur(OSError(errno.EROFS, "x")) == "read-only filesystem"
    assert will_recur(PermissionError(errno.EACCES, "x")) == "permission denied"
    # pyarrow keeps the errno only in its message
    assert will_recur(OSError("Failed to open local file '/r/state.pt'. Detail: [errno 28] No space left on device")) \
        == "no space left"
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "PutObject")
    assert will_recur(RuntimeError("wrapped")) is None
    try:
        try:
            raise denied
        except ClientError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as outer:
        assert will_recur(outer) == "access denied"                    # found through the chain
    slow = ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject")
    for transient in (slow, ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("timed out"),
                      OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 56")):
        assert will_recur(transient) is None


def test_leftover_and_torn_records_are_skipped_with_a_warning_naming_them(exp):
    record_resume(exp, {"reason": "rerun", "checkpoint": "epoch_0001", "epoch": 2, "step": 0,
                        "at": "2026-12-01T09:00:00.000+00:00"})
    os.makedirs(exp.path("resumes"), exist_ok=True)
    open(os.path.join(exp.path("resumes"), tmp_name("20261201T0901-abcd.json")), "wb").close()   # a full disk's leftover
    open(os.path.join(exp.path("resumes"), "20261201T0902-torn.json"), "wb").write(b'{"reason": "fail')
    warnings: list[str] = []
    got = list_resumes(exp, log=warnings.append)
    assert [r["checkpoint"] for r in got] == ["epoch_0001"]
    assert len(warnings) == 1 and "resume record" in warnings[0] and "20261201T0902-torn.json" in warnings[0]
    # attempts: a temp beside the records is not counted as a worker-group start
    record_worker_start(exp, "d1")
    open(os.path.join(exp.path("attempts/d1"), tmp_name("x")), "wb").close()
    assert count_restarts(exp) == 0
    assert exp.sweep_temps() == 2 and not any(is_temp(f) for _, _, fs in os.walk(exp.path()) for f in fs)


def test_finalise_and_readers_tolerate_partial_records(exp, tmp_path):
    root = Store.open(str(tmp_path / "root"))
    logs: list[str] = []
    exp.write_json(RESULT, {"experiment_id": "exp1", "status": "running", "failure": None})   # no gate, no curves
    r = finalise(root, "exp1", logs.append)
    assert r["status"] == "running" and "run not finished" in logs[0] and "rerun the same command" in logs[0]
    exp.write_json(RESULT, {"status": "failed", "gate": {"epoch": None}})                       # failed, no failure
    r = finalise(root, "exp1", logs.append)
    assert "gate FAILED: gate not passed; final edge -, rule -" in logs[-2]
    exp.write_bytes(RESULT, b'{"status": "pass')                                               # torn
    logs.clear()
    assert read_finished(exp, logs.append) is None and "result.json" in logs[0]
    r = finalise(root, "exp1", logs.append)
    assert r["status"] == "interrupted" and exp.read_json(RESULT)["status"] == "interrupted"
    row = experiment_row(exp, "exp1", time.time())
    assert row["status"] == "interrupted" and row["max_epochs"] is None and row["gate_epoch"] is None
    exp.write_json(RESULT, {"status": "running", "gate": [1], "config": {"train": 3}})          # wrong types
    assert experiment_row(exp, "exp1", time.time())["gate_epoch"] is None


def test_interrupted_is_recorded_without_touching_a_finished_run(exp):
    cfg = tiny_config(exp.path())
    assert mark_interrupted(exp, "exp1", cfg, "storage unwritable (no space left): ...", lambda s: None)
    r = exp.read_json(RESULT)
    assert r["status"] == "interrupted" and r["interrupted"]["reason"].startswith("storage unwritable")
    assert status_now(r["status"], None, time.time(), time.time()) == "interrupted"
    exp.write_json(RESULT, {"status": "passed"})
    assert not mark_interrupted(exp, "exp1", cfg, "x", lambda s: None)
    assert exp.read_json(RESULT) == {"status": "passed"}


def test_lease_temps_follow_the_rule_and_a_worker_sees_a_lost_lease(exp):
    a = Lease(exp, "exp1", log=lambda s: None, stale_after_s=1.0, heartbeat_s=0.2).acquire()
    a.renew()
    assert sorted(os.listdir(exp.path())) == [LEASE, "lease.lock"]          # no lease.json.<uuid>.tmp
    check_holder(exp, "exp1", a.holder)                                     # held and live: fine
    time.sleep(1.1)
    with pytest.raises(LeaseLost, match="has not renewed it for 1s"):        # its driver is paused
        check_holder(exp, "exp1", a.holder)
    b = Lease(exp, "exp1", log=lambda s: None).acquire()
    with pytest.raises(LeaseLost, match=f"another driver holds it now \\(host .*pid {os.getpid()}"):
        check_holder(exp, "exp1", a.holder)
    assert b.release()


def test_hold_reports_a_takeover_once_and_does_not_release_the_new_holders_lease(exp):
    lost: list[str] = []
    with hold(exp, "exp1", log=lambda s: None, stale_after_s=1.0, heartbeat_s=0.2, on_lost=lost.append) as a:
        info = json.loads(exp.read_bytes(LEASE))
        b = Lease(exp, "exp1", log=lambda s: None)
        b._backend.replace(json.dumps({**info, "holder": "other", "heartbeat_unix": time.time() + 60}).encode(),
                           b._backend.read()[1])                             # another driver took it over
        deadline = time.time() + 5
        while not lost and time.time() < deadline:
            time.sleep(0.05)
        assert a.lost == lost[0] and len(lost) == 1
        assert lost[0].startswith("lost the lease on experiment exp1: another driver holds it now (host ")
    assert json.loads(exp.read_bytes(LEASE))["holder"] == "other"           # left alone at the end


def test_read_only_storage_is_told_apart_and_a_ray_task_error_is_seen_through(tmp_path):
    import subprocess

    from raywalk.service.stops import unwritable

    d = tmp_path / "ro"
    d.mkdir()
    with mounted_tmpfs(d, "1m"):
        st = Store.open(str(d))
        st.write_json("result.json", {"status": "running"})
        subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True)
        with pytest.raises(StorageUnwritable, match="read-only filesystem") as e:
            st.write_json("result.json", {"status": "passed"})
        assert st.read_json("result.json") == {"status": "running"}

        class TaskError(Exception):   # the shape of ray.exceptions.RayTaskError: the task's own error in .cause
            def __init__(self, cause):
                super().__init__("task failed")
                self.cause = cause

        u = unwritable(TaskError(e.value), "elsewhere")
        assert (u.what, u.why) == (st.child_uri("result.json"), "read-only filesystem")
        assert unwritable(TaskError(ValueError("bug")), "elsewhere") is None
