"""One driver per experiment: the lease, on a local root and on a real S3 server (moto)."""
from __future__ import annotations

import os
import threading
import time

import pytest

from raywalk.records.lease import LEASE, Lease, LeaseHeld, LeaseInfo, LeaseLost, hold, timings
from raywalk.records.storage import Store


@pytest.fixture(scope="module")
def s3_uri(s3_server):
    """A URI maker for a bucket on a real S3-compatible server (moto, threaded, in this process)."""
    return s3_server["uri"]


@pytest.fixture(params=["local", "s3"])
def exp(request, tmp_path):
    """An experiment directory on either backend (fresh per test)."""
    if request.param == "local":
        return Store.open(str(tmp_path / "root")).sub("exp1")
    return Store.open(request.getfixturevalue("s3_uri")(f"t{time.monotonic_ns()}")).sub("exp1")


def lease(exp: Store, logs: list[str] | None = None, **kw) -> Lease:
    return Lease(exp, "exp1", log=(logs.append if logs is not None else lambda s: None), **kw)


def test_acquire_writes_the_agreed_record_and_a_second_driver_is_refused(exp):
    a = lease(exp).acquire()
    d = exp.read_json(LEASE)
    assert set(d) == {"holder", "host", "pid", "started_at", "heartbeat_at", "heartbeat_unix", "stale_after_s"}
    assert d["holder"] == a.holder and d["pid"] == os.getpid() and d["stale_after_s"] == 60.0
    assert d["started_at"].endswith("Z") and abs(d["heartbeat_unix"] - time.time()) < 60
    with pytest.raises(LeaseHeld) as e:
        lease(exp).acquire()
    msg = str(e.value)
    assert "experiment exp1 is already being run by another driver" in msg
    assert f"pid {os.getpid()}" in msg and d["host"] in msg and d["started_at"] in msg and d["heartbeat_at"] in msg
    assert e.value.info.holder == a.holder
    assert exp.read_json(LEASE)["holder"] == a.holder       # the refused driver changed nothing


def test_release_frees_the_experiment(exp):
    a = lease(exp).acquire()
    assert a.release() is True and not exp.is_file(LEASE)
    assert a.release() is False                              # once only
    b = lease(exp).acquire()
    assert exp.read_json(LEASE)["holder"] == b.holder


def test_renewal_moves_the_heartbeat_and_only_the_holder_renews(exp):
    a = lease(exp).acquire()
    first = exp.read_json(LEASE)
    time.sleep(1.1)
    a.renew()
    again = exp.read_json(LEASE)
    assert again["heartbeat_unix"] > first["heartbeat_unix"] and again["started_at"] == first["started_at"]
    stranger = lease(exp)                                    # never acquired: cannot renew or release it
    with pytest.raises(LeaseLost):
        stranger.renew()
    assert stranger.release() is False and exp.read_json(LEASE) == again


def test_a_stale_lease_is_taken_over_and_its_old_holder_cannot_renew_or_release_it(exp):
    a = lease(exp, stale_after_s=3.0, heartbeat_s=0.5).acquire()
    with pytest.raises(LeaseHeld):
        lease(exp).acquire()                                 # still live
    time.sleep(3.2)
    logs: list[str] = []
    b = lease(exp, logs).acquire()
    assert exp.read_json(LEASE)["holder"] == b.holder
    assert len(logs) == 1 and "taking over experiment exp1" in logs[0] and f"pid {os.getpid()}" in logs[0]
    with pytest.raises(LeaseLost, match="taken over"):
        a.renew()
    assert a.release() is False and exp.read_json(LEASE)["holder"] == b.holder


def test_a_waiting_driver_takes_the_lease_once_it_goes_stale(exp, monkeypatch):
    a = lease(exp, stale_after_s=2.0, heartbeat_s=0.5).acquire()
    logs: list[str] = []
    b = lease(exp, logs, heartbeat_s=0.5).acquire(wait_s=30)      # a (never renewed) goes stale meanwhile
    assert exp.read_json(LEASE)["holder"] == b.holder and "taking over" in logs[0]
    monkeypatch.setenv("RAYWALK_LEASE_WAIT_S", "1")
    with pytest.raises(LeaseHeld):
        lease(exp, heartbeat_s=0.5).acquire()                     # b is live for 60 s: waiting 1 s is not enough
    assert a.release() is False


def test_an_unreadable_lease_file_is_taken_over(exp):
    exp.write_bytes(LEASE, b"{not json")
    logs: list[str] = []
    b = lease(exp, logs).acquire()
    assert exp.read_json(LEASE)["holder"] == b.holder and "unreadable" in logs[0]


def test_hold_heartbeats_past_the_stale_time_and_releases_at_the_end(exp):
    with hold(exp, "exp1", log=lambda s: None, stale_after_s=2.0, heartbeat_s=0.2) as a:
        time.sleep(2.5)                                      # longer than stale_after: only renewals keep it live
        with pytest.raises(LeaseHeld):
            lease(exp).acquire()
        assert LeaseInfo.decode(exp.read_bytes(LEASE)).age() < 2.0
    assert not exp.is_file(LEASE)
    with pytest.raises(LeaseLost):
        a.renew()


def test_hold_releases_when_the_block_raises(exp):
    with pytest.raises(ZeroDivisionError):
        with hold(exp, "exp1", log=lambda s: None):
            1 / 0
    assert not exp.is_file(LEASE)


def test_racing_drivers_get_exactly_one_lease_locally(tmp_path):
    """Eight threads create at once, then eight take over the stale lease at once: one winner each time."""
    exp = Store.open(str(tmp_path)).sub("exp1")
    for stale in (False, True):
        if stale:
            lease(exp, stale_after_s=0.2, heartbeat_s=0.1).acquire()
            time.sleep(0.3)
        wins, refused = [], []
        gate = threading.Barrier(8)

        def go():
            mine = lease(exp)
            gate.wait()
            try:
                wins.append(mine.acquire())
            except LeaseHeld:
                refused.append(mine)

        threads = [threading.Thread(target=go) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(wins) == 1 and len(refused) == 7
        assert exp.read_json(LEASE)["holder"] == wins[0].holder
        wins[0].release()


def test_timings_from_the_environment(monkeypatch):
    assert timings() == (60.0, 10.0)
    monkeypatch.setenv("RAYWALK_LEASE_STALE_AFTER_S", "3")
    assert timings() == (3.0, 0.5)
    monkeypatch.setenv("RAYWALK_LEASE_HEARTBEAT_S", "1")
    assert timings() == (3.0, 1.0)
    monkeypatch.setenv("RAYWALK_LEASE_STALE_AFTER_S", "soon")
    with pytest.raises(ValueError, match="RAYWALK_LEASE_STALE_AFTER_S: 'soon' is invalid"):
        timings()
    with pytest.raises(ValueError, match="heartbeat"):
        timings(stale_after_s=5, heartbeat_s=5)


# A second driver refused while the first runs, and the first's release at its end; a killed driver's stale
# lease taken over by the rerun, which resumes: tests/test_resume.py
# (test_driver_sigkill_then_rerun_resumes_the_same_experiment) asserts them on its own drivers.
