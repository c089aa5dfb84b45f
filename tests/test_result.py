"""records/result.py: the Result record, built by pure functions, written at the edges."""
from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import numpy as np

from raywalk.science.compliance import Compliance, JumpLengthCounts
from raywalk.records import result
from raywalk.records.result import UNSET, EpochFacts, Result, ResultWriter, build
from raywalk.records.storage import Store
from tests.conftest import tiny_config

CURVES = SimpleNamespace(train_loss=[2.0, 1.5], edge_compliance=[0.99], rule_compliance=[0.5],
                         n_rule_checks=[40], n_distinct_sequences=[16])
# result.json's keys, in the order every run has written them
KEYS = ["experiment_id", "status", "svd_eligible", "failure", "gate", "epochs_trained", "steps_per_epoch", "curves",
        "gate_history", "checkpoints", "restarts", "environment", "updated_at", "config", "corpus", "resumes",
        "data_path", "timing"]


def make(tmp_path, gate_epoch, epochs, by_r, last=Compliance(99, 100, 20, 40), **kw) -> dict:
    cfg = tiny_config(tmp_path)   # w = 4, r_scales 0.5, 1.0 -> r in {2, 4}; max_epochs 5
    e = EpochFacts(CURVES, last, gate_epoch, epochs, 16, 25, by_r=by_r, **kw)
    return build(cfg, "exp", e, checkpoints={}, environment={}, restarts=0).to_json()


def test_failed_run_explains_itself_per_jump_length(tmp_path):
    r = make(tmp_path, None, 5, {2: (30, 18), 4: (10, 2), 6: (0, 0)})
    assert r["status"] == "failed" and "gate not passed after 5 epochs (max_epochs 5)" in r["failure"]["reason"]
    rows = r["failure"]["by_jump_length"]
    assert rows == [
        {"r": 2, "r_over_w": 0.5, "beyond_window": False, "rule_checks": 30, "compliant": 18, "rule_compliance": 0.6},
        {"r": 4, "r_over_w": 1.0, "beyond_window": False, "rule_checks": 10, "compliant": 2, "rule_compliance": 0.2},
        {"r": 6, "r_over_w": 1.5, "beyond_window": True, "rule_checks": 0, "compliant": 0, "rule_compliance": None},
    ]
    assert r["gate"]["by_jump_length"] == rows
    assert sum(x["rule_checks"] for x in rows) == r["failure"]["n_rule_checks"]
    assert list(r["failure"]) == ["reason", "final_edge_compliance", "final_rule_compliance", "n_rule_checks",
                                  "n_distinct_sequences", "by_jump_length"]
    json.dumps(r, allow_nan=False)


def test_passed_run_and_counts_object(tmp_path):
    counts = JumpLengthCounts(np.array([4, 2]), np.array([10, 30]), np.array([9, 27]))  # order does not matter
    r = make(tmp_path, 1, 1, counts, last=Compliance(99, 100, 36, 40))
    assert r["status"] == "passed" and r["svd_eligible"] and r["failure"] is None
    assert [(x["r"], x["rule_checks"], x["compliant"]) for x in r["gate"]["by_jump_length"]] == [(2, 30, 27),
                                                                                                 (4, 10, 9)]
    assert all(type(x["r"]) is int and type(x["rule_checks"]) is int for x in r["gate"]["by_jump_length"])
    # keys as result.json's reader would give them back (strings) work as well
    again = make(tmp_path, 1, 1, {"2": [30, 27], "4": [10, 9]}, last=Compliance(99, 100, 36, 40))
    assert again["gate"]["by_jump_length"] == r["gate"]["by_jump_length"]


def test_without_counts_and_updated_at(tmp_path):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    r = make(tmp_path, None, 1, None)
    assert r["status"] == "running" and r["gate"]["by_jump_length"] is None and r["failure"] is None
    assert "data_path" not in r and "timing" not in r and "corpus" not in r
    t = datetime.fromisoformat(r["updated_at"])
    assert t.tzinfo is not None and before <= t <= datetime.now(timezone.utc) + timedelta(seconds=1)


def test_records_round_trip_key_for_key_partial_and_unknown_ones_too(tmp_path):
    full = make(tmp_path, None, 2, None, timing={"train_seconds": [1.0]}, data_path="resident")
    full = {**full, "corpus": {"id": "c", "uri": "u"}, "resumes": []}
    full = {k: full[k] for k in KEYS}
    assert Result.from_json(full).to_json() == full and list(Result.from_json(full).to_json()) == KEYS
    partial = {"status": "failed", "gate": [1], "someday": {"x": 1}}   # wrong types, a key from a later version
    p = Result.from_json(partial)
    assert p.experiment_id is UNSET and p.gate_epoch is None and p.extra == {"someday": {"x": 1}}
    assert p.to_json() == partial
    done = result.finalised(p, {"kept": []}, 3).to_json()
    assert done == {"status": "failed", "gate": [1], "checkpoints": {"kept": []}, "restarts": 3, "someday": {"x": 1}}
    stopped = result.interrupted(Result(experiment_id="e"), "disk full", at="T").to_json()
    assert stopped == {"experiment_id": "e", "status": "interrupted", "interrupted": {"reason": "disk full", "at": "T"}}


def test_the_writer_writes_only_when_asked(tmp_path):
    cfg = tiny_config(tmp_path)
    root = Store.open(str(tmp_path / "root"))
    w = ResultWriter(root, "exp", cfg, 1, "cpu", "drv", "corpus-uri")
    assert not os.path.exists(root.path("exp"))                         # constructing it writes nothing
    assert w.start() is w and (w.restarts, w.restarts_this_run) == (0, 0)
    assert len(root.sub("exp").listdir("attempts/drv")) == 1           # the attempt marker, explicitly
    w.epoch_done(CURVES, Compliance(99, 100, 36, 40), None, 1, 16, 25, by_r={2: (30, 27)}, data="stream")
    r = result.read(root.sub("exp"))
    assert r.status == "running" and r.corpus == {"id": cfg.corpus_id(), "uri": "corpus-uri"}
    assert list(r.to_json()) == [k for k in KEYS if k != "timing"] and r.data_path == "stream"
    ResultWriter(root, "exp", cfg, 1, "cpu", "drv", "corpus-uri").start()
    assert result.count_restarts(root.sub("exp")) == 1


def test_a_bucket_member_records_its_bucket_and_says_when_it_goes_on_alone(tmp_path):
    cfg = tiny_config(tmp_path)
    root = Store.open(str(tmp_path / "root"))
    block = {"id": "bucket-1234abcd", "members": ["exp", "other"]}
    w = ResultWriter(root, "exp", cfg, 1, "cpu", "drv", "corpus-uri", bucket=block).start()
    w.epoch_done(CURVES, Compliance(99, 100, 36, 40), None, 1, 16, 25)
    assert result.read(root.sub("exp")).extra["bucket"] == block
    solo = ResultWriter(root, "exp", cfg, 1, "cpu", "drv2", "corpus-uri").start()   # `raywalk train` on its config
    solo.epoch_done(CURVES, Compliance(99, 100, 36, 40), None, 2, 16, 25)
    assert result.read(root.sub("exp")).extra["bucket"] == {**block, "continued_solo_from_epoch": 2}


def test_by_jump_length_report():
    rows = result.by_jump_length({"4": [10, 9], 2: (30, 27), 6: (0, 0)}, w=4)   # result.json's string keys too
    assert rows == [
        {"r": 2, "r_over_w": 0.5, "beyond_window": False, "rule_checks": 30, "compliant": 27, "rule_compliance": 0.9},
        {"r": 4, "r_over_w": 1.0, "beyond_window": False, "rule_checks": 10, "compliant": 9, "rule_compliance": 0.9},
        {"r": 6, "r_over_w": 1.5, "beyond_window": True, "rule_checks": 0, "compliant": 0, "rule_compliance": None},
    ]
    counts = JumpLengthCounts(np.array([2, 4]), np.array([30, 10]), np.array([27, 9]))
    assert result.by_jump_length(counts, 4) == rows[:2] and result.by_jump_length(None, 4) is None


def test_one_reader_one_policy(tmp_path):
    exp = Store.open(str(tmp_path)).sub("exp")
    assert result.load(exp) is None and result.read(exp) is None            # no record: None, nothing said
    exp.write_bytes("result.json", b'{"status": "pass')
    logs: list[str] = []
    assert result.read(exp, logs.append) is None and "not valid JSON" in logs[0] and "result.json" in logs[0]
    exp.write_json("result.json", [1, 2])
    try:
        result.load(exp)
        raise AssertionError("a JSON list is not a record")
    except result.Unreadable as e:
        assert "not a JSON object" in str(e)
    exp.write_json("result.json", {"status": "failed"})
    assert result.read_finished(exp).status == "failed"
    exp.write_json("result.json", {"status": "interrupted"})
    assert result.read_finished(exp) is None


def test_statuses_derived_in_one_place():
    assert result.FINISHED == ("passed", "failed") and result.is_finished("passed") and not result.is_finished(None)
    assert [result.sweep_status(s, None) for s in ("passed", "failed", "running", "interrupted", None)] == \
        ["passed", "failed", "running", "interrupted", "not_run"]
    assert [result.sweep_status(s, "boom") for s in ("passed", "running", None)] == ["passed", "error", "error"]
