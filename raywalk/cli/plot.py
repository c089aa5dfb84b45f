"""`raywalk plot RESULT_JSON|SUMMARY_JSON [--out PNG]`: curves of a run, or compliance across a sweep."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from raywalk.cli import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="plot a run's result.json or a sweep's summary.json", description=__doc__)
    p.add_argument("path", help="result.json of a run, or summary.json of a sweep")
    p.add_argument("--out", help="PNG to write (default: beside the input)")


def read_input(src: Path) -> dict:
    """The JSON object in src, or InputError naming the file and what is wrong with it."""
    if not src.exists():
        raise InputError(f"{src}: no such file")
    if not src.is_file():
        raise InputError(f"{src}: not a file (give a result.json or a summary.json)")
    try:
        data = json.loads(src.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{src}: not valid JSON ({e})") from None
    except OSError as e:
        raise InputError(f"{src}: cannot be read ({e.strerror})") from None
    if not isinstance(data, dict) or not ("rows" in data or "curves" in data):
        raise InputError(f"{src}: not a raywalk result.json (no 'curves') or sweep summary.json (no 'rows')")
    return data


def run(args: argparse.Namespace) -> int:
    src = Path(args.path)
    data = read_input(src)
    out = Path(args.out or src.with_name("sweep.png" if "rows" in data else "curves.png"))
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: directory {out.parent} does not exist")
    from raywalk.plot import plot_run, plot_sweep

    print(plot_sweep(data, out) if "rows" in data else plot_run(data, out))
    return 0
