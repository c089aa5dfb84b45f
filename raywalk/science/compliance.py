"""The one compliance checker: used on the walk corpus and by the gate on
model-generated sequences, so both are measured identically."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from raywalk.science.graph import Graph, Jumpers

_BITMAP_MAX_BITS = 8 * 32 * 2**20


@dataclass(frozen=True, eq=False)
class RuleTable:
    n: int
    block_of: np.ndarray    # int64 (n,)
    r_of: np.ndarray        # int64 (n,), 0 for non-jumpers
    target_of: np.ndarray   # int64 (n,), -1 for non-jumpers
    edge_keys: np.ndarray   # sorted int64 src*n+dst

    @classmethod
    def build(cls, graph: Graph, jumpers: Jumpers) -> "RuleTable":
        n = graph.n
        r_of = np.zeros(n, dtype=np.int64)
        target_of = np.full(n, -1, dtype=np.int64)
        r_of[jumpers.vertex] = jumpers.r
        target_of[jumpers.vertex] = jumpers.target_block
        src, dst = graph.edges()
        keys = src.astype(np.int64) * n + dst  # CSR row-major with sorted rows => already sorted
        if keys.size > 1 and np.any(keys[1:] < keys[:-1]):
            keys = np.sort(keys)
        return cls(n=n, block_of=graph.block_of(), r_of=r_of, target_of=target_of, edge_keys=keys)

    @property
    def jump_lengths(self) -> np.ndarray:
        return np.unique(self.r_of[self.r_of > 0])

    @cached_property
    def edge_bits(self) -> np.ndarray | None:
        """Packed n×n adjacency bitmap (little bit order) when it fits in 32 MB, else None."""
        if self.n * self.n > _BITMAP_MAX_BITS:
            return None
        bits = np.zeros((self.n * self.n + 7) // 8, dtype=np.uint8)
        k = self.edge_keys
        np.bitwise_or.at(bits, k >> 3, (1 << (k & 7)).astype(np.uint8))
        return bits


@dataclass(frozen=True)
class Compliance:
    edge_ok: int
    edge_total: int
    rule_ok: int
    rule_total: int

    @property
    def edge(self) -> float:
        return self.edge_ok / self.edge_total if self.edge_total else 0.0

    @property
    def rule(self) -> float:
        # zero checks must never read as a pass
        return self.rule_ok / self.rule_total if self.rule_total else 0.0

    def __add__(self, other: "Compliance") -> "Compliance":
        return Compliance(self.edge_ok + other.edge_ok, self.edge_total + other.edge_total,
                          self.rule_ok + other.rule_ok, self.rule_total + other.rule_total)

    def scaled(self, k: int) -> "Compliance":
        return Compliance(self.edge_ok * k, self.edge_total * k, self.rule_ok * k, self.rule_total * k)


def _as_2d(seqs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray | None]:
    """int64 view with out-of-vocabulary tokens clipped for lookups, plus their mask (None if none)."""
    s = np.asarray(seqs)
    if s.ndim == 1:
        s = s[None, :]
    s = s.astype(np.int64, copy=False)
    if s.size == 0 or (s.min() >= 0 and s.max() < n):
        return s, None
    bad = (s < 0) | (s >= n)
    return np.clip(s, 0, max(n - 1, 0)), bad


def _edge_ok(s: np.ndarray, bad: np.ndarray | None, table: RuleTable) -> np.ndarray:
    """(N, L-1) bool: consecutive pair is an edge of the graph."""
    keys = s[:, :-1] * table.n + s[:, 1:]
    bits = table.edge_bits
    if bits is not None:  # packed n×n bitmap: one gather instead of a binary search
        ok = ((bits[keys >> 3] >> (keys & 7).astype(np.uint8)) & 1).astype(bool)
    else:
        ek = table.edge_keys
        if ek.size == 0:
            return np.zeros(keys.shape, dtype=bool)
        pos = np.minimum(np.searchsorted(ek, keys), ek.size - 1)
        ok = ek[pos] == keys
    if bad is not None:
        ok &= ~bad[:, :-1] & ~bad[:, 1:]
    return ok


def _rule_visits(s: np.ndarray, bad: np.ndarray | None, table: RuleTable
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every checked visit as (row, r, hit); visits are sparse, so work on them only."""
    N, L = s.shape
    visit = table.r_of[s] > 0  # every visit counts: revisits, nested visits
    if bad is not None:
        visit &= ~bad
    rows, cols = np.nonzero(visit)
    v = s[rows, cols]
    r = table.r_of[v]
    arr = cols + r
    inside = arr <= L - 1  # arrival outside the sequence: not checked
    rows, arr, v, r = rows[inside], arr[inside], v[inside], r[inside]
    hit = table.block_of[s[rows, arr]] == table.target_of[v]
    if bad is not None:
        hit &= ~bad[rows, arr]
    return rows, r, hit


def _rule_counts(s: np.ndarray, bad: np.ndarray | None, table: RuleTable) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence (checked, violated) rule counts."""
    rows, _, hit = _rule_visits(s, bad, table)
    N = s.shape[0]
    return np.bincount(rows, minlength=N), np.bincount(rows[~hit], minlength=N)


def check_sequences(seqs: np.ndarray, table: RuleTable, weights: np.ndarray | None = None) -> Compliance:
    """Edge and rule counts over the sequences; `weights`: how many sequences each row stands for (the
    counts of the rows repeated that often, without repeating them)."""
    s, bad = _as_2d(seqs, table.n)
    if s.shape[0] == 0 or s.shape[1] == 0:
        return Compliance(0, 0, 0, 0)
    e = _edge_ok(s, bad, table)
    checked, violated = _rule_counts(s, bad, table)
    if weights is None:
        tot = int(checked.sum())
        return Compliance(int(e.sum()), int(e.size), tot - int(violated.sum()), tot)
    w = np.asarray(weights, dtype=np.int64)
    tot = int(checked @ w)
    return Compliance(int(e.sum(axis=1) @ w), int(e.shape[1] * w.sum()), tot - int(violated @ w), tot)


def per_sequence_rule_violations(seqs: np.ndarray, table: RuleTable) -> np.ndarray:
    s, bad = _as_2d(seqs, table.n)
    return _rule_counts(s, bad, table)[1]


def per_sequence_edge_violations(seqs: np.ndarray, table: RuleTable) -> np.ndarray:
    s, bad = _as_2d(seqs, table.n)
    if s.shape[1] < 2:
        return np.zeros(s.shape[0], dtype=np.int64)
    return (~_edge_ok(s, bad, table)).sum(axis=1)


@dataclass(frozen=True, eq=False)
class JumpLengthCounts:
    """Rule checks and compliant visits per distinct jump length (the table's, sorted; zeros included)."""
    r: np.ndarray        # int64 (k,) sorted distinct jump lengths
    checks: np.ndarray   # int64 (k,) visits checked (arrival inside the sequence)
    ok: np.ndarray       # int64 (k,) of those, in the target block

    def as_dict(self) -> dict[int, tuple[int, int]]:
        """{r: (checks, ok)}, plain ints (what result.json holds per jump length)."""
        return {int(r): (int(c), int(o)) for r, c, o in zip(self.r, self.checks, self.ok)}

    def __add__(self, other: "JumpLengthCounts") -> "JumpLengthCounts":
        if not np.array_equal(self.r, other.r):
            raise ValueError(f"jump lengths differ: {self.r.tolist()} vs {other.r.tolist()}")
        return JumpLengthCounts(self.r, self.checks + other.checks, self.ok + other.ok)


def rule_counts_by_jump_length(seqs: np.ndarray, table: RuleTable, weights: np.ndarray | None = None
                               ) -> JumpLengthCounts:
    """check_sequences' rule counts split by the visited jumper's r; the sums equal its rule totals
    (`weights` as there)."""
    rs = table.jump_lengths
    s, bad = _as_2d(seqs, table.n)
    if s.shape[0] == 0 or s.shape[1] == 0 or rs.size == 0:
        z = np.zeros(rs.size, dtype=np.int64)
        return JumpLengthCounts(rs, z, z.copy())
    rows, r, hit = _rule_visits(s, bad, table)
    k = np.searchsorted(rs, r)
    w = None if weights is None else np.asarray(weights, dtype=np.int64)[rows]
    return JumpLengthCounts(rs, np.bincount(k, w, minlength=rs.size).astype(np.int64),
                            np.bincount(k[hit], None if w is None else w[hit], minlength=rs.size).astype(np.int64))
