"""Rule-compliant random walks (SPEC §2), vectorised over walks, stepping over t.

Each step proposes a uniform out-neighbour; walks with pending rules accept it
only if every pending rule stays satisfiable (rejection keeps the draw uniform
over the allowed set); the rare leftovers are finished exactly by enumerating
their neighbours.  Pairwise checks are necessary, not sufficient, so every walk
is verified with the gate's own checker and failures are redrawn.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .compliance import RuleTable, per_sequence_edge_violations, per_sequence_rule_violations
from .graph import Graph, Jumpers

_CHUNK = 16384          # walks per vectorised pass; fixed so results are deterministic
_REJECT_ROUNDS = 3      # rejection rounds before exact enumeration
_MAX_REDRAWS = 100


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


@dataclass(frozen=True, eq=False)
class WalkBatch:
    walks: np.ndarray     # int32 (n_walks, walk_length)
    n_regenerated: int    # walks redrawn after a dead end or a failed verification


class _Sampler:
    def __init__(self, graph: Graph, jumpers: Jumpers, L: int, rng: np.random.Generator):
        self.g, self.j, self.L, self.rng = graph, jumpers, L, rng
        self.table = RuleTable.build(graph, jumpers)
        self.reach = reachability(graph, max(L - 1, 0))
        self.indptr = graph.indptr
        self.indices = graph.indices.astype(np.int32)
        self.deg = graph.out_degree()
        n, K = graph.n, graph.K
        self.n, self.K = n, K
        self.R = self.reach.vertex.reshape(-1)  # flat: (k*n + v)*K + B
        self.BB = self.reach.block.reshape(-1)  # flat: (k*K + A)*K + B
        self.r_of, self.tgt_of = self.table.r_of, self.table.target_of
        # rules further than `horizon` steps away constrain nothing: R[k] is all-True there
        sat_all = self.reach.saturated and bool(self.reach.vertex[-1].all())
        self.horizon = self.reach.last if sat_all else L + 1

    # ---- rule state: D[w, p] deadline (absolute step), T[w, p] target; D < t means empty slot
    def _add_rules(self, D: np.ndarray, T: np.ndarray, u: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        r = self.r_of[u]
        w = np.nonzero((r > 0) & (t + r <= self.L - 1))[0]  # only deadlines inside the walk
        if w.size == 0:
            return D, T
        free = D[w] < t
        need_col = ~free.any(axis=1)
        if need_col.any():
            D = np.concatenate([D, np.full((D.shape[0], 1), -1, D.dtype)], axis=1)
            T = np.concatenate([T, np.zeros((T.shape[0], 1), T.dtype)], axis=1)
            free = D[w] < t
        slot = free.argmax(axis=1)
        D[w, slot] = t + r[w]
        T[w, slot] = self.tgt_of[u[w]]
        return D, T

    def _valid(self, D: np.ndarray, T: np.ndarray, u: np.ndarray, t: int) -> np.ndarray:
        """Candidate u at step t keeps every pending rule (rows of D, T) satisfiable."""
        live = D >= t
        k = self.reach.idx(D - t)
        ok = self.R[(k * self.n + u[:, None].astype(np.int64)) * self.K + T]
        ok |= ~live
        rn = self.r_of[u]
        has = (rn > 0) & (t + rn <= self.L - 1)
        if has.any():
            # the candidate's own rule must fit with each pending one (pairwise, block level)
            dn = (t + rn)[:, None]
            bn = self.tgt_of[u][:, None]
            gap = self.reach.idx(np.abs(dn - D))
            a = np.where(D < dn, T, bn)
            b = np.where(D < dn, bn, T)
            cons = np.where(D == dn, T == bn, self.BB[(gap * self.K + a) * self.K + b])
            ok &= cons | ~live | ~has[:, None]
        return ok.all(axis=1)

    def _propose(self, cur: np.ndarray) -> np.ndarray:
        d = self.deg[cur]
        off = (self.rng.random(cur.shape[0]) * d).astype(np.int64)
        return self.indices[self.indptr[cur] + np.minimum(off, np.maximum(d - 1, 0))]

    def generate(self, gidx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Walks for global indices gidx; returns (walks, dead-end mask)."""
        W, L, rng = gidx.shape[0], self.L, self.rng
        walks = np.empty((W, L), dtype=np.int32)
        J = len(self.j)
        even = (gidx % 2 == 0) if J else np.zeros(W, bool)
        start = rng.integers(0, self.n, size=W)
        if J:
            start[even] = self.j.vertex[(gidx[even] // 2) % J]
        walks[:, 0] = start
        dead = self.deg[start] == 0
        D = np.full((W, 1), -1, dtype=np.int64)
        T = np.zeros((W, 1), dtype=np.int64)
        D, T = self._add_rules(D, T, start, 0)
        for t in range(1, L):
            cur = walks[:, t - 1].astype(np.int64)
            u = self._propose(cur)
            # constrained: a pending rule within the horizon, or a jumper proposal while rules pend
            live = D >= t
            near = (live & (D < t + self.horizon)).any(axis=1)
            ci = np.nonzero(near | ((self.r_of[u] > 0) & live.any(axis=1)))[0]
            if ci.size:
                rej = ci[~self._valid(D[ci], T[ci], u[ci], t)]
                for _ in range(_REJECT_ROUNDS):
                    if rej.size == 0:
                        break
                    u[rej] = self._propose(cur[rej])
                    rej = rej[~self._valid(D[rej], T[rej], u[rej], t)]
                if rej.size:
                    nd = self._exact(rej, cur, u, D, T, t)
                    dead |= nd
                    D[nd] = -1  # a dead walk is redrawn anyway; stop constraining it
            walks[:, t] = u
            D, T = self._add_rules(D, T, u, t)
        return walks, dead

    def _exact(self, rej: np.ndarray, cur: np.ndarray, u: np.ndarray, D: np.ndarray,
               T: np.ndarray, t: int) -> np.ndarray:
        """Uniform over all valid neighbours for the leftover walks; returns dead-end mask."""
        d = self.deg[cur[rej]]
        grp = np.repeat(np.arange(rej.size), d)
        first = np.concatenate([[0], np.cumsum(d)[:-1]])
        pos = np.arange(grp.size) - first[grp] + self.indptr[cur[rej]][grp]
        cand = self.indices[pos]
        ok = self._valid(D[rej][grp], T[rej][grp], cand, t)
        cnt = np.bincount(grp[ok], minlength=rej.size)
        pick = (self.rng.random(rej.size) * cnt).astype(np.int64)
        okpos = np.nonzero(ok)[0]
        okfirst = np.concatenate([[0], np.cumsum(cnt)[:-1]])
        alive = cnt > 0
        u[rej[alive]] = cand[okpos[okfirst[alive] + pick[alive]]]
        dead = np.zeros(cur.shape[0], dtype=bool)
        dead[rej[~alive]] = True  # keeps its uniform proposal; redrawn after verification
        return dead

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
    for c0 in range(0, n_walks, _CHUNK):
        gidx = np.arange(first_index + c0, first_index + min(n_walks, c0 + _CHUNK), dtype=np.int64)
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
    is_j = r_of[walks] > 0
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
