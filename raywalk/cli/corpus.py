"""`raywalk corpus CONFIG [--out DIR] [--set k=v]`: build (or reuse) the walk corpus."""
from __future__ import annotations

import argparse

from . import add_config_args, load_config


def add_parser(sub) -> None:
    p = sub.add_parser("corpus", help="build or reuse the walk corpus of a config", description=__doc__)
    add_config_args(p)
    p.add_argument("--out", help="storage root (default: the config's run.storage); corpora/<id>/ goes under it")
    p.add_argument("--parallel", type=int, default=None, help="shards generated at once (default: CPUs)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args, [f"run.storage={args.out}"] if args.out else [])
    if args.parallel is not None and args.parallel < 1:
        from ..config import ConfigError
        raise ConfigError(f"--parallel: {args.parallel} is invalid: must be >= 1")
    import ray

    from ..corpus import build_corpus, ray_mapper
    from ..ray_env import ensure_ray
    from ..storage import Store

    ensure_ray(cfg, verbose=args.verbose)
    try:
        corpus, s = build_corpus(cfg, Store.open(cfg.run.storage), mapper=ray_mapper(args.parallel))
    finally:
        ray.shutdown()
    t, e = s["train"], s["eval"]
    print(f"{'reused' if s['reused'] else 'built'} corpus {cfg.corpus_id()} in {s['seconds']:.1f}s")
    for name, x in (("train", t), ("eval", e)):
        print(f"  {name:5s} {x['walks']:>9,d} walks  start at jumper {x['start_at_jumper_share']:.1%}  "
              f"jumper visits checked {x['jumper_visits_checked']:,d}  rule compliance {x['rule_compliance']:.3%}  "
              f"edge {x['edge_compliance']:.3%}  regenerated {x['regenerated']}")
    paths = s["distinct_paths_per_jumper"]
    print(f"  distinct compliant paths per jumper: min {min(paths.values())} (sampled up to 16)")
    print(corpus.uri)
    return 0
