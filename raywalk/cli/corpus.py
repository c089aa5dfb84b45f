"""`raywalk corpus CONFIG [--out DIR] [--set k=v] [--verify]`: build (or reuse) the walk corpus."""
from __future__ import annotations

import argparse

from raywalk.cli import add_config_args, load_config


def add_parser(sub) -> None:
    p = sub.add_parser("corpus", help="build or reuse the walk corpus of a config", description=__doc__)
    add_config_args(p)
    p.add_argument("--out", help="storage root (default: the config's run.storage); corpora/<id>/ goes under it")
    p.add_argument("--parallel", type=int, default=None,
                   help="most shard tasks submitted at once (default 1000: every shard, so an autoscaler sees "
                        "the whole demand; Ray runs as many as the cluster has CPUs)")
    p.add_argument("--verify", action="store_true",
                   help="re-hash every file of an existing corpus against its manifest (default: sizes only)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args, [f"run.storage={args.out}"] if args.out else [])
    from raywalk.records.storage import Store

    Store.open(cfg.run.storage).check_writable()   # before Ray starts
    if args.parallel is not None and args.parallel < 1:
        from raywalk.config import ConfigError
        raise ConfigError(f"--parallel: {args.parallel} is invalid: must be >= 1")
    import ray

    from raywalk.service.corpus import build_corpus, ray_mapper
    from raywalk.service.ray_env import ensure_ray
    from raywalk.records.storage import Store

    def mapper(fn, shard_args):   # Ray starts only when shards must be built: a reuse never starts it
        ensure_ray(cfg, verbose=args.verbose)
        yield from ray_mapper(args.parallel)(fn, shard_args)

    ours = not ray.is_initialized()   # a Ray this command starts is this command's to stop; a caller's is not
    try:
        corpus, s = build_corpus(cfg, Store.open(cfg.run.storage), mapper=mapper,
                                 verify="full" if args.verify else "size")
    finally:
        if ours:
            ray.shutdown()
    t, e = s["train"], s["eval"]
    checked = " (every file re-hashed)" if s["reused"] and args.verify else ""
    print(f"{'reused' if s['reused'] else 'built'} corpus {cfg.corpus_id()} in {s['seconds']:.1f}s{checked}")
    for name, x in (("train", t), ("eval", e)):
        print(f"  {name:5s} {x['walks']:>9,d} walks  start at jumper {x['start_at_jumper_share']:.1%}  "
              f"jumper visits checked {x['jumper_visits_checked']:,d}  rule compliance {x['rule_compliance']:.3%}  "
              f"edge {x['edge_compliance']:.3%}  regenerated {x['regenerated']}")
    paths = s["distinct_paths_per_jumper"]
    print(f"  distinct compliant paths per jumper: min {min(paths.values())} (sampled up to 16)")
    print(corpus.uri)
    return 0
