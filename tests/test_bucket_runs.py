"""Buckets on the session's local Ray: a bucketed sweep (one Tune trial, one fit, four experiments), its
members as complete experiments on disk, and a bucket whose worker is SIGKILLed mid-epoch resuming exactly."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

import raywalk
from raywalk.config import Config
from raywalk.records import checkpoints as ckpt
from raywalk.records.overview import scan
from raywalk.records.storage import Store
from raywalk.service.bucket_driver import train_bucket
from raywalk.service.sweep import parse_sweep
from raywalk.service.sweep_summary import read_csv
from raywalk.service.tune import run_sweep
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("local_ray")

MAX_EPOCHS = 3


def sweep_spec(storage) -> dict:
    base = json.loads(json.dumps(TINY))
    # 750 steps an epoch: long enough for a kill from outside to land inside one
    base["corpus"].update(corpus_size=16000, shard_size=4096)
    base["train"]["max_epochs"] = MAX_EPOCHS
    base["gate"].update(sequences=32, edge=0.0)
    base["run"].update(storage=str(storage), cpus_per_worker=0.5)
    # gate.rule 0.0 passes at epoch 1 (edge > 0 and any rule check); 1.0 never passes ("rule > 1.0"): those
    # members train on in the bucket after the others have left, and fail after MAX_EPOCHS
    return {"name": "tiny-bucket", "base": base, "grid": {"gate.rule": [0.0, 1.0], "seed": [3, 4]}, "bucket": 4}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("bucketed") / "results"
    spec = sweep_spec(root)
    spec["base"]["run"]["trackers"] = ["mlflow"]   # each member's MLflow run carries its sweep and grid point
    sweep = parse_sweep(spec)
    summary = run_sweep(sweep, max_concurrent=2, log=lambda s: None)
    return sweep, summary, Store.open(str(root)), root


def test_a_bucketed_sweep_trains_its_points_in_one_trial_then_a_rerun_trains_nothing(swept, tmp_path):
    sweep, summary, root, _ = swept
    sd = root.sub("sweeps", sweep.sweep_id)
    results = {p.experiment_id: root.read_json(f"{p.experiment_id}/result.json") for p in sweep.points}
    bucket = {r["bucket"]["id"] for r in results.values()}
    assert len(bucket) == 1 and all(sorted(r["bucket"]["members"]) == sorted(results) for r in results.values())
    assert (summary["trials_run"], summary["points_run"]) == (1, 4) and root.listdir("buckets") == list(bucket)
    disk = sd.read_json("summary.json")
    assert disk == json.loads(json.dumps(summary))
    for row in disk["rows"]:
        r = results[row["experiment_id"]]
        passing = row["grid"]["gate.rule"] == 0.0
        # a member that passes leaves at epoch 1, the others train on to max_epochs
        assert (r["status"], r["epochs_trained"]) == (("passed", 1) if passing else ("failed", MAX_EPOCHS))
        assert len(r["curves"]["train_loss"]) == r["epochs_trained"] * r["steps_per_epoch"]
        assert row["bucket"] == r["bucket"]["id"] and row["status"] == r["status"]
        assert row["final_rule_compliance"] == r["gate"]["final_rule_compliance"]
        assert row["svd_eligible"] == r["svd_eligible"] == passing
        kept = [n.rsplit("/", 1)[-1] for n in r["checkpoints"]["kept"]]
        assert kept == ([ckpt.dir_name(1)] if passing else [ckpt.dir_name(e) for e in range(1, MAX_EPOCHS + 1)])
    # Ray's own record of the trial (Tune's result.json) holds every member's curve, epoch by epoch
    reported = [json.loads(line) for f in (Path(sd.path()) / "tune").glob("*/result.json")
                for line in f.read_text().splitlines()]
    per_epoch = [r["experiments"] for r in reported if "experiments" in r]
    for eid, r in results.items():
        assert [e[eid]["rule"] for e in per_epoch if eid in e] == r["curves"]["rule_compliance"]
        assert [e[eid]["edge"] for e in per_epoch if eid in e] == r["curves"]["edge_compliance"]
    rows = read_csv(sd.read_bytes("summary.csv").decode())
    assert [c["bucket"] for c in rows] == [r["bucket"] for r in disk["rows"]]

    from tests.test_trackers import mlflow_runs
    for p in sweep.points:
        c, runs = mlflow_runs(root.path(), p.experiment_id)
        assert len(runs) == 1 and runs[0].data.tags["raywalk.sweep_id"] == sweep.sweep_id
        steps = sorted(m.step for m in c.get_metric_history(runs[0].info.run_id, "train_loss"))
        assert steps == list(range(1, len(results[p.experiment_id]["curves"]["train_loss"]) + 1))

    mtimes = {e: root.fs.get_file_info(root.path(f"{e}/result.json")).mtime for e in results}
    again = run_sweep(sweep, max_concurrent=2, log=lambda s: None)
    assert (again["trials_run"], again["points_run"]) == (0, 0) and not any(r["trained_now"] for r in again["rows"])
    assert {e: root.fs.get_file_info(root.path(f"{e}/result.json")).mtime for e in results} == mtimes

    from raywalk.plot import plot_sweep
    assert plot_sweep(again, tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_bucket_members_load_export_and_list_like_solo_experiments(swept, tmp_path):
    sweep, _, root, path = swept
    listed = {e["experiment_id"]: e for e in scan(root)["experiments"]}
    assert set(listed) == {p.experiment_id for p in sweep.points}   # buckets/ is not an experiment
    for p in sweep.points:
        r = root.read_json(f"{p.experiment_id}/result.json")
        assert listed[p.experiment_id]["status"] == r["status"]
        exp = raywalk.load(path / p.experiment_id, checkpoint="gate" if r["status"] == "passed" else "latest")
        assert type(exp.model).__name__ == "GPT" and exp.config.seed == p.cfg.seed
        if r["status"] == "passed":
            manifest = exp.export(tmp_path / p.experiment_id)
            assert (tmp_path / p.experiment_id / "model.pt").is_file() and manifest["experiment_id"] == p.experiment_id


def _kill_mid_epoch(runs: list, killed: list, stop: threading.Event) -> None:
    """Once every run has its epoch-1 checkpoint, wait into epoch 2 and SIGKILL the training worker."""
    from ray.util.state import list_actors

    while not stop.is_set():
        if all((r / ckpt.dir_name(1) / "manifest.json").is_file() for r in runs):
            time.sleep(0.5)
            for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]):
                os.kill(a.pid, signal.SIGKILL)
                killed.append(a.pid)
            return
        time.sleep(0.05)


def test_a_bucket_killed_mid_epoch_resumes_every_member_exactly(swept, tmp_path):
    sweep, _, ref_root, _ = swept
    cfgs = [Config.from_dict({**p.cfg.to_dict(), "run": {**p.cfg.to_dict()["run"], "trackers": [],
                                                          "storage": str(tmp_path)}}) for p in sweep.points]
    runs = [tmp_path / c.experiment_id() / "checkpoints" for c in cfgs if c.gate.rule == 1.0]
    killed: list[int] = []
    stop = threading.Event()
    t = threading.Thread(target=_kill_mid_epoch, args=(runs, killed, stop), daemon=True)
    t.start()
    try:
        got = train_bucket(cfgs, progress=False, log=lambda s: None)
    finally:
        stop.set()
        t.join()
    assert killed, "the bucket finished before the kill"
    for p, r in zip(sweep.points, got):
        want = ref_root.read_json(f"{p.experiment_id}/result.json")
        assert r["curves"] == want["curves"] and r["status"] == want["status"]
        if p.cfg.gate.rule == 1.0:   # trained through the kill
            assert r["restarts"] == 1 and [x["reason"] for x in r["resumes"]] == ["failure"]
        last = ckpt.dir_name(r["epochs_trained"])
        a = ckpt.read(Store.open(str(tmp_path)).sub(r["experiment_id"], "checkpoints", last))
        b = ckpt.read(ref_root.sub(r["experiment_id"], "checkpoints", last))
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
        assert all(torch.equal(x, y) for s, u in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
                   for x, y in zip(s.values(), u.values()))


def test_members_whose_final_records_were_lost_are_rebuilt_by_a_rerun_of_the_bucket(swept, tmp_path):
    import shutil

    from tests.helpers import comparable

    sweep, _, ref_root, path = swept
    copy = tmp_path / "results"
    shutil.copytree(path, copy, ignore=shutil.ignore_patterns("mlruns", "sweeps", "buckets"))
    for p in sweep.points:   # every final write lost: each record as it stood an epoch before, still running
        f = copy / p.experiment_id / "result.json"
        r = json.loads(f.read_text())
        steps = r["steps_per_epoch"]
        r.update(status="running", epochs_trained=r["epochs_trained"] - 1)
        r["curves"] = {k: v[:-steps] if k == "train_loss" else v[:-1] for k, v in r["curves"].items()}
        f.write_text(json.dumps(r))
    cfgs = [p.cfg.replace(**{"run.storage": str(copy), "run.trackers": []}) for p in sweep.points]
    got = train_bucket(cfgs, progress=False, log=lambda s: None)   # all four restart together, none trains
    for p, r in zip(sweep.points, got):
        want = ref_root.read_json(f"{p.experiment_id}/result.json")
        assert comparable(r) == comparable(want)
        assert comparable(json.loads((copy / p.experiment_id / "result.json").read_text())) == comparable(want)
        assert sorted(os.listdir(copy / p.experiment_id / "checkpoints")) == \
            sorted(os.listdir(path / p.experiment_id / "checkpoints"))   # nothing trained, nothing written


def test_a_member_continued_alone_finishes_with_its_checkpoints_kept_as_a_solo_runs(tmp_path):
    from raywalk.service.driver import train

    spec = sweep_spec(tmp_path)
    spec["base"]["train"]["max_epochs"] = 5
    spec["base"]["run"]["max_failures"] = 0   # the kill ends the bucket: stopped mid-way
    cfgs = [p.cfg for p in parse_sweep({**spec, "grid": {"gate.rule": [1.0], "seed": [3, 4]}}).points]
    runs = [tmp_path / c.experiment_id() / "checkpoints" for c in cfgs]
    killed: list[int] = []
    stop = threading.Event()
    t = threading.Thread(target=_kill_mid_epoch, args=(runs, killed, stop), daemon=True)
    t.start()
    try:
        with pytest.raises(Exception):
            train_bucket(cfgs, progress=False, log=lambda s: None)
    finally:
        stop.set()
        t.join()
    assert killed and all(sorted(os.listdir(r))[-1] == ckpt.dir_name(1) for r in runs)
    lines: list[str] = []
    r = train(cfgs[0], progress=False, log=lines.append)   # its config alone: `raywalk train` on it
    assert r["status"] == "failed" and r["epochs_trained"] == 5
    assert r["bucket"]["continued_solo_from_epoch"] == 2
    assert len(r["curves"]["train_loss"]) == 5 * r["steps_per_epoch"]
    kept = sorted(n for n in os.listdir(runs[0]) if n.startswith("epoch_"))
    assert kept == [ckpt.dir_name(e) for e in (3, 4, 5)]   # the bucket's epoch 1 pruned as Ray prunes its own
    assert [n.rsplit("/", 1)[-1] for n in r["checkpoints"]["kept"]] == kept


def _epoch_1_recorded(results: list[Path]) -> bool:
    try:
        return all(json.loads(f.read_text())["epochs_trained"] >= 1 for f in results)
    except (OSError, ValueError, KeyError):   # not there yet
        return False


def _fill_once(fs: Path, results: list[Path], stop: threading.Event, leave: int = 65536) -> None:
    """Once every result.json in `results` records epoch 1, fill the filesystem at fs up to `leave` bytes free
    (a shared disk filling up under the sweep): room to mark a run interrupted (result.json after one epoch:
    about 21 KB), not for an epoch's checkpoint (86 KB)."""
    while not stop.is_set():
        if _epoch_1_recorded(results):
            st = os.statvfs(fs)
            size = max(0, st.f_bavail * st.f_frsize - leave)
            with contextlib.suppress(OSError), open(fs / "filler", "wb") as f:
                while size > 0:
                    f.write(b"\0" * min(size, 1 << 20))
                    size -= min(size, 1 << 20)
            return
        time.sleep(0.02)


def _tune_cli(spec: dict, where: Path, capfd, *extra: str) -> tuple[int, str]:
    """`raywalk tune` on the sweep `spec`, as a user runs it (this process joins the session's Ray)."""
    from raywalk.cli import main

    (where / "sweep.yaml").write_text(yaml.safe_dump(spec))
    rc = main(["tune", str(where / "sweep.yaml"), "--max-concurrent", "2", *extra])
    out, err = capfd.readouterr()
    return rc, out + err


def _filled_sweep(spec: dict, fs: Path, watch: list[Path], capfd, *extra: str) -> tuple[int, str]:
    stop = threading.Event()
    t = threading.Thread(target=_fill_once, args=(fs, watch, stop), daemon=True)
    t.start()
    try:
        return _tune_cli(spec, fs.parent, capfd, *extra)
    finally:
        stop.set()
        t.join()


def test_a_full_disk_under_a_sweep_stops_it_in_one_line_and_the_rerun_finishes_as_a_clean_sweep(swept, tmp_path,
                                                                                              capfd):
    """The disk fills in epoch 2 under a bucketed sweep (4 points in one trial, two still training), then under
    a sweep's solo trial (--bucket 1): each time one line, exit 4, no traceback, no Tune retry into the full
    disk, every unfinished point `interrupted` with its resume hint. The bucketed sweep, rerun with room,
    finishes with the curves of the clean one (the module's `swept`). (A solo trial's rerun is `raywalk
    train`'s, test_storage_faults.)"""
    from raywalk.records.result import RESULT
    from tests.conftest import mounted_tmpfs
    from tests.helpers import comparable

    sweep, _, ref_root, _ = swept
    clean = {p.experiment_id: ref_root.read_json(f"{p.experiment_id}/{RESULT}") for p in sweep.points}
    solo = {**sweep_spec("unset"), "grid": {"gate.rule": [1.0], "seed": [3]}}   # one point: a solo trial
    for i, (spec, extra) in enumerate([(sweep_spec("unset"), ()), (solo, ("--bucket", "1"))]):
        fs = tmp_path / f"sweep{i}" / "small"
        fs.mkdir(parents=True)
        with mounted_tmpfs(fs, "16m"):
            root = fs / "root"
            spec["base"]["run"]["storage"] = str(root)
            uri = Store.open(str(root)).uri
            this = parse_sweep(spec)
            points = this.points
            rc, text = _filled_sweep(spec, fs, [root / p.experiment_id / RESULT for p in points], capfd, *extra)
            assert (fs / "filler").exists() and rc == 4, text[-3000:]
            told = [l for l in text.splitlines() if "storage unwritable" in l]
            assert len(told) == 1 and told[0].startswith("raywalk tune: storage unwritable (no space left): could "
                                                         f"not write {uri}/"), text[-3000:]
            assert told[0].endswith("rerun the same command to resume them once there is room"), told
            # no traceback: not the trial's, not Tune's retry of it, not Tune's own state sync failing
            assert "Traceback" not in text and "Trial task failed" not in text, text[-3000:]
            assert "ERROR" not in text and "experiment state" not in text, text[-3000:]
            for p in points:
                r = json.loads((root / p.experiment_id / RESULT).read_text())
                if p.cfg.gate.rule == 0.0:   # passed at epoch 1 and left the bucket before the disk filled
                    assert (r["status"], r["epochs_trained"]) == ("passed", 1)
                    continue
                assert (r["status"], r["epochs_trained"]) == ("interrupted", 1), p.experiment_id
                reason = r["interrupted"]["reason"]
                assert reason.startswith("storage unwritable (no space left): could not write ")
                newest = Store.open(uri).sub(p.experiment_id, ckpt.RUN_DIR).child_uri(ckpt.dir_name(1))
                assert reason.endswith(f"; newest intact checkpoint {newest} (epoch 1); rerun the same command to "
                                       f"resume from it once there is room"), reason
            with capfd.disabled():
                print(f"\nfull disk under a sweep {' '.join(extra)}: the user saw:\n{told[0]}")
            if extra:
                continue

            subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)   # room again
            rc, text = _tune_cli(spec, fs.parent, capfd, *extra)
            assert rc == 0 and "Traceback" not in text, text[-3000:]
            for p in points:
                assert comparable(json.loads((root / p.experiment_id / RESULT).read_text())) == \
                    comparable(clean[p.experiment_id]), p.experiment_id
            summary = json.loads((root / "sweeps" / this.sweep_id / "summary.json").read_text())
            assert (summary["trials_run"], summary["points_run"]) == (1, 2)   # the two left, in one bucket
            assert f"summary: {uri}/sweeps/{this.sweep_id}/summary.json (and summary.csv); 2 point(s) run in 1 " \
                   f"Tune trial(s) in " in text
