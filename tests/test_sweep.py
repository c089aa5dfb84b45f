"""Sweep files without Ray: parsing, grid expansion, validation, expressions, summaries."""
from __future__ import annotations

import json

import pytest
import yaml

from raywalk.config import ConfigError
from raywalk.service.expressions import evaluate
from raywalk.service.sweep import load_sweep, parse_sweep
from raywalk.service.sweep_summary import build_summary, format_table, read_csv, summary_row, to_csv
from tests.conftest import ROOT, TINY


def sweep_dict(**kw) -> dict:
    d = {"name": "t", "base": json.loads(json.dumps(TINY)), "grid": {"graph.n": [16, 32]}}
    d.update(kw)
    return d


# ---- expressions --------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("400*n", 40000), ("max(200000, 400*n)", 200000), ("min(n, 64) + 2*w", 72), ("n // 3", 33),
    ("-(n - 2*n)", 100), ("4 * w", 64), ("0.5 * n", 50), ("max(1, n // K)", 25), ("7", 7),
])
def test_expressions_evaluate(text, expected):
    v = evaluate(text, {"n": 100, "w": 4 if "4 * w" not in text else 16, "K": 4})
    assert v == expected and type(v) is type(expected)


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')", "n ** 2", "n / 2", "x + 1", "abs(n)", "n.bit_length()", "'a'",
    "[n]", "n if w else 1", "max(n, key=1)", "max()", "lambda: 1", "n < 2", "True", "",
])
def test_unsafe_or_unknown_expressions_are_rejected(text):
    with pytest.raises(ConfigError, match="invalid"):
        evaluate(text, {"n": 1, "w": 1, "K": 1}, where="sweep.derived corpus.corpus_size")


def test_division_by_zero_is_a_config_error():
    with pytest.raises(ConfigError, match="division by zero"):
        evaluate("n // (w - 4)", {"n": 16, "w": 4, "K": 2})


# ---- expansion ----------------------------------------------------------------

def test_grid_is_the_cartesian_product_in_file_order():
    s = parse_sweep(sweep_dict(grid={"graph.n": [16, 32], "seed": [1, 2, 3]}))
    assert [p.grid for p in s.points] == [{"graph.n": n, "seed": sd} for n in (16, 32) for sd in (1, 2, 3)]
    assert [p.cfg.graph.n for p in s.points] == [16, 16, 16, 32, 32, 32]
    assert [p.cfg.seed for p in s.points] == [1, 2, 3, 1, 2, 3]
    assert len({p.experiment_id for p in s.points}) == 6
    assert s.axis == "graph.n" and s.axes == ("graph.n", "seed")


def test_corpus_size_follows_the_n_scaling_rule():
    base = sweep_dict()["base"]
    base["corpus"]["corpus_size"] = 3200          # 200 walks per vertex at n=16
    s = parse_sweep(sweep_dict(base=base, grid={"graph.n": [16, 32, 64]}))
    assert [p.cfg.corpus.corpus_size for p in s.points] == [3200, 6400, 12800]
    assert all(p.cfg.corpus.corpus_size >= 100 * p.cfg.graph.n for p in s.points)


def test_derived_expressions_and_set():
    s = parse_sweep(sweep_dict(grid={"graph.n": [16, 32], "w": [4, 6]}, set={"train.max_epochs": 2},
                               derived={"corpus.corpus_size": "max(2000, 150*n)", "corpus.walk_length": "4*w"}))
    got = [(p.cfg.graph.n, p.cfg.w, p.cfg.corpus.corpus_size, p.cfg.corpus.walk_length, p.cfg.train.max_epochs)
           for p in s.points]
    assert got == [(16, 4, 2400, 16, 2), (16, 6, 2400, 24, 2), (32, 4, 4800, 16, 2), (32, 6, 4800, 24, 2)]
    assert s.derived == {"corpus.corpus_size": "max(2000, 150*n)", "corpus.walk_length": "4*w"}


def test_an_explicit_corpus_size_axis_wins_over_the_rule():
    s = parse_sweep(sweep_dict(grid={"graph.n": [16], "corpus.corpus_size": [1600, 4000]}))
    assert [p.cfg.corpus.corpus_size for p in s.points] == [1600, 4000]


@pytest.mark.parametrize("mut,match", [
    (dict(grid={"graph.n": [16, 17]}), r"sweep point 1 \(graph.n=17\): graph.n: 17 .*divisible"),
    (dict(grid={"graph.n": [16, 32], "model.n_heads": [1, 3]}), r"point 1 .*model.n_heads: 3"),
    (dict(grid={"graph.n": [16, "big"]}), r"point 1 .*graph.n"),
    (dict(grid={"graph.n": [16], "corpus.corpus_size": [1600, 100]}), r"point 1 .*corpus.corpus_size: 100"),
    (dict(grid={"graph.nn": [16]}), r"sweep.grid graph.nn: unknown config key"),
    (dict(grid={"graph": [16]}), r"sweep.grid graph: is a section"),
    (dict(grid={"graph.n": []}), r"sweep.grid graph.n: .*non-empty list"),
    (dict(grid={"graph.n": 16}), r"sweep.grid graph.n: .*non-empty list"),
    (dict(grid={"graph.n": [16, 16]}), r"values repeat"),
    (dict(grid={}), r"sweep.grid"),
    (dict(grid={"run.storage": ["a", "b"]}), r"run.storage: cannot be an axis"),
    (dict(grid={"graph.n": [16], "run.max_failures": [1, 2]}), r"same experiment"),
    (dict(derived={"graph.n": "2*n"}), r"also a grid axis"),
    (dict(derived={"corpus.corpus_size": "10*n"}), r"point 0 .*corpus.corpus_size: 160 .*100\*graph.n"),
    (dict(derived={"corpus.corpus_size": "n**2"}), r"sweep.derived corpus.corpus_size"),
    (dict(set={"train.max_epochs": 99}), r"sweep base config: train.max_epochs"),
    (dict(axis="seed"), r"sweep.axis"),
    (dict(grids={"graph.n": [16]}), r"sweep.grids: unknown key"),
    (dict(base=5), r"sweep.base"),
    (dict(base="no_such.yaml"), r"sweep.base: 'no_such.yaml'"),
])
def test_invalid_sweeps_name_the_field(mut, match):
    with pytest.raises(ConfigError, match=match):
        parse_sweep(sweep_dict(**mut))


def test_sweep_id_is_stable_and_follows_the_points():
    a, b = parse_sweep(sweep_dict()), parse_sweep(sweep_dict())
    assert a.sweep_id == b.sweep_id and a.sweep_id.startswith("t-")
    assert parse_sweep(sweep_dict(grid={"graph.n": [16, 64]})).sweep_id != a.sweep_id
    assert parse_sweep(sweep_dict(set={"train.lr": 1e-3})).sweep_id != a.sweep_id


def test_shipped_sweep_files_are_valid():
    tiny = load_sweep(ROOT / "configs" / "sweep_tiny.yaml")
    assert len({p.cfg.graph.n for p in tiny.points}) >= 2
    assert all(p.cfg.run.cpus_per_worker <= 0.5 for p in tiny.points)   # two trials fit 2 cores
    big = load_sweep(ROOT / "configs" / "sweep_graph_sizes.yaml")
    anchor = yaml.safe_load((ROOT / "configs" / "anchor.yaml").read_text())
    assert sorted({p.cfg.graph.n for p in big.points}) == [200, 500, 1000, 2000]
    for p in big.points:
        assert p.cfg.model.d_model == anchor["model"]["d_model"] and p.cfg.w == anchor["w"]
        assert p.cfg.corpus.corpus_size == 400 * p.cfg.graph.n
    assert big.sweep_id.startswith("graph_sizes-")


def test_base_path_is_relative_to_the_sweep_file(tmp_path):
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(TINY))
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"base": "b.yaml", "grid": {"seed": [1, 2]}}))
    s = load_sweep(tmp_path / "s.yaml")
    assert s.name == "s" and [p.cfg.seed for p in s.points] == [1, 2]


# ---- summaries ----------------------------------------------------------------

def fake_result(p, status, epochs, edge, rule, gate_epoch):
    return {"experiment_id": p.experiment_id, "status": status, "svd_eligible": status == "passed",
            "epochs_trained": epochs,
            "failure": {"reason": "gate not passed after 3 epochs"} if status == "failed" else None,
            "gate": {"passed": status == "passed", "epoch": gate_epoch, "final_edge_compliance": edge,
                     "final_rule_compliance": rule}}


def fake_summary():
    s = parse_sweep(sweep_dict(grid={"graph.n": [16, 32, 48]}))
    p0, p1, p2 = s.points
    rows = [summary_row(p0, fake_result(p0, "passed", 2, 0.99, 0.9, 2), {"wall_time_s": 12.5}, "r0"),
            summary_row(p1, fake_result(p1, "failed", 3, 0.97, 0.5, None), {"wall_time_s": 20.0}, "r1"),
            summary_row(p2, None, {"error": "RuntimeError: boom", "wall_time_s": 1.0}, None)]
    return s, build_summary(s, rows, storage="/x", wall_time_s=40.0, max_concurrent=2, trials_run=3)


def test_summary_rows_and_excluded_points():
    s, summ = fake_summary()
    assert [r["status"] for r in summ["rows"]] == ["passed", "failed", "error"]
    assert [r["svd_eligible"] for r in summ["rows"]] == [True, False, False]
    assert [e["point"] for e in summ["excluded_from_svd"]] == [1, 2]
    assert summ["excluded_from_svd"][0]["reason"].startswith("gate not passed")
    assert summ["excluded_from_svd"][1]["reason"] == "RuntimeError: boom"
    assert summ["counts"] == {"passed": 1, "failed": 1, "error": 1}
    assert summ["thresholds"] == {"edge": 0.95, "rule": 0.8} and summ["axis"] == "graph.n"
    json.dumps(summ)   # serialisable


def test_csv_agrees_with_the_summary():
    _, summ = fake_summary()
    rows = read_csv(to_csv(summ))
    assert len(rows) == 3
    for c, r in zip(rows, summ["rows"]):
        assert int(c["graph.n"]) == r["grid"]["graph.n"]
        assert c["experiment_id"] == r["experiment_id"] and c["status"] == r["status"]
        assert c["svd_eligible"] == str(r["svd_eligible"])
        for k in ("final_edge_compliance", "final_rule_compliance", "wall_time_s"):
            assert (float(c[k]) if c[k] else None) == r[k]
        assert (int(c["gate_epoch"]) if c["gate_epoch"] else None) == r["gate_epoch"]


def test_table_lists_the_excluded_configs():
    _, summ = fake_summary()
    t = format_table(summ)
    assert "graph.n" in t.splitlines()[0] and "excluded from SVD analysis (2 of 3)" in t
    assert "point 1 (graph.n=32)" in t and "RuntimeError: boom" in t


def test_plot_sweep_draws_a_png_with_missing_figures(tmp_path):
    from raywalk.plot import plot_sweep

    _, summ = fake_summary()
    out = plot_sweep(summ, tmp_path / "sweep.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the CLI rejects an invalid grid before anything runs -----------------------

def test_cli_rejects_invalid_grid_before_running(tmp_path, capsys):
    from raywalk.cli import main

    bad = sweep_dict(grid={"graph.n": [16, 17]})
    bad["base"]["run"]["storage"] = str(tmp_path / "store")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["tune", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and "graph.n" in err and "sweep point 1" in err
    assert not (tmp_path / "store").exists()


def test_cli_dry_run_lists_points(tmp_path, capsys):
    from raywalk.cli import main

    assert main(["tune", str(ROOT / "configs" / "sweep_tiny.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 valid points" in out and "graph.n=32" in out


def test_cli_dry_run_says_which_points_train_alone_and_why(tmp_path, capsys):
    from raywalk.cli import main

    d = sweep_dict(grid={"seed": [1, 2, 3]})
    d["base"]["run"]["storage"] = str(tmp_path / "store")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    assert main(["tune", str(tmp_path / "s.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 valid points in 1 trial(s)" in out and "3 same-shape points in one worker" in out and "alone" not in out
    d["base"]["train"]["data"] = "stream"   # a setting a bucket cannot honour: each point trains alone
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    assert main(["tune", str(tmp_path / "s.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "3 valid points in 3 trial(s)" in out
    assert out.count("alone: train.data stream: a bucket holds its members' windows resident") == 3
    assert not (tmp_path / "store").exists()
