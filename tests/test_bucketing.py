"""service/bucketing.py: which sweep points train together, how many, and what does not fit (pure)."""
import dataclasses

import pytest

from raywalk.config import Config, ConfigError
from raywalk.science.bucket import member_bytes
from raywalk.service import bucketing
from raywalk.service.windows import planned_windows
from raywalk.service.bucket_driver import check_members
from raywalk.service.sweep import parse_sweep

ANCHOR = Config()


def points(*cfgs):
    sweep = parse_sweep({"base": ANCHOR.to_dict(), "grid": {"seed": [1]}})
    return [dataclasses.replace(sweep.points[0], index=i, cfg=c) for i, c in enumerate(cfgs)]


def test_same_shape_points_share_buckets_of_at_most_k_in_point_order():
    same = [ANCHOR.replace(seed=s) for s in range(5)]
    other = ANCHOR.replace(**{"model.d_model": 64})
    ps = points(same[0], other, *same[1:])
    got = bucketing.group(ps, 3)
    assert [[p.index for p in b] for _, b in got] == [[0, 2, 3], [1], [4, 5]]
    assert got[1][0] == other.experiment_id() and got[0][0].startswith("bucket-")   # a bucket of one is the point
    assert [len(b) for _, b in bucketing.group(ps, 1)] == [1] * 6                     # --bucket 1: today's trials
    alone = points(ANCHOR.replace(**{"run.workers": 2}), ANCHOR.replace(**{"run.workers": 2, "seed": 1}),
                   ANCHOR.replace(**{"model.dropout": 0.1}), ANCHOR.replace(**{"model.dropout": 0.1, "seed": 1}))
    assert [len(b) for _, b in bucketing.group(alone, 8)] == [1, 1, 1, 1]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="--bucket"):
            bucketing.group(ps, bad)


def test_a_point_whose_settings_a_bucket_cannot_honour_trains_alone_and_says_why():
    stream = ANCHOR.replace(**{"train.data": "stream", "seed": 9})
    same = [ANCHOR.replace(seed=s) for s in range(3)]
    got = bucketing.group(points(same[0], stream, *same[1:]), 8, host_available=2**40)
    assert [[p.index for p in b] for _, b in got] == [[0, 2, 3], [1]]
    assert "train.data stream" in bucketing.alone_reason(stream, 2**40)
    need = planned_windows(ANCHOR) * (ANCHOR.w + 1) * 2   # int16 windows at n = 500
    assert bucketing.alone_reason(ANCHOR, host_available=4 * need) is None   # within 0.5 of the host
    why = bucketing.alone_reason(ANCHOR, host_available=need)
    assert why.startswith("train.data_budget 0.5: its windows (78.0 MB) exceed the budget (39.0 MB)")
    assert [len(b) for _, b in bucketing.group(points(*same), 8, host_available=need)] == [1, 1, 1]
    resident = ANCHOR.replace(**{"train.data": "resident"})   # asked for resident: the budget does not apply
    assert bucketing.alone_reason(resident, host_available=need) is None


def test_the_default_k_is_what_fits_the_gpu_and_cpu_default_on_a_cpu():
    small = ANCHOR.replace(**{"w": 16, "graph.n": 64, "model.d_model": 64, "model.n_layers": 2,
                              "corpus.walk_length": 64, "corpus.corpus_size": 6400})   # the quickstart model
    assert bucketing.step_flops(small) < bucketing.CPU_BUCKET_FLOPS < bucketing.step_flops(ANCHOR)
    assert bucketing.default_k(small, host_available=2**40) == bucketing.CPU_DEFAULT
    assert bucketing.default_k(ANCHOR, host_available=2**40) == 1   # arithmetic-bound on a CPU: alone
    h200 = ANCHOR.replace(**{"run.gpus_per_worker": 1.0, "run.accelerator_type": "H200"})
    assert bucketing.default_k(h200, 0) == bucketing.GPU_MAX
    big = ANCHOR.replace(**{"run.gpus_per_worker": 0.25, "run.accelerator_type": "T4", "model.d_model": 512,
                            "model.n_layers": 6})
    each = member_bytes(big, planned_windows(big))
    assert bucketing.default_k(big, 0) == int(0.8 * 0.25 * 16 * 2**30 // each) < bucketing.GPU_MAX


def test_a_bucket_that_cannot_fit_is_refused_with_the_estimate_and_the_budget():
    cfgs = [ANCHOR.replace(seed=s) for s in range(4)]
    each = member_bytes(ANCHOR, planned_windows(ANCHOR))
    bucketing.check_fits(cfgs, host_available=int(8 * each / ANCHOR.train.data_budget))
    with pytest.raises(ConfigError, match=r"4 members need about .* GiB .* more than the .* GiB budget "
                                          r"\(train.data_budget 0.5 of the host's free memory\)"):
        bucketing.check_fits(cfgs, host_available=int(2 * each / ANCHOR.train.data_budget))


def test_members_that_one_trainer_cannot_run_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"run.cpus_per_worker: \[1.0, 2.0\]"):
        check_members([ANCHOR, ANCHOR.replace(seed=1, **{"run.cpus_per_worker": 2.0})])
    with pytest.raises(ConfigError, match="run.workers"):
        check_members([ANCHOR.replace(**{"run.workers": 2}), ANCHOR.replace(seed=1, **{"run.workers": 2})])
    with pytest.raises(ConfigError, match="listed twice"):
        check_members([ANCHOR, ANCHOR])
    with pytest.raises(ConfigError, match=r"run.max_failures: \[1, 3\]"):   # one FailureConfig for the bucket
        check_members([ANCHOR, ANCHOR.replace(seed=1, **{"run.max_failures": 1})])
    with pytest.raises(ConfigError, match="train.data: 'stream' is invalid in a bucket"):
        check_members([ANCHOR, ANCHOR.replace(seed=1, **{"train.data": "stream"})])
