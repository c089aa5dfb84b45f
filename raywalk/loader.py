"""One call from a notebook back to a finished experiment: `raywalk.load(where)`.

    exp = raywalk.load("results/n64_w16_d64_L2_s42-445f0093")    # the gate checkpoint
    maps = exp.model.attention_internals(torch.as_tensor(exp.eval_walks()[:8, :exp.config.w]))
    exp.export("handoff/")    # the same, as files for the study's own analysis code (raywalk.export)

`where` is an experiment directory or its result.json, a local path or an
s3:// URI. The corpus is looked for first at ROOT/corpora/<corpus_id>, ROOT
being the experiment directory's parent (so a whole root copied to another
machine still works), then at the location result.json records.

The corpus is checked before use: its manifest must match the experiment's
config, and the files this module reads (graph, eval split) must match their
sizes and sha256. The train split is never read here, so it is not hashed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raywalk.config import Config, ConfigError
from raywalk.records import checkpoints as ckpt
from raywalk.records.corpus import Corpus, CorpusError, check_files, read_manifest
from raywalk.records.errors import StorageError, first_line
from raywalk.records.layout import CORPORA, CORPUS_GRAPH, RESULT, RUN_DIR
from raywalk.records.manifest import listed
from raywalk.records.result import Unreadable, load as load_result
from raywalk.records.storage import Store
from raywalk.records.uris import check_uri, is_remote, join_uri, split_query
from raywalk.science.graph import Graph, Jumpers
from raywalk.science.model import GPT


class LoadError(ValueError):
    """An experiment that cannot be loaded as asked; the message names what is missing."""


@dataclass(frozen=True, eq=False)
class Experiment:
    """A trained experiment in memory, for the analysis phases."""
    config: Config
    """The experiment's typed config (from result.json)."""
    result: dict[str, Any]
    """result.json as a dict."""
    model: GPT
    """The GPT with the chosen checkpoint's weights, in eval mode, on the requested device."""
    graph: Graph
    """The DCSBM graph (adjacency via graph.adjacency(), block of each vertex via graph.block_of())."""
    jumpers: Jumpers
    """The jumper table: vertex, block, target_block, r."""
    epoch: int
    """The epoch whose checkpoint was loaded."""
    checkpoint_uri: str
    """Where that checkpoint is."""
    corpus: Corpus
    """The walk corpus the experiment was trained on."""
    requested: str | int = "gate"
    """The checkpoint as asked for: "gate", "latest" or an epoch number."""

    @property
    def experiment_id(self) -> str:
        return self.result["experiment_id"]

    def eval_walks(self) -> np.ndarray:
        """The held-out walks, (N, L) int64, in corpus order."""
        return self.corpus.walks("eval")

    def gate_starts(self) -> np.ndarray:
        """The gate's start tokens, in the gate's order (gate.sequences of them)."""
        return self.corpus.gate_starts(self.config.gate.sequences)

    def export(self, out: str | Path, format: str = "reference", overwrite: bool = False) -> dict[str, Any]:
        """Write model, graph, jumpers, gate starts and eval walks for the study's analysis code
        (see raywalk.export); returns the manifest. A non-empty `out` is refused unless overwrite."""
        from raywalk.export import export

        return export(self, str(out), format, overwrite, self.requested)


def load(where: str | Path, checkpoint: str | int = "gate", device: str | torch.device = "cpu") -> Experiment:
    """Load an experiment: config, result.json, model at `checkpoint`, graph, jumpers, corpus.

    checkpoint: "gate" (the gate-pass checkpoint; refused for a run that never passed the
    gate, which is not for SVD analysis), "latest" (the newest checkpoint that verifies),
    or an epoch number.
    """
    try:
        exp_uri = _experiment_uri(str(where))
        exp = Store.open(exp_uri)
    except StorageError as e:
        raise LoadError(str(e)) from None
    result = _read_result(exp)
    eid = result.get("experiment_id", exp_uri)
    try:
        cfg = Config.from_recorded(result["config"])
    except (KeyError, ConfigError) as e:
        raise LoadError(f"experiment {eid}: result.json holds no valid config ({e})") from None

    state, name = _checkpoint(exp, result, eid, checkpoint)
    if state.get("experiment_id", eid) != eid:
        raise LoadError(f"experiment {eid}: checkpoint {exp.child_uri(RUN_DIR, name)} belongs to "
                        f"experiment {state['experiment_id']}")
    model = GPT.from_config(cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        old = any(k.endswith(("q_proj.bias", "out_proj.bias")) for k in state["model"])
        why = ("it has attention biases: it was trained before raywalk's attention projections became "
               "bias-free; retrain it (raywalk train ... --fresh)" if old else first_line(e))
        raise LoadError(f"experiment {eid}: checkpoint {name} does not fit the model: {why}") from None
    model.eval().to(device)

    corpus = _find_corpus(exp_uri, result, cfg, eid)
    return Experiment(config=cfg, result=result, model=model, graph=corpus.graph(), jumpers=corpus.jumpers(),
                      epoch=int(state["epoch"]), checkpoint_uri=exp.child_uri(RUN_DIR, name), corpus=corpus,
                      requested=checkpoint)


# ---- where things are -------------------------------------------------------------

def _experiment_uri(where: str) -> str:
    """The experiment directory's URI, from the directory or its result.json."""
    if is_remote(where):
        check_uri(where)   # before any stripping: "s3://" must not become the local path "s3:"
    base, query = split_query(where)
    scheme, sep, path = base.rpartition("://")
    path = path.rstrip("/") or "/"
    if path.endswith("/" + RESULT) or path == RESULT:
        path = path[: -len(RESULT)].rstrip("/") or "."
    base = scheme + sep + path
    return f"{base}?{query}" if query else base


def _parent(uri: str) -> str:
    base, query = split_query(uri)
    if not is_remote(base):
        return str(Path(base).resolve().parent)
    parent = base.rstrip("/").rsplit("/", 1)[0]
    return f"{parent}?{query}" if query else parent


def _read_result(exp: Store) -> dict[str, Any]:
    try:
        r = load_result(exp)
    except Unreadable as e:
        raise LoadError(str(e)) from None
    except OSError as e:
        raise LoadError(f"cannot read {exp.child_uri(RESULT)}: {e}") from None
    if r is None:
        raise LoadError(f"no experiment at {exp.uri}: {exp.child_uri(RESULT)} does not exist")
    return r


def _checkpoint(exp: Store, result: dict[str, Any], eid: str, which: str | int) -> tuple[dict[str, Any], str]:
    run = exp.sub(RUN_DIR)
    if which == "gate":
        epoch = _gate_epoch(result, eid, run)
    elif which == "latest":
        epoch = None
    elif isinstance(which, (int, np.integer)) and not isinstance(which, bool):
        epoch = int(which)
    else:
        raise LoadError(f"checkpoint: {which!r} is invalid: must be 'gate', 'latest' or an epoch number")
    try:
        # the warning names the caller of load(): warn <- checkpoints (3 frames) <- _checkpoint <- load
        return ckpt.select(run, epoch, lambda s: warnings.warn(s, stacklevel=7))
    except ckpt.CheckpointError as e:
        raise LoadError(f"experiment {eid}: {e}") from None


def _gate_epoch(result: dict[str, Any], eid: str, run: Store) -> int:
    """The gate-pass epoch; a run that never passed is refused (it is not for SVD analysis)."""
    gate = result.get("gate") or {}
    if not gate.get("passed") or gate.get("epoch") is None:
        reason = (result.get("failure") or {}).get("reason") or f"status {result.get('status')!r}"
        raise LoadError(f"experiment {eid} did not pass the sufficiency gate ({reason}); it is excluded from "
                        f"SVD analysis. checkpoint='latest' or an epoch number loads it anyway "
                        f"(epochs on disk: {ckpt.epochs_on_disk(run)})")
    return int(gate["epoch"])


def _find_corpus(exp_uri: str, result: dict[str, Any], cfg: Config, eid: str) -> Corpus:
    cid = cfg.corpus_id()
    tried = []
    beside = join_uri(_parent(exp_uri), CORPORA, cid)
    recorded = (result.get("corpus") or {}).get("uri")
    for uri in dict.fromkeys(u for u in (beside, recorded) if u):
        try:
            return _open_checked(Store.open(uri), cfg)
        except (LoadError, OSError) as e:
            tried.append(f"{uri} ({e})")
    if not recorded:
        tried.append("result.json records no corpus location")
    raise LoadError(f"experiment {eid}: corpus {cid} not found: tried " + "; ".join(tried))


def _open_checked(store: Store, cfg: Config) -> Corpus:
    """The corpus at store if it is the config's; the files read here are checked against the manifest."""
    try:
        m = read_manifest(store, cfg)
        check_files(store, listed(m), "full", only=[CORPUS_GRAPH, *m["splits"]["eval"]["files"]])
    except CorpusError as e:
        raise LoadError(str(e)) from None
    return Corpus(store, m)
