"""`raywalk` command line: one module per verb (corpus, train, tune, plot, ls, export)."""
from __future__ import annotations

import argparse
import importlib
import sys

VERBS = ("corpus", "train", "tune", "plot", "ls", "export")


class InputError(ValueError):
    """A file or directory named on the command line that cannot be used; the message says which and why."""


def main(argv: list[str] | None = None) -> int:
    from raywalk.config import ConfigError
    from raywalk.service.ray_env import quiet_defaults
    from raywalk.records.errors import StorageError

    argv = sys.argv[1:] if argv is None else argv
    quiet_defaults("--verbose" in argv)   # before anything imports ray
    parser = argparse.ArgumentParser(prog="raywalk", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True)
    modules = {}
    for verb in VERBS:
        mod = importlib.import_module(f".{verb}", __name__)
        mod.add_parser(sub)
        modules[verb] = mod
    args = parser.parse_args(argv)
    try:
        return modules[args.verb].run(args) or 0
    except ConfigError as e:
        print(f"raywalk {args.verb}: invalid configuration: {e}", file=sys.stderr)
        return 2
    except (StorageError, InputError) as e:   # before any work: nothing created, no traceback
        print(f"raywalk {args.verb}: {e}", file=sys.stderr)
        return 2


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set graph.n=1000 (repeatable)")


def load_config(args: argparse.Namespace, extra: list[str] = ()):
    from raywalk.config import Config

    return Config.load(args.config, [*args.overrides, *extra])
