"""records/checkpoints.py without Ray: names, format, save/verify, resume point, listing, selection for load."""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import pytest
import torch

from raywalk.records import checkpoints as ckpt
from raywalk.records.layout import is_temp
from raywalk.records.storage import Store
from raywalk.science.loop import TrainingState, rng_state
from raywalk.records.checkpoints import resume_hint
from tests.conftest import tiny_config


@dataclass
class Registered:
    """What ray.train.get_checkpoint() hands a worker: a path on a filesystem (ray.train.Checkpoint's two fields)."""
    path: str
    filesystem: pafs.FileSystem = field(default_factory=pafs.LocalFileSystem)


def state(epoch: int, **extra) -> dict:
    return {"epoch": epoch, "model": {"w": torch.full((3,), float(epoch))}, **extra}


def make(run_dir, *names: str) -> Store:
    for n in names:
        ckpt.save(run_dir / n, state(ckpt.position(n)[0], name=n))
    return Store.open(str(run_dir))


def tear(run_dir, name: str) -> None:
    p = run_dir / name / ckpt.STATE
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def test_names_sort_in_training_order(tmp_path):
    names = ["epoch_0002", "epoch_0001_step_000150", "epoch_0010", "epoch_0001", "epoch_0002_step_000003",
             "epoch_0002_step_1000000"]
    assert [ckpt.position(n) for n in names] == [(2, 0), (1, 150), (10, 0), (1, 0), (2, 3), (2, 1000000)]
    assert ckpt.dir_name(1, 150) == "epoch_0001_step_000150" and ckpt.dir_name(3) == "epoch_0003"
    assert [ckpt.is_mid_epoch(n) for n in names] == [False, True, False, False, True, True]
    assert not any(ckpt.is_checkpoint(n) for n in ("epoch_1", "epoch_0001_step_1", "checkpoint_manager_snapshot.json",
                                                   ".raywalk-tmp-0.manifest.json.part"))
    with pytest.raises(ValueError, match="not a checkpoint directory name"):
        ckpt.position("epoch_1")
    run = make(tmp_path, *names)
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")   # Ray's, beside ours
    assert ckpt.names(run) == ["epoch_0001", "epoch_0001_step_000150", "epoch_0002", "epoch_0002_step_000003",
                               "epoch_0002_step_1000000", "epoch_0010"]
    assert ckpt.candidates(run, None) == ckpt.names(run)[::-1]
    # from a given one down: only older ones follow (a newer one is never used in its place)
    assert ckpt.candidates(run, "epoch_0002") == ["epoch_0002", "epoch_0001_step_000150", "epoch_0001"]


def test_save_writes_the_state_then_the_manifest_that_vouches_for_it(tmp_path):
    d = tmp_path / "epoch_0001"
    ckpt.save(d, state(1))
    assert sorted(os.listdir(d)) == [ckpt.MANIFEST, ckpt.STATE]   # no temp left behind
    data = (d / ckpt.STATE).read_bytes()
    m = json.loads((d / ckpt.MANIFEST).read_text())
    assert m == {"files": {ckpt.STATE: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}, "epoch": 1}
    s = ckpt.read(Store.open(str(d)))
    assert s["format"] == ckpt.FORMAT and s["epoch"] == 1 and torch.equal(s["model"]["w"], torch.ones(3))
    assert ckpt.pack(state(1))[ckpt.MANIFEST] == (d / ckpt.MANIFEST).read_bytes()   # the same bytes, every time


@pytest.mark.parametrize("damage, why", [("truncate", "truncated"), ("missing_manifest", "manifest.json is missing"),
                                         ("flip", "sha256"), ("incomplete", "incomplete"),
                                         ("unreadable", "unreadable"), ("no_state", "state.pt is missing")])
def test_torn_or_tampered_checkpoints_are_detected(tmp_path, damage, why):
    d = tmp_path / "epoch_0001"
    ckpt.save(d, {"epoch": 1, "model": {"w": torch.arange(100.0)}})
    data = (d / ckpt.STATE).read_bytes()
    if damage == "truncate":
        (d / ckpt.STATE).write_bytes(data[:-10])
    elif damage == "missing_manifest":
        (d / ckpt.MANIFEST).unlink()
    elif damage == "flip":
        (d / ckpt.STATE).write_bytes(data[:50] + bytes([data[50] ^ 1]) + data[51:])
    elif damage == "incomplete":
        (d / ckpt.MANIFEST).write_text('{"epoch": 1}')
    elif damage == "unreadable":
        (d / ckpt.MANIFEST).write_text('{"files": ')
    else:
        (d / ckpt.STATE).unlink()
    with pytest.raises(ckpt.CheckpointError, match=why):
        ckpt.read(Store.open(str(d)))


class Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())


def test_a_checkpoint_with_a_pickled_object_is_refused_and_the_resume_goes_back(tmp_path):
    ckpt.save(tmp_path / "epoch_0001", state(1, extra=Sneaky()))
    with pytest.raises(ckpt.CheckpointError, match="not plain data"):
        ckpt.read(Store.open(str(tmp_path / "epoch_0001")))
    run = make(tmp_path, "epoch_0000")
    warnings: list[str] = []
    s, name = ckpt.resume_point(run, Registered(str(tmp_path / "epoch_0001")), warnings.append)
    assert name == "epoch_0000" and torch.equal(s["model"]["w"], torch.zeros(3))
    assert warnings == [f"warning: skipping checkpoint {run.child_uri('epoch_0001')}: refusing a checkpoint that "
                        f"is not plain data (it would run code to load): " + warnings[0].split("load): ", 1)[1]]


def test_the_resume_point_is_rays_registered_checkpoint(tmp_path):
    run = make(tmp_path / "run", "epoch_0001", "epoch_0002", "epoch_0002_step_000005", "epoch_0003")
    warnings: list[str] = []
    # Ray registered none (a driver killed within Ray's 2 s poll of its first report): the newest on disk
    assert ckpt.resume_point(run, None, warnings.append)[1] == "epoch_0003"
    assert ckpt.resume_point(Store.open(str(tmp_path / "none")), None, warnings.append) == (None, None)
    # Ray registered epoch_0002; epoch_0002_step_000005 and epoch_0003 were reported but not registered
    s, name = ckpt.resume_point(run, Registered(run.path("epoch_0002") + "/"), warnings.append)
    assert (name, s["name"]) == ("epoch_0002", "epoch_0002") and warnings == []
    # read where Ray points, not looked up again in the run directory
    ckpt.save(tmp_path / "elsewhere" / "epoch_0002", state(2, name="Ray's copy"))
    s, name = ckpt.resume_point(run, Registered(str(tmp_path / "elsewhere" / "epoch_0002")), warnings.append)
    assert (name, s["name"]) == ("epoch_0002", "Ray's copy")


def test_a_torn_registered_checkpoint_falls_back_to_the_newest_older_intact_one(tmp_path):
    run = make(tmp_path, "epoch_0001", "epoch_0001_step_000007", "epoch_0002", "epoch_0003")
    tear(tmp_path, "epoch_0002")
    tear(tmp_path, "epoch_0001_step_000007")
    warnings: list[str] = []
    s, name = ckpt.resume_point(run, Registered(run.path("epoch_0002")), warnings.append)
    assert name == "epoch_0001" and s["epoch"] == 1                  # never the newer epoch_0003
    assert len(warnings) == 2 and all(w.startswith(f"warning: skipping checkpoint {run.child_uri(n)}: ")
                                      for w, n in zip(warnings, ("epoch_0002", "epoch_0001_step_000007")))
    assert "truncated" in warnings[0]
    tear(tmp_path, "epoch_0001")
    assert ckpt.resume_point(run, Registered(run.path("epoch_0002")), lambda w: None) == (None, None)


def test_listing_and_the_result_block(tmp_path):
    exp = Store.open(str(tmp_path)).sub("exp1")
    run = exp.sub(ckpt.RUN_DIR)
    assert ckpt.names(run) == [] and ckpt.info(exp, None) == {"directory": run.uri, "kept": [], "latest": None,
                                                               "gate": None}
    make(tmp_path / "exp1" / ckpt.RUN_DIR, "epoch_0001", "epoch_0002", "epoch_0002_step_000004")
    os.remove(run.path("epoch_0002_step_000004", ckpt.MANIFEST))   # being written: not listed as kept
    assert ckpt.names(run, complete=True) == ["epoch_0001", "epoch_0002"]
    assert ckpt.info(exp, 2) == {"directory": run.uri, "kept": [run.child_uri("epoch_0001"), run.child_uri("epoch_0002")],
                                 "latest": run.child_uri("epoch_0002"), "gate": run.child_uri("epoch_0002")}
    assert ckpt.info(exp, 5)["gate"] is None   # evicted or never written: not claimed


def test_newest_intact_checkpoint_skips_torn_and_incomplete_ones(tmp_path):
    exp = Store.open(str(tmp_path / "root")).sub("exp1")
    run = exp.sub(ckpt.RUN_DIR)
    assert resume_hint(exp).startswith("no intact checkpoint yet")
    for e in (1, 2, 3):
        ckpt.save(run.path(ckpt.dir_name(e)), {"epoch": e, "x": [e]})
    data = run.read_bytes("epoch_0003/state.pt")
    run.write_bytes("epoch_0003/state.pt", data[: len(data) // 2])      # torn by a full disk
    run.write_bytes("epoch_0002/manifest.json", b'{"epoch": 2}')         # a manifest without its files
    assert ckpt.newest_intact(run) == ("epoch_0001", 1)
    assert resume_hint(exp) == (f"newest intact checkpoint {run.child_uri('epoch_0001')} (epoch 1); rerun the same "
                                f"command to resume from it once there is room")
    assert not any(is_temp(f) or f.endswith(".tmp") for f in os.listdir(run.path("epoch_0001")))


def test_selection_for_load(tmp_path):
    run = make(tmp_path, "epoch_0003", "epoch_0004", "epoch_0005", "epoch_0005_step_000002")
    assert ckpt.epochs_on_disk(run) == "3, 4, 5"
    s, name = ckpt.select(run, 4, lambda w: None)
    assert (name, s["epoch"]) == ("epoch_0004", 4)
    warnings: list[str] = []
    assert ckpt.select(run, None, warnings.append)[1] == "epoch_0005_step_000002" and warnings == []   # latest
    tear(tmp_path, "epoch_0005_step_000002")
    assert ckpt.select(run, None, warnings.append)[1] == "epoch_0005" and "epoch_0005_step_000002" in warnings[0]
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint .*epoch_0001 \(epochs on disk: 3, 4, 5; "
                                                   r"the last 3 and the gate checkpoint are kept\)"):
        ckpt.select(run, 1, lambda w: None)
    tear(tmp_path, "epoch_0005")
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint .*epoch_0005 is unusable: .*truncated"):
        ckpt.select(run, 5, lambda w: None)
    empty = Store.open(str(tmp_path / "none"))
    with pytest.raises(ckpt.CheckpointError, match=r"no usable checkpoint under .*none \(epochs on disk: none\)"):
        ckpt.select(empty, None, lambda w: None)


def test_a_checkpoint_written_before_still_loads_and_resumes(tmp_path):
    """The directory as raywalk wrote it before checkpoints had one home, built here byte by byte."""
    cfg = tiny_config(tmp_path)
    a = TrainingState.create(cfg, steps_per_epoch=4)
    a.epoch, a.timing.train_seconds = 1, [0.5]
    old = {"format": 1, **a.state_dict([rng_state()], "exp-old")}   # the layout then: "format" inside
    buf = io.BytesIO()
    torch.save(old, buf)
    d = tmp_path / ckpt.RUN_DIR / "epoch_0001"
    d.mkdir(parents=True)
    (d / "state.pt").write_bytes(buf.getvalue())
    (d / "manifest.json").write_text(json.dumps({"files": {"state.pt": {
        "size": len(buf.getvalue()), "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}}, "epoch": 1}))
    run = Store.open(str(tmp_path / ckpt.RUN_DIR))
    s, name = ckpt.resume_point(run, Registered(str(d)), lambda w: pytest.fail(w))
    b = TrainingState.create(cfg, steps_per_epoch=4)
    b.load_state_dict(s)
    assert name == "epoch_0001" and b.epoch == 1 and s["experiment_id"] == "exp-old"
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    assert ckpt.select(run, 1, lambda w: None)[0]["format"] == 1
    # and what is written now has the same layout: the same keys, "format" among them
    assert ckpt.unpack(ckpt.pack(a.state_dict([rng_state()], "exp-old"))).keys() == s.keys()


def test_the_corpus_a_run_was_trained_on_is_checked_on_resume(tmp_path):
    """Checkpoints record the corpus's identity in their manifest; the driver refuses another corpus in one
    line, and accepts checkpoints from before the record (nothing to compare)."""
    from types import SimpleNamespace

    from raywalk.config import ConfigError
    from raywalk.records.corpus import identity
    from raywalk.service.driver import check_same_corpus

    m = {"config_hash": "c1", "format_version": 2, "checksums": {"train/part-0.parquet": {"size": 1, "sha256": "a"}}}
    newer = {**m, "format_version": 3}
    run = tmp_path / "exp" / ckpt.RUN_DIR
    ckpt.save(run / "epoch_0001", state(1))                              # before the record: none
    ckpt.save(run / "epoch_0002", state(2), corpus=identity(m))
    exp = Store.open(str(tmp_path / "exp"))
    assert ckpt.corpora(exp.sub(ckpt.RUN_DIR)) == {"epoch_0002": identity(m)}
    check_same_corpus(exp, "e", SimpleNamespace(identity=identity(m), uri="/c"))   # the same one: goes on
    with pytest.raises(ConfigError) as refused:
        check_same_corpus(exp, "e", SimpleNamespace(identity=identity(newer), uri="/c"))
    assert "\n" not in str(refused.value) and "was trained on corpus c1 format 2" in str(refused.value)
    assert identity(newer)["sha256"] == identity(m)["sha256"]   # the same files: the format alone tells them apart
