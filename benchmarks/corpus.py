"""Graph build cost, compliant-walk throughput and corpus compliance at the anchor shape.

Run: python benchmarks/corpus.py [--skip-full]

Parts: graph build time and peak memory at n = 500, 2,000, 10,000; the sampler's
walks/s in one process against a one-walk-at-a-time Python generator; then the
whole anchor corpus (200,000 + 22,222 walks, written as Parquet) built by
`build_corpus` as Ray tasks with 1 and with 2 shards in parallel.
"""
from __future__ import annotations

import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raywalk.compliance import RuleTable, check_sequences  # noqa: E402
from raywalk.graph import build_graph, place_jumpers  # noqa: E402
from raywalk.walks import sample_walks  # noqa: E402

P_IN, P_OUT, K, SEED = 0.25, 0.03, 4, 42
SCALES = (0.5, 0.7, 0.9, 1.0, 1.1, 1.3, 1.5, 2.0)
W, L, N_WALKS, N_NAIVE = 64, 256, 20_000, 2_000


def naive_walks(graph, starts, length, rng):
    """Deliberately plain: one walk at a time, uniform neighbour, rules ignored."""
    indptr, indices = graph.indptr.tolist(), graph.indices.tolist()
    out = []
    for v in starts:
        walk = [int(v)]
        for _ in range(length - 1):
            lo, hi = indptr[v], indptr[v + 1]
            v = indices[lo + int(rng.random() * (hi - lo))]
            walk.append(v)
        out.append(walk)
    return np.array(out, dtype=np.int32)


def main() -> None:
    print("graph build (p_in 0.25, p_out 0.03, K=4):")
    for n in (500, 2_000, 10_000):
        tracemalloc.start()
        t0 = time.perf_counter()
        g = build_graph(n, K, P_IN, P_OUT, SEED)
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        t0 = time.perf_counter()
        place_jumpers(g, 2, SCALES, W, SEED)
        dj = time.perf_counter() - t0
        print(f"  n={n:>6}: {dt:6.2f} s, peak {peak / 2**20:7.1f} MiB, {g.n_edges:>9,} edges, "
              f"seed used {g.seed}; jumpers {dj:.2f} s")

    g = build_graph(500, K, P_IN, P_OUT, SEED)
    J = place_jumpers(g, 2, SCALES, W, SEED)
    T = RuleTable.build(g, J)
    print(f"anchor: n=500 K=4 w={W} L={L} r={J.r.tolist()}")
    t0 = time.perf_counter()
    b = sample_walks(g, J, N_WALKS, L, np.random.default_rng(SEED))
    dt = time.perf_counter() - t0
    c = check_sequences(b.walks, T)
    fast = N_WALKS / dt
    print(f"  raywalk sampler: {N_WALKS:,} walks in {dt:.2f} s = {fast:,.0f} walks/s "
          f"({222_222 / fast:.1f} s per 222,222); n_regenerated={b.n_regenerated}")
    print(f"    edge compliance {100 * c.edge:.3f}%, rule compliance {100 * c.rule:.3f}% "
          f"({c.rule_ok:,}/{c.rule_total:,} checks)")

    rng = np.random.default_rng(SEED)
    gi = np.arange(N_NAIVE)
    starts = np.where(gi % 2 == 0, J.vertex[(gi // 2) % len(J)], rng.integers(0, g.n, N_NAIVE))
    t0 = time.perf_counter()
    nw = naive_walks(g, starts, L, rng)
    dn = time.perf_counter() - t0
    cn = check_sequences(nw, T)
    slow = N_NAIVE / dn
    print(f"  naive per-walk Python sampler (rules ignored): {slow:,.0f} walks/s, "
          f"edge {100 * cn.edge:.3f}%, rule {100 * cn.rule:.3f}% ({cn.rule_ok:,}/{cn.rule_total:,})")
    print(f"  speed ratio raywalk/naive: {fast / slow:.1f}x")
    if "--skip-full" not in sys.argv:
        full_corpus()


def full_corpus() -> None:
    import tempfile

    from raywalk.config import Config
    from raywalk.corpus import build_corpus, ray_mapper
    from raywalk.ray_env import ensure_ray
    from raywalk.storage import Store

    anchor = Path(__file__).resolve().parents[1] / "configs" / "anchor.yaml"
    cfg = Config.load(anchor)
    ensure_ray(cfg)
    print("anchor corpus through build_corpus (Ray tasks, Parquet shards, manifest):")
    for parallel in (1, 2):
        root = Store.open(tempfile.mkdtemp(prefix="raywalk-bench-corpus-"))
        t0 = time.perf_counter()
        corpus, s = build_corpus(cfg, root, mapper=ray_mapper(parallel), progress=False)
        dt = time.perf_counter() - t0
        walks = s["train"]["walks"] + s["eval"]["walks"]
        print(f"  {parallel} shard(s) at once: {walks:,} walks in {dt:.1f} s = {walks / dt:,.0f} walks/s; "
              f"rule compliance train {100 * s['train']['rule_compliance']:.3f}% "
              f"({s['train']['jumper_visits_checked']:,} visits), eval {100 * s['eval']['rule_compliance']:.3f}%; "
              f"regenerated {s['train']['regenerated'] + s['eval']['regenerated']}")


if __name__ == "__main__":
    main()
