"""`raywalk plot RESULT_JSON|SUMMARY_JSON [--out PNG]`: curves of a run, or compliance across a sweep."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="plot a run's result.json or a sweep's summary.json", description=__doc__)
    p.add_argument("path", help="result.json of a run, or summary.json of a sweep")
    p.add_argument("--out", help="PNG to write (default: beside the input)")


def run(args: argparse.Namespace) -> int:
    from ..plot import plot_run, plot_sweep

    src = Path(args.path)
    data = json.loads(src.read_text())
    if "rows" in data:
        out = plot_sweep(data, Path(args.out or src.with_name("sweep.png")))
    else:
        out = plot_run(data, Path(args.out or src.with_name("curves.png")))
    print(out)
    return 0
