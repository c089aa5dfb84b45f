"""Graph build cost, compliant-walk throughput and corpus compliance at the anchor shape.

Run: python benchmarks/corpus.py [--skip-full] [--skip-cluster]
     python benchmarks/corpus.py --cluster-only [--tenfold-walks N]   (or --cold-only)
     python benchmarks/corpus.py --horizons [--scale F]   (anchor vs long horizon, one run)

Parts: graph build time and peak memory at n = 500, 2,000, 10,000; the sampler's
walks/s in one process against a one-walk-at-a-time Python generator; then the
whole anchor corpus (200,000 + 22,222 walks, written as Parquet) built by
`build_corpus` as Ray tasks with 1 and with 2 shards in parallel.

Horizons part: the anchor corpus (n 500, K 4, 2 jumpers/block, w 64, L 256, 222,222
walks) and the long-horizon one (n 512, K 16, 5 jumpers/block, w 256, L 1024, 56,888 walks), both
built by build_corpus as Ray tasks on one local Ray (started before the clock), tokens/s of each and
their ratio; the sampler alone in this process (sample_walks, 8,192 walks); and the peak memory of one
shard task (tracemalloc, make_shard of 8,192 walks) at the long horizon and at L = 2048.  --scale F
builds F times the walk counts (for quick iterations).

Cluster part, `before` = the old driver (in-flight limit computed once
from ray.available_resources(); every shard's bytes returned to the driver and
written at the end), `after` = build_corpus today (all tasks submitted, each task
writes its shard and returns path/size/sha256/stats):
- peak driver memory (tracemalloc peak of Python allocations, and the growth of the
  driver's peak RSS, VmHWM, during the build) for the anchor corpus and one 10x
  larger (2,000,000 + 222,222 walks), each variant in a fresh process with its own
  local Ray (2 CPUs);
- a cold cluster: a head with 0 CPUs (ray.cluster_utils.Cluster), the build started,
  the shard tasks it has submitted and the CPU demand the autoscaler sees
  (autoscaler v2 get_cluster_status) before any node can run them; then a 2-CPU
  worker node is added and the build runs to the end.
"""
from __future__ import annotations

import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raywalk.science.compliance import RuleTable, check_sequences  # noqa: E402
from raywalk.science.graph import build_graph, place_jumpers  # noqa: E402
from raywalk.science.walks import sample_walks  # noqa: E402

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
    if "--skip-cluster" not in sys.argv:
        cluster_part()


def full_corpus() -> None:
    import tempfile

    from raywalk.config import Config
    from raywalk.service.corpus import build_corpus, ray_mapper
    from raywalk.service.ray_env import ensure_ray
    from raywalk.records.storage import Store

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


# ---- the build on a cluster, before and after -------------------------------

def before_mapper(max_in_flight=None):
    """The old ray_mapper: its in-flight limit comes once from the CPUs available at the start."""
    import ray

    def run(fn, args):
        remote = ray.remote(num_cpus=1)(fn)
        shared = {id(a[k]): ray.put(a[k]) for a in args[:1] for k in range(3)}
        limit = max_in_flight or max(1, int(ray.available_resources().get("CPU", 1)))
        pending: dict = {}
        for i, a in enumerate(args):
            while len(pending) >= limit:
                done, _ = ray.wait(list(pending), num_returns=1)
                yield pending.pop(done[0]), ray.get(done[0])
            pending[remote.remote(*(shared.get(id(x), x) for x in a))] = i
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            yield pending.pop(done[0]), ray.get(done[0])

    return run


def build_before(cfg, root, mapper) -> int:
    """The old build: shard bytes come back to the driver, all held until every shard is done, then written."""
    import hashlib
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from raywalk.records.layout import CORPUS_GRAPH, corpus_shard
    from raywalk.service.corpus import make_shard, plan_shards

    graph = build_graph(cfg.graph.n, cfg.graph.K, cfg.graph.p_in, cfg.graph.p_out, cfg.seed)
    jumpers = place_jumpers(graph, cfg.graph.n_jumpers_per_block, cfg.graph.r_scales, cfg.w, cfg.seed)
    table = RuleTable.build(graph, jumpers)
    specs = plan_shards(cfg)
    work = root.sub("corpora", f".building-{cfg.corpus_id()}")
    checksums = {}
    src, dst = graph.edges()
    buf = io.BytesIO()
    pq.write_table(pa.table({"src": pa.array(src.astype(np.int32)), "dst": pa.array(dst.astype(np.int32))}), buf)
    work.write_bytes(CORPUS_GRAPH, buf.getvalue())
    results = {}
    for i, res in mapper(make_shard, [(graph, jumpers, table, s, cfg.seed, cfg.corpus.walk_length) for s in specs]):
        results[i] = res
    total = 0
    for i, spec in enumerate(specs):
        data, _ = results.pop(i)
        work.write_bytes(corpus_shard(spec.split, spec.index), data)
        checksums[corpus_shard(spec.split, spec.index)] = hashlib.sha256(data).hexdigest()
        total += len(data)
    work.write_json("manifest.json", {"checksums": checksums})
    return total


def _vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure_one(variant: str, corpus_size: int) -> None:
    """In a fresh process: build with `variant` and print one JSON line of driver memory figures."""
    import json
    import shutil
    import tempfile

    from raywalk.config import Config
    from raywalk.service.corpus import build_corpus, ray_mapper
    from raywalk.service.ray_env import ensure_ray
    from raywalk.records.storage import Store

    cfg = Config.load(Path(__file__).resolve().parents[1] / "configs" / "anchor.yaml",
                      [f"corpus.corpus_size={corpus_size}"])
    ensure_ray(cfg)
    tmp = tempfile.mkdtemp(prefix="raywalk-bench-mem-")
    root = Store.open(tmp)
    try:
        with open("/proc/self/clear_refs", "w") as f:   # reset the peak RSS (VmHWM) to the current RSS
            f.write("5")
        rss0 = _vm("VmRSS")
        tracemalloc.start()
        t0 = time.perf_counter()
        if variant == "before":
            build_before(cfg, root, before_mapper())
        else:
            build_corpus(cfg, root, mapper=ray_mapper(), progress=False, log=lambda s: None)
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        hwm = _vm("VmHWM")
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.parquet"))
        shards = sum(1 for _ in Path(tmp).rglob("part-*.parquet"))
        print(json.dumps({"variant": variant, "walks": corpus_size + corpus_size // 9, "shards": shards,
                          "corpus_bytes": size, "seconds": dt, "tracemalloc_peak": peak,
                          "rss_before": rss0, "rss_peak": hwm}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def memory_part(tenfold: int) -> None:
    import json
    import subprocess

    print("peak driver memory while building (each in a fresh process with its own local Ray):")
    print(f"  {'corpus':>22} {'variant':>7} {'shards':>6} {'parquet':>9} {'time':>7} "
          f"{'tracemalloc peak':>17} {'driver RSS growth':>18}")
    for size in (200_000, tenfold):
        for variant in ("before", "after"):
            out = subprocess.run([sys.executable, __file__, "--measure", variant, str(size)], capture_output=True,
                                 text=True, timeout=1800)
            line = [x for x in out.stdout.splitlines() if x.startswith("{")]
            if out.returncode or not line:
                print(f"  {variant} {size}: failed\n{out.stderr[-2000:]}")
                continue
            r = json.loads(line[-1])
            print(f"  {r['walks']:>16,} walks {r['variant']:>7} {r['shards']:>6} {r['corpus_bytes'] / 2**20:>7.0f}MiB "
                  f"{r['seconds']:>6.0f}s {r['tracemalloc_peak'] / 2**20:>15.1f}MiB "
                  f"{(r['rss_peak'] - r['rss_before']) / 2**20:>16.1f}MiB", flush=True)


def cold_cluster_part() -> None:
    """A 0-CPU head: how many shard tasks and how much CPU demand exist before any node can run them."""
    import tempfile
    import threading

    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status
    from ray.cluster_utils import Cluster

    from raywalk.config import Config
    from raywalk.service.corpus import build_corpus, plan_shards, ray_mapper
    from raywalk.records.storage import Store

    os.environ["RAY_SCHEDULER_EVENTS"] = "0"    # no "(autoscaler) cannot fulfill" lines: the cold head is the point
    cfg = Config.load(Path(__file__).resolve().parents[1] / "configs" / "anchor.yaml")
    n_shards = len(plan_shards(cfg))
    print(f"cold cluster (head with 0 CPUs, no worker yet), anchor corpus = {n_shards} shards:")
    for variant in ("before", "after"):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        try:
            ray.init(address=cluster.address, logging_level="ERROR")
            root = Store.open(tempfile.mkdtemp(prefix="raywalk-bench-cold-"))
            submitted = []

            def counting(mapper):
                """The mapper, with every task submission counted (ray.remote wrapped while it runs)."""
                def run(fn, args):
                    real = ray.remote

                    def remote(*a, **k):            # used as ray.remote(num_cpus=1)(fn)
                        def apply(f):
                            r = real(*a, **k)(f)

                            class Counted:
                                def remote(self, *x):
                                    submitted.append(time.perf_counter())
                                    return r.remote(*x)
                            return Counted()
                        return apply
                    ray.remote = remote
                    try:
                        yield from mapper(fn, args)
                    finally:
                        ray.remote = real
                return run

            def build():
                if variant == "before":
                    build_before(cfg, root, counting(before_mapper()))
                else:
                    build_corpus(cfg, root, mapper=counting(ray_mapper()), progress=False, log=lambda s: None)

            t = threading.Thread(target=build, daemon=True)
            t.start()
            demand, deadline = 0, time.time() + 60
            while time.time() < deadline:     # until the demand the autoscaler sees stops growing
                time.sleep(2)
                st = get_cluster_status(cluster.address)
                now = sum(b.count * b.bundle.get("CPU", 0) for d in st.resource_demands.ray_task_actor_demand
                          for b in d.bundles_by_count)
                if now and now == demand:
                    break
                demand = now
            queued = len(submitted)
            t0 = time.perf_counter()
            cluster.add_node(num_cpus=2)
            t.join()
            print(f"  {variant:>6}: {queued:>3} of {n_shards} shard tasks submitted, autoscaler sees demand for "
                  f"{demand:g} CPU(s); after a 2-CPU node joins, the build takes {time.perf_counter() - t0:.0f}s",
                  flush=True)
        finally:
            ray.shutdown()
            cluster.shutdown()


# ---- long horizons at the anchor's cost per token -------------------------

LONG = ["graph.n=512", "graph.K=16", "graph.n_jumpers_per_block=5", "w=256", "corpus.walk_length=1024",
        "corpus.corpus_size=51200"]


def horizons_part(scale: float) -> None:
    import shutil
    import tempfile

    from raywalk.config import Config
    from raywalk.service.corpus import ShardSpec, build_corpus, make_shard, ray_mapper
    from raywalk.service.ray_env import ensure_ray
    from raywalk.records.storage import Store

    anchor = Path(__file__).resolve().parents[1] / "configs" / "anchor.yaml"
    base = Config.load(anchor)
    cfgs = {"anchor": Config.load(anchor, [f"corpus.corpus_size={max(1000, int(base.corpus.corpus_size * scale))}"]),
            "long horizon": Config.load(anchor, LONG[:-1] + [f"corpus.corpus_size={max(5120, int(51200 * scale))}"])}
    print("sampler alone (sample_walks in this process, 8,192 walks, verification included, compile cache warm):")
    alone = {}
    for name, cfg in cfgs.items():
        g = build_graph(cfg.graph.n, cfg.graph.K, cfg.graph.p_in, cfg.graph.p_out, cfg.seed)
        J = place_jumpers(g, cfg.graph.n_jumpers_per_block, cfg.graph.r_scales, cfg.w, cfg.seed)
        L = cfg.corpus.walk_length
        sample_walks(g, J, 8, L, np.random.default_rng(0))   # numba: load (or compile) the kernel first
        t0 = time.perf_counter()
        b = sample_walks(g, J, 8192, L, np.random.default_rng(SEED))
        dt = time.perf_counter() - t0
        alone[name] = 8192 * L / dt
        print(f"  {name:>12}: {alone[name] / 1e6:6.2f} M tokens/s ({8192 / dt:,.0f} walks/s), "
              f"regenerated {b.n_regenerated / 8192:.1%}")
    print(f"  ratio long/anchor: {alone['long horizon'] / alone['anchor']:.2f}")

    print("whole corpus through build_corpus (Ray tasks on a local Ray started before the clock, Parquet shards):")
    ensure_ray(cfgs["anchor"])
    rate = {}
    for name, cfg in cfgs.items():
        tmp = tempfile.mkdtemp(prefix="raywalk-bench-horizon-")
        try:
            t0 = time.perf_counter()
            _, s = build_corpus(cfg, Store.open(tmp), mapper=ray_mapper(), progress=False, log=lambda x: None)
            dt = time.perf_counter() - t0
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        walks = s["train"]["walks"] + s["eval"]["walks"]
        rate[name] = walks * cfg.corpus.walk_length / dt
        print(f"  {name:>12}: {walks:>8,} walks x {cfg.corpus.walk_length} in {dt:6.1f} s = "
              f"{rate[name] / 1e6:5.2f} M tokens/s; rule compliance train "
              f"{100 * s['train']['rule_compliance']:.3f}% ({s['train']['jumper_visits_checked']:,} visits), "
              f"eval {100 * s['eval']['rule_compliance']:.3f}%; regenerated "
              f"{s['train']['regenerated'] + s['eval']['regenerated']:,}", flush=True)
    print(f"  ratio long/anchor tokens/s: {rate['long horizon'] / rate['anchor']:.2f} (goal >= 0.5)")

    print("peak memory of one shard task (tracemalloc, make_shard of 8,192 walks):")
    for L in (1024, 2048):
        cfg = Config.load(anchor, LONG[:-2] + [f"corpus.walk_length={L}"])
        g = build_graph(cfg.graph.n, cfg.graph.K, cfg.graph.p_in, cfg.graph.p_out, cfg.seed)
        J = place_jumpers(g, cfg.graph.n_jumpers_per_block, cfg.graph.r_scales, cfg.w, cfg.seed)
        T = RuleTable.build(g, J)
        tracemalloc.start()
        t0 = time.perf_counter()
        data, _ = make_shard(g, J, T, ShardSpec("train", 0, 0, 8192), cfg.seed, L)
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(f"  long horizon, L={L}: peak {peak / 2**20:6.1f} MiB (walks alone {8192 * L * 4 / 2**20:.0f} MiB, "
              f"parquet {len(data) / 2**20:.1f} MiB), {dt:.1f} s")


def cluster_part() -> None:
    tenfold = 2_000_000
    if "--tenfold-walks" in sys.argv:
        tenfold = int(sys.argv[sys.argv.index("--tenfold-walks") + 1])
    memory_part(tenfold)
    cold_cluster_part()


if __name__ == "__main__":
    if "--measure" in sys.argv:
        i = sys.argv.index("--measure")
        measure_one(sys.argv[i + 1], int(sys.argv[i + 2]))
    elif "--cluster-only" in sys.argv:
        cluster_part()
    elif "--horizons" in sys.argv:
        horizons_part(float(sys.argv[sys.argv.index("--scale") + 1]) if "--scale" in sys.argv else 1.0)
    elif "--cold-only" in sys.argv:
        cold_cluster_part()
    else:
        main()
