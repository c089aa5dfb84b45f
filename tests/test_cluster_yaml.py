"""cluster.yaml against the autoscaler schema shipped in the installed ray, plus raywalk's own rules.

Ray's schema checks structure but not `node_config` (a misspelt MarketType
passes it), so the spot/on-demand, storage and version rules are checked here.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray
from raywalk.records.uris import is_remote
from raywalk.service.tune import DRIVER_RESOURCE

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def pyproject_deps() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def workers(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def setup_of(cfg: dict, node_type: str) -> list[str]:
    """The setup commands a node of this type runs (a node type's worker_setup_commands replace the global ones)."""
    nt = cfg["available_node_types"][node_type]
    if node_type == cfg["head_node_type"]:
        return cfg.get("setup_commands", []) + cfg.get("head_setup_commands", [])
    if "worker_setup_commands" in nt:
        return nt["worker_setup_commands"]
    return cfg.get("setup_commands", []) + cfg.get("worker_setup_commands", [])


def raywalk_problems(cfg: dict) -> list[str]:
    """raywalk's rules for cluster.yaml; empty when it follows them."""
    out = []
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    if "InstanceMarketOptions" in head["node_config"]:
        out.append("head node must be on-demand (no InstanceMarketOptions)")
    if head.get("resources", {}).get("CPU") != 0:
        out.append("head node must advertise CPU: 0 (no training on it)")
    if not any("--num-cpus=0" in c for c in cfg.get("head_start_ray_commands", [])):
        out.append("head_start_ray_commands must pass --num-cpus=0")
    if head.get("resources", {}).get(DRIVER_RESOURCE, 0) < 1:
        out.append(f"head node must declare {DRIVER_RESOURCE} (slots for sweep trial drivers, safe from spot reclaims)")
    for name, nt in workers(cfg).items():
        if nt.get("resources", {}).get(DRIVER_RESOURCE):
            out.append(f"{name}: only the head may declare {DRIVER_RESOURCE} (workers are spot)")
    for name, nt in workers(cfg).items():
        market = nt["node_config"].get("InstanceMarketOptions", {})
        if market.get("MarketType") != "spot":
            out.append(f"{name}: worker must be spot (InstanceMarketOptions.MarketType: spot), got {market}")
        if nt.get("min_workers", 0) != 0:
            out.append(f"{name}: min_workers must be 0")
        if nt.get("max_workers", 0) < 1:
            out.append(f"{name}: max_workers must be >= 1")
    gpu = [n for n, t in workers(cfg).items() if t["resources"].get("GPU", 0) > 0]
    cpu = [n for n, t in workers(cfg).items() if t["resources"].get("GPU", 0) == 0 and t["resources"].get("CPU", 0) > 0]
    zones = cfg["provider"].get("availability_zone", "").split(",")
    if not gpu or not cpu:
        out.append(f"need GPU and CPU worker types, got gpu={gpu} cpu={cpu}")
    if len({types[n]["node_config"]["InstanceType"] for n in gpu}) < 2 and len(zones) < 2:
        out.append("no spot fallback: give several GPU instance types or several zones")
    if not cfg.get("idle_timeout_minutes"):
        out.append("idle_timeout_minutes must be set")
    storage = cfg.get("metadata", {}).get("raywalk", {}).get("storage", "")
    if not (is_remote(storage) and re.match(r"^(s3|gs|abfss?)://[^/?]+", storage)):
        out.append(f"metadata.raywalk.records.storage must be a remote URI (s3://bucket/prefix), got {storage!r}")
    for name in types:
        cmds = " ".join(setup_of(cfg, name))
        tokens = shlex.split(cmds)
        for dep in pyproject_deps():
            if dep not in tokens:
                out.append(f"{name}: setup does not install {dep!r} as pinned in pyproject.toml")
        if not re.search(r"pip install[^;&]*(-e )?~/raywalk", cmds):
            out.append(f"{name}: setup does not install raywalk itself")
        for pkg, ver in re.findall(r"(torch|ray)(?:\[[^\]]*\])?==([\w.+]+)", cmds):
            want = next(d for d in pyproject_deps() if re.match(rf"^{pkg}(\[|==)", d)).split("==")[1]
            if ver != want:
                out.append(f"{name}: installs {pkg}=={ver}, pyproject pins {want}")
    start = " ".join(cfg.get("head_start_ray_commands", []) + cfg.get("worker_start_ray_commands", []))
    if "0.0.0.0" in start or "--dashboard-host=127.0.0.1" not in start:
        out.append("the dashboard must listen on 127.0.0.1 only (reach it with `ray dashboard`)")
    return out


def test_validates_against_the_autoscaler_schema_shipped_with_ray(cluster):
    jsonschema.validate(cluster, json.loads(SCHEMA.read_text()))


def test_ray_accepts_it_after_filling_defaults(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_follows_raywalks_rules(cluster):
    assert raywalk_problems(cluster) == []


def test_a_cold_cluster_sweeps_at_the_width_it_can_grow_to(cluster):
    """`raywalk tune` sizes trial concurrency from the autoscaler's node types, not the cold cluster's 0 CPUs."""
    from raywalk.service.sweep import load_sweep
    from raywalk.service.tune import capacity_from_autoscaling_config, concurrency

    cap = capacity_from_autoscaling_config(cluster)
    types = workers(cluster)
    most_cpus = max(t["resources"].get("CPU", 0) for t in types.values())
    assert cap["CPU"] == most_cpus * cluster["max_workers"]     # the global max_workers caps all types together
    assert 0 < cap["GPU"] <= sum(t["max_workers"] * t["resources"].get("GPU", 0) for t in types.values())
    sweep = load_sweep(str(ROOT / "configs" / "sweep_graph_sizes.yaml"))
    k = concurrency(cap, sweep.points, on_head=True, driver_slots=cap[DRIVER_RESOURCE])
    assert k >= len(sweep.points) > 1          # every point at once; a cold cluster's own CPUs (0) give 1
    gpu_points = [dataclasses.replace(p, cfg=p.cfg.replace(**{"run.gpus_per_worker": 1.0})) for p in sweep.points]
    assert concurrency(cap, gpu_points, on_head=True, driver_slots=cap[DRIVER_RESOURCE]) == int(cap["GPU"])


def test_the_rules_catch_what_the_schema_lets_through(cluster):
    bad = copy.deepcopy(cluster)
    w = next(iter(workers(bad)))
    bad["available_node_types"][w]["node_config"]["InstanceMarketOptions"] = {"MarketTyp": "spot"}   # misspelt
    bad["available_node_types"][bad["head_node_type"]]["node_config"]["InstanceMarketOptions"] = {"MarketType": "spot"}
    bad["metadata"]["raywalk"]["storage"] = "results"
    del bad["available_node_types"][bad["head_node_type"]]["resources"][DRIVER_RESOURCE]
    bad["setup_commands"] = [c.replace("torch==2.13.0", "torch") for c in bad["setup_commands"]]
    jsonschema.validate(bad, json.loads(SCHEMA.read_text()))          # the schema is happy...
    problems = " | ".join(raywalk_problems(bad))                       # ...raywalk is not
    for needle in (f"{w}: worker must be spot", "head node must be on-demand", "remote URI", "'torch==2.13.0'",
                   f"head node must declare {DRIVER_RESOURCE}"):
        assert needle in problems


def test_nothing_secret_and_nothing_public(cluster):
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert not re.search(r"(?i)(secret|password|token)\s*[:=]\s*\S", text)
    assert not re.search(r"(?i)aws_(access_key_id|secret_access_key)\s*[:=]", text)
    code = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    assert "0.0.0.0" not in code
    for change in ("region", "bucket", "key"):
        assert re.search(rf"(?i)CHANGE.*{change}|{change}.*CHANGE", text), f"no comment on changing the {change}"


def test_job_uploads_exclude_results_corpora_and_caches():
    env = yaml.safe_load((ROOT / "runtime_env.yaml").read_text())
    for ex in ("results", "corpora", ".hypothesis"):
        assert ex in env["excludes"]
    assert any("__pycache__" in e for e in env["excludes"])
    ignored = (ROOT / ".gitignore").read_text().split()
    for ex in ("results/", "corpora/", ".hypothesis/", "__pycache__/"):
        assert ex in ignored


# GPU model of each EC2 GPU family raywalk's cluster may use (AWS's published specs).
GPU_OF_FAMILY = {"g4dn": "T4", "g5": "A10G", "g6": "L4", "p3": "V100", "p4d": "A100", "p5": "H100"}


def gpu_models(cfg: dict) -> dict[str, str]:
    """Node type -> the GPU model its instance type carries (GPU node types only)."""
    out = {}
    for name, t in workers(cfg).items():
        if t.get("resources", {}).get("GPU", 0) > 0:
            family = t["node_config"]["InstanceType"].split(".")[0]
            out[name] = GPU_OF_FAMILY[family]
    return out


def test_gpu_fallbacks_keep_one_gpu_model(cluster):
    models = gpu_models(cluster)
    assert models and len(set(models.values())) == 1, models   # a replacement worker runs the same kernels
    for name, model in models.items():   # and says so, for run.accelerator_type
        declared = [k for k in cluster["available_node_types"][name]["resources"] if k.startswith("accelerator_type:")]
        assert declared == [f"accelerator_type:{model}"], (name, declared)
    mixed = copy.deepcopy(cluster)
    mixed["available_node_types"]["t4"] = {**copy.deepcopy(next(iter(workers(cluster).values()))),
                                           "node_config": {"InstanceType": "g4dn.xlarge"}}
    mixed["available_node_types"]["t4"]["resources"] = {"CPU": 4, "GPU": 1}
    assert len(set(gpu_models(mixed).values())) == 2


def test_gpu_nodes_start_cuda_mps_before_ray(cluster):
    """Fractional-GPU trials share a GPU's SMs only under MPS; the daemon must run before any CUDA client."""
    for name, t in cluster["available_node_types"].items():
        if t["resources"].get("GPU", 0) > 0:
            cmds = t["worker_setup_commands"]
            assert any("nvidia-cuda-mps-control -d" in c for c in cmds), name
