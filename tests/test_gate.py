"""The Gate object (science/gate.py), Ray-free: starts de-duplicated once, shards, evaluation, reduction,
and the pass rule (result.json's per-jump-length report: test_result.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raywalk.science.compliance import Compliance, JumpLengthCounts, RuleTable, check_sequences, \
    rule_counts_by_jump_length
from raywalk.science.gate import Gate, GateCounts
from raywalk.science.generate import reference_generate
from raywalk.science.graph import build_graph, place_jumpers
from raywalk.science.model import GPT
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny config, its graph's rule table and a sharpened random model (varied, rule-visiting walks)."""
    cfg = tiny_config(tmp_path_factory.mktemp("gate"))
    g = cfg.graph
    graph = build_graph(g.n, g.K, g.p_in, g.p_out, cfg.seed)
    table = RuleTable.build(graph, place_jumpers(graph, g.n_jumpers_per_block, g.r_scales, cfg.w, cfg.seed))
    torch.manual_seed(0)
    model = GPT.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0)
    starts = np.random.default_rng(0).integers(0, g.n, 50)   # repeats on purpose (16 vertices)
    return cfg, table, model, starts


def test_starts_are_deduplicated_once_and_weighted(world):
    cfg, table, _, starts = world
    gate = Gate(starts, table, cfg)
    assert gate.starts.tolist() == sorted(set(starts.tolist())) and gate.n_distinct == len(gate.starts)
    assert gate.counts.tolist() == [int((starts == s).sum()) for s in gate.starts] and gate.counts.sum() == 50
    assert Gate(tuple(starts.tolist()), table, cfg).starts.tolist() == gate.starts.tolist()   # a tuple, as WorkerSpec holds them


@pytest.mark.parametrize("n_ranks", [1, 2, 3, 40])
def test_shards_partition_the_distinct_starts(world, n_ranks):
    cfg, table, _, starts = world
    gate = Gate(starts, table, cfg)
    parts = [gate.shard(r, n_ranks) for r in range(n_ranks)]
    got = np.concatenate([p.starts for p in parts])
    assert sorted(got.tolist()) == gate.starts.tolist()                         # every start once, no overlap
    assert sum(int(p.counts.sum()) for p in parts) == len(starts)
    assert all(p.n_distinct == gate.n_distinct for p in parts)                  # the whole's, for the curves
    assert gate.starts.tolist() == sorted(set(starts.tolist()))                 # the whole is untouched
    with pytest.raises(ValueError, match="rank 3 is invalid"):
        gate.shard(3, 3)


def test_evaluation_counts_every_gate_sequence_and_shards_add_up(world):
    cfg, table, model, starts = world
    seqs = reference_generate(model, torch.as_tensor(starts), cfg.corpus.walk_length, cfg.w).numpy()
    want, want_r = check_sequences(seqs, table), rule_counts_by_jump_length(seqs, table)
    assert want.rule_total > 0
    got = Gate(starts, table, cfg).evaluate(model)
    assert got.comp == want and got.by_r.as_dict() == want_r.as_dict()
    parts = [Gate(starts, table, cfg).shard(r, 3).evaluate(model) for r in range(3)]
    assert Compliance(*(sum(getattr(p.comp, k) for p in parts) for k in
                        ("edge_ok", "edge_total", "rule_ok", "rule_total"))) == want
    assert (parts[0].by_r + parts[1].by_r + parts[2].by_r).as_dict() == want_r.as_dict()
    empty = Gate(starts[:1], table, cfg).shard(1, 2).evaluate(model)   # a rank with no start
    assert empty.comp == Compliance(0, 0, 0, 0) and empty.by_r.r.tolist() == want_r.r.tolist()


def test_reduction_without_a_process_group_keeps_the_counts():
    mine = GateCounts(Compliance(9, 10, 3, 7), JumpLengthCounts(np.array([2, 4]), np.array([5, 2]),
                                                                 np.array([3, 0])))
    packed = Gate.all_reduce(mine, torch.device("cpu"))
    assert packed.dtype == torch.int64 and packed.tolist() == [9, 10, 3, 7, 5, 2, 3, 0]
    got = Gate.reduce(mine, torch.device("cpu"))
    assert got.comp == mine.comp and got.by_r.as_dict() == {2: (5, 3), 4: (2, 0)}


@pytest.mark.parametrize("comp,passed", [(Compliance(96, 100, 81, 100), True), (Compliance(95, 100, 81, 100), False),
                                         (Compliance(96, 100, 80, 100), False), (Compliance(100, 100, 0, 0), False)])
def test_passes_strictly_above_both_thresholds_never_on_zero_rule_checks(world, comp, passed):
    cfg, table, _, starts = world   # edge 0.95, rule 0.80
    assert Gate(starts, table, cfg).passes(comp) is passed
