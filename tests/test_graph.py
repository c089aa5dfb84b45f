import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from scipy.sparse.csgraph import connected_components

from raywalk.science.graph import (Graph, GraphValidationError, Jumpers, _failed_checks, _sample,
                           build_graph, jump_lengths, place_jumpers, reachable_blocks, zipf_theta)

SCALES = (0.5, 0.7, 0.9, 1.0, 1.1, 1.3, 1.5, 2.0)
CFG = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


def small_graph(K, bs, p_in, p_out, seed):
    try:
        return build_graph(K * bs, K, p_in, p_out, seed)
    except GraphValidationError:
        assume(False)


@CFG
@given(K=st.integers(2, 4), bs=st.integers(8, 40), p_in=st.floats(0.3, 0.7),
       p_out=st.floats(0.05, 0.2), seed=st.integers(0, 10_000))
def test_graph_structure(K, bs, p_in, p_out, seed):
    g = small_graph(K, bs, p_in, p_out, seed)
    n = K * bs
    assert g.n == n and g.K == K and g.block_size == bs
    assert g.indptr.dtype == np.int64 and g.indices.dtype == np.int32
    assert g.indptr[0] == 0 and g.indptr[-1] == g.indices.size and np.all(np.diff(g.indptr) >= 0)
    src, dst = g.edges()
    assert not np.any(src == dst), "self loop"
    for v in range(n):  # sorted, unique within each row
        row = g.indices[g.indptr[v]:g.indptr[v + 1]]
        assert np.all(np.diff(row) > 0)
    np.testing.assert_array_equal(g.block_of(), np.arange(n) // bs)
    assert connected_components(g.adjacency(), directed=True, connection="strong")[0] == 1
    assert g.seed >= seed
    # roundtrip through a shuffled edge list
    perm = np.random.default_rng(0).permutation(src.size)
    h = Graph.from_edges(n, K, src[perm], dst[perm], g.seed)
    np.testing.assert_array_equal(h.indptr, g.indptr)
    np.testing.assert_array_equal(h.indices, g.indices)
    assert g.adjacency().sum() == src.size


def test_same_seed_same_graph_and_differs_otherwise():
    a, b = build_graph(200, 4, 0.3, 0.05, 7), build_graph(200, 4, 0.3, 0.05, 7)
    np.testing.assert_array_equal(a.indices, b.indices)
    c = build_graph(200, 4, 0.3, 0.05, 8 if a.seed == 7 else a.seed + 1)
    assert c.indices.size != a.indices.size or not np.array_equal(c.indices, a.indices)


@given(K=st.integers(1, 5), bs=st.integers(1, 60), seed=st.integers(0, 99))
@settings(max_examples=30, deadline=None)
def test_theta_zipf_normalised(K, bs, seed):
    th = zipf_theta(K * bs, K, np.random.default_rng(seed))
    blocks = th.reshape(K, bs)
    np.testing.assert_allclose(blocks.sum(axis=1), bs)
    raw = 1.0 / np.arange(1, bs + 1)
    for b in range(K):  # a permutation of 1/rank, rescaled
        np.testing.assert_allclose(np.sort(blocks[b])[::-1], raw * bs / raw.sum())


def test_expectations_match_dense_reference():
    n, K, p_in, p_out, seed = 60, 3, 0.6, 0.2, 3
    d = _sample(n, K, p_in, p_out, seed)
    th = zipf_theta(n, K, np.random.default_rng(seed))
    blk = np.arange(n) // (n // K)
    P = np.clip(np.outer(th, th) * np.where(blk[:, None] == blk[None, :], p_in, p_out), 0, 1)
    np.fill_diagonal(P, 0)
    assert P.max() == 1.0  # the reference exercises clipping
    np.testing.assert_allclose(d.exp_degree, P.sum(1), rtol=1e-5)
    for a in range(K):
        for b in range(K):
            blkP = P[blk == a][:, blk == b]
            np.testing.assert_allclose(d.pair_mean[a, b], blkP.sum(), rtol=1e-5)
            np.testing.assert_allclose(d.pair_var[a, b], (blkP * (1 - blkP)).sum(), rtol=1e-4)


def test_validation_error_names_checks_and_seeds():
    with pytest.raises(GraphValidationError) as e:
        build_graph(40, 2, 0.01, 0.001, seed=5, max_attempts=3)
    msg = str(e.value)
    assert "min expected out-degree" in msg and "strongly connected" in msg
    assert "[5, 6, 7]" in msg and "seed 8" not in msg


def test_density_check_detects_a_starved_block_pair():
    g = build_graph(120, 3, 0.4, 0.1, 1)
    d = _sample(120, 3, 0.4, 0.1, g.seed)
    assert _failed_checks(g, d) == []
    src, dst = g.edges()
    blk = g.block_of()
    keep = ~((blk[src] == 0) & (blk[dst] == 1))
    keep[np.nonzero(~keep)[0][:1]] = True  # keep one edge so nothing else changes much
    h = Graph.from_edges(120, 3, src[keep], dst[keep], g.seed)
    fails = _failed_checks(h, d)
    assert any("density" in f and "(0,1)" in f for f in fails)


def test_jump_lengths_default_w64():
    assert jump_lengths(SCALES, 64) == [32, 45, 58, 64, 70, 83, 96, 128]
    assert jump_lengths((0.01, 0.5, 0.5), 4) == [1, 2]


@CFG
@given(K=st.integers(2, 4), bs=st.integers(10, 30), per=st.integers(1, 3),
       w=st.integers(4, 16), seed=st.integers(0, 1000))
def test_jumpers_cycle_target_and_nontrivial(K, bs, per, w, seed):
    g = small_graph(K, bs, 0.5, 0.1, seed)
    J = place_jumpers(g, per, SCALES, w, seed)
    rs = jump_lengths(SCALES, w)
    assert len(J) == K * per
    np.testing.assert_array_equal(J.r, [rs[i % len(rs)] for i in range(K * per)])
    np.testing.assert_array_equal(J.block, J.vertex // g.block_size)
    np.testing.assert_array_equal(J.block, np.repeat(np.arange(K), per))
    assert np.all(J.target_block != J.block) and len(set(J.vertex.tolist())) == len(J)
    A = g.adjacency().toarray().astype(np.int64)
    for v, t, r in zip(J.vertex, J.target_block, J.r):  # dense reference of "exactly r steps"
        x = np.zeros(g.n, np.int64); x[v] = 1
        for _ in range(r):
            x = (x @ A > 0).astype(np.int64)
        blocks = set((np.nonzero(x)[0] // g.block_size).tolist())
        assert t in blocks and len(blocks) >= 2
    J2 = Jumpers.from_records(J.to_records())
    assert J2.to_records() == J.to_records()
    assert all(type(x) is int for rec in J.to_records() for x in rec.values())


def test_jumpers_deterministic_w64():
    g = build_graph(200, 4, 0.3, 0.05, 2)
    a, b = place_jumpers(g, 2, SCALES, 64, 9), place_jumpers(g, 2, SCALES, 64, 9)
    assert a.to_records() == b.to_records()
    assert a.r.tolist() == [32, 45, 58, 64, 70, 83, 96, 128]


def test_nontriviality_failure_names_block():
    # directed 4-cycle: exactly one vertex (one block) is reachable in r steps
    g = Graph.from_edges(4, 2, np.array([0, 1, 2, 3]), np.array([1, 2, 3, 0]), 0)
    assert reachable_blocks(g, 0, 2).tolist() == [False, True]
    with pytest.raises(ValueError, match="block 0"):
        place_jumpers(g, 1, (1.0,), 2, 0)
