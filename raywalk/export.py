"""A trained experiment handed to the study's own analysis code: `raywalk export` / `Experiment.export`.

The study's reference model (ParkerWilliams/dcsbm-transformer, `src/model/transformer.py`,
`TransformerLM`) is raywalk's GPT under other state_dict names, so the export is a renaming,
not a conversion: on the other side

    model = TransformerLM(**json.load(open("DIR/model.json")))
    model.load_state_dict(torch.load("DIR/model.pt", weights_only=True))

gives the same logits as raywalk's explicit attention path, bit for bit (both scale scores by
multiplying with 1/√d_head). The directory holds:

    model.pt         state_dict (reference layout, or raywalk's with --format raywalk)
    model.json       the constructor's keyword arguments for that layout
    graph.npz        indptr, indices (CSR adjacency), block_of
    jumpers.csv      vertex, block, target_block, r
    gate_starts.npy  the gate's start tokens, in the gate's order
    eval_walks.npy   the held-out walks (N, walk_length), corpus order
    manifest.json    what each file is and its sha256, the experiment, the checkpoint and its figures

Written last, manifest.json marks a complete export. Locally the whole directory is built
aside and renamed into place; an existing non-empty --out is refused unless overwrite=True,
which replaces it (the old one is removed only once the new one is in place).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from raywalk.records.layout import MANIFEST, tmp_name, utc_iso
from raywalk.records.errors import StorageError
from raywalk.records.manifest import entry
from raywalk.records.storage import Store, write_synced

if TYPE_CHECKING:
    from raywalk.loader import Experiment
    from raywalk.science.model import GPT

FORMATS = ("reference", "raywalk")
FORMAT_VERSION = 1

# raywalk name -> reference name; ln_1, ln_2, mlp.0, mlp.2 and ln_f are the same in both
_TOP = {"tok_emb.": "token_embedding.", "pos_emb.": "position_embedding.", "head.": "lm_head."}
_BLOCK = {".attn.q_proj.": ".attention.W_q.", ".attn.k_proj.": ".attention.W_k.",
          ".attn.v_proj.": ".attention.W_v.", ".attn.out_proj.": ".attention.W_o."}


def reference_name(key: str) -> str:
    for a, b in _TOP.items():
        if key.startswith(a):
            return b + key[len(a):]
    for a, b in _BLOCK.items():
        key = key.replace(a, b)
    return key


class ExportError(ValueError):
    """An export that cannot be written as asked; the message says why and what to do."""


def reference_state_dict(model: "GPT") -> dict[str, torch.Tensor]:
    """model's weights under the reference TransformerLM's names, plus its causal_mask buffers (CPU)."""
    out = {reference_name(k): v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    mask = torch.tril(torch.ones(model.block_size, model.block_size, dtype=torch.bool))
    for i in range(model.n_layers):
        out[f"blocks.{i}.attention.causal_mask"] = mask.clone()
    return out


def reference_kwargs(model: "GPT", dropout: float) -> dict[str, Any]:
    return {"vocab_size": model.vocab_size, "d_model": model.d_model, "n_layers": model.n_layers,
            "n_heads": model.n_heads, "max_seq_len": model.block_size, "dropout": dropout}


def raywalk_kwargs(model: "GPT", dropout: float) -> dict[str, Any]:
    return {"vocab_size": model.vocab_size, "block_size": model.block_size, "d_model": model.d_model,
            "n_layers": model.n_layers, "n_heads": model.n_heads, "dropout": dropout}


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _files(exp: "Experiment", fmt: str) -> dict[str, tuple[bytes, str]]:
    """rel -> (bytes, description), everything but the manifest."""
    model, cfg = exp.model, exp.config
    if fmt == "reference":
        sd, kw = reference_state_dict(model), reference_kwargs(model, cfg.model.dropout)
        what = ("state_dict of the reference TransformerLM (src/model/transformer.py); "
                "torch.load(weights_only=True), then load_state_dict(strict=True)")
    else:
        sd = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
        kw = raywalk_kwargs(model, cfg.model.dropout)
        what = "state_dict of raywalk.model.GPT; torch.load(weights_only=True)"
    buf = io.BytesIO()
    torch.save(sd, buf)
    g = exp.graph
    gbuf = io.BytesIO()
    np.savez(gbuf, indptr=g.indptr.astype(np.int64), indices=g.indices.astype(np.int64), block_of=g.block_of())
    j = exp.jumpers
    jbuf = io.StringIO()
    w = csv.writer(jbuf, lineterminator="\n")
    w.writerow(["vertex", "block", "target_block", "r"])
    w.writerows(zip(j.vertex.tolist(), j.block.tolist(), j.target_block.tolist(), j.r.tolist()))
    return {
        "model.pt": (buf.getvalue(), what),
        "model.json": ((json.dumps(kw, indent=2) + "\n").encode(),
                       ("keyword arguments of TransformerLM(...)" if fmt == "reference"
                        else "keyword arguments of raywalk.model.GPT(...)")),
        "graph.npz": (gbuf.getvalue(), f"CSR adjacency of the {g.n}-vertex graph (indptr, indices; int64) and "
                                       f"block_of (block of each vertex, {g.K} blocks)"),
        "jumpers.csv": (jbuf.getvalue().encode(), "jumper table: vertex, block (source), target_block, r"),
        "gate_starts.npy": (_npy(exp.gate_starts().astype(np.int64)),
                            f"the gate's {cfg.gate.sequences} start tokens, in the gate's order (int64)"),
        "eval_walks.npy": (_npy(exp.eval_walks()), "held-out eval walks (N, walk_length) int64, corpus order"),
    }


def _figures(exp: "Experiment") -> dict[str, Any]:
    """The checkpoint's own evaluation (curves at its epoch) and the run's gate outcome."""
    r, e = exp.result, exp.epoch
    c, h = r.get("curves") or {}, r.get("gate_history") or {}

    def at(xs):
        return xs[e - 1] if xs and 0 < e <= len(xs) else None

    g = r.get("gate") or {}
    return {"at_checkpoint": {"epoch": e, "edge_compliance": at(c.get("edge_compliance")),
                              "rule_compliance": at(c.get("rule_compliance")),
                              "n_rule_checks": at(h.get("n_rule_checks"))},
            "gate": {k: g.get(k) for k in ("passed", "epoch", "edge_threshold", "rule_threshold", "sequences",
                                           "final_edge_compliance", "final_rule_compliance", "n_rule_checks")}}


def export(exp: "Experiment", out: str, fmt: str = "reference", overwrite: bool = False,
           checkpoint: str | int = "gate") -> dict[str, Any]:
    """Write exp to out (a local path or s3:// URI); returns the manifest.

    checkpoint: only recorded (how exp was loaded). overwrite: replace a non-empty out."""
    if fmt not in FORMATS:
        raise ExportError(f"format: {fmt!r} is invalid: must be one of {', '.join(FORMATS)}")
    dest, existing = _open_out(out, overwrite)
    files = _files(exp, fmt)
    manifest = _manifest(exp, fmt, checkpoint, files)
    body = (json.dumps(manifest, indent=2) + "\n").encode()
    if dest.local:
        _write_local(dest.root, files, body)
    else:   # each object PUT is atomic; the manifest goes last and marks the export complete
        if existing:
            dest.delete_dir("")
        for rel, (data, _) in files.items():
            dest.write_bytes(rel, data)
        dest.write_bytes(MANIFEST, body)
    return manifest


def _open_out(out: str, overwrite: bool) -> tuple[Store, list[str]]:
    """The --out store and what it holds; ExportError if it cannot be written or is not empty (unless overwrite)."""
    try:
        dest = Store.open(str(out))
        dest.check_writable()
        if dest.is_file(""):
            raise ExportError(f"--out {dest.uri}: is a file, not a directory")
        existing = dest.listdir()
    except (StorageError, OSError) as e:
        raise ExportError(f"--out {out}: {e}") from None
    if existing and not overwrite:
        raise ExportError(f"--out {dest.uri} is not empty ({len(existing)} entries, e.g. {existing[0]}); "
                          f"give another directory, or --overwrite (overwrite=True) to replace it")
    return dest, existing


def _manifest(exp: "Experiment", fmt: str, checkpoint: str | int,
              files: dict[str, tuple[bytes, str]]) -> dict[str, Any]:
    return {
        "format": fmt, "format_version": FORMAT_VERSION, "experiment_id": exp.experiment_id,
        "checkpoint": {"requested": checkpoint, "epoch": exp.epoch, "uri": exp.checkpoint_uri},
        "figures": _figures(exp),
        "corpus": {"id": exp.config.corpus_id(), "uri": exp.corpus.uri},
        "exported_at": utc_iso(),
        "files": {rel: entry(data, what=what) for rel, (data, what) in files.items()},
        "config": exp.config.to_dict(),
    }


def _write_local(root: str, files: dict[str, tuple[bytes, str]], manifest: bytes) -> None:
    """Build the directory aside under layout's temp name, then rename it into place."""
    parent, name = os.path.split(root.rstrip("/"))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, tmp_name(name))
    os.mkdir(tmp)
    try:
        for rel, (data, _) in [*files.items(), (MANIFEST, (manifest, ""))]:
            write_synced(os.path.join(tmp, rel), data)
        old = None
        if os.path.exists(root):   # an empty directory, or one the caller allowed to replace
            old = os.path.join(parent, tmp_name(f"old-{name}"))
            os.replace(root, old)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old:
        shutil.rmtree(old, ignore_errors=True)
