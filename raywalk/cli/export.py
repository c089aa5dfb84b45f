"""`raywalk export EXPERIMENT --out DIR [--checkpoint gate|latest|N] [--format reference|raywalk] [--overwrite]`.

Writes what the study's analysis phases read (model.pt, model.json, graph.npz, jumpers.csv,
gate_starts.npy, eval_walks.npy, manifest.json with sha256s) from one experiment's checkpoint:
by default the gate checkpoint, in the reference TransformerLM's layout. Local or s3:// on
both sides. A non-empty --out is refused unless --overwrite (which replaces it).
"""
from __future__ import annotations

import argparse

from raywalk.cli import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="hand a trained model to the study's analysis code", description=__doc__)
    p.add_argument("experiment", help="experiment directory or its result.json (path or s3://...)")
    p.add_argument("--out", required=True, help="directory to write (path or s3://...)")
    p.add_argument("--checkpoint", default="gate",
                   help="gate (default; refused for a run that failed the gate), latest, or an epoch number")
    p.add_argument("--format", default="reference", choices=("reference", "raywalk"),
                   help="state_dict names: the study's TransformerLM (default) or raywalk's GPT")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    from raywalk.loader import LoadError, load
    from raywalk.export import ExportError

    which = args.checkpoint
    if which not in ("gate", "latest"):
        if not which.isdigit():
            raise InputError(f"--checkpoint {which!r} is invalid: must be gate, latest or an epoch number")
        which = int(which)
    try:
        exp = load(args.experiment, checkpoint=which)
        m = exp.export(args.out, format=args.format, overwrite=args.overwrite)
    except (LoadError, ExportError) as e:
        raise InputError(str(e)) from None
    fig = m["figures"]["at_checkpoint"]
    print(f"exported {m['experiment_id']} epoch {fig['epoch']} (edge {fig['edge_compliance']}, "
          f"rule {fig['rule_compliance']}, {fig['n_rule_checks']} rule checks) as {m['format']} to {args.out}")
    return 0
