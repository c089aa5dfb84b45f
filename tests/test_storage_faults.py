"""The storage fault campaign: a real full filesystem, kills between a temp write and its rename, a lease
taken over from a paused driver. Each ends in a run that finishes with curves equal to an uninterrupted one.

The session's local Ray (conftest); the uninterrupted run is the session's (conftest.long_reference).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from raywalk.service import driver as trainer
from raywalk.cli import main
from raywalk.config import ConfigError
from raywalk.records import corpus as corpus_module
from raywalk.records.lease import LEASE
from raywalk.records.result import RESULT, list_resumes
from raywalk.records import checkpoints as ckpt
from raywalk.records.layout import is_temp
from raywalk.records.storage import Store
from tests.conftest import LONG, QUICKSTART, kill_session, mounted_tmpfs, session_pids, tiny_config, tiny_overrides
from tests.faults import FillDisk, instrumented
from tests.flaky_proxy import FlakyProxy
from tests.helpers import comparable

quiet = dict(progress=False, log=lambda s: None)


def _cli_args(storage: Path | str) -> list[str]:
    args = ["train", str(QUICKSTART), "--no-progress"]
    for o in tiny_overrides(storage, **LONG):
        args += ["--set", o]
    return args


@pytest.fixture
def tmpfs(tmp_path):
    """A small real tmpfs (4 MB) that the test can grow; unmounted at the end."""
    d = tmp_path / "small"
    d.mkdir()
    with mounted_tmpfs(d, "4m"):
        yield d


def test_a_full_filesystem_stops_at_once_in_one_line_and_the_rerun_finishes(tmpfs, tmp_path, long_reference, capfd):
    root = tmpfs / "root"
    cfg = tiny_config(root, **LONG)
    exp = Store.open(str(root)).sub(cfg.experiment_id())
    marker = tmp_path / "filled"
    # The disk fills during epoch 2: its checkpoint write is the first to fail. Room is left for result.json,
    # not for an 82 KB checkpoint.
    t0 = time.perf_counter()
    with instrumented(FillDisk(epoch=2, step=3, path=str(tmpfs), marker=str(marker), leave=32768)):
        rc = main(_cli_args(root))
    stopped_s = time.perf_counter() - t0
    out, err = capfd.readouterr()
    assert marker.exists()
    assert rc == 4, err[-3000:]
    last = err.strip().splitlines()[-1]
    with capfd.disabled():
        print(f"\nfull disk at a checkpoint: stopped after {stopped_s:.0f}s; the user saw:\n{last}")
    ckpts = exp.sub("checkpoints")
    assert last == (f"raywalk train: storage unwritable (no space left): could not write "
                    f"{ckpts.child_uri('epoch_0002')} ({last.split('epoch_0002 (')[1].split(')')[0]}); newest intact "
                    f"checkpoint {ckpts.child_uri('epoch_0001')} (epoch 1); rerun the same command to resume from "
                    f"it once there is room")
    assert " free of 4.2 MB" in last
    assert "Traceback" not in out + err and "Error in training function" not in out + err
    assert err.count("storage unwritable") == 1 and "epoch 2/3" not in err   # stopped at once, no retry
    r = json.loads((Path(exp.path()) / RESULT).read_text())
    assert r["status"] == "interrupted" and r["interrupted"]["reason"] == last.removeprefix("raywalk train: ")
    assert r["restarts"] == 0 and r["epochs_trained"] == 1
    assert ckpts.listdir() == [".validate_storage_marker", "checkpoint_manager_snapshot.json", "epoch_0001"]
    assert ckpt.read(ckpts.sub("epoch_0001"))["epoch"] == 1                # nothing on disk damaged

    subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)], check=True)   # room again
    assert main(_cli_args(root)) == 0
    err = capfd.readouterr().err
    assert "resuming from" in err and "epoch_0001" in err and "epoch 1/3" not in err
    assert comparable(json.loads((Path(exp.path()) / RESULT).read_text())) == comparable(long_reference)


def test_full_storage_before_ray_is_one_line_too(tmpfs, capfd):
    """The lease is the first write: a storage root that is already full stops there, before Ray starts."""
    (tmpfs / "filler").write_bytes(b"\0" * (4 << 20))       # ENOSPC part-way: the tmpfs is now full
    rc = main(_cli_args(tmpfs / "root"))
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 4 and len(err) == 1, err
    with capfd.disabled():
        print(f"\nfull disk at the lease: the user saw:\n{err[0]}")
    assert err[0].startswith("raywalk train: storage unwritable (no space left): could not write ")
    assert "lease.json" in err[0] and "no intact checkpoint yet; rerun the same command" in err[0]
    assert not any(is_temp(f) for _, _, fs in os.walk(tmpfs) for f in fs)


def test_kills_between_temp_write_and_rename_leave_nothing_a_reader_trips_on(tmp_path, long_reference,
                                                                              monkeypatch):
    """SIGKILL of the rank-0 worker right between writing the temp file and renaming it: first a checkpoint's
    manifest, then the resume record the restart writes, then result.json. Ray restarts the worker group
    each time; the run finishes with the reference's curves, and the temps left behind are never read."""
    cfg = tiny_config(tmp_path, **{**LONG, "run.max_failures": 3})
    marks = {k: tmp_path / f"killed-{k}" for k in ("checkpoint", "resume", "result")}
    kills = {f"/{ckpt.MANIFEST}": str(marks["checkpoint"]), "/resumes/": str(marks["resume"]),
             "/result.json": str(marks["result"])}
    with instrumented(kill_before_rename=kills):
        r = trainer.train(cfg, **quiet)
    assert all(m.exists() for m in marks.values())
    assert r["restarts"] == 3
    exp = Store.open(str(tmp_path)).sub(cfg.experiment_id())
    left = [f for _, _, fs in os.walk(exp.path()) for f in fs if is_temp(f)]
    assert len(left) >= 2, left                                   # the kills really were mid-write
    # 3 restarts, 2 resume records: the one killed before its rename never landed; its temp is not read
    assert len(list_resumes(exp, log=lambda s: pytest.fail(s))) == 2
    assert comparable(r) == comparable(long_reference)
    # the next driver on this experiment sweeps the leftovers (it holds the lease, no workers run yet)
    assert exp.sweep_temps() == len(left)

    # Its last record lost (rank 0's epoch-3 write failed, the driver marked the run interrupted): the
    # checkpoints are complete, so a rerun trains nothing and rebuilds result.json from the newest one.
    lost = {**r, "status": "interrupted", "interrupted": {"reason": "storage unwritable", "at": "T"},
            "epochs_trained": 2, "curves": {k: v[:2] if k != "train_loss" else v[:2 * r["steps_per_epoch"]]
                                            for k, v in r["curves"].items()}}
    exp.write_json(RESULT, lost)
    # ...but first its corpus is rebuilt in another format (a newer raywalk): the rerun refuses in one line
    monkeypatch.setattr(corpus_module, "FORMAT_VERSION", 3)
    with pytest.raises(ConfigError) as refused:
        trainer.train(cfg, **quiet)
    line = str(refused.value)
    assert "\n" not in line and f"experiment {cfg.experiment_id()} was trained on corpus" in line, line
    assert "format 2" in line and "(format 3," in line and "--fresh" in line, line
    assert exp.read_json(RESULT) == lost                          # refused before any worker ran
    monkeypatch.undo()   # the raywalk that built it: its corpus again (rebuilt, the same walks), accepted
    logs: list[str] = []
    again = trainer.train(cfg, progress=False, log=logs.append)
    assert comparable(again) == comparable(long_reference) and exp.read_json(RESULT)["status"] == "failed", logs
    assert not any(l.startswith("epoch ") for l in logs)


def test_a_lease_taken_over_from_a_paused_driver_stops_it_and_the_new_one_finishes(tmp_path, long_reference):
    cfg = tiny_config(tmp_path, **LONG)
    exp = tmp_path / cfg.experiment_id()
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONUNBUFFERED": "1",
           "RAYWALK_LEASE_STALE_AFTER_S": "4"}
    old = subprocess.Popen([sys.executable, "-m", "raywalk.cli", *_cli_args(tmp_path)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(l.decode() for l in old.stdout), daemon=True)
    reader.start()
    stopped: list[int] = []
    try:
        deadline = time.time() + 600   # bounds on a hang, not timing checks
        while not any(l.startswith("epoch 1/3") for l in lines):
            assert old.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
            time.sleep(0.05)
        stopped = session_pids(old.pid)
        for pid in stopped:                       # the driver and its Ray: the whole machine pauses
            os.kill(pid, signal.SIGSTOP)
        holder = json.loads((exp / LEASE).read_text())
        assert holder["pid"] == old.pid
        while time.time() - holder["heartbeat_unix"] < holder["stale_after_s"] + 0.5:
            time.sleep(0.2)
        logs: list[str] = []
        got: dict = {}
        new = threading.Thread(target=lambda: got.update(trainer.train(cfg, progress=False, log=logs.append)))
        new.start()
        while json.loads((exp / LEASE).read_text())["pid"] == old.pid:
            assert new.is_alive() and time.time() < deadline, logs
            time.sleep(0.1)
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        stopped = []
        rc = old.wait(timeout=300)
        reader.join(timeout=10)
        new.join(timeout=600)
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        kill_session(old.pid)
    text = "".join(lines)
    lost = [l for l in lines if l.startswith("raywalk train: lost the lease")]
    print(f"lost lease: the user saw:\n{lost[-1] if lost else text[-2000:]}", file=sys.__stderr__)
    assert rc == 5, text[-3000:]
    assert len(lost) == 1 and f"lost the lease on experiment {cfg.experiment_id()}: another driver holds it " \
        f"now (host " in lost[0] and f"pid {os.getpid()}" in lost[0], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    # An embedded Ray beside the module's: Train's placement-group cleaner found its own cluster (RAY_ADDRESS
    # pinned, ray_env.pin_ray_address), not "Found multiple active Ray instances" and a dead monitor thread.
    assert "multiple active Ray instances" not in text, text[-3000:]
    assert any("taking over experiment" in l and f"pid {old.pid}" in l for l in logs)
    assert comparable(got) == comparable(long_reference)
    assert comparable(json.loads((exp / RESULT).read_text())) == comparable(long_reference)


def test_a_flaky_object_store_ends_exactly_as_an_unfaulted_run(s3_server, long_reference):
    """moto behind a proxy that answers 10% of requests with 503 SlowDown and drops 3% of connections
    (2% before the request reaches the store, 1% after it landed): the clients' retries absorb it all."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with FlakyProxy(s3_server["port"], p_503=0.10, p_drop=0.02, p_drop_after=0.01, seed=7) as proxy:
        uri = f"s3://raywalk-test/flaky?endpoint_override=127.0.0.1:{proxy.port}&scheme=http"
        logs: list[str] = []
        t0 = time.perf_counter()
        r = trainer.train(tiny_config(uri, **LONG), progress=False, log=logs.append)
        took = time.perf_counter() - t0
    st = proxy.stats
    print(f"\nflaky S3: {st} in {took:.0f}s")
    assert st["503"] >= 10 and st["dropped"] >= 2 and st["dropped_after"] >= 1, st   # really faulted
    assert r["restarts"] == 0 and not any(l.startswith("warning") for l in logs), logs
    assert comparable(r) == comparable(long_reference)
    direct = Store.open(s3_server["uri"]("flaky")).sub(r["experiment_id"])   # past the proxy, now closed
    assert direct.read_json(RESULT)["curves"] == long_reference["curves"]
    assert direct.listdir() == ["attempts", "checkpoints", "result.json"]     # lease released, no strays

