"""`raywalk ls [ROOT] [--json]`: the experiments and sweeps under a storage root (local or s3://).

One line per experiment: id, status (running / passed / failed / interrupted),
epochs done, gate epoch, final edge and rule compliance, restarts, last
update; then each sweep with its points counted by status. Reads only
result.json, lease.json and summary.json files.
"""
from __future__ import annotations

import argparse
import json

from raywalk.cli import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("ls", help="list the experiments and sweeps under a storage root", description=__doc__)
    p.add_argument("root", nargs="?", default="results", help="storage root, a path or s3://... (default: results)")
    p.add_argument("--json", action="store_true", help="print the overview as JSON (for scripts)")


def run(args: argparse.Namespace) -> int:
    from raywalk.records.overview import format_overview, scan
    from raywalk.records.storage import Store

    root = Store.open(args.root)
    if root.local and not root.exists():
        raise InputError(f"storage root {root.uri}: no such directory")
    if root.local and not root.fs.get_file_info(root.path()).type.name == "Directory":
        raise InputError(f"storage root {root.uri}: not a directory")
    ov = scan(root)
    print(json.dumps(ov, indent=2) if args.json else format_overview(ov))
    return 0
