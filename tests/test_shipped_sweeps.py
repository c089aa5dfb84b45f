"""The study's sweeps as shipped configs: `raywalk tune X --dry-run` lists every point as valid."""
from __future__ import annotations

import yaml

from raywalk.cli import main
from raywalk.config import Config
from raywalk.science.graph import jump_lengths
from raywalk.service.sweep import load_sweep
from tests.conftest import ROOT

CONFIGS = ROOT / "configs"
ANCHOR = Config.load(CONFIGS / "anchor.yaml")


def dry_run(capsys, name: str) -> list[str]:
    assert main(["tune", str(CONFIGS / name), "--dry-run"]) == 0
    return capsys.readouterr().out.splitlines()


def test_graph_sizes_dry_run(capsys):
    out = dry_run(capsys, "sweep_graph_sizes.yaml")
    assert "12 valid points" in out[0] and len(out) == 13
    s = load_sweep(CONFIGS / "sweep_graph_sizes.yaml")
    assert sorted((p.cfg.graph.n, p.cfg.seed) for p in s.points) == sorted(
        (n, sd) for n in (200, 500, 1000, 2000) for sd in (42, 123, 7))
    for p in s.points:
        assert p.cfg.corpus.corpus_size == 400 * p.cfg.graph.n >= 100 * p.cfg.graph.n
        assert (p.cfg.model, p.cfg.w, p.cfg.graph.r_scales) == (ANCHOR.model, ANCHOR.w, ANCHOR.graph.r_scales)
        assert f"graph.n={p.cfg.graph.n}, seed={p.cfg.seed}" in out[1 + p.index]


def test_r_curve_dry_run(capsys):
    out = dry_run(capsys, "sweep_r_curve.yaml")
    assert "24 valid points" in out[0] and len(out) == 25
    s = load_sweep(CONFIGS / "sweep_r_curve.yaml")
    scales = yaml.safe_load((CONFIGS / "anchor.yaml").read_text())["graph"]["r_scales"]
    assert len(scales) == 8
    assert sorted((p.cfg.graph.r_scales, p.cfg.seed) for p in s.points) == sorted(
        ((sc,), sd) for sc in scales for sd in (42, 123, 7))
    rs = set()
    for p in s.points:
        # the anchor in every other respect, one jump length per point
        assert p.cfg.replace(**{"graph.r_scales": list(ANCHOR.graph.r_scales), "seed": ANCHOR.seed,
                                "run.cpus_per_worker": ANCHOR.run.cpus_per_worker}) == ANCHOR
        (r,) = jump_lengths(p.cfg.graph.r_scales, p.cfg.w)
        rs.add(r)
    assert sorted(rs) == [32, 45, 58, 64, 70, 83, 96, 128]
    assert len({p.experiment_id for p in s.points}) == 24 and s.axis == "graph.r_scales"
