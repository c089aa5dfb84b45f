"""The epoch data path: which one a worker takes (plan_data), and the resident path's batches."""
from __future__ import annotations

import pytest
import torch

from raywalk.science.batches import ResidentWindows, epoch_permutation, fill_windows, token_dtype
from raywalk.config import ConfigError, TrainConfig
from raywalk.service.dataset import plan_data

CPU = torch.device("cpu")
N, WIDTH = 600_000, 65          # the anchor's windows: 78 MB as int16


def plan(free, recorded=None, **train):
    return plan_data(TrainConfig(**train), N, WIDTH, 500, CPU, recorded=recorded, free=free)


def test_auto_keeps_the_windows_resident_within_the_budget_and_streams_past_it():
    p = plan(free=10**9)
    assert (p.path, p.nbytes, p.dtype) == ("resident", N * WIDTH * 2, torch.int16)
    assert p.describe() == "resident on cpu, 78.0 MB int16 (within budget 500.0 MB)"
    p = plan(free=10**8)                                     # budget 0.5 x 100 MB < 78 MB
    assert p.path == "stream" and p.describe() == "streaming (windows 78.0 MB > budget 50.0 MB)"
    assert plan(free=10**8, data_budget=1.0).path == "resident"
    assert plan(free=10**9).agreed(False).describe() == "streaming (another rank has too little memory)"
    assert plan(free=10**8).agreed(False).describe() == "streaming (windows 78.0 MB > budget 50.0 MB)"


def test_a_recorded_path_is_kept_and_a_resume_that_cannot_keep_it_is_refused():
    assert plan(free=10**12, recorded="stream").path == "stream"
    assert plan(free=10**8, recorded="resident").path == "resident"     # the budget no longer decides
    with pytest.raises(ConfigError, match=r"recorded data path: 'resident' is invalid on cpu: the windows take "
                                          r"78\.0 MB, more than the 1\.0 MB free there; resume on a worker"):
        plan(free=10**6, recorded="resident")
    with pytest.raises(ConfigError, match=r"train\.data: 'resident' is invalid .* use train\.data=stream"):
        plan(free=10**6, data="resident")
    assert plan(free=10**12, data="stream").describe() == "streaming (train.data=stream)"


def test_ids_take_the_smallest_dtype_that_holds_them():
    assert token_dtype(500) == token_dtype(32768) == torch.int16 and token_dtype(32769) == torch.int32
    assert plan_data(TrainConfig(), 10, 5, 40_000, CPU, free=10**9).nbytes == 10 * 5 * 4


def test_every_window_once_per_epoch_a_fresh_order_each_epoch_and_ranks_split_each_batch():
    windows = torch.arange(1000 * 3, dtype=torch.int16).view(1000, 3)   # row i holds 3i, 3i+1, 3i+2
    one = ResidentWindows(windows, seed=7, batch_size=8)
    e0 = torch.cat(list(one.epoch(0)))
    assert e0.dtype == torch.int64 and e0.shape == (125 * 8, 3)
    assert sorted((e0[:, 0] // 3).tolist()) == list(range(1000))        # a permutation of all windows
    assert not torch.equal(e0, torch.cat(list(one.epoch(1))))
    assert torch.equal(e0[:, 0] // 3, epoch_permutation(1000, 7, 0)[:1000])
    ranks = [list(ResidentWindows(windows, 7, 8, rank=r, world=2).epoch(0)) for r in range(2)]
    glued = torch.cat([torch.cat([a, b]) for a, b in zip(*ranks)])       # rank 0's half, then rank 1's
    assert torch.equal(glued, e0)
    # a mid-epoch resume: the same batches from step 50 on, none of the skipped ones made
    assert torch.equal(torch.cat(list(one.epoch(0, start=50))), e0[50 * 8:])
    assert len(list(one.epoch(0, start=3, steps=10))) == 7


def test_filling_checks_the_count():
    chunks = [torch.arange(6, dtype=torch.int32).view(2, 3).numpy()] * 2
    assert fill_windows(chunks, 4, 3, torch.int16, CPU).tolist() == [[0, 1, 2], [3, 4, 5]] * 2
    with pytest.raises(ValueError, match="gave 4 windows, the corpus manifest says 5"):
        fill_windows(chunks, 5, 3, torch.int16, CPU)


def test_the_driver_builds_streaming_windows_only_for_a_run_that_streams(tmp_path):
    """A run keeps the path it took: after a resident start, train.data=stream must not put the windows in the
    object store beside the workers' tensors (twice in host memory)."""
    from raywalk.records.storage import Store
    from raywalk.service.driver import driver_streams
    from tests.conftest import tiny_config

    exp = Store.open(str(tmp_path))
    stream, auto = tiny_config(tmp_path, **{"train.data": "stream"}), tiny_config(tmp_path)
    assert driver_streams(stream, exp) and not driver_streams(auto, exp)       # a first start
    exp.write_json("result.json", {"status": "running", "data_path": "resident"})
    assert not driver_streams(stream, exp)
    exp.write_json("result.json", {"status": "running", "data_path": "stream"})
    assert driver_streams(stream, exp)
