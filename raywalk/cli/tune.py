"""`raywalk tune SWEEP_YAML [--storage ROOT] [--max-concurrent K]`: a Ray Tune grid of experiments.

Every point of the sweep is validated before anything runs; finished points are
skipped, interrupted ones resume from their checkpoints. Writes
ROOT/sweeps/{sweep_id}/summary.json and summary.csv and prints a table.
"""
from __future__ import annotations

import argparse

from raywalk.cli import EXIT_DONE, EXIT_NOT_FINISHED


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="run a sweep (grid over config keys) as Ray Tune trials", description=__doc__)
    p.add_argument("sweep", help="sweep YAML (see configs/sweep_*.yaml)")
    p.add_argument("--storage", help="storage root, local path or s3://... (default: the base config's run.storage)")
    p.add_argument("--max-concurrent", type=int, default=None, metavar="K",
                   help="trials at once (default: as many as the cluster can grow to - its autoscaler's node "
                        "types and max_workers, or its resources now without an autoscaler; see raywalk/service/tune.py)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the points; run nothing")
    p.add_argument("--verbose", action="store_true", help="show Ray's and Tune's own logs and status tables")


def run(args: argparse.Namespace) -> int:
    from raywalk.config import ConfigError
    from raywalk.service.sweep import load_sweep

    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent: {args.max_concurrent} is invalid: must be >= 1")
    sweep = load_sweep(args.sweep)
    if args.dry_run:
        print(f"sweep {sweep.sweep_id}: {len(sweep.points)} valid points")
        for p in sweep.points:
            g = ", ".join(f"{k}={v}" for k, v in p.grid.items())
            print(f"  {p.index:3d}  {g}  corpus_size={p.cfg.corpus.corpus_size}  {p.experiment_id}")
        return 0
    from raywalk.records.storage import Store
    from raywalk.service.tune import print_summary, run_sweep

    Store.open(args.storage or sweep.base.run.storage).check_writable()   # before Ray starts
    from raywalk.service.trackers import check

    for p in sweep.points:
        check(p.cfg.run.trackers, args.storage or p.cfg.run.storage)
    summary = run_sweep(sweep, storage=args.storage, max_concurrent=args.max_concurrent, verbose=args.verbose)
    print_summary(summary, Store.open(args.storage or sweep.base.run.storage).uri)
    from raywalk.records.result import is_finished

    return EXIT_DONE if all(is_finished(r["status"]) for r in summary["rows"]) else EXIT_NOT_FINISHED
