"""Sweep files and grid expansion (Ray-free; `raywalk.service.tune` runs the points, sweep_summary.py sums them up).

A sweep file (YAML) names a base config and a grid over any config keys:

    name: graph_sizes            # optional; default: the file's stem
    base: anchor.yaml            # a config file (relative to the sweep file) or an inline mapping
    set:                         # optional fixed overrides of the base, dotted keys
      train.max_epochs: 30
    grid:                        # axes: dotted config keys -> lists of values (cartesian product)
      graph.n: [100, 200, 500, 1000]
      seed: [42, 123, 7]
    derived:                     # optional: keys computed per point from n, w, K
      corpus.corpus_size: "max(20000, 400*n)"
    axis: graph.n                # optional: x axis of `raywalk plot` (default: the first grid key)

Each point is base <- set <- grid values <- derived expressions <- the n-scaling
rule, and is validated as a full Config before anything runs; an error names the
point and the dotted field.

`derived` values are expressions of expressions.py's tiny arithmetic language (never eval).

The n-scaling rule (SCALING_RULE): when neither the grid nor `derived` sets
corpus.corpus_size, it keeps the base config's walks per vertex:
corpus_size = max(100*n, base_corpus_size * n // base_n). A researcher sweeping
graph.n never has to hand-write a corpus size per point.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from raywalk.config import Config, ConfigError, apply_overrides, read_yaml, set_dotted
from raywalk.service.expressions import Expr

SCALING_RULE = ("corpus.corpus_size, unless set by the grid or `derived`, keeps the base's walks per vertex: "
                "max(100*n, base_corpus_size * n // base_n)")
SWEEP_KEYS = {"name", "base", "set", "grid", "derived", "axis", "bucket"}
OPERATIONAL = {"run.storage"}   # set for every point from --storage, never an axis


# ---- sweep file ---------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    index: int
    grid: dict[str, Any]          # dotted key -> value of this point's grid axes
    cfg: Config

    @property
    def experiment_id(self) -> str:
        return self.cfg.experiment_id()


@dataclass(frozen=True)
class Sweep:
    name: str
    sweep_id: str
    axes: tuple[str, ...]
    axis: str
    base: Config                  # base <- set (thresholds and the n-scaling reference)
    points: tuple[Point, ...]
    derived: dict[str, str]
    source: str
    bucket: int | None = None     # sweep.bucket: at most this many same-shape points train together

    def with_storage(self, storage: str) -> "Sweep":
        pts = tuple(Point(p.index, p.grid, p.cfg.replace(**{"run.storage": storage})) for p in self.points)
        return Sweep(self.name, self.sweep_id, self.axes, self.axis, self.base.replace(**{"run.storage": storage}),
                     pts, self.derived, self.source, self.bucket)


def _get_dotted(d: Mapping[str, Any], key: str) -> Any:
    cur: Any = d
    for p in key.split("."):
        if not isinstance(cur, Mapping) or p not in cur:
            return None
        cur = cur[p]
    return cur


def _known_key(key: str, where: str) -> None:
    """The key must name a config field (not a section), e.g. graph.n or seed."""
    d = Config().to_dict()
    cur: Any = d
    parts = key.split(".")
    for i, p in enumerate(parts):
        if not isinstance(cur, dict) or p not in cur:
            sect = ".".join(parts[:i]) or "the top level"
            allowed = ", ".join(sorted(cur)) if isinstance(cur, dict) else "(none: not a section)"
            raise ConfigError(f"{where} {key}: unknown config key (allowed under {sect}: {allowed})")
        cur = cur[p]
    if isinstance(cur, dict):
        raise ConfigError(f"{where} {key}: is a section, not a value; name a key inside it "
                          f"({', '.join(sorted(cur))})")


def load_sweep(path: str | Path) -> Sweep:
    path = Path(path)
    data = read_yaml(path, "sweep file")
    return parse_sweep(data, base_dir=path.parent, default_name=path.stem, source=str(path))


def parse_sweep(data: Any, *, base_dir: str | Path = ".", default_name: str = "sweep",
                source: str = "<sweep>") -> Sweep:
    """Parse and expand a sweep mapping; every point is validated before it returns."""
    if not isinstance(data, dict):
        raise ConfigError("sweep: must be a mapping with base and grid")
    unknown = set(data) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"sweep.{sorted(unknown)[0]}: unknown key (allowed: {', '.join(sorted(SWEEP_KEYS))})")
    name = _sweep_name(data.get("name", default_name))
    base_dict = _base_dict(data.get("base"), Path(base_dir))
    base_cfg = _apply_sets(base_dict, data.get("set") or {})
    grid = data.get("grid")
    axes = _grid_axes(grid)
    derived = _derived(data.get("derived") or {}, grid)
    axis = data.get("axis", axes[0])
    if axis not in axes:
        raise ConfigError(f"sweep.axis: {axis!r} is invalid: must be one of the grid keys ({', '.join(axes)})")
    points = _points(base_dict, base_cfg, grid, axes, derived)
    ident = {"points": [p.experiment_id for p in points], "axes": axes}
    sweep_id = f"{name}-{hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]}"
    bucket = data.get("bucket")
    if bucket is not None and (isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1):
        raise ConfigError(f"sweep.bucket: {bucket!r} is invalid: must be a whole number >= 1 "
                          f"(1: one experiment per trial)")
    return Sweep(name, sweep_id, tuple(axes), axis, base_cfg, tuple(points),
                 {k: e.text for k, e in derived.items()}, source, bucket)


def _sweep_name(name: Any) -> str:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(f"sweep.name: {name!r} is invalid: letters, digits, - _ . only")
    return name


def _base_dict(base: Any, base_dir: Path) -> dict[str, Any]:
    """sweep.base as a config mapping of its own (a file relative to the sweep file, or inline)."""
    if isinstance(base, str):
        path = base_dir / base
        if not path.is_file():
            raise ConfigError(f"sweep.base: {base!r} is invalid: no config file at {path}")
        try:
            base_dict = read_yaml(path, "config file")
        except ConfigError as e:
            raise ConfigError(f"sweep.base: {e}") from None
    elif isinstance(base, dict):
        base_dict = base
    else:
        raise ConfigError(f"sweep.base: {base!r} is invalid: a config file path or an inline config mapping")
    if not isinstance(base_dict, dict):
        raise ConfigError(f"sweep.base: {base!r} is invalid: the config must be a mapping of sections")
    return copy.deepcopy(base_dict)   # set/grid values are written into it: never into the caller's


def _apply_sets(base_dict: dict[str, Any], sets: Any) -> Config:
    """sweep.set written into base_dict (in place); the validated base config."""
    if not isinstance(sets, dict):
        raise ConfigError("sweep.set: must be a mapping of dotted keys to values")
    for k, v in sets.items():
        _known_key(str(k), "sweep.set")
        set_dotted(base_dict, str(k), v)
    try:
        return Config.from_dict(base_dict)
    except ConfigError as e:
        raise ConfigError(f"sweep base config: {e}") from None


def _grid_axes(grid: Any) -> list[str]:
    if not isinstance(grid, dict) or not grid:
        raise ConfigError("sweep.grid: must be a non-empty mapping of dotted keys to lists of values")
    for k, vals in grid.items():
        k = str(k)
        _known_key(k, "sweep.grid")
        if k in OPERATIONAL:
            raise ConfigError(f"sweep.grid {k}: cannot be an axis (every point's storage comes from --storage)")
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"sweep.grid {k}: {vals!r} is invalid: must be a non-empty list of values")
        if len({json.dumps(v, sort_keys=True) for v in vals}) != len(vals):
            raise ConfigError(f"sweep.grid {k}: {vals!r} is invalid: values repeat")
    return [str(k) for k in grid]


def _derived(raw: Any, grid: dict[str, Any]) -> dict[str, Expr]:
    if not isinstance(raw, dict):
        raise ConfigError("sweep.derived: must be a mapping of dotted keys to expressions")
    derived: dict[str, Expr] = {}
    for k, text in raw.items():
        k = str(k)
        _known_key(k, "sweep.derived")
        if k in grid:
            raise ConfigError(f"sweep.derived {k}: is also a grid axis; give it one way only")
        if k in OPERATIONAL:
            raise ConfigError(f"sweep.derived {k}: cannot be derived (it comes from --storage)")
        derived[k] = Expr(str(text) if isinstance(text, (int, float)) else text, f"sweep.derived {k}")
    return derived


def _points(base_dict: dict[str, Any], base_cfg: Config, grid: dict[str, Any], axes: list[str],
            derived: dict[str, Expr]) -> list[Point]:
    """The grid's cartesian product, each point a validated Config; two points of one experiment are refused."""
    points: list[Point] = []
    seen: dict[str, int] = {}
    for i, values in enumerate(itertools.product(*(grid[k] for k in axes))):
        gp = dict(zip(axes, values))
        where = f"sweep point {i} ({', '.join(f'{k}={v}' for k, v in gp.items())})"
        cfg = expand_point(base_dict, base_cfg, gp, derived, where)
        eid = cfg.experiment_id()
        if eid in seen:
            raise ConfigError(f"{where}: is the same experiment ({eid}) as point {seen[eid]}; "
                              f"an axis that does not change the model (e.g. run.*) makes duplicate points")
        seen[eid] = i
        points.append(Point(i, gp, cfg))
    return points


def expand_point(base_dict: dict[str, Any], base_cfg: Config, gp: Mapping[str, Any],
                 derived: Mapping[str, Expr], where: str) -> Config:
    d = apply_overrides(base_dict, [])   # deep copy
    for k, v in gp.items():
        set_dotted(d, k, v)
    names = {"n": _get_dotted(d, "graph.n"), "w": _get_dotted(d, "w"), "K": _get_dotted(d, "graph.K")}
    defaults = Config().to_dict()
    names = {k: (v if v is not None else _get_dotted(defaults, {"n": "graph.n", "w": "w", "K": "graph.K"}[k]))
             for k, v in names.items()}
    for k, v in names.items():
        if isinstance(v, bool) or not isinstance(v, int):
            field = {"n": "graph.n", "w": "w", "K": "graph.K"}[k]
            raise ConfigError(f"{where}: {field}: {v!r} is invalid: must be an integer")
    for k, e in derived.items():
        set_dotted(d, k, e.eval_with(names))
    if "corpus.corpus_size" not in gp and "corpus.corpus_size" not in derived:
        n, bn = names["n"], base_cfg.graph.n
        set_dotted(d, "corpus.corpus_size", max(100 * n, base_cfg.corpus.corpus_size * n // bn))
    try:
        return Config.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
