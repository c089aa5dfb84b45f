"""`raywalk train CONFIG [--workers N] [--storage ROOT] [--set k=v] [--fresh]`: train to the gate."""
from __future__ import annotations

import argparse

from raywalk.cli import EXIT_DONE, EXIT_NOT_FINISHED, add_config_args, load_config


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model until it passes the sufficiency gate", description=__doc__)
    add_config_args(p)
    p.add_argument("--workers", type=int, help="training workers (overrides run.workers)")
    p.add_argument("--storage", help="storage root, local path or s3://... (overrides run.storage)")
    p.add_argument("--fresh", action="store_true",
                   help="start over: the earlier run of this experiment is moved aside (and named), never deleted")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress bars")
    p.add_argument("--no-progress", action="store_true", help="no per-epoch progress bar")


def run(args: argparse.Namespace) -> int:
    extra = []
    if args.workers is not None:
        extra.append(f"run.workers={args.workers}")
    if args.storage:
        extra.append(f"run.storage={args.storage}")
    cfg = load_config(args, extra)
    from raywalk.records.storage import Store
    from raywalk.service.driver import train

    Store.open(cfg.run.storage).check_writable()   # before Ray starts
    from raywalk.service.trackers import check

    check(cfg.run.trackers, cfg.run.storage)       # a tracker not installed: refused, with the pip command
    from raywalk.records.result import is_finished

    r = train(cfg, fresh=args.fresh, verbose=args.verbose, progress=not args.no_progress)   # stops: cli.exit_codes
    return EXIT_DONE if is_finished(r["status"]) else EXIT_NOT_FINISHED
