"""result.json's composition: per-jump-length figures in gate/failure, updated_at."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import numpy as np

from raywalk.science.compliance import Compliance, JumpLengthCounts
from raywalk.records.result import compose
from raywalk.records.storage import Store
from tests.conftest import tiny_config

CURVES = SimpleNamespace(train_loss=[2.0, 1.5], edge_compliance=[0.99], rule_compliance=[0.5],
                         n_rule_checks=[40], n_distinct_sequences=[16])


def make(tmp_path, gate_epoch, finished, by_r, last=Compliance(99, 100, 20, 40)):
    cfg = tiny_config(tmp_path)   # w = 4, r_scales 0.5, 1.0 -> r in {2, 4}
    return compose(cfg, "exp", CURVES, last, gate_epoch, 1, 16, 25, Store.open(str(tmp_path)).sub("exp"),
                   {}, 0, finished, by_r=by_r)


def test_failed_run_explains_itself_per_jump_length(tmp_path):
    r = make(tmp_path, None, True, {2: (30, 18), 4: (10, 2), 6: (0, 0)})
    assert r["status"] == "failed"
    rows = r["failure"]["by_jump_length"]
    assert rows == [
        {"r": 2, "r_over_w": 0.5, "beyond_window": False, "rule_checks": 30, "compliant": 18, "rule_compliance": 0.6},
        {"r": 4, "r_over_w": 1.0, "beyond_window": False, "rule_checks": 10, "compliant": 2, "rule_compliance": 0.2},
        {"r": 6, "r_over_w": 1.5, "beyond_window": True, "rule_checks": 0, "compliant": 0, "rule_compliance": None},
    ]
    assert r["gate"]["by_jump_length"] == rows
    assert sum(x["rule_checks"] for x in rows) == r["failure"]["n_rule_checks"]
    json.dumps(r, allow_nan=False)


def test_passed_run_and_counts_object(tmp_path):
    counts = JumpLengthCounts(np.array([4, 2]), np.array([10, 30]), np.array([9, 27]))  # order does not matter
    r = make(tmp_path, 1, True, counts, last=Compliance(99, 100, 36, 40))
    assert r["status"] == "passed" and r["failure"] is None
    assert [(x["r"], x["rule_checks"], x["compliant"]) for x in r["gate"]["by_jump_length"]] == [(2, 30, 27),
                                                                                                 (4, 10, 9)]
    assert all(type(x["r"]) is int and type(x["rule_checks"]) is int for x in r["gate"]["by_jump_length"])
    # keys as result.json's reader would give them back (strings) work as well
    again = make(tmp_path, 1, True, {"2": [30, 27], "4": [10, 9]}, last=Compliance(99, 100, 36, 40))
    assert again["gate"]["by_jump_length"] == r["gate"]["by_jump_length"]


def test_without_counts_and_updated_at(tmp_path):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    r = make(tmp_path, None, False, None)
    assert r["status"] == "running" and r["gate"]["by_jump_length"] is None and r["failure"] is None
    t = datetime.fromisoformat(r["updated_at"])
    assert t.tzinfo is not None and before <= t <= datetime.now(timezone.utc) + timedelta(seconds=1)
