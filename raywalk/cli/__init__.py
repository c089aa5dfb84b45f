"""`raywalk` command line: one module per verb (corpus, train, tune, plot, ls, export)."""
from __future__ import annotations

import argparse
import importlib
import sys

VERBS = ("corpus", "train", "tune", "plot", "ls", "export")

# Exit codes, the same for every verb (README "Exit codes").
EXIT_DONE = 0           # done; for train and tune: every run finished (gate passed or failed)
EXIT_NOT_FINISHED = 1   # a run is not finished (rerun the same command to resume it)
EXIT_INPUT = 2          # bad input, refused before any work: nothing created, no traceback
EXIT_LEASE_HELD = 3     # another driver holds the experiment
EXIT_STORAGE = 4        # storage full or unwritable: stopped at once, resumable
EXIT_LEASE_LOST = 5     # this driver lost its lease to another one, and stopped writing


class InputError(ValueError):
    """A file or directory named on the command line that cannot be used; the message says which and why."""


def exit_codes() -> list[tuple[type, int, str]]:
    """(error, exit code, what the one line says before the error's message), first match wins."""
    from raywalk.config import ConfigError
    from raywalk.records.errors import StorageError, StorageUnwritable
    from raywalk.records.lease import LeaseHeld, LeaseLost

    return [(ConfigError, EXIT_INPUT, "invalid configuration: "), (StorageError, EXIT_INPUT, ""),
            (InputError, EXIT_INPUT, ""), (LeaseHeld, EXIT_LEASE_HELD, ""), (StorageUnwritable, EXIT_STORAGE, ""),
            (LeaseLost, EXIT_LEASE_LOST, "")]


def main(argv: list[str] | None = None) -> int:
    from raywalk.messages import tell
    from raywalk.service.ray_env import quiet_defaults

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
        return modules[args.verb].run(args) or EXIT_DONE
    except Exception as e:   # one line and its exit code for what the table knows; a traceback for the rest
        for error, code, what in exit_codes():
            if isinstance(e, error):
                tell(f"raywalk {args.verb}: {what}{e}")
                return code
        raise


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set graph.n=1000 (repeatable)")


def load_config(args: argparse.Namespace, extra: list[str] = ()):
    from raywalk.config import Config

    return Config.load(args.config, [*args.overrides, *extra])
