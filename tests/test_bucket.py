"""science/bucket.py: k same-shape members in one batched step, each still its own experiment."""
import pytest
import torch

from raywalk.config import Config, ConfigError
from raywalk.science.batches import ResidentWindows
from raywalk.science.bucket import (BucketState, BucketWindows, check_bucketable, clip_rows_, run_bucket_epoch)
from raywalk.science.loop import TrainingState, optimizer_step
from tests.helpers import RefuseHostDefaults

STEPS = 6
BASE = Config().replace(**{"w": 8, "graph.n": 32, "graph.K": 2, "model.d_model": 16, "model.n_layers": 2,
                           "model.n_heads": 2, "train.batch_size": 8, "train.max_epochs": 2})


def members(*seeds):
    return [BASE.replace(seed=s) for s in seeds]


def windows(cfg, i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(0, cfg.graph.n, (cfg.train.batch_size * STEPS, cfg.w + 1), generator=g, dtype=torch.int16)


def data(cfgs):
    return [ResidentWindows(windows(c, c.seed), c.seed, c.train.batch_size) for c in cfgs]   # a member's own corpus


def test_members_start_from_their_solo_initial_weights_bit_for_bit():
    cfgs = members(1, 2, 3)
    b = BucketState(cfgs, STEPS)
    for i, c in enumerate(cfgs):
        solo = TrainingState.create(c, STEPS).model.state_dict()
        mine = b.member_state(i)["model"]
        assert mine.keys() == solo.keys()
        assert all(torch.equal(mine[n], solo[n]) for n in solo)


def test_each_members_losses_follow_its_solo_run():
    # fp32: the batched GEMMs and layer norms round differently from the solo kernels by an ulp or
    # so per op (losses ~3.5, so ~4e-7); AdamW's normalised steps keep six steps' drift far below 1e-5
    cfgs = members(1, 2, 3)
    b = BucketState(cfgs, STEPS)
    solos = [TrainingState.create(c, STEPS) for c in cfgs]
    solo_batches = [d.epoch(0) for d in data(cfgs)]
    for tok in BucketWindows(data(cfgs)).epoch(0):
        got = b.train_step(tok)
        for i, s in enumerate(solos):
            t = next(solo_batches[i])
            assert torch.equal(t, tok[i])   # its own windows, in its own (seed, epoch) order
            want = optimizer_step(s.model, s.optimizer, s.scheduler, t, s.cfg.train.grad_clip, False)
            assert abs(got[i].item() - want.item()) < 1e-5


def test_a_member_checkpoint_is_a_solo_checkpoint_and_comes_back_exactly():
    cfgs = members(4, 5)
    b = BucketState(cfgs, STEPS)
    run_bucket_epoch(b, BucketWindows(data(cfgs)).epoch(0))
    states = [b.member_state(i) for i in range(2)]
    solo = TrainingState.create(cfgs[1], STEPS)
    solo.load_state_dict(states[1])   # today's format: a member rerun alone goes on from it
    assert solo.scheduler.last_epoch == STEPS and solo.step == 0
    again = BucketState(cfgs, STEPS)
    again.load_members(states)
    assert torch.equal(again.rows, b.rows)
    for k in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(again.optimizer.state[again.rows][k], b.optimizer.state[b.rows][k])
    tok = next(BucketWindows(data(cfgs)).epoch(1))
    assert torch.equal(again.train_step(tok), b.train_step(tok))


def test_a_member_leaving_does_not_change_the_others():
    three, two = members(1, 2, 3), members(1, 3)
    b3, b2 = BucketState(three, STEPS), BucketState(two, STEPS)
    d3, d2 = BucketWindows(data(three)), BucketWindows(data([three[0], three[2]]))
    it3, it2 = d3.epoch(0), d2.epoch(0)
    b3.train_step(next(it3)), b2.train_step(next(it2))
    left = b3.drop([1])
    d3.keep([0, 2])
    assert [m.cfg.seed for m in left] == [2] and [m.cfg.seed for m in b3.members] == [1, 3]
    for tok3, tok2 in zip(d3.epoch(1), d2.epoch(1)):
        assert torch.equal(tok3, tok2)
        assert torch.equal(b3.train_step(tok3), b2.train_step(tok2))
    assert torch.equal(b3.rows, b2.rows)


def test_clipping_is_per_member():
    g = torch.randn(3, 50) * torch.tensor([[0.01], [5.0], [100.0]])
    want = []
    for row in g:
        p = torch.nn.Parameter(torch.zeros(50))
        p.grad = row.clone()
        torch.nn.utils.clip_grad_norm_([p], 1.0)
        want.append(p.grad)
    clip_rows_(g, 1.0)
    assert torch.allclose(g, torch.stack(want), rtol=1e-6, atol=0)


def test_members_that_cannot_share_a_step_are_refused_naming_the_fields():
    with pytest.raises(ConfigError, match=r"model.d_model: \[16, 32\].*train.lr: \[0.0003, 0.001\]"):
        check_bucketable([BASE, BASE.replace(**{"model.d_model": 32, "train.lr": 1e-3})])
    with pytest.raises(ConfigError, match="model.dropout"):
        check_bucketable([BASE.replace(**{"model.dropout": 0.1})] * 2)
    check_bucketable(members(1, 2))   # seeds (and graph, corpus) are each member's own


def test_a_bucket_never_makes_a_tensor_without_saying_where():
    """A GPU worker's trap, on a CPU: a tensor made on the default device would not be the bucket's."""
    cfgs = members(1, 2)
    want = BucketState(cfgs, STEPS)
    run_bucket_epoch(want, BucketWindows(data(cfgs)).epoch(0))
    b = BucketState(cfgs, STEPS)
    with RefuseHostDefaults():
        run_bucket_epoch(b, BucketWindows(data(cfgs)).epoch(0))
        states = [b.member_state(i) for i in range(2)]
        b.load_members(states)
        b.model_of(1)
        b.drop([0])
    assert torch.equal(want.rows[1], b.rows[0])


def test_members_record_their_seams_and_a_resumed_epoch_counts_only_its_steps():
    cfgs = members(1, 2)
    b = BucketState(cfgs, STEPS)
    feed = BucketWindows(data(cfgs))
    first = run_bucket_epoch(b, feed.epoch(0))
    assert first.steps == STEPS and all(m.timing.seam_seconds == [] for m in b.members)
    for m in b.members:
        m.epoch += 1
    b.step = 0
    second = run_bucket_epoch(b, feed.epoch(1), previous_end=first.ended)
    assert all(len(m.timing.seam_seconds) == 1 and 0 <= m.timing.seam_seconds[0] < 60 for m in b.members)
    c = BucketState(cfgs, STEPS)
    for m in c.members:
        m.epoch_losses = torch.zeros(4, dtype=torch.float64)
    third = run_bucket_epoch(c, feed.epoch(1, 4), 4)   # the rest of an epoch: its steps
    assert (second.steps, third.steps) == (STEPS, STEPS - 4)


def test_a_compiled_bucket_resumes_exactly():
    """train.compile in a bucket: the batched step compiled; a bucket stopped mid-epoch and restored from its
    members' checkpoints repeats an uninterrupted compiled bucket bit for bit."""
    from raywalk.science.loop import set_determinism

    cfgs = [c.replace(**{"train.compile": True}) for c in members(1, 2)]
    feed = BucketWindows(data(cfgs))
    threads = torch.get_num_threads()
    set_determinism(True)   # as a worker runs it (see test_loop's compiled test)
    torch.set_num_threads(1)
    try:
        ref = BucketState(cfgs, STEPS)
        assert ref._forward is not ref._losses   # compiled
        eager = BucketState(members(1, 2), STEPS)
        want = run_bucket_epoch(ref, feed.epoch(0)).losses
        torch.testing.assert_close(want, run_bucket_epoch(eager, feed.epoch(0)).losses, rtol=1e-4, atol=1e-5)

        a = BucketState(cfgs, STEPS)

        class Stop(Exception):
            pass

        def stop(state):
            if state.step == 3:
                raise Stop

        with pytest.raises(Stop):
            run_bucket_epoch(a, feed.epoch(0), callbacks=[stop])
        saved = [a.member_state(i, 3) for i in range(2)]
        b = BucketState(cfgs, STEPS)
        b.load_members(saved)
        got = run_bucket_epoch(b, feed.epoch(0, 3), 3).losses
        assert torch.equal(got, want)
        assert torch.equal(b.rows, ref.rows)
    finally:
        set_determinism(False)
        torch.set_num_threads(threads)
