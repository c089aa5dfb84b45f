"""Directed degree-corrected SBM with jumper rules.

Edges are sampled in row chunks straight into CSR, so memory follows the
edge count, never n².  Everything random comes from numpy Generators seeded
by the caller's seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

# Fixed (not memory-dependent) so the same seed always gives the same graph.
_CHUNK_CELLS = 1 << 22
MIN_EXPECTED_DEGREE = 3.0


@dataclass(frozen=True, eq=False)
class Graph:
    n: int
    K: int
    indptr: np.ndarray   # int64 (n+1,)
    indices: np.ndarray  # int32, sorted within each row
    seed: int            # the seed whose draw passed validation

    @property
    def block_size(self) -> int:
        return self.n // self.K

    def block_of(self) -> np.ndarray:
        return np.arange(self.n, dtype=np.int64) // self.block_size

    def out_degree(self) -> np.ndarray:
        return np.diff(self.indptr)

    @property
    def n_edges(self) -> int:
        return int(self.indptr[-1])

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        src = np.repeat(np.arange(self.n, dtype=np.int32), self.out_degree())
        return src, self.indices.astype(np.int32, copy=False)

    @classmethod
    def from_edges(cls, n: int, K: int, src: np.ndarray, dst: np.ndarray, seed: int) -> "Graph":
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        order = np.lexsort((dst, src))
        src, dst = src[order], dst[order]
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(src, minlength=n), out=indptr[1:])
        return cls(n=int(n), K=int(K), indptr=indptr, indices=dst.astype(np.int32), seed=int(seed))

    def adjacency(self) -> sp.csr_array:
        data = np.ones(self.indices.shape[0], dtype=np.int8)
        return sp.csr_array((data, self.indices, self.indptr), shape=(self.n, self.n))


class GraphValidationError(ValueError):
    """Every attempted seed failed validation; the message names each failed check."""


def zipf_theta(n: int, K: int, rng: np.random.Generator) -> np.ndarray:
    """Per block: raw 1/rank with ranks randomly permuted, normalised to sum block_size."""
    bs = n // K
    theta = np.empty(n, dtype=np.float64)
    for b in range(K):
        raw = 1.0 / (rng.permutation(bs) + 1.0)
        theta[b * bs:(b + 1) * bs] = raw * (bs / raw.sum())
    return theta


@dataclass(frozen=True, eq=False)
class _Draw:
    indptr: np.ndarray
    indices: np.ndarray
    exp_degree: np.ndarray   # (n,) expected out-degree
    pair_mean: np.ndarray    # (K, K) expected edge count per block pair
    pair_var: np.ndarray     # (K, K) variance of that count (sum of p(1-p))


def _sample(n: int, K: int, p_in: float, p_out: float, seed: int) -> _Draw:
    rng = np.random.default_rng(seed)
    bs = n // K
    theta = zipf_theta(n, K, rng)
    theta32 = theta.astype(np.float32)
    chunk = max(1, _CHUNK_CELLS // n)
    counts = np.zeros(n, dtype=np.int64)
    parts: list[np.ndarray] = []
    exp_degree = np.empty(n)
    pair_mean = np.zeros((K, K))
    pair_var = np.zeros((K, K))
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        c = r1 - r0
        P = np.multiply.outer(theta32[r0:r1] * np.float32(p_out), theta32)
        for b in range(r0 // bs, (r1 - 1) // bs + 1):  # in-block cells get p_in instead
            lo, hi = max(r0, b * bs), min(r1, (b + 1) * bs)
            P[lo - r0:hi - r0, b * bs:(b + 1) * bs] = np.multiply.outer(
                theta32[lo:hi] * np.float32(p_in), theta32[b * bs:(b + 1) * bs])
        np.minimum(P, 1.0, out=P)
        P[np.arange(c), np.arange(r0, r1)] = 0.0  # no self loops
        hit = rng.random((c, n), dtype=np.float32) < P
        rows, cols = np.nonzero(hit)  # row-major, so columns come out sorted
        counts[r0:r1] = np.bincount(rows, minlength=c)
        parts.append(cols.astype(np.int32))
        # expectations in float64 on the same clipped P: per-row sums by column block
        mean_rb = P.reshape(c, K, bs).sum(axis=2, dtype=np.float64)
        P *= 1.0 - P
        var_rb = P.reshape(c, K, bs).sum(axis=2, dtype=np.float64)
        exp_degree[r0:r1] = mean_rb.sum(axis=1)
        rb = np.arange(r0, r1) // bs
        np.add.at(pair_mean, rb, mean_rb)
        np.add.at(pair_var, rb, var_rb)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return _Draw(indptr, indices, exp_degree, pair_mean, pair_var)


def pair_z(K: int) -> float:
    """Per-pair band so that all K² pairs pass together as often as one 2σ test (95.45%).

    A plain 2σ band on each of K² pairs rejects most fair draws once K grows
    (about half at K=4, 97% at K=8), so the 2σ level is applied family-wise (Šidák).
    """
    from scipy.stats import norm

    coverage = norm.cdf(2.0) - norm.cdf(-2.0)
    per_pair = coverage ** (1.0 / (K * K))
    return float(norm.ppf(0.5 + per_pair / 2.0))


def _failed_checks(g: Graph, d: _Draw) -> list[str]:
    fails: list[str] = []
    n_comp, _ = connected_components(g.adjacency(), directed=True, connection="strong")
    if n_comp != 1:
        fails.append(f"not strongly connected ({n_comp} strong components)")
    min_deg = float(d.exp_degree.min()) if g.n else 0.0
    if min_deg < MIN_EXPECTED_DEGREE:
        fails.append(f"min expected out-degree {min_deg:.3f} < {MIN_EXPECTED_DEGREE:g}")
    src, dst = g.edges()
    blk = g.block_of()
    obs = np.bincount(blk[src] * g.K + blk[dst], minlength=g.K * g.K).reshape(g.K, g.K)
    # count of independent Bernoullis: sigma = sqrt(sum p(1-p)); density scales both sides equally
    dev = np.abs(obs - d.pair_mean)
    z = pair_z(g.K)
    tol = z * np.sqrt(d.pair_var) + 1e-6
    bad = np.argwhere(dev > tol)
    if len(bad):
        desc = ", ".join(
            f"({a},{b}): {obs[a, b]} edges vs expected {d.pair_mean[a, b]:.1f} ± {z:.2f}σ={tol[a, b]:.1f}"
            for a, b in bad)
        fails.append(f"block-pair density outside its 2σ band (family-wise over {g.K * g.K} pairs: "
                     f"{z:.2f}σ each): {desc}")
    return fails


def build_graph(n: int, K: int, p_in: float, p_out: float, seed: int,
                max_attempts: int = 10) -> Graph:
    if K < 1 or n % K != 0:
        raise ValueError(f"n={n} must be a positive multiple of K={K}")
    report: list[str] = []
    for attempt in range(max_attempts):
        s = seed + attempt
        d = _sample(n, K, p_in, p_out, s)
        g = Graph(n=n, K=K, indptr=d.indptr, indices=d.indices, seed=s)
        fails = _failed_checks(g, d)
        if not fails:
            return g
        report.append(f"seed {s}: " + "; ".join(fails))
    tried = list(range(seed, seed + max_attempts))
    raise GraphValidationError(
        f"graph validation failed for n={n}, K={K}, p_in={p_in}, p_out={p_out} "
        f"after {max_attempts} attempts (seeds tried: {tried}):\n  " + "\n  ".join(report))


# ---------------------------------------------------------------- jumpers

@dataclass(frozen=True, eq=False)
class Jumpers:
    vertex: np.ndarray        # int64 (J,)
    block: np.ndarray         # int64 (J,)
    target_block: np.ndarray  # int64 (J,)
    r: np.ndarray             # int64 (J,)

    def __len__(self) -> int:
        return int(self.vertex.shape[0])

    def to_records(self) -> list[dict]:
        return [{"vertex": int(v), "block": int(b), "target_block": int(t), "r": int(r)}
                for v, b, t, r in zip(self.vertex, self.block, self.target_block, self.r)]

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> "Jumpers":
        def col(k: str) -> np.ndarray:
            return np.asarray([int(rec[k]) for rec in records], dtype=np.int64)
        return cls(vertex=col("vertex"), block=col("block"),
                   target_block=col("target_block"), r=col("r"))


def jump_lengths(r_scales: Sequence[float], w: int) -> list[int]:
    return sorted({max(1, int(round(s * w))) for s in r_scales})


def reachable_blocks(graph: Graph, v: int, steps: int,
                     At: sp.csr_array | None = None) -> np.ndarray:
    """Blocks containing a vertex reachable from v in exactly `steps` steps (bool (K,)).

    Frontier sets are eventually periodic; once one repeats, jump ahead instead of
    iterating all the way (r can be 128+ on a 10k-vertex graph)."""
    if At is None:
        At = graph.adjacency().T.tocsr()
    x = np.zeros(graph.n, dtype=bool)
    x[v] = True
    seen: dict[bytes, int] = {}
    history: list[np.ndarray] = []
    k = 0
    while k < steps:
        key = np.packbits(x).tobytes()
        if key in seen:
            start = seen[key]
            period = k - start
            x = history[start + (steps - start) % period]
            break
        seen[key] = k
        history.append(x)
        x = (At @ x.astype(np.int8)) > 0
        k += 1
    hit = np.zeros(graph.K, dtype=bool)
    hit[np.unique(np.nonzero(x)[0] // graph.block_size)] = True
    return hit


def place_jumpers(graph: Graph, n_per_block: int, r_scales: Sequence[float], w: int,
                  seed: int) -> Jumpers:
    if graph.K < 2 and n_per_block > 0:
        raise ValueError("jumpers need K >= 2 (target block must differ from own)")
    rng = np.random.default_rng(seed)
    rs = jump_lengths(r_scales, w)
    bs = graph.block_size
    At = graph.adjacency().T.tocsr()
    verts, blocks, targets, rvals = [], [], [], []
    j = 0
    for b in range(graph.K):
        order = b * bs + rng.permutation(bs)
        pos = 0
        for _ in range(n_per_block):
            r = rs[j % len(rs)]
            j += 1
            tgt = int(rng.choice([x for x in range(graph.K) if x != b]))
            while True:
                if pos >= len(order):
                    raise ValueError(
                        f"block {b}: no vertex has target block {tgt} and another block "
                        f"reachable in exactly r={r} steps")
                v = int(order[pos])
                pos += 1
                hit = reachable_blocks(graph, v, r, At)
                if hit[tgt] and hit.sum() >= 2:
                    break
            verts.append(v); blocks.append(b); targets.append(tgt); rvals.append(r)
    a = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return Jumpers(vertex=a(verts), block=a(blocks), target_block=a(targets), r=a(rvals))
