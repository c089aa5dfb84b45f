"""Rule-compliant random walks: one compiled pass per walk, exact per step.

Each walk keeps a feasibility state: for every pending rule (deadline s, block B)
the mask G[s] of vertices of B from which every later pending rule can still be
met (exact joint feasibility, not pairwise).  Masks come from F[k][v, B], the
vertices of B reachable from v in exactly k steps; past the graph's primitivity
exponent H every vertex reaches every vertex, so rules more than H-1 steps apart
are independent and a step only looks at rules within H of it.  A step draws
uniformly over the out-neighbours that keep the state feasible, a jumper's own
new rule included (memory: a ring of max(r)+1 deadline slots per walk).  Rules of
jumpers not yet visited are not foreseen, so a walk can still meet a dead end;
it is redrawn, and every walk is verified with the gate's own checker.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raywalk.science.compliance import RuleTable, per_sequence_edge_violations, per_sequence_rule_violations
from raywalk.science.graph import Graph, Jumpers

try:
    from numba import njit
except ImportError:   # the same kernel as plain Python: correct, about 100x slower
    def njit(*a, **k):
        return (lambda f: f) if not (len(a) == 1 and callable(a[0])) else a[0]

_CHUNK_TOKENS = 1 << 21   # walks per pass = this // L: bounds the random draws held (16 MiB); fixed => deterministic
_MAX_REDRAWS = 100
_MAX_TABLE_BYTES = 1 << 28  # F tables of a graph that never becomes primitive within L steps


@dataclass(frozen=True, eq=False)
class Reach:
    """R[k][v, B]: v can be in block B after exactly k steps; BB[k][A, B] block-level."""
    vertex: np.ndarray   # bool (S+1, n, K)
    block: np.ndarray    # bool (S+1, K, K)
    last: int            # S: tables for k > S equal those at S when `saturated`
    saturated: bool

    def idx(self, k: np.ndarray) -> np.ndarray:
        return np.clip(k, 0, self.last)


def reachability(graph: Graph, max_steps: int) -> Reach:
    n, K, bs = graph.n, graph.K, graph.block_size
    A = graph.adjacency().astype(np.float32)
    R = np.zeros((n, K), dtype=bool)
    R[np.arange(n), graph.block_of()] = True
    tables = [R]
    saturated = False
    for _ in range(max(0, max_steps)):
        nxt = (A @ R.astype(np.float32)) > 0
        if np.array_equal(nxt, R):  # fixed point: identical for every larger k
            saturated = True
            break
        tables.append(nxt)
        R = nxt
    vt = np.stack(tables)
    bt = vt.reshape(len(tables), K, bs, K).any(axis=2)
    return Reach(vertex=vt, block=bt, last=len(tables) - 1, saturated=saturated)


# ---- exact per-step feasibility -------------------------------------------------------------

def feasibility_tables(graph: Graph, max_steps: int, until: int | None = None) -> tuple[np.ndarray, int, bool]:
    """F[k][v, B]: bitmask over block B's vertices reachable from v in exactly k steps, k = 0..H.

    saturated: F[H] is all ones (the graph is primitive: so is every F[k], k >= H), and
    rules H or more steps apart constrain each other no more than any walk does.
    Else H = max_steps (every gap a walk can have is tabled).  Size (H+1)·n·K·ceil(bs/64) words.
    until: build exactly k = 0..until (another table's H), saturated or not."""
    n, K, bs = graph.n, graph.K, graph.block_size
    nw = (bs + 63) // 64
    v = np.arange(n)
    loc = v % bs
    F0 = np.zeros((n, K, nw), np.uint64)
    F0[v, v // bs, loc >> 6] = np.left_shift(np.uint64(1), (loc & 63).astype(np.uint64))
    full = _full_mask(bs)
    tabs, cur = [F0], F0
    deg = graph.out_degree()
    starts = graph.indptr[:-1].copy()
    nz = deg > 0
    saturated = bool((F0 == full).all())
    while (len(tabs) <= until) if until is not None else (not saturated and len(tabs) <= max_steps):
        nxt = np.zeros_like(cur)
        if nz.any():  # a vertex's k-step set is the union of its out-neighbours' (k-1)-step sets
            nxt[nz] = np.bitwise_or.reduceat(cur[graph.indices], starts[nz], axis=0)
        tabs.append(nxt)
        cur = nxt
        saturated = bool((nxt == full).all())
        if len(tabs) * nxt.nbytes > _MAX_TABLE_BYTES:
            raise ValueError(f"graph (n={n}, K={K}) is not primitive within {len(tabs)} steps: its exact-step "
                             f"reachability tables would exceed {_MAX_TABLE_BYTES >> 20} MiB")
    return np.stack(tabs), len(tabs) - 1, saturated


def _full_mask(bs: int) -> np.ndarray:
    nw = (bs + 63) // 64
    m = np.full(nw, np.iinfo(np.uint64).max, np.uint64)
    if bs % 64:
        m[-1] = np.uint64((1 << (bs % 64)) - 1)
    return m


# Kernel state per walk: req[s & Mm] = block due at step s (-1: none); G[s & Mm] = its feasible mask; rows
# M, M+1 of G are scratch.  Masks are addressed by row, never sliced: a view costs refcounting.

@njit(cache=True, nogil=True)
def _reach(F, H, u, g, B, G, row):
    """Some vertex of mask G[row] (within block B) is reachable from u in exactly g steps."""
    gi = g if g < H else H
    for w in range(G.shape[1]):
        if F[gi, u, B, w] & G[row, w]:
            return True
    return False


@njit(cache=True, nogil=True)
def _filter(Fin, Rb, H, B, bs, g, B2, G, src, dst, full):
    """G[dst] = vertices of block B from which G[src] (within block B2) is reachable in exactly g steps."""
    gi = g if g < H else H
    nw = G.shape[1]
    isfull = True
    for w in range(nw):
        if G[src, w] != full[w]:
            isfull = False
            break
    if isfull:                        # a rule nothing later constrains: a block-to-block table
        for w in range(nw):
            G[dst, w] = Rb[gi, B2, B, w]
    else:                             # union of the in-reach of each vertex left in the mask
        for w in range(nw):
            G[dst, w] = 0
        base = B2 * bs
        for i in range(bs):
            if (G[src, i >> 6] >> np.uint64(i & 63)) & np.uint64(1):
                for w in range(nw):
                    G[dst, w] |= Fin[gi, base + i, B, w]
    for w in range(nw):
        if G[dst, w]:
            return True
    return False


@njit(cache=True, nogil=True)
def _add_rule(req, G, F, Fin, Rb, H, bs, Mm, reach_w, rmax, u, t, dn, b, base_ok, commit, full):
    """Does candidate u at step t (base_ok: it keeps the pending rules) stay feasible with its own rule
    (deadline dn, block b) added?  commit: apply the rule to the state (u was chosen)."""
    M = Mm + 1
    nw = G.shape[1]
    slot = dn & Mm
    if req[slot] >= 0:                       # a rule already falls due at dn
        return base_ok and req[slot] == b
    nxt = -1                                 # the next pending rule after dn, if it constrains dn
    g = 1
    while g <= reach_w and dn + g <= t + rmax - 1:
        if req[(dn + g) & Mm] >= 0:
            nxt = dn + g
            break
        g += 1
    if nxt >= 0:
        if not _filter(Fin, Rb, H, b, bs, nxt - dn, req[nxt & Mm], G, nxt & Mm, M, full):
            return False
    else:
        for w in range(nw):
            G[M, w] = full[w]
    if commit:
        req[slot] = b
        for w in range(nw):
            G[slot, w] = G[M, w]
    cur, other = M, M + 1
    curd, curB, ok = dn, b, base_ok
    while True:                               # propagate back through the rules that dn constrains
        s = -1
        g = 1
        while g <= reach_w and curd - g >= t:
            if req[(curd - g) & Mm] >= 0:
                s = curd - g
                break
            g += 1
        if s < 0:
            if curd - t <= reach_w:           # curd is the first rule due: u must reach its new mask
                ok = _reach(F, H, u, curd - t, curB, G, cur)
            break
        sB = req[s & Mm]
        if not _filter(Fin, Rb, H, sB, bs, curd - s, curB, G, cur, other, full):
            return False
        same = True
        for w in range(nw):
            if G[other, w] != G[s & Mm, w]:
                same = False
                break
        if same:                              # unchanged here => unchanged further back
            break
        if commit:
            for w in range(nw):
                G[s & Mm, w] = G[other, w]
        cur, other = other, cur
        curd, curB = s, sB
    return ok


@njit(cache=True, nogil=True)
def _step_ok(k, mid, s1, t, L, nbr, r_of, tgt_of, req, G, F, Fin, Rb, H, bs, Mm, reach_w, rmax, full):
    """Neighbour nbr[k] at step t keeps every pending rule satisfiable, its own new rule included."""
    u = nbr[k]
    ok = s1 < 0 or _reach(F, H, u, s1 - t, req[s1 & Mm], G, s1 & Mm)
    if ok and k >= mid and t + r_of[u] <= L - 1:
        ok = _add_rule(req, G, F, Fin, Rb, H, bs, Mm, reach_w, rmax, u, t, t + r_of[u], tgt_of[u], ok, False, full)
    return ok


@njit(cache=True, nogil=True)
def _drop(cand, j, total, seeded, seed):
    """Remove candidate j (swap with the last) before a redraw; seed the walk's redraw stream on its first use."""
    total -= 1
    cand[j] = cand[total]
    if not seeded:
        np.random.seed(seed)
    return total


@njit(cache=True, nogil=True)
def _walk_kernel(starts, U, seeds, L, indptr, nbr, n_free, r_of, tgt_of, F, Fin, Rb, H, bs, reach_w, rmax, full,
                 out, dead):
    W = starts.shape[0]
    M = 1
    while M < rmax + 1:                       # deadlines pending at step t lie in [t, t+rmax]: distinct slots
        M *= 2
    Mm = M - 1
    nw = full.shape[0]
    req = np.full(M, -1, np.int64)
    G = np.zeros((M + 2, nw), np.uint64)
    maxdeg = 64 * nw                          # a block's vertices, for a rule due now
    for v in range(indptr.shape[0] - 1):
        maxdeg = max(maxdeg, indptr[v + 1] - indptr[v])
    cand = np.empty(maxdeg, np.int64)
    for i in range(W):
        req[:] = -1
        x = starts[i]
        out[i, 0] = x
        r = r_of[x]
        if r > 0 and r <= L - 1:
            req[r & Mm] = tgt_of[x]
            for w in range(nw):
                G[r & Mm, w] = full[w]
        isdead = False
        seeded = False
        for t in range(1, L):
            lo, hi = indptr[x], indptr[x + 1]
            if hi == lo:                      # no way on: a dead end (validated graphs have none)
                dead[i] = True
                out[i, t:] = x
                break
            mid = lo + n_free[x]              # nbr rows: non-jumpers first, then jumpers
            if isdead:
                x = nbr[lo + min(int(U[i, t] * (hi - lo)), hi - lo - 1)]
                out[i, t] = x
                continue
            s1 = -1                           # the first rule due within reach of this step
            g = 0
            while g <= reach_w and g <= rmax - 1:
                if req[(t + g) & Mm] >= 0:
                    s1 = t + g
                    break
                g += 1
            # Uniform over the valid neighbours by rejection without replacement: draw among those left,
            # drop an invalid one, draw again.  The first draw is U[i, t]; redraws come from the compiled
            # generator, seeded per walk from seeds[i] on its first redraw (deterministic, exact).
            y = U[i, t]
            u = -1
            if s1 == t:                       # a rule due now: the valid set is within N(x) & G[t], as bits
                B1 = req[t & Mm]
                total = 0
                for w in range(nw):
                    m = F[1 if H >= 1 else 0, x, B1, w] & G[t & Mm, w]
                    for q in range(64):
                        if (m >> np.uint64(q)) & np.uint64(1):
                            cand[total] = B1 * bs + w * 64 + q
                            total += 1
                while total > 0:
                    j = min(int(y * total), total - 1)
                    uu = cand[j]
                    if r_of[uu] == 0 or t + r_of[uu] > L - 1 or _add_rule(
                            req, G, F, Fin, Rb, H, bs, Mm, reach_w, rmax, uu, t, t + r_of[uu], tgt_of[uu], True,
                            False, full):
                        u = uu
                        break
                    total = _drop(cand, j, total, seeded, seeds[i])
                    seeded = True
                    y = np.random.random()
            else:
                total = hi - lo
                listed = False
                while total > 0:
                    j = min(int(y * total), total - 1)
                    kk = cand[j] if listed else lo + j
                    if (s1 < 0 and kk < mid) or _step_ok(kk, mid, s1, t, L, nbr, r_of, tgt_of, req, G, F, Fin, Rb,
                                                         H, bs, Mm, reach_w, rmax, full):
                        u = nbr[kk]
                        break
                    if not listed:
                        for q in range(total):
                            cand[q] = lo + q
                        listed = True
                    total = _drop(cand, j, total, seeded, seeds[i])
                    seeded = True
                    y = np.random.random()
            if u < 0:                         # every continuation breaks a rule: redrawn after this pass
                dead[i] = True
                isdead = True
                x = nbr[lo + min(int(U[i, t] * (hi - lo)), hi - lo - 1)]
                out[i, t] = x
                continue
            dn = t + r_of[u]
            if r_of[u] > 0 and dn <= L - 1:
                _add_rule(req, G, F, Fin, Rb, H, bs, Mm, reach_w, rmax, u, t, dn, tgt_of[u], True, True, full)
            req[t & Mm] = -1                  # the rule due now is kept; its slot serves step t + M
            x = u
            out[i, t] = u


@dataclass(frozen=True, eq=False)
class WalkBatch:
    walks: np.ndarray     # int32 (n_walks, walk_length)
    n_regenerated: int    # walks redrawn after a dead end or a failed verification


class _Sampler:
    def __init__(self, graph: Graph, jumpers: Jumpers, L: int, rng: np.random.Generator):
        self.g, self.j, self.L, self.rng = graph, jumpers, L, rng
        self.table = RuleTable.build(graph, jumpers)
        self.n = graph.n
        self.r_of, self.tgt_of = self.table.r_of, self.table.target_of
        self.F, self.H, sat = feasibility_tables(graph, max(L - 1, 1))
        rev = Graph.from_edges(graph.n, graph.K, graph.indices, np.repeat(np.arange(graph.n), graph.out_degree()),
                               graph.seed)
        # Fin[k][x, B]: vertices of B that reach x in exactly k steps; Rb[k][B2, B]: ... that reach block B2
        self.Fin, _, _ = feasibility_tables(rev, self.H, until=self.H)
        K, bs = graph.K, graph.block_size
        self.Rb = np.bitwise_or.reduce(self.Fin.reshape(self.H + 1, K, bs, K, -1), axis=2)
        self.reach_w = self.H - 1 if sat else L       # rules further apart than this are independent
        self.rmax = int(self.r_of.max(initial=0))
        self.full = _full_mask(graph.block_size)
        row = np.repeat(np.arange(graph.n), graph.out_degree())
        isj = self.r_of[graph.indices] > 0
        order = np.lexsort((isj, row))          # per row: non-jumpers, then jumpers, each ascending
        self.nbr = graph.indices[order].astype(np.int64)
        self.indptr = graph.indptr.astype(np.int64)
        self.n_free = np.bincount(row[~isj], minlength=graph.n).astype(np.int64)

    def generate(self, gidx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Walks for global indices gidx; returns (walks, dead-end mask)."""
        W, L, rng = gidx.shape[0], self.L, self.rng
        J = len(self.j)
        even = (gidx % 2 == 0) if J else np.zeros(W, bool)
        start = rng.integers(0, self.n, size=W)
        if J:
            start[even] = self.j.vertex[(gidx[even] // 2) % J]
        U = rng.random((W, L))
        seeds = rng.integers(0, 2**32, size=W, dtype=np.uint64).astype(np.int64)
        walks = np.empty((W, L), dtype=np.int32)
        dead = np.zeros(W, dtype=bool)
        _walk_kernel(start.astype(np.int64), U, seeds, L, self.indptr, self.nbr, self.n_free, self.r_of, self.tgt_of,
                     self.F, self.Fin, self.Rb, self.H, self.g.block_size, self.reach_w, self.rmax, self.full,
                     walks, dead)
        return walks, dead

    def failed(self, walks: np.ndarray, dead: np.ndarray) -> np.ndarray:
        return dead | (per_sequence_rule_violations(walks, self.table) > 0) | \
            (per_sequence_edge_violations(walks, self.table) > 0)


def sample_walks(graph: Graph, jumpers: Jumpers, n_walks: int, walk_length: int,
                 rng: np.random.Generator, first_index: int = 0) -> WalkBatch:
    """n_walks walks, every jumper visit compliant (verified); deterministic given rng."""
    if walk_length < 1:
        raise ValueError("walk_length must be >= 1")
    s = _Sampler(graph, jumpers, walk_length, rng)
    out = np.empty((n_walks, walk_length), dtype=np.int32)
    regenerated = 0
    chunk = max(1, _CHUNK_TOKENS // walk_length)
    for c0 in range(0, n_walks, chunk):
        gidx = np.arange(first_index + c0, first_index + min(n_walks, c0 + chunk), dtype=np.int64)
        walks, dead = s.generate(gidx)
        bad = np.nonzero(s.failed(walks, dead))[0]
        for _ in range(_MAX_REDRAWS):
            if bad.size == 0:
                break
            regenerated += bad.size
            redo, rdead = s.generate(gidx[bad])  # same global index => same start rule
            walks[bad] = redo
            bad = bad[s.failed(redo, rdead)]
        else:
            raise RuntimeError(f"{bad.size} walks still non-compliant after {_MAX_REDRAWS} redraws")
        out[c0:c0 + walks.shape[0]] = walks
    return WalkBatch(walks=out, n_regenerated=regenerated)


EVENT_FIELDS = ("event_vertex", "event_step", "event_target", "event_arrival")


def jumper_events(walks: np.ndarray, table: RuleTable | Jumpers) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-walk jumper visits as {field: (values int32, offsets int32)}, row-major order.

    offsets has n_walks+1 entries (shared by all fields), so
    pyarrow.ListArray.from_arrays(offsets, values) gives one list per walk.
    event_arrival = step + r and may exceed L-1 (then the rule is not checked)."""
    walks = np.asarray(walks)
    if isinstance(table, Jumpers):
        size = int(max(walks.max(initial=-1), table.vertex.max(initial=-1))) + 1
        r_of = np.zeros(size, np.int64)
        tgt_of = np.full(size, -1, np.int64)
        r_of[table.vertex] = table.r
        tgt_of[table.vertex] = table.target_block
    else:
        r_of, tgt_of = table.r_of, table.target_of
    is_j = (r_of > 0)[walks]           # a bool gather: an int64 one is 8 bytes per token of the shard
    rows, steps = np.nonzero(is_j)
    v = walks[rows, steps]
    offsets = np.zeros(walks.shape[0] + 1, dtype=np.int32)
    np.cumsum(is_j.sum(axis=1), out=offsets[1:])
    vals = {
        "event_vertex": v.astype(np.int32),
        "event_step": steps.astype(np.int32),
        "event_target": tgt_of[v].astype(np.int32),
        "event_arrival": (steps + r_of[v]).astype(np.int32),
    }
    return {k: (vals[k], offsets) for k in EVENT_FIELDS}
