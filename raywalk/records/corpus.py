"""A walk corpus on disk, read back: `Corpus` (graph, jumpers, walks) and the checks that vouch for it.

Layout under `<root>/corpora/<corpus_id>/` (names in layout.py):
  manifest.json      written last; lists every file with its size and sha256 (records/manifest.py)
  graph.parquet      one row per directed edge (int32 src, dst)
  train/*.parquet    one row per walk: walk (list<int32>, length L) + its jumper events
  eval/*.parquet     the held-out split, generated from another seed

Reuse checks the manifest and every file's size (one listing, no download); verify="full"
re-hashes every file. service/corpus.py builds corpora; this module only reads them.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raywalk.config import Config
from raywalk.records import manifest
from raywalk.records.layout import CORPORA, CORPUS_GRAPH, MANIFEST
from raywalk.records.storage import Store
from raywalk.science.compliance import RuleTable
from raywalk.science.graph import Graph, Jumpers

# 2: walks drawn by the exact-feasibility sampler; a version-1 corpus holds other walks for the same
# config, so it is refused by open_corpus, and moved aside and rebuilt by build_corpus, never mixed in.
FORMAT_VERSION = 2
VERIFY = ("size", "full")           # reuse checks: manifest + sizes (cheap), or + sha256 of every file


class CorpusError(RuntimeError):
    """A corpus that is missing, incomplete, corrupt or inconsistent."""


@dataclass(frozen=True)
class Corpus:
    store: Store          # the corpus directory
    manifest: dict

    @property
    def uri(self) -> str:
        return self.store.uri

    def files(self, split: str) -> list[str]:
        """Filesystem paths (for pyarrow / Ray Data with `self.store.fs`)."""
        return [self.store.path(f) for f in self.manifest["splits"][split]["files"]]

    def graph(self) -> Graph:
        t = pq.read_table(io.BytesIO(self.store.read_bytes(CORPUS_GRAPH)))
        m = self.manifest
        return Graph.from_edges(m["n"], m["K"], t["src"].to_numpy(), t["dst"].to_numpy(), m["seeds"]["graph"])

    def jumpers(self) -> Jumpers:
        return Jumpers.from_records(self.manifest["jumpers"])

    def rule_table(self) -> RuleTable:
        return RuleTable.build(self.graph(), self.jumpers())

    def walks(self, split: str, limit: int | None = None) -> np.ndarray:
        L = self.manifest["walk_length"]
        parts, have = [], 0
        for rel in self.manifest["splits"][split]["files"]:
            t = pq.read_table(io.BytesIO(self.store.read_bytes(rel)), columns=["walk"])
            parts.append(t["walk"].combine_chunks().flatten().to_numpy().reshape(-1, L))
            have += len(parts[-1])
            if limit is not None and have >= limit:
                break
        out = np.concatenate(parts).astype(np.int64)
        return out if limit is None else out[:limit]

    def gate_starts(self, k: int) -> np.ndarray:
        """First tokens of the first k held-out walks, cycling when the split is smaller."""
        first = self.walks("eval", limit=k)[:, 0]
        return np.resize(first, k)

    @property
    def identity(self) -> dict:
        return identity(self.manifest)


def identity(m: dict) -> dict:
    """What a run's checkpoints record of the corpus they were trained on: its format and one sha256 over
    every file's (the corpus id names a config, not the walks: a rebuild in another format keeps the id)."""
    files = json.dumps(manifest.listed(m), sort_keys=True).encode()
    return {"id": m["config_hash"], "format_version": m["format_version"], "sha256": hashlib.sha256(files).hexdigest()}


def _file_sizes(store: Store) -> dict[str, int]:
    """Every file under store with its size, from one recursive listing (no reads)."""
    sel = pafs.FileSelector(store.path(), allow_not_found=True, recursive=True)
    base = store.path() + "/"
    return {i.path[len(base):]: i.size for i in store.fs.get_file_info(sel) if i.type == pafs.FileType.File}


def _sha256(store: Store, rel: str, chunk: int = 1 << 22) -> str:
    """The file's sha256, read in chunks (a shard may not fit in memory twice)."""
    h = hashlib.sha256()
    with store.fs.open_input_stream(store.path(rel)) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_files(store: Store, checksums: dict[str, dict], verify: str, only: list[str] | None = None) -> None:
    """CorpusError unless every file in checksums (or just those in `only`) is there with its size,
    and under verify="full" its sha256 too. One listing; "full" reads the files it checks."""
    sizes = _file_sizes(store)
    try:
        manifest.check(checksums, sizes.get, (lambda rel: _sha256(store, rel)) if verify == "full" else None, only)
    except manifest.Mismatch as e:
        raise CorpusError(str(e)) from None


def read_manifest(store: Store, cfg: Config) -> dict:
    """The manifest at store if it is a finished corpus of cfg's, else CorpusError with the reason."""
    if not store.is_file(MANIFEST):
        raise CorpusError("manifest.json is missing (an interrupted build?)")
    try:
        m = store.read_json(MANIFEST)
    except ValueError as e:
        raise CorpusError(f"manifest.json is not valid JSON ({e})") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise CorpusError(f"format_version {m.get('format_version')} != {FORMAT_VERSION}: written by another raywalk "
                          f"whose sampler draws other walks for this config, so it cannot be reused or mixed")
    if m.get("config_hash") != cfg.corpus_id():
        raise CorpusError(f"config_hash {m.get('config_hash')} does not match {cfg.corpus_id()}")
    try:
        manifest.listed(m)
    except KeyError as e:
        raise CorpusError(f"manifest.json lists no files (no {e})") from None
    return m


def check_verify_mode(verify: str) -> None:
    if verify not in VERIFY:
        raise ValueError(f"verify: {verify!r} is invalid: must be one of {', '.join(VERIFY)}")


def verified_manifest(store: Store, cfg: Config, verify: str = "size") -> dict:
    """The manifest if the corpus is complete and matches cfg, else CorpusError with the reason.

    verify="size": manifest, config hash, and every listed file present with its size;
    verify="full": also the sha256 of every file (reads the whole corpus).
    """
    check_verify_mode(verify)
    m = read_manifest(store, cfg)
    check_files(store, manifest.listed(m), verify)
    return m


def open_corpus(root: Store, cfg: Config, verify: str = "size") -> Corpus:
    """The finished corpus for cfg under root, or CorpusError (verify: "size" or "full")."""
    store = root.sub(CORPORA, cfg.corpus_id())
    return Corpus(store, verified_manifest(store, cfg, verify))
