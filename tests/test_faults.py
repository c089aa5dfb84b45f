"""tests/faults.py's instruments reach train() and the workers' hot loop, with nothing in the runtime (no Ray here:
the fault tests run them on real workers)."""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import pytest

from raywalk.service import driver, worker
from tests.conftest import tiny_config
from tests.faults import instrumented


class RecordingHooks:
    """A hook factory like the faults': rank 0 records every (epoch, step) it is called at."""
    seen: list = []

    def for_worker(self, rank, checkpoints):
        return self if rank == 0 else None

    def before_step(self, epoch, step):
        self.seen.append((epoch, step))


def test_short_epochs_are_the_drivers_steps_cut_and_restored_after():
    cfg, planned = tiny_config("results"), driver.steps_per_epoch
    with pytest.raises(ValueError, match=r"max_steps_per_epoch: 0 is invalid: must be a whole number >= 1"):
        with instrumented(max_steps_per_epoch=0):
            pass
    with instrumented(max_steps_per_epoch=5):
        assert (driver.steps_per_epoch(cfg, 10_000), driver.steps_per_epoch(cfg, 3 * 64)) == (5, 3)
    assert driver.steps_per_epoch is planned and planned(cfg, 10_000) == 156


def test_hooks_travel_to_the_worker_and_run_first_before_each_step(tmp_path, monkeypatch):
    real_loop = worker.train_loop_per_worker
    with instrumented(RecordingHooks()):
        in_worker = pickle.loads(pickle.dumps(worker.train_loop_per_worker))   # Ray Train ships it to each worker
    assert worker.train_loop_per_worker is real_loop
    ran: list = []

    def run_epoch(state, batches, steps, rank, net, callbacks, previous_end):
        ran.append(len(callbacks))
        for c in callbacks:
            c(state)

    def loop(spec):   # the worker's own loop, as far as the hook goes
        worker.run_epoch(SimpleNamespace(epoch=1, step=3), [], 5, 0, None, [lambda s: ran.append("watch")], None)

    monkeypatch.setattr(worker, "run_epoch", run_epoch)
    monkeypatch.setattr(worker, "train_loop_per_worker", loop)
    in_worker(SimpleNamespace(config=tiny_config(tmp_path), experiment_id="x"))
    assert RecordingHooks.seen == [(2, 3)] and ran == [2, "watch"]   # TrainingState: epochs done, steps of the next
    assert worker.run_epoch is run_epoch   # the worker's process restored
