"""`raywalk tune SWEEP_YAML [--storage ROOT] [--max-concurrent K] [--bucket K]`: a Ray Tune grid of experiments.

Every point of the sweep is validated before anything runs; finished points are
skipped, interrupted ones resume from their checkpoints. Writes
ROOT/sweeps/{sweep_id}/summary.json and summary.csv and prints a table.
Exit codes as `raywalk train`: storage that refuses a write stops the sweep in one
line (4), every unfinished point interrupted; a lease lost to another driver: 5.
"""
from __future__ import annotations

import argparse

from raywalk.cli import EXIT_DONE, EXIT_LEASE_LOST, EXIT_NOT_FINISHED


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="run a sweep (grid over config keys) as Ray Tune trials", description=__doc__)
    p.add_argument("sweep", help="sweep YAML (see configs/sweep_*.yaml)")
    p.add_argument("--storage", help="storage root, local path or s3://... (default: the base config's run.storage)")
    p.add_argument("--max-concurrent", type=int, default=None, metavar="K",
                   help="trials at once (default: as many as the cluster can grow to - its autoscaler's node "
                        "types and max_workers, or its resources now without an autoscaler; see raywalk/service/tune.py)")
    p.add_argument("--bucket", type=int, default=None, metavar="K",
                   help="train at most K same-shape points together in one worker (default: the sweep file's "
                        "`bucket`, else what fits the worker: 8 on a CPU, by memory on a GPU); 1: one per trial")
    p.add_argument("--dry-run", action="store_true", help="validate and list the points and buckets; run nothing")
    p.add_argument("--verbose", action="store_true", help="show Ray's and Tune's own logs and status tables")


def run(args: argparse.Namespace) -> int:
    from raywalk.config import ConfigError
    from raywalk.service.sweep import load_sweep

    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent: {args.max_concurrent} is invalid: must be >= 1")
    if args.bucket is not None and args.bucket < 1:
        raise ConfigError(f"--bucket: {args.bucket} is invalid: must be >= 1 (1: one experiment per trial)")
    sweep = load_sweep(args.sweep)
    from raywalk.records.storage import Store
    from raywalk.service.tune import plan_buckets, print_summary, run_sweep

    buckets = plan_buckets(list(sweep.points), args.bucket, sweep.bucket)   # refuses what cannot fit, before Ray
    if args.dry_run:
        print(f"sweep {sweep.sweep_id}: {len(sweep.points)} valid points in {len(buckets)} trial(s)")
        import torch

        from raywalk.service.bucketing import alone_reason
        from raywalk.service.dataset import free_memory

        host = free_memory(torch.device("cpu"))
        for tid, members in buckets:
            if len(members) > 1:
                print(f"  {tid}: {len(members)} same-shape points in one worker")
            elif args.bucket != 1 and (why := alone_reason(members[0].cfg, host)):
                print(f"  alone: {why}")
            for p in members:
                g = ", ".join(f"{k}={v}" for k, v in p.grid.items())
                print(f"  {'  ' if len(members) > 1 else ''}{p.index:3d}  {g}  corpus_size={p.cfg.corpus.corpus_size}"
                      f"  {p.experiment_id}")
        return 0

    Store.open(args.storage or sweep.base.run.storage).check_writable()   # before Ray starts
    from raywalk.service.trackers import check

    for p in sweep.points:
        check(p.cfg.run.trackers, args.storage or p.cfg.run.storage)
    summary = run_sweep(sweep, storage=args.storage, max_concurrent=args.max_concurrent, verbose=args.verbose,
                        bucket=args.bucket)
    print_summary(summary, Store.open(args.storage or sweep.base.run.storage).uri)
    from raywalk.records.result import is_finished

    # a storage stop raised (one line, exit 4); a lease lost to another driver is said by its trial, in one line
    if any(s["kind"] == "lease" for s in summary.get("stops", ())):
        return EXIT_LEASE_LOST
    return EXIT_DONE if all(is_finished(r["status"]) for r in summary["rows"]) else EXIT_NOT_FINISHED
