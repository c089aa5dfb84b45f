"""Config: the documented keys, strict types, every rule enforced with the field named."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raywalk.config import Config, ConfigError
from tests.conftest import QUICKSTART, ROOT


def test_anchor_yaml_is_the_studys_anchor():
    c = Config.load(ROOT / "configs" / "anchor.yaml")
    assert (c.graph.n, c.graph.K, c.graph.p_in, c.graph.p_out, c.graph.n_jumpers_per_block) == (500, 4, 0.25, 0.03, 2)
    assert (c.w, c.corpus.walk_length, c.corpus.corpus_size) == (64, 256, 200_000)
    assert (c.model.d_model, c.model.n_layers, c.model.n_heads, c.seed) == (128, 4, 1, 42)
    assert (c.train.batch_size, c.train.lr, c.train.max_epochs) == (64, 3e-4, 50)
    assert c.graph.r_scales == (0.5, 0.7, 0.9, 1.0, 1.1, 1.3, 1.5, 2.0)


def test_quickstart_is_valid_and_small():
    c = Config.load(QUICKSTART)
    assert max(c.graph.r_scales) <= 1.0          # every rule learnable inside the window
    assert c.graph.n <= 128 and c.corpus.corpus_size <= 20_000


@pytest.mark.parametrize("override, field", [
    ("graph.n=501", "graph.n"),                       # not divisible by K
    ("corpus.walk_length=100", "corpus.walk_length"),  # < 2w
    ("corpus.corpus_size=100", "corpus.corpus_size"),  # < 100 n
    ("model.n_heads=3", "model.n_heads"),
    ("model.d_model=130", "model.d_model"),            # not divisible by 4 heads
    ("graph.p_in=1.5", "graph.p_in"),
    ("graph.p_out=-0.1", "graph.p_out"),
    ("graph.r_scales=[0.5, -1]", "graph.r_scales"),
    ("graph.r_scales=[]", "graph.r_scales"),
    ("train.max_epochs=51", "train.max_epochs"),
    ("train.lr=0", "train.lr"),
    ("train.precision=fp16", "train.precision"),
    ("gate.rule=2", "gate.rule"),
    ("run.workers=3", "train.batch_size"),             # 64 not divisible by 3
    ("graph.bogus=1", "graph.bogus"),                  # unknown key
    ("graph.n=five", "graph.n"),                       # wrong type
    ("graph.n=true", "graph.n"),                       # bools are not ints
    ("seed=1.5", "seed"),
])
def test_invalid_values_name_the_field(override, field):
    extra = ["model.n_heads=4"] if field == "model.d_model" else []
    with pytest.raises(ConfigError) as e:
        Config.load(ROOT / "configs" / "anchor.yaml", [*extra, override])
    assert str(e.value).startswith(field), str(e.value)


def test_unknown_section_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="^trian: unknown key"):
        Config.from_dict({"trian": {}})
    with pytest.raises(ConfigError, match="does not exist"):
        Config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("graph: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.load(bad)


def test_a_retired_key_is_refused_from_a_user_but_read_from_an_older_runs_record():
    recorded = Config().to_dict()
    recorded["run"]["preemption_check_steps"] = 5   # as a result.json of an older raywalk holds it
    with pytest.raises(ConfigError, match="^run.preemption_check_steps: unknown key"):
        Config.from_dict(recorded)
    assert Config.from_recorded(recorded) == Config()
    with pytest.raises(ConfigError, match="^run.bogus: unknown key"):
        Config.from_recorded({**recorded, "run": {**recorded["run"], "bogus": 1}})


def test_overrides_and_roundtrip():
    c = Config.load(QUICKSTART, ["graph.n=128", "corpus.corpus_size=12800", "train.lr=1e-3"])
    assert c.graph.n == 128 and c.train.lr == 1e-3
    assert Config.from_dict(c.to_dict()) == c


def test_experiment_id_is_deterministic_and_content_addressed():
    a = Config.load(QUICKSTART)
    assert a.experiment_id() == Config.load(QUICKSTART).experiment_id()
    assert a.experiment_id().startswith("n64_w16_d64_L2_s42-")
    assert a.replace(**{"model.d_model": 32}).experiment_id() != a.experiment_id()
    # where results go and the failure budget do not change what is trained
    assert a.replace(**{"run.storage": "/elsewhere", "run.max_failures": 9}).experiment_id() == a.experiment_id()
    # the corpus is shared by models trained on the same data
    assert a.replace(**{"model.d_model": 32}).corpus_id() == a.corpus_id()
    assert a.replace(**{"graph.p_in": 0.4}).corpus_id() != a.corpus_id()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), K=st.integers(1, 8), w=st.integers(1, 40), L=st.integers(1, 200))
def test_validation_agrees_with_the_rules(n, K, w, L):
    d = {"w": w, "graph": {"n": n, "K": K, "n_jumpers_per_block": 1}, "corpus": {"walk_length": L,
         "corpus_size": 100 * max(n, 1)}}
    ok = 8 <= n and 2 <= K <= 64 and n % K == 0 and w >= 2 and L >= 2 * w
    if ok:
        Config.from_dict(d)
    else:
        with pytest.raises(ConfigError):
            Config.from_dict(d)


@pytest.mark.parametrize("overrides, field, rule", [
    (["run.gpus_per_worker=0.5", "run.workers=2"], "run.gpus_per_worker", "two ranks on one GPU"),
    (["run.gpus_per_worker=1.5"], "run.gpus_per_worker", "whole number"),
    (["run.accelerator_type=A10G"], "run.accelerator_type", "gpus_per_worker > 0"),
    (["run.deterministic=maybe"], "run.deterministic", "true or false"),
])
def test_gpu_settings_are_refused_with_the_field_named(overrides, field, rule):
    with pytest.raises(ConfigError, match=rf"^{field}: .* is invalid: .*{rule}"):
        Config.load(QUICKSTART, overrides)


def test_gpu_settings_that_are_fine():
    assert Config.load(QUICKSTART, ["run.gpus_per_worker=0.5"]).run.gpus_per_worker == 0.5   # one rank
    c = Config.load(QUICKSTART, ["run.gpus_per_worker=2", "run.workers=2", "run.accelerator_type=A10G"])
    assert c.run.deterministic is True and c.experiment_id() == Config.load(QUICKSTART, ["run.workers=2"]).experiment_id()


def test_a_local_storage_root_is_refused_on_a_multi_host_cluster(tmp_path):
    from raywalk.records.storage import Store
    from raywalk.service.driver import check_storage_reachable

    one_host = [{"NodeManagerAddress": "127.0.0.1", "Alive": True}] * 3          # several nodes, one machine
    two_hosts = one_host + [{"NodeManagerAddress": "10.0.0.7", "Alive": True}]
    check_storage_reachable(Store.open(str(tmp_path)), one_host)
    check_storage_reachable(Store.open(str(tmp_path)), one_host + [{"NodeManagerAddress": "10.0.0.7", "Alive": False}])
    with pytest.raises(ConfigError, match=r"^run\.storage: .* is invalid: .* 2 hosts .*s3://"):
        check_storage_reachable(Store.open(str(tmp_path)), two_hosts)
    check_storage_reachable(Store.open("s3://bucket/prefix?endpoint_override=127.0.0.1:1&scheme=http"), two_hosts)
