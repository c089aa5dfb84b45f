"""service/epoch_end.py: one epoch end for both engines: what Ray is told, what the console says."""
import numpy as np

from raywalk.science.compliance import Compliance, JumpLengthCounts
from raywalk.science.loop import Curves, EpochEnd, EpochRun, Timing
from raywalk.service.epoch_end import Console, Experiment, metrics
from tests.conftest import tiny_config


class _Rec:
    def __init__(self, cfg, epoch):
        self.cfg, self.epoch, self.gate_epoch = cfg, epoch, None
        self.curves, self.timing, self.data_path = Curves(), Timing(), "resident"


def _end(loss, rule, passed):
    return EpochEnd(loss, Compliance(99, 100, int(rule * 50), 50), JumpLengthCounts([2], np.zeros(1), np.zeros(1)),
                    passed)


def _bucket(k, tmp_path):
    cfg = tiny_config(tmp_path)
    exps = [Experiment(f"exp-{i}", _Rec(cfg, 2), None, 10, None) for i in range(k)]
    ends = [_end(1.0 + i / 10, 0.5 + i / 100, i == 0) for i in range(k)]
    return cfg, exps, ends


def test_ray_is_told_every_members_figures_and_the_tokens_trained_here(tmp_path):
    cfg, exps, ends = _bucket(3, tmp_path)
    run = EpochRun(None, train_seconds=2.0, first_batch_seconds=0.1, started=0.0, ended=2.0, steps=4)   # resumed at 6 of 10
    m = metrics(exps, run, ends, cfg.train.batch_size, cfg.w)
    assert m["members"] == 3 and m["passed"] == 1 and m["epoch"] == 2
    assert m["experiments"]["exp-1"] == {"loss": 1.1, "edge": 0.99, "rule": 25 / 50, "rule_checks": 50,
                                         "gate_passed": False}
    assert m["tokens_per_second"] == 4 * cfg.train.batch_size * cfg.w * 3 / 2.0   # the steps run, not the epoch's
    solo = metrics(exps[:1], run, ends[:1], cfg.train.batch_size, cfg.w)
    assert solo["loss"] == 1.0 and solo["gate_passed"] is True   # a solo run's figures also at the top


def test_a_bucket_prints_one_line_an_epoch_and_each_member_under_verbose(tmp_path):
    _, exps, ends = _bucket(64, tmp_path)
    lines: list[str] = []
    Console(lines.append, bucket="bucket-1").epoch(exps, ends, 12.0)
    assert len(lines) == 1
    assert lines[0].startswith("bucket bucket-1 epoch 2/5: 64 member(s), 1 passed  loss 1.000-7.300 (median 4.150)")
    assert lines[0].endswith("  12s")
    Console(lines.append, bucket="bucket-1", verbose=True).epoch(exps, ends, 12.0)
    assert len(lines) == 1 + 64 + 1 and lines[1].startswith("[exp-0] epoch 2/5  loss 1.000")
    exps[0].record.gate_epoch = 2
    Console(lines.append, bucket="bucket-1").left(exps[0])
    assert lines[-1] == "[exp-0] leaves the bucket: gate PASSED at epoch 2 after 2 epoch(s)"
    solo: list[str] = []
    Console(solo.append).epoch(exps[:1], ends[:1], 3.0)
    assert solo == ["epoch 2/5  loss 1.000  edge 0.990  rule 0.500  gate PASS  3s"]
