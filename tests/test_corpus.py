"""The on-disk corpus: format, rule keeping measured from the files, reuse, torn/corrupt detection."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from raywalk.science.compliance import check_sequences
from raywalk.records.corpus import CorpusError, FORMAT_VERSION, open_corpus
from raywalk.service.corpus import build_corpus, eval_size
from raywalk.records.storage import Store
from tests.conftest import tiny_config

quiet = dict(progress=False, log=lambda s: None)


@pytest.fixture()
def built(tmp_path):
    cfg = tiny_config(tmp_path)
    root = Store.open(str(tmp_path))
    corpus, summary = build_corpus(cfg, root, **quiet)
    return cfg, root, corpus, summary


def test_format_and_manifest(built):
    cfg, root, corpus, summary = built
    m = json.loads(open(corpus.store.path("manifest.json")).read())
    assert m["format_version"] == FORMAT_VERSION == 2 and m["config_hash"] == cfg.corpus_id()
    assert (m["n"], m["K"], m["w"], m["walk_length"]) == (cfg.graph.n, cfg.graph.K, cfg.w, cfg.corpus.walk_length)
    assert {"vertex", "block", "target_block", "r"} == set(m["jumpers"][0])
    assert m["splits"]["train"]["walks"] == cfg.corpus.corpus_size
    assert m["splits"]["eval"]["walks"] == eval_size(cfg)
    g = pq.read_table(corpus.store.path("graph.parquet"))
    assert str(g.schema.field("src").type) == "int32" and str(g.schema.field("dst").type) == "int32"
    shard = pq.read_table(corpus.files("train")[0])
    assert str(shard.schema.field("walk").type) == "list<element: int32>"
    assert {"event_vertex", "event_step", "event_target", "event_arrival"} <= set(shard.column_names)
    assert all(len(x) == cfg.corpus.walk_length for x in shard["walk"].to_pylist()[:50])


def test_every_jumper_visit_in_the_stored_walks_keeps_its_rule(built):
    cfg, root, corpus, summary = built
    table = corpus.rule_table()
    for split in ("train", "eval"):
        walks = corpus.walks(split)
        c = check_sequences(walks, table)
        assert c.rule_total > 100 and c.rule_ok == c.rule_total
        assert c.edge_ok == c.edge_total
        starts_at_jumper = np.isin(walks[:, 0], corpus.jumpers().vertex).mean()
        assert starts_at_jumper >= 0.5
    train, ev = corpus.walks("train"), corpus.walks("eval")
    assert not np.array_equal(train[: len(ev)], ev)
    assert summary["train"]["rule_compliance"] == 1.0
    assert min(summary["distinct_paths_per_jumper"].values()) >= 3


def test_events_are_stored_with_the_walks(built):
    cfg, root, corpus, _ = built
    t = pq.read_table(corpus.files("train")[0])
    jumpers = corpus.jumpers()
    r_of = dict(zip(jumpers.vertex.tolist(), jumpers.r.tolist()))
    tgt = dict(zip(jumpers.vertex.tolist(), jumpers.target_block.tolist()))
    for row in t.slice(0, 40).to_pylist():
        walk = row["walk"]
        expected = [(t_, v) for t_, v in enumerate(walk) if v in r_of]
        assert list(zip(row["event_step"], row["event_vertex"])) == expected
        for v, s, b, a in zip(row["event_vertex"], row["event_step"], row["event_target"], row["event_arrival"]):
            assert (b, a) == (tgt[v], s + r_of[v])


def test_same_config_reuses_the_corpus(built):
    cfg, root, corpus, _ = built
    before = {f: open(f, "rb").read() for f in corpus.files("train")}
    again, summary = build_corpus(cfg, root, **quiet)
    assert summary["reused"] is True
    assert {f: open(f, "rb").read() for f in again.files("train")} == before
    assert open_corpus(root, cfg).manifest == corpus.manifest


def test_same_seed_same_bytes_other_seed_other_walks(tmp_path):
    a, _ = build_corpus(tiny_config(tmp_path / "a"), Store.open(str(tmp_path / "a")), **quiet)
    b, _ = build_corpus(tiny_config(tmp_path / "b"), Store.open(str(tmp_path / "b")), **quiet)
    assert a.manifest["checksums"] == b.manifest["checksums"]
    c, _ = build_corpus(tiny_config(tmp_path / "c", seed=4), Store.open(str(tmp_path / "c")), **quiet)
    assert c.manifest["checksums"]["train/part-00000.parquet"] != a.manifest["checksums"]["train/part-00000.parquet"]


def _damage(corpus, damage: str) -> None:
    import os

    shard = corpus.files("train")[1]
    if damage == "truncate":
        data = open(shard, "rb").read()
        open(shard, "wb").write(data[: len(data) // 2])
    elif damage == "flip":              # same size: only a full verify can see it
        data = bytearray(open(shard, "rb").read())
        data[len(data) // 2] ^= 0xFF
        open(shard, "wb").write(bytes(data))
    elif damage == "delete_manifest":
        os.remove(corpus.store.path("manifest.json"))
    else:
        os.remove(shard)


@pytest.mark.parametrize("damage,verify", [("truncate", "size"), ("flip", "full"), ("delete_manifest", "size"),
                                           ("delete_shard", "size")])
def test_torn_or_corrupt_corpus_is_detected_and_never_reused(built, damage, verify):
    cfg, root, corpus, _ = built
    _damage(corpus, damage)
    with pytest.raises(CorpusError):
        open_corpus(root, cfg, verify=verify)
    logs: list[str] = []
    rebuilt, summary = build_corpus(cfg, root, progress=False, log=logs.append, verify=verify)
    assert summary["reused"] is False
    assert any("not usable" in m and "moved to" in m for m in logs)
    # the damaged one is kept aside, not deleted; the rebuilt one verifies and equals the original
    aside = [n for n in root.listdir("corpora") if ".invalid-" in n]
    assert len(aside) == 1 and root.sub("corpora", aside[0]).listdir("train")
    assert open_corpus(root, cfg, verify="full").manifest["checksums"] == corpus.manifest["checksums"]


def test_a_corpus_of_an_older_format_is_refused_and_rebuilt(built):
    """A version-1 corpus (the pairwise sampler's walks) is never reused: refused, moved aside, rebuilt."""
    cfg, root, corpus, _ = built
    path = corpus.store.path("manifest.json")
    m = json.loads(open(path).read())
    open(path, "w").write(json.dumps({**m, "format_version": 1}))
    with pytest.raises(CorpusError, match="format_version 1 != 2: written by another raywalk"):
        open_corpus(root, cfg)
    logs: list[str] = []
    rebuilt, summary = build_corpus(cfg, root, progress=False, log=logs.append)
    assert summary["reused"] is False and any("format_version 1" in x and "moved to" in x for x in logs)
    assert rebuilt.manifest["format_version"] == 2
    assert rebuilt.manifest["checksums"] == corpus.manifest["checksums"]


def test_reuse_checks_sizes_only_and_a_full_verify_rehashes(built):
    """A same-size edit passes the cheap reuse check (no shard is read) and fails the full one."""
    cfg, root, corpus, _ = built
    _damage(corpus, "flip")
    again, summary = build_corpus(cfg, root, **quiet)
    assert summary["reused"] is True and again.manifest == corpus.manifest
    with pytest.raises(CorpusError, match="sha256"):
        open_corpus(root, cfg, verify="full")
    with pytest.raises(ValueError, match="verify: 'quick' is invalid"):
        open_corpus(root, cfg, verify="quick")


def test_shards_are_written_by_the_tasks_not_returned(tmp_path):
    """The mapper sees only (path, size, sha256, stats): no walk data travels back to the driver."""
    from raywalk.service.corpus import _serial_map

    seen: list = []

    def spy(fn, args):
        for i, res in _serial_map(fn, args):
            seen.append(res)
            yield i, res

    cfg = tiny_config(tmp_path)
    corpus, _ = build_corpus(cfg, Store.open(str(tmp_path)), mapper=spy, **quiet)
    assert len(seen) == len(corpus.files("train")) + len(corpus.files("eval"))
    for rel, size, sha, stats in seen:
        assert isinstance(rel, str) and corpus.manifest["checksums"][rel] == {"size": size, "sha256": sha}
        assert not any(isinstance(v, (bytes, np.ndarray)) for v in stats.values())
    assert not list((tmp_path / "corpora").glob(".building-*"))     # built aside, then renamed


def test_cli_verify_rehashes_and_moves_a_corrupt_corpus_aside(built, capsys, monkeypatch, local_ray):
    """`raywalk corpus` reuses on sizes (without asking for Ray); `--verify` finds a flipped byte and rebuilds,
    on the Ray this process already holds (the session's), which it leaves running."""
    from raywalk.service import ray_env
    from raywalk.cli import main

    started: list[bool] = []
    real = ray_env.ensure_ray
    monkeypatch.setattr(ray_env, "ensure_ray", lambda *a, **k: (started.append(True), real(*a, **k)))
    cfg, root, corpus, _ = built
    path = root.path("tiny.yaml")
    open(path, "w").write(json.dumps(cfg.to_dict()))     # JSON is YAML
    assert main(["corpus", path, "--verify"]) == 0
    assert "reused corpus" in capsys.readouterr().out
    _damage(corpus, "flip")
    assert main(["corpus", path]) == 0
    assert "reused corpus" in capsys.readouterr().out
    assert started == []                      # two reuses, no Ray
    assert main(["corpus", path, "--verify", "--parallel", "2"]) == 0
    out = capsys.readouterr()
    assert "built corpus" in out.out and "does not match its sha256" in out.err and "moved to" in out.err
    assert started == [True] and local_ray.is_initialized()
    assert open_corpus(root, cfg, verify="full").manifest["checksums"] == corpus.manifest["checksums"]


def test_gate_starts_cycle_over_a_small_eval_split(built):
    cfg, root, corpus, _ = built
    starts = corpus.gate_starts(1000)
    first = corpus.walks("eval")[:, 0]
    assert len(starts) == 1000 and len(first) < 1000
    assert np.array_equal(starts[: len(first)], first) and np.array_equal(starts[len(first):2 * len(first)], first)
