"""Building the walk corpus (Parquet shards + graph + manifest), once per config; records/corpus.py reads it.

Each shard is generated and written by its own task (Ray on a cluster), which
returns only (path, size, sha256, stats): the driver never holds walk data, so
its memory does not grow with the corpus. Reuse checks the manifest and every
file's size (one listing, no download); `verify="full"` (`raywalk corpus
--verify`) re-hashes every file. A directory that fails (a killed build, a
truncated or missing file, a wrong checksum under a full verify) is never
reused: it is moved aside, never deleted, with a warning and rebuilt.
"""
from __future__ import annotations

import hashlib
import io
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raywalk.science.compliance import Compliance, RuleTable, check_sequences
from raywalk.config import Config
from raywalk.science.graph import Graph, Jumpers, build_graph, place_jumpers
from raywalk.messages import Tell, tell
from raywalk.records import layout
from raywalk.records import corpus as corpus_format
from raywalk.records.corpus import Corpus, CorpusError, check_files, check_verify_mode, verified_manifest
from raywalk.records.layout import CORPORA, CORPUS_GRAPH, MANIFEST, corpus_shard
from raywalk.records.manifest import entry
from raywalk.records.storage import Store
from raywalk.science.walks import jumper_events, sample_walks

MAX_IN_FLIGHT = 1000                # shard tasks submitted at once: the whole demand for any sane corpus
SPLITS = {"train": 0, "eval": 1}   # split -> seed stream, so eval never shares draws with train


def eval_size(cfg: Config) -> int:
    return max(1, cfg.corpus.corpus_size // 9)


# ---- one shard (pure: same arguments => same bytes) --------------------------

@dataclass(frozen=True)
class ShardSpec:
    split: str
    index: int
    first_walk: int
    n_walks: int


def make_shard(graph: Graph, jumpers: Jumpers, table: RuleTable, spec: ShardSpec, seed: int,
               walk_length: int) -> tuple[bytes, dict]:
    """Generate one shard's walks and return (parquet bytes, stats)."""
    rng = np.random.default_rng([seed, SPLITS[spec.split], spec.index])
    batch = sample_walks(graph, jumpers, spec.n_walks, walk_length, rng, first_index=spec.first_walk)
    walks = batch.walks
    # the gate's checker over row slices: its int64 temporaries stay ~2M tokens, not the whole shard's
    step = max(1, (1 << 21) // max(walk_length, 1))
    comp = sum((check_sequences(walks[i:i + step], table) for i in range(0, len(walks), step)),
               Compliance(0, 0, 0, 0))
    ev = jumper_events(walks, jumpers)
    cols = {
        "walk_index": pa.array(np.arange(spec.first_walk, spec.first_walk + spec.n_walks, dtype=np.int64)),
        "walk": pa.ListArray.from_arrays(
            pa.array(np.arange(0, walks.size + 1, walk_length, dtype=np.int32)),
            pa.array(walks.reshape(-1).astype(np.int32))),
    }
    for name, (values, offsets) in ev.items():
        cols[name] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                              pa.array(values.astype(np.int32)))
    buf = io.BytesIO()
    pq.write_table(pa.table(cols), buf, compression="zstd")
    stats = {
        "walks": spec.n_walks,
        "start_at_jumper": int(np.isin(walks[:, 0], jumpers.vertex).sum()),
        "regenerated": batch.n_regenerated,
        "compliance": [comp.edge_ok, comp.edge_total, comp.rule_ok, comp.rule_total],
        "paths": _path_samples(walks, ev, jumpers, limit=16),
    }
    return buf.getvalue(), stats


def write_shard(graph: Graph, jumpers: Jumpers, table: RuleTable, spec: ShardSpec, seed: int, walk_length: int,
                work_uri: str) -> tuple[str, int, str, dict]:
    """Generate one shard, write it under work_uri; return (relative path, size, sha256, stats), no walk data."""
    data, stats = make_shard(graph, jumpers, table, spec, seed, walk_length)
    rel = corpus_shard(spec.split, spec.index)
    Store.open(work_uri).write_bytes(rel, data)
    e = entry(data)
    return rel, e["size"], e["sha256"], stats


def _path_samples(walks: np.ndarray, ev: dict, jumpers: Jumpers, limit: int) -> dict[int, list[str]]:
    """Up to `limit` distinct (visit -> arrival) vertex paths per jumper, as hex digests.

    Per jumper: its first limit*8 visits in row-major order whose arrival is inside the walk, taken from
    the shard's jumper events (not one scan of the shard per jumper: with 80 jumpers that was a third of
    a long-horizon shard's time)."""
    L = walks.shape[1]
    vs, steps, arr = ev["event_vertex"][0], ev["event_step"][0], ev["event_arrival"][0]
    rows = np.repeat(np.arange(walks.shape[0]), np.diff(ev["event_vertex"][1]))
    keep = arr <= L - 1
    order = np.argsort(vs[keep], kind="stable")     # row-major order kept within each jumper
    rows, steps, vs = rows[keep][order], steps[keep][order], vs[keep][order]
    lo = np.searchsorted(vs, jumpers.vertex, side="left")
    hi = np.searchsorted(vs, jumpers.vertex, side="right")
    out: dict[int, list[str]] = {}
    for v, r, a, b in zip(jumpers.vertex.tolist(), jumpers.r.tolist(), lo.tolist(), hi.tolist()):
        seen: set[str] = set()
        for i, t in zip(rows[a:min(b, a + limit * 8)].tolist(), steps[a:min(b, a + limit * 8)].tolist()):
            seen.add(hashlib.blake2b(walks[i, t: t + r + 1].tobytes(), digest_size=8).hexdigest())
            if len(seen) >= limit:
                break
        out[v] = sorted(seen)
    return out


def plan_shards(cfg: Config) -> list[ShardSpec]:
    specs = []
    for split, total in (("train", cfg.corpus.corpus_size), ("eval", eval_size(cfg))):
        for i, start in enumerate(range(0, total, cfg.corpus.shard_size)):
            specs.append(ShardSpec(split, i, start, min(cfg.corpus.shard_size, total - start)))
    return specs


# ---- building -------------------------------------------------------------------

Mapper = Callable[[Callable, list], Iterable]   # (fn, list of arg tuples) -> results in any order, each (i, result)


def _serial_map(fn: Callable, args: list) -> Iterable:
    for i, a in enumerate(args):
        yield i, fn(*a)


def build_corpus(cfg: Config, root: Store, *, mapper: Mapper | None = None, progress: bool = True,
                 log: Tell = tell,
                 verify: str = "size") -> tuple[Corpus, dict]:
    """Build the corpus for cfg (or reuse one that passes `verify`). Returns (corpus, summary)."""
    t0 = time.perf_counter()
    store = root.sub(CORPORA, cfg.corpus_id())
    check_verify_mode(verify)
    if store.exists():
        reused = _reuse(root, store, cfg, verify, log)
        if reused is not None:
            return reused, {**reused.manifest["summary"], "reused": True, "seconds": time.perf_counter() - t0}

    graph = build_graph(cfg.graph.n, cfg.graph.K, cfg.graph.p_in, cfg.graph.p_out, cfg.seed)
    jumpers = place_jumpers(graph, cfg.graph.n_jumpers_per_block, cfg.graph.r_scales, cfg.w, cfg.seed)
    specs = plan_shards(cfg)
    work = root.sub(CORPORA, f"{layout.BUILDING}{cfg.corpus_id()}") if root.local else store
    work.delete_dir("")
    checksums = {CORPUS_GRAPH: _write_graph(work, graph)}
    # Each task writes its own shard and returns only its path, size, sha256 and stats.
    table = RuleTable.build(graph, jumpers)   # one object in every task's arguments: ray_mapper puts it once
    args = [(graph, jumpers, table, s, cfg.seed, cfg.corpus.walk_length, work.uri) for s in specs]
    written = _run_shards(mapper or _serial_map, args, specs, progress)
    files, stats = _collect(specs, written, checksums)
    _check_written(work, checksums)
    summary = _summarise(cfg, stats, jumpers)
    _check_summary(summary)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    manifest = _manifest(cfg, graph, jumpers, files, stats, summary, checksums)
    work.write_json(MANIFEST, manifest)   # last: its presence marks a finished corpus
    if work is not store:
        root.makedirs(CORPORA)
        root.move(f"{CORPORA}/{layout.BUILDING}{cfg.corpus_id()}", f"{CORPORA}/{cfg.corpus_id()}")
    return Corpus(store, manifest), {**summary, "reused": False}


def _reuse(root: Store, store: Store, cfg: Config, verify: str, log: Tell) -> Corpus | None:
    """The corpus at store if it passes `verify`; else it is moved aside (never deleted) and None."""
    try:
        return Corpus(store, verified_manifest(store, cfg, verify))
    except CorpusError as e:
        aside = f"{CORPORA}/{layout.aside(cfg.corpus_id(), layout.INVALID)}"
        log(f"warning: corpus {store.uri} is not usable ({e}); moved to {root.child_uri(aside)} and rebuilding")
        root.move(f"{CORPORA}/{cfg.corpus_id()}", aside)
        return None


def _write_graph(work: Store, graph: Graph) -> dict:
    """graph.parquet (one row per directed edge); returns its checksum entry."""
    src, dst = graph.edges()
    buf = io.BytesIO()
    pq.write_table(pa.table({"src": pa.array(src.astype(np.int32)), "dst": pa.array(dst.astype(np.int32))}), buf)
    data = buf.getvalue()
    work.write_bytes(CORPUS_GRAPH, data)
    return entry(data)


def _run_shards(mapper: Mapper, args: list, specs: list[ShardSpec], progress: bool
                ) -> dict[int, tuple[str, int, str, dict]]:
    """Every shard written by write_shard through the mapper, behind a progress bar; index -> its result."""
    from tqdm import tqdm

    bar = tqdm(total=sum(s.n_walks for s in specs), unit="walk", desc="corpus", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    written: dict[int, tuple[str, int, str, dict]] = {}
    for i, res in mapper(write_shard, args):
        written[i] = res
        bar.update(specs[i].n_walks)
    bar.close()
    return written


def _collect(specs: list[ShardSpec], written: dict, checksums: dict[str, dict]
             ) -> tuple[dict[str, list[str]], dict[str, list[dict]]]:
    """Shard files and stats per split in manifest order (by split and index, whatever finished first);
    their checksums go into `checksums`."""
    files: dict[str, list[str]] = {s: [] for s in SPLITS}
    stats: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for i, spec in enumerate(specs):
        rel, size, sha, st = written.pop(i)
        checksums[rel] = {"size": size, "sha256": sha}   # manifest.entry's form
        files[spec.split].append(rel)
        stats[spec.split].append(st)
    return files, stats


def _check_written(work: Store, checksums: dict[str, dict]) -> None:
    try:   # a local root that the cluster's nodes do not share would leave shards on other machines
        check_files(work, checksums, "size")
    except CorpusError as e:
        raise CorpusError(f"shards written by the corpus tasks are not all in {work.uri} ({e}); on a multi-node "
                          f"cluster the storage root must be shared by every node (s3://... or a shared "
                          f"filesystem)") from None


def _check_summary(summary: dict) -> None:
    if summary["train"]["rule_compliance"] != 1.0 or summary["eval"]["rule_compliance"] != 1.0:
        raise CorpusError(f"corpus rule compliance below 100%: {summary}")  # by construction, never
    short = [v for v, k in summary["distinct_paths_per_jumper"].items() if k < 3]
    if short:
        raise CorpusError(f"jumpers {short} have fewer than 3 distinct compliant paths in the train split; "
                          f"raise corpus.corpus_size or lower graph.n_jumpers_per_block")


def _manifest(cfg: Config, graph: Graph, jumpers: Jumpers, files: dict[str, list[str]],
              stats: dict[str, list[dict]], summary: dict, checksums: dict[str, dict]) -> dict:
    return {
        "format_version": corpus_format.FORMAT_VERSION,   # the reader's: one home for the format
        "config_hash": cfg.corpus_id(),
        "config": cfg.corpus_key(),
        "n": cfg.graph.n, "K": cfg.graph.K, "w": cfg.w, "walk_length": cfg.corpus.walk_length,
        "n_edges": int(len(graph.edges()[0])),
        "seeds": {"graph": graph.seed, "jumpers": cfg.seed,
                  "train": [cfg.seed, SPLITS["train"]], "eval": [cfg.seed, SPLITS["eval"]]},
        "jumpers": jumpers.to_records(),
        "splits": {s: {"walks": sum(x["walks"] for x in stats[s]), "files": files[s]} for s in SPLITS},
        "summary": summary,
        "checksums": checksums,
    }


def _summarise(cfg: Config, stats: dict[str, list[dict]], jumpers: Jumpers) -> dict:
    out: dict = {}
    for split, rows in stats.items():
        c = Compliance(*np.sum([r["compliance"] for r in rows], axis=0).tolist())
        walks = sum(r["walks"] for r in rows)
        out[split] = {
            "walks": walks,
            "start_at_jumper_share": round(sum(r["start_at_jumper"] for r in rows) / walks, 6),
            "regenerated": sum(r["regenerated"] for r in rows),
            "edge_compliance": c.edge,
            "rule_compliance": c.rule,
            "jumper_visits_checked": c.rule_total,
        }
    paths: dict[str, int] = {}
    for v in jumpers.vertex.tolist():
        paths[str(v)] = len(set().union(*(set(r["paths"][v]) for r in stats["train"])))
    out["distinct_paths_per_jumper"] = paths
    return out


def ray_mapper(max_in_flight: int | None = None) -> Mapper:
    """Run shards as Ray tasks (ray must be initialised); results stream back as they finish.

    Every task is submitted at once (at most `max_in_flight`, default MAX_IN_FLIGHT), so
    a cold autoscaling cluster sees the whole demand and scales out; Ray runs as many as
    there are CPUs. Tasks left when the caller stops early are cancelled.
    """
    import ray

    limit = max_in_flight or MAX_IN_FLIGHT
    if limit < 1:
        raise ValueError(f"max_in_flight: {limit} is invalid: must be >= 1")

    def run(fn: Callable, args: list) -> Iterable:
        remote = ray.remote(num_cpus=1)(fn)
        shared = {id(a[k]): ray.put(a[k]) for a in args[:1] for k in range(3)}   # graph, jumpers, table once
        todo = list(enumerate(args))[::-1]
        pending: dict = {}
        try:
            while todo or pending:
                while todo and len(pending) < limit:
                    i, a = todo.pop()
                    pending[remote.remote(*(shared.get(id(x), x) for x in a))] = i
                done, _ = ray.wait(list(pending), num_returns=1)
                yield pending.pop(done[0]), ray.get(done[0])
        finally:
            for ref in pending:     # a failed or abandoned build leaves no task writing behind it
                ray.cancel(ref)

    return run
