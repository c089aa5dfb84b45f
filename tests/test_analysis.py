"""raywalk.load: a finished experiment back in memory, from a real (tiny) training run.

One local Ray for the module trains two tiny experiments: one whose gate passes
(thresholds at 0) and one that cannot pass (thresholds at 1), three epochs.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import raywalk
import raywalk.export
from raywalk.records import checkpoints as ckpt
from raywalk.science.compliance import RuleTable
from raywalk.service.corpus import eval_size
from raywalk.science.gate import Gate
from raywalk.records.storage import Store
from tests.conftest import LONG, PASSING, reference_run


@pytest.fixture(scope="module")
def runs(local_ray, tmp_path_factory):
    """The session's passing and never-passing runs (conftest.reference_run: read here, never changed)."""
    passed = reference_run(tmp_path_factory, **PASSING)
    failed = reference_run(tmp_path_factory, **LONG)
    assert passed["status"] == "passed" and failed["status"] == "failed"
    return {"passed": passed, "failed": failed,
            "roots": {k: Path(r["config"]["run"]["storage"]) for k, r in (("passed", passed), ("failed", failed))}}


def exp_dir(runs, which):
    return runs["roots"][which] / runs[which]["experiment_id"]


def weights_equal(model, state) -> bool:
    sd = model.state_dict()
    return sd.keys() == state.keys() and all(torch.equal(sd[k], state[k]) for k in sd)


def test_gate_model_reproduces_its_checkpoint_and_its_gate(runs):
    d = exp_dir(runs, "passed")
    exp = raywalk.load(d)
    r = runs["passed"]
    g = r["gate"]["epoch"]
    assert exp.epoch == g and exp.checkpoint_uri.endswith(ckpt.dir_name(g))
    assert exp.config.experiment_id() == r["experiment_id"] == exp.experiment_id
    assert exp.result["status"] == "passed" and not exp.model.training
    assert next(exp.model.parameters()).device.type == "cpu"
    assert weights_equal(exp.model, ckpt.read(Store.open(str(d / "checkpoints" / ckpt.dir_name(g))))["model"])
    # the same experiment through its result.json
    again = raywalk.load(str(d / "result.json"))
    assert again.epoch == g and weights_equal(again.model, exp.model.state_dict())

    # model + gate starts + graph + jumpers give back the gate's own figures at that epoch
    cfg = exp.config
    starts = exp.gate_starts()
    assert starts.shape == (cfg.gate.sequences,)
    walks = exp.eval_walks()
    assert walks.dtype == np.int64 and walks.shape == (eval_size(cfg), cfg.corpus.walk_length)
    assert np.array_equal(starts, np.resize(walks[:, 0], cfg.gate.sequences))
    c = Gate(starts, RuleTable.build(exp.graph, exp.jumpers), cfg).evaluate(exp.model).comp
    assert c.edge == r["curves"]["edge_compliance"][g - 1] and c.rule == r["curves"]["rule_compliance"][g - 1]
    assert c.rule_total == r["gate_history"]["n_rule_checks"][g - 1] > 0
    assert exp.graph.n == cfg.graph.n and len(exp.jumpers) == cfg.graph.K * cfg.graph.n_jumpers_per_block


def test_two_lines_reach_the_attention_internals(runs):
    exp = raywalk.load(exp_dir(runs, "passed"))
    cfg = exp.config
    internals = exp.model.attention_internals(torch.as_tensor(exp.eval_walks()[:5, :cfg.w]))
    H, dh = cfg.model.n_heads, cfg.model.d_model // cfg.model.n_heads
    assert len(internals) == cfg.model.n_layers
    for d in internals:
        assert d["q"].shape == d["k"].shape == d["v"].shape == (5, H, cfg.w, dh)
        assert d["scores"].shape == d["weights"].shape == (5, H, cfg.w, cfg.w)
        assert torch.allclose(d["weights"].sum(-1), torch.ones(5, H, cfg.w))
    assert exp.model.qk_circuits().shape == exp.model.ov_circuits().shape == (cfg.model.n_layers, H,
                                                                               cfg.model.d_model, cfg.model.d_model)


def test_failed_runs_are_refused_for_the_gate_but_load_by_epoch(runs):
    d = exp_dir(runs, "failed")
    eid = runs["failed"]["experiment_id"]
    with pytest.raises(raywalk.LoadError, match=rf"experiment {eid} did not pass the sufficiency gate.*SVD"):
        raywalk.load(d)
    last = runs["failed"]["epochs_trained"]
    assert last == runs["failed"]["config"]["train"]["max_epochs"] >= 3
    latest = raywalk.load(d, checkpoint="latest")
    assert latest.epoch == last
    prev = raywalk.load(d, checkpoint=last - 1)
    assert prev.epoch == last - 1
    assert weights_equal(prev.model, ckpt.read(Store.open(str(d / "checkpoints" / ckpt.dir_name(last - 1))))["model"])
    assert not weights_equal(prev.model, latest.model.state_dict())
    kept = ", ".join(str(e) for e in range(last - 2, last + 1))   # num_to_keep=3, no gate checkpoint
    with pytest.raises(raywalk.LoadError, match=rf"no checkpoint .*epoch_0099 \(epochs on disk: {kept};"):
        raywalk.load(d, checkpoint=99)
    for bad in ("best", True, 2.0):
        with pytest.raises(raywalk.LoadError, match="checkpoint: .* must be 'gate', 'latest' or an epoch"):
            raywalk.load(d, checkpoint=bad)


def test_missing_things_are_named(tmp_path):
    with pytest.raises(raywalk.LoadError, match=r"no experiment at .*nowhere.*result.json does not exist"):
        raywalk.load(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "result.json").write_text("{torn")
    with pytest.raises(raywalk.LoadError, match="result.json is not valid JSON"):
        raywalk.load(tmp_path / "junk")
    for uri in ("s3://", "s3:///result.json"):
        with pytest.raises(raywalk.LoadError, match="malformed: no bucket"):
            raywalk.load(uri)


def test_a_copied_root_finds_its_own_corpus(runs, tmp_path):
    copy = tmp_path / "elsewhere"
    shutil.copytree(runs["roots"]["passed"], copy)
    exp = raywalk.load(copy / runs["passed"]["experiment_id"])
    assert exp.corpus.uri.startswith(str(copy))
    assert weights_equal(exp.model, raywalk.load(exp_dir(runs, "passed")).model.state_dict())


def test_an_experiment_alone_falls_back_to_the_recorded_corpus(runs, tmp_path):
    eid = runs["passed"]["experiment_id"]
    alone = tmp_path / "alone" / eid
    shutil.copytree(exp_dir(runs, "passed"), alone)
    r = json.loads((alone / "result.json").read_text())
    cid = r["config"] and raywalk.load(exp_dir(runs, "passed")).config.corpus_id()
    corpus_uri = str(runs["roots"]["passed"] / "corpora" / cid)
    assert r.get("corpus", {}).get("uri") in (None, corpus_uri)   # where result.json records it, if it does
    r["corpus"] = {"id": cid, "uri": corpus_uri}
    (alone / "result.json").write_text(json.dumps(r))
    assert raywalk.load(alone).corpus.uri == corpus_uri

    r["corpus"]["uri"] = str(tmp_path / "gone")
    (alone / "result.json").write_text(json.dumps(r))
    with pytest.raises(raywalk.LoadError, match=rf"experiment {eid}: corpus {cid} not found: tried "
                                                rf".*alone/corpora/{cid} \(manifest.json is missing.*\); .*gone"):
        raywalk.load(alone)


def test_latest_skips_a_torn_checkpoint(runs, tmp_path):
    d = tmp_path / "root"
    shutil.copytree(runs["roots"]["failed"], d)
    last = runs["failed"]["epochs_trained"]
    name = ckpt.dir_name(last)
    state = d / runs["failed"]["experiment_id"] / "checkpoints" / name / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        exp = raywalk.load(d / runs["failed"]["experiment_id"], checkpoint="latest")
    assert exp.epoch == last - 1 and any(name in str(x.message) for x in w)
    with pytest.raises(raywalk.LoadError, match=f"{name} is unusable: .*truncated"):
        raywalk.load(d / runs["failed"]["experiment_id"], checkpoint=last)


def test_load_from_s3(runs, s3_server):
    import pyarrow.fs as pafs

    remote = Store.open(s3_server["uri"]("copied-root"))
    pafs.copy_files(str(runs["roots"]["passed"]), remote.root, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=remote.fs)
    eid = runs["passed"]["experiment_id"]
    exp = raywalk.load(remote.child_uri(eid, "result.json"))
    assert exp.corpus.uri.startswith("s3://") and exp.checkpoint_uri.endswith("scheme=http")
    assert weights_equal(exp.model, raywalk.load(exp_dir(runs, "passed")).model.state_dict())
    assert np.array_equal(exp.eval_walks(), raywalk.load(exp_dir(runs, "passed")).eval_walks())
    # export from s3 to s3: the same files as a local export of the same checkpoint
    out = Store.open(s3_server["uri"]("handoff"))
    exp.export(out.uri)
    check_manifest(out.read_bytes, eid, exp.epoch)
    assert torch.equal(torch.load(io.BytesIO(out.read_bytes("model.pt")), weights_only=True)["lm_head.weight"],
                       exp.model.head.weight)
    with pytest.raises(raywalk.export.ExportError, match="is not empty"):
        exp.export(out.uri)


def test_import_raywalk_stays_light():
    code = ("import sys, raywalk; assert 'torch' not in sys.modules and 'ray' not in sys.modules; "
            "raywalk.load; assert 'ray' not in sys.modules, 'load pulled in ray'; print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


# ---- raywalk export ------------------------------------------------------------------------

EXPORTED = {"model.pt", "model.json", "graph.npz", "jumpers.csv", "gate_starts.npy", "eval_walks.npy",
            "manifest.json"}


def check_manifest(read, eid, epoch):
    """The manifest's sha256s against the files; read(rel) -> bytes."""
    import hashlib

    m = json.loads(read("manifest.json"))
    assert set(m["files"]) | {"manifest.json"} == EXPORTED
    for rel, meta in m["files"].items():
        data = read(rel)
        assert len(data) == meta["size"] and hashlib.sha256(data).hexdigest() == meta["sha256"], rel
    assert m["experiment_id"] == eid and m["checkpoint"]["epoch"] == epoch
    return m


def test_export_hands_the_gate_model_to_the_reference(runs, tmp_path, capsys):
    from raywalk.cli import main
    from tests.helpers import reference_forward, to_reference

    d, r = exp_dir(runs, "passed"), runs["passed"]
    g, out = r["gate"]["epoch"], tmp_path / "handoff"
    assert main(["export", str(d), "--out", str(out)]) == 0
    assert f"epoch {g}" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == EXPORTED   # no temp names left
    m = check_manifest(lambda rel: (out / rel).read_bytes(), r["experiment_id"], g)
    fig = m["figures"]["at_checkpoint"]
    assert (fig["edge_compliance"], fig["rule_compliance"], fig["n_rule_checks"]) == (
        r["curves"]["edge_compliance"][g - 1], r["curves"]["rule_compliance"][g - 1],
        r["gate_history"]["n_rule_checks"][g - 1])
    assert m["figures"]["gate"]["passed"] and m["format"] == "reference"

    exp = raywalk.load(d)
    cfg = exp.config
    kw = json.loads((out / "model.json").read_text())
    assert kw == {"vocab_size": cfg.graph.n, "d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers,
                  "n_heads": cfg.model.n_heads, "max_seq_len": cfg.w, "dropout": cfg.model.dropout}
    sd = torch.load(out / "model.pt", weights_only=True)
    want = to_reference(exp.model.state_dict())   # the reference's names (helpers.REF_KEYS)
    masks = {f"blocks.{i}.attention.causal_mask" for i in range(cfg.model.n_layers)}
    assert set(sd) == set(want) | masks
    assert all(torch.equal(sd[k], want[k]) for k in want)
    assert all(torch.equal(sd[k], torch.tril(torch.ones(cfg.w, cfg.w, dtype=torch.bool))) for k in masks)
    idx = torch.as_tensor(exp.eval_walks()[:6, :cfg.w])
    with torch.no_grad():
        assert torch.equal(reference_forward(sd, kw["n_layers"], kw["n_heads"], idx)[0],
                           exp.model(idx, internals=[])[0])   # bit for bit

    z = np.load(out / "graph.npz")
    assert np.array_equal(z["indptr"], exp.graph.indptr) and np.array_equal(z["indices"], exp.graph.indices)
    assert np.array_equal(z["block_of"], exp.graph.block_of())
    import csv
    with open(out / "jumpers.csv") as f:
        rows = [{k: int(v) for k, v in row.items()} for row in csv.DictReader(f)]
    assert rows == exp.jumpers.to_records() and list(rows[0]) == ["vertex", "block", "target_block", "r"]
    assert np.array_equal(np.load(out / "gate_starts.npy"), exp.gate_starts())
    assert np.array_equal(np.load(out / "eval_walks.npy"), exp.eval_walks())

    # a second export into the same directory is refused, nothing touched; --overwrite replaces it
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["export", str(d), "--out", str(out), "--checkpoint", "latest"]) == 2
    assert "is not empty" in capsys.readouterr().err and {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["export", str(d), "--out", str(out), "--checkpoint", str(g), "--format", "raywalk",
                 "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["format"] == "raywalk"
    assert {p.name for p in tmp_path.iterdir()} == {"handoff"}   # no .tmp- or .old- left beside it
    from raywalk.science.model import GPT
    own = GPT(**json.loads((out / "model.json").read_text()))
    own.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert weights_equal(own, exp.model.state_dict())


def test_export_refuses_a_failed_run_for_the_gate(runs, tmp_path, capsys):
    from raywalk.cli import main

    d, out = exp_dir(runs, "failed"), tmp_path / "x"
    assert main(["export", str(d), "--out", str(out)]) == 2
    assert "did not pass the sufficiency gate" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(d), "--out", str(out), "--checkpoint", "best"]) == 2
    assert "--checkpoint 'best' is invalid" in capsys.readouterr().err and not out.exists()
    last = runs["failed"]["epochs_trained"]
    m = raywalk.load(d, checkpoint="latest").export(out)
    assert m["checkpoint"] == {**m["checkpoint"], "requested": "latest", "epoch": last}
    assert m["figures"]["gate"]["passed"] is False


def test_plot_of_a_real_run_has_whole_epochs_and_the_jump_lengths(runs, tmp_path):
    from raywalk.cli import main
    from raywalk.plot import run_figure

    r = runs["passed"]
    png = tmp_path / "c.png"
    assert main(["plot", str(exp_dir(runs, "passed") / "result.json"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = run_figure(r)
    loss, comp, per_r = fig.axes[:3]
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in comp.get_xticks())
    rows = r["gate"]["by_jump_length"]
    assert rows and len(per_r.patches) == len(rows)   # one bar per r
    labels = [t.get_text() for t in per_r.get_xticklabels()]
    assert labels == [f"r={x['r']}\n{x['r_over_w']:.2g}w\nn={x['rule_checks']}" for x in rows]
    hatched = [bool(b.get_hatch()) for b in per_r.patches[:len(rows)]]
    assert hatched == [x["beyond_window"] for x in rows]
    assert r["gate"]["rule_threshold"] in [ln.get_ydata()[0] for ln in per_r.get_lines()]
