import numpy as np
from hypothesis import given, settings, strategies as st

from raywalk.science.compliance import (Compliance, RuleTable, check_sequences, per_sequence_edge_violations,
                                per_sequence_rule_violations, rule_counts_by_jump_length)
from raywalk.science.graph import Graph, Jumpers

# n=8, K=2: block 0 = {0..3}, block 1 = {4..7}; complete digraph minus 1->2
N = 8
SRC, DST = zip(*[(a, b) for a in range(N) for b in range(N) if a != b and (a, b) != (1, 2)])
G = Graph.from_edges(N, 2, np.array(SRC), np.array(DST), 0)
# jumper 0: r=2 -> block 1; jumper 5: r=1 -> block 0
J = Jumpers(vertex=np.array([0, 5]), block=np.array([0, 1]), target_block=np.array([1, 0]), r=np.array([2, 1]))
T = RuleTable.build(G, J)


def c(*seq):
    return check_sequences(np.array([seq]), T)


def test_table():
    assert T.r_of.tolist() == [2, 0, 0, 0, 0, 1, 0, 0]
    assert T.target_of.tolist() == [1, -1, -1, -1, -1, 0, -1, -1]
    assert np.all(np.diff(T.edge_keys) > 0) and T.edge_keys.size == len(SRC)


def test_rule_satisfied_and_violated():
    assert c(0, 1, 4, 3) == Compliance(3, 3, 1, 1)
    assert c(0, 3, 2, 3) == Compliance(3, 3, 0, 1)


def test_non_edges_counted():
    r = c(3, 1, 2, 1)  # 1->2 removed
    assert (r.edge_ok, r.edge_total) == (2, 3)
    assert c(3, 3, 4).edge_ok == 1  # self loop is no edge
    bad = check_sequences(np.array([[3, -1, 8, 4]]), T)  # out-of-vocabulary tokens
    assert (bad.edge_ok, bad.edge_total) == (0, 3)


def test_nested_visits_each_checked():
    # 0 at t0 needs block 1 at t2; 5 at t1 (pending rule of 0) needs block 0 at t2: one must fail
    assert c(0, 5, 2, 4) == Compliance(3, 3, 1, 2)
    assert c(0, 5, 6, 4) == Compliance(3, 3, 1, 2)
    # 5 at t1 -> block 0 at t2 (vertex 0, a jumper itself) -> block 1 at t4; 0 at t0 -> t2 in block 0: fails
    assert c(0, 5, 0, 3, 6) == Compliance(4, 4, 2, 3)


def test_revisits_each_checked():
    assert c(0, 1, 4, 0, 3, 6) == Compliance(5, 5, 2, 2)
    assert c(0, 1, 4, 0, 3, 2) == Compliance(5, 5, 1, 2)


def test_visits_too_close_to_end_not_counted():
    r = c(1, 3, 4, 0)  # arrival t5 is outside the sequence
    assert (r.rule_ok, r.rule_total) == (0, 0) and r.rule == 0.0
    r = c(3, 0, 1)
    assert r.rule_total == 0
    r = c(3, 0, 1, 4)  # just fits (t+r = L-1)
    assert (r.rule_ok, r.rule_total) == (1, 1)


def test_zero_checks_never_pass():
    empty = Compliance(0, 0, 0, 0)
    assert empty.edge == 0.0 and empty.rule == 0.0
    assert check_sequences(np.zeros((0, 5), int), T) == empty
    r = check_sequences(np.array([[1, 3, 4, 6]]), T)
    assert r.rule_total == 0 and r.rule == 0.0 and r.edge == 1.0


def test_add_and_scale():
    a, b = Compliance(1, 2, 3, 4), Compliance(10, 20, 30, 40)
    assert a + b == Compliance(11, 22, 33, 44)
    assert a.scaled(3) == Compliance(3, 6, 9, 12)
    assert a.edge == 0.5 and a.rule == 0.75
    seqs = np.array([[0, 1, 4, 3], [0, 3, 2, 3], [3, 1, 2, 1]])
    tot = check_sequences(seqs[:1], T) + check_sequences(seqs[1:], T)
    assert tot == check_sequences(seqs, T)
    assert check_sequences(np.repeat(seqs[:1], 5, axis=0), T) == check_sequences(seqs[:1], T).scaled(5)


def naive(seqs, table):
    """One-visit-at-a-time reference."""
    eo = et = ro = rt = 0
    viol = []
    edges = set(zip(*G.edges()))
    for s in seqs:
        L, v = len(s), 0
        for t in range(L - 1):
            et += 1; eo += (int(s[t]), int(s[t + 1])) in edges
        for t in range(L):
            r = int(table.r_of[s[t]])
            if r and t + r <= L - 1:
                rt += 1
                ok = table.block_of[s[t + r]] == table.target_of[s[t]]
                ro += ok; v += not ok
        viol.append(v)
    return Compliance(eo, et, ro, rt), viol


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, N - 1), min_size=6, max_size=6), min_size=1, max_size=12))
def test_matches_naive_reference(rows):
    seqs = np.array(rows)
    ref, viol = naive(seqs, T)
    assert check_sequences(seqs, T) == ref
    assert per_sequence_rule_violations(seqs, T).tolist() == viol
    assert per_sequence_edge_violations(seqs, T).sum() == ref.edge_total - ref.edge_ok


def test_searchsorted_path_agrees_with_bitmap(monkeypatch):
    seqs = np.random.default_rng(0).integers(0, N, (50, 9))
    fast = check_sequences(seqs, T)
    import raywalk.science.compliance as cm
    monkeypatch.setattr(cm, "_BITMAP_MAX_BITS", 0)
    T2 = RuleTable.build(G, J)
    assert T2.edge_bits is None
    assert check_sequences(seqs, T2) == fast


# ---- per jump length --------------------------------------------------------------

def naive_by_r(seqs, table):
    """{r: [checks, ok]} one visit at a time, every distinct r of the table listed."""
    out = {int(r): [0, 0] for r in sorted(set(table.r_of[table.r_of > 0].tolist()))}
    for s in seqs:
        L = len(s)
        for t in range(L):
            if not 0 <= s[t] < table.n:
                continue
            r = int(table.r_of[s[t]])
            if r and t + r <= L - 1:
                out[r][0] += 1
                out[r][1] += bool(0 <= s[t + r] < table.n
                                  and table.block_of[s[t + r]] == table.target_of[s[t]])
    return {r: tuple(v) for r, v in out.items()}


def test_by_jump_length_examples():
    # jumper 0: r=2, jumper 5: r=1
    got = rule_counts_by_jump_length(np.array([[0, 5, 0, 3, 6]]), T)
    assert got.r.tolist() == [1, 2]
    assert got.as_dict() == {1: (1, 1), 2: (2, 1)}
    empty = rule_counts_by_jump_length(np.array([[1, 3, 4, 6]]), T)
    assert empty.as_dict() == {1: (0, 0), 2: (0, 0)}   # every jump length listed, zero checks too
    assert rule_counts_by_jump_length(np.zeros((0, 4), int), T).as_dict() == {1: (0, 0), 2: (0, 0)}
    a, b = rule_counts_by_jump_length(np.array([[0, 1, 4, 3]]), T), rule_counts_by_jump_length(
        np.array([[5, 0, 1, 2]]), T)
    assert (a + b).as_dict() == rule_counts_by_jump_length(np.array([[0, 1, 4, 3], [5, 0, 1, 2]]), T).as_dict()


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(-1, N), min_size=7, max_size=7), min_size=1, max_size=12))
def test_by_jump_length_matches_reference_and_totals(rows):
    seqs = np.array(rows)   # -1 and N: out-of-vocabulary tokens never count as a visit or a hit
    got = rule_counts_by_jump_length(seqs, T)
    assert got.as_dict() == naive_by_r(seqs, T)
    tot = check_sequences(seqs, T)
    assert int(got.checks.sum()) == tot.rule_total and int(got.ok.sum()) == tot.rule_ok


def test_by_jump_length_on_a_real_graph():
    from raywalk.science.graph import build_graph, place_jumpers

    g = build_graph(32, 2, 0.6, 0.2, seed=1)
    j = place_jumpers(g, 2, (0.5, 1.0, 1.5, 2.0), 4, seed=1)
    tab = RuleTable.build(g, j)
    seqs = np.random.default_rng(0).integers(0, 32, (40, 12))
    got = rule_counts_by_jump_length(seqs, tab)
    assert got.r.tolist() == sorted(set(j.r.tolist())) == [2, 4, 6, 8]
    assert got.as_dict() == naive_by_r(seqs, tab)
    tot = check_sequences(seqs, tab)
    assert (int(got.checks.sum()), int(got.ok.sum())) == (tot.rule_total, tot.rule_ok)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(-1, N), min_size=7, max_size=7), st.integers(0, 5)),
                min_size=1, max_size=10))
def test_weighted_counts_equal_the_rows_repeated(rows):
    """The gate counts each distinct sequence once, weighted by how many gate sequences it stands for."""
    seqs, w = np.array([r for r, _ in rows]), np.array([k for _, k in rows])
    repeated = np.repeat(seqs, w, axis=0)
    assert check_sequences(seqs, T, w) == check_sequences(repeated, T)
    a, b = rule_counts_by_jump_length(seqs, T, w), rule_counts_by_jump_length(repeated, T)
    assert np.array_equal(a.checks, b.checks) and np.array_equal(a.ok, b.ok)
