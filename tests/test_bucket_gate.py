"""science/bucket_gate.py: a bucket's members gated in one batched pass, each member's counts its solo gate's."""
import numpy as np
import pytest
import torch

from raywalk.science import bucket_gate, generate
from raywalk.science.bucket import BucketState, BucketWindows, run_bucket_epoch
from raywalk.science.bucket_gate import gate_members, member_sequences
from raywalk.science.gate import Gate
from raywalk.science.generate import greedy_generate
from tests.helpers import RefuseHostDefaults, resident

STEPS = 20
SHAPES = {"d16/L1/H1": {}, "d16/L2/H2": {"model.n_layers": 2, "model.n_heads": 2}}


def bucket(corpus, over, trained=True, seeds=(1, 2, 3)):
    """A bucket of the tiny config's shape (members of different seeds), trained STEPS steps or sharpened."""
    cfg, c = corpus
    cfgs = [cfg.replace(**over, seed=s) for s in seeds]
    state = BucketState(cfgs, STEPS)
    if trained:
        data = BucketWindows([resident(m, c) for m in cfgs])
        run_bucket_epoch(state, data.epoch(0, steps=STEPS))
    else:
        with torch.no_grad():   # random weights, sharpened: varied walks, not near-uniform ones
            state.rows.mul_(10.0)
    return cfgs, state


def gates_of(corpus, cfgs, sizes=(64, 30, 9)):
    """Each member's gate over a different number of the corpus' gate starts (so different distinct counts)."""
    _, c = corpus
    starts = c.gate_starts(64)
    return [Gate(starts[:n], c.rule_table(), m) for m, n in zip(cfgs, sizes)]


def same(a, b):
    return a.comp == b.comp and a.by_r.as_dict() == b.by_r.as_dict()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("trained", [True, False], ids=["trained", "random"])
def test_each_members_counts_are_its_solo_gates(corpus, shape, trained):
    cfgs, state = bucket(corpus, SHAPES[shape], trained)
    gates = gates_of(corpus, cfgs)
    assert len({len(g.starts) for g in gates}) == 3 and sum(g.cfg.corpus.walk_length > g.cfg.w + 1 for g in gates)
    got = gate_members(state, gates)
    for i, g in enumerate(gates):
        want = g.evaluate(state.model_of(i))
        assert want.comp.rule_total > 0
        assert same(got[i], want), i
    assert all(same(a, b) for a, b in zip(gate_members(state, gates, memo=False), got))


def test_sequences_are_each_members_greedy_walks(corpus):
    cfgs, state = bucket(corpus, SHAPES["d16/L2/H2"], trained=False)
    starts = [g.starts for g in gates_of(corpus, cfgs)]
    L = cfgs[0].corpus.walk_length
    got = member_sequences(state, starts, [L, L - 3, 1])   # lengths may differ: a walk's prefix is its own
    for i, s in enumerate(starts):
        want = greedy_generate(state.model_of(i), torch.as_tensor(s, device="cpu"), L, cfgs[0].w).numpy()
        assert np.array_equal(got[i], want[:, :got[i].shape[1]])


def force(monkeypatch, how: str) -> None:
    """WindowMemo's work-saving paths (_compute: per model on a CPU, repacked slots on a GPU), forced."""
    init = generate.WindowMemo.__init__

    def forced(self, *a, **k):
        init(self, *a, **k)
        self.pad_below, self.repack_below = 0, 2.0
        self.sync_free = how == "one model at a time"

    monkeypatch.setattr(generate.WindowMemo, "__init__", forced)


@pytest.mark.parametrize("how", ["one model at a time", "repacked"])
def test_uneven_members_computed_apart_or_repacked_give_the_same_walks(corpus, monkeypatch, how):
    cfgs, state = bucket(corpus, SHAPES["d16/L2/H2"], trained=False)
    gates = gates_of(corpus, cfgs)
    want = gate_members(state, gates)
    force(monkeypatch, how)
    assert all(same(a, b) for a, b in zip(gate_members(state, gates), want))


def test_windows_in_many_small_passes_give_the_same_walks(corpus, monkeypatch):
    cfgs, state = bucket(corpus, SHAPES["d16/L2/H2"], trained=False)
    gates = gates_of(corpus, cfgs)
    want = gate_members(state, gates)
    for module in (generate, bucket_gate):
        monkeypatch.setattr(module, "pass_tokens", lambda d_model, device: 2 * cfgs[0].w)   # two windows a pass
    assert all(same(a, b) for a, b in zip(gate_members(state, gates), want))
    starts = torch.as_tensor(gates[0].starts, device="cpu")
    m = state.model_of(0)
    L, w = cfgs[0].corpus.walk_length, cfgs[0].w
    ref = generate.reference_generate(m, starts, L, w)
    assert torch.equal(greedy_generate(m, starts, L, w), ref)
    assert torch.equal(greedy_generate(m, starts, L, w, on_device=True), ref)


@pytest.mark.parametrize("collide", ["always", "often"])
def test_a_hash_collision_costs_time_never_a_token(corpus, monkeypatch, collide):
    cfgs, state = bucket(corpus, SHAPES["d16/L1/H1"], trained=False)
    gates = gates_of(corpus, cfgs)
    want = gate_members(state, gates)
    init = generate.WindowMemo.__init__

    def colliding(self, *a, **k):
        init(self, *a, **k)
        # always: every window of a model gets one key; often: keys from two token values, so the table
        # holds entries whose key a different window shares
        self.tok_hash.zero_() if collide == "always" else self.tok_hash.remainder_(2)

    monkeypatch.setattr(generate.WindowMemo, "__init__", colliding)
    assert all(same(a, b) for a, b in zip(gate_members(state, gates), want))
    starts = torch.as_tensor(gates[0].starts, device="cpu")
    m = state.model_of(0)
    L, w = cfgs[0].corpus.walk_length, cfgs[0].w
    assert torch.equal(greedy_generate(m, starts, L, w, on_device=True), generate.reference_generate(m, starts, L, w))


def test_members_without_starts_and_bad_calls(corpus):
    cfgs, state = bucket(corpus, SHAPES["d16/L1/H1"], trained=False)
    _, c = corpus
    table = c.rule_table()
    gates = [Gate(c.gate_starts(64), table, cfgs[0]), Gate(c.gate_starts(1), table, cfgs[1]).shard(1, 2),
             Gate(c.gate_starts(5), table, cfgs[2])]
    assert len(gates[1].starts) == 0
    got = gate_members(state, gates)
    for i, g in enumerate(gates):
        assert same(got[i], g.evaluate(state.model_of(i)))
    with pytest.raises(ValueError, match="2 gates for 3 members"):
        gate_members(state, gates[:2])
    none = gate_members(state, [gates[1]] * 3)   # no member has a start
    assert all(same(n, gates[1].evaluate(state.model_of(0))) for n in none)


@pytest.mark.parametrize("how", ["as is", "one model at a time", "repacked"])
def test_gating_a_bucket_never_makes_a_tensor_without_saying_where(corpus, monkeypatch, how):
    """A GPU worker's trap, on a CPU: a tensor made on the default device would not be the bucket's."""
    cfgs, state = bucket(corpus, SHAPES["d16/L2/H2"], trained=False)
    gates = gates_of(corpus, cfgs)
    want = gate_members(state, gates)
    if how != "as is":
        force(monkeypatch, how)
    with RefuseHostDefaults():
        got = gate_members(state, gates)
        seqs = greedy_generate(state.model_of(0), torch.as_tensor(gates[0].starts, device="cpu"),
                               cfgs[0].corpus.walk_length, cfgs[0].w, on_device=True)
    assert all(same(a, b) for a, b in zip(got, want))
    assert seqs.shape == (len(gates[0].starts), cfgs[0].corpus.walk_length)
