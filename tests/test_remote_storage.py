"""Remote storage for real: a moto S3 server on 127.0.0.1, a run that writes there, is killed, resumes.

Credentials come only from the environment (the fake ones moto accepts); the
bucket endpoint rides in the storage URI's query string, which every child URI
raywalk hands on (corpus, checkpoints, result.json) must keep at its end.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from raywalk.records.storage import Store
from raywalk.records.uris import join_uri, split_query
from tests.conftest import BUCKET, CREDS, QUICKSTART, kill_session, tiny_overrides


@pytest.fixture(scope="module")
def s3(s3_server):
    """A real S3-compatible server (moto, threaded, in this process) and a bucket in it."""
    return s3_server


def keys(client, prefix: str) -> list[str]:
    out, token = [], None
    while True:
        kw = {"Bucket": BUCKET, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = client.list_objects_v2(**kw)
        out += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return out
        token = page["NextContinuationToken"]


# ---- URIs ---------------------------------------------------------------------------

def test_child_uris_keep_the_query_at_the_end():
    u = "s3://b/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert split_query(u) == ("s3://b/runs", "endpoint_override=127.0.0.1:9000&scheme=http")
    assert join_uri(u, "exp", "/result.json") == \
        "s3://b/runs/exp/result.json?endpoint_override=127.0.0.1:9000&scheme=http"
    assert join_uri("s3://b/runs/", "x") == "s3://b/runs/x"
    # A local path is a path: a '?' in it is part of a name, never a query.
    assert split_query("/tmp/a?b") == ("/tmp/a?b", "")


def test_local_paths_still_open(tmp_path):
    st = Store.open(str(tmp_path / "root"))
    assert st.local and st.uri == str(tmp_path / "root")
    st.sub("a").write_json("x.json", {"k": 1})
    assert Store.open(st.child_uri("a")).read_json("x.json") == {"k": 1}
    assert Store.open("file://" + str(tmp_path / "root")).read_json("a/x.json") == {"k": 1}


def test_store_round_trip_on_s3(s3):
    st = Store.open(s3["uri"]("unit/"))
    assert not st.local and st.root == f"{BUCKET}/unit"
    exp = st.sub("exp1")
    assert exp.uri.endswith(f"/unit/exp1?endpoint_override=127.0.0.1:{s3['port']}&scheme=http")
    exp.write_json("result.json", {"status": "running"})
    exp.write_bytes("attempts/t/1", b"")
    assert Store.open(exp.uri).read_json("result.json") == {"status": "running"}
    assert st.listdir("exp1") == ["attempts", "result.json"] and exp.is_file("result.json")
    st.move("exp1", "exp1.old")
    assert not st.exists("exp1") and st.sub("exp1.old").read_json("result.json") == {"status": "running"}
    assert "unit/exp1.old/result.json" in keys(s3["client"], "unit/")


# ---- a real run on S3: written there, killed, resumed from there ---------------------

def _cmd(storage: str) -> list[str]:
    sets = [s for s in tiny_overrides("unused") if not s.startswith("run.storage=")]
    # gate.edge=1.0 can never pass (edge > 1.0), so the run goes on to max_epochs and can be killed mid-way.
    sets += ["train.max_epochs=4", "gate.edge=1.0"]
    return [sys.executable, "-c", "import sys; from raywalk.cli import main; sys.exit(main())", "train", str(QUICKSTART), "--storage", storage, "--no-progress",
            *[a for s in sets for a in ("--set", s)]]


def _env(ray) -> dict[str, str]:
    """The CLI drivers join the session's local Ray (its workers hold the same fake credentials, conftest)."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    env.update(CREDS)
    env["RAYWALK_LEASE_STALE_AFTER_S"] = "3"   # the killed driver's lease goes stale 3 s after the kill
    return env


def test_run_on_s3_is_killed_and_resumes_from_the_bucket(s3, tmp_path, local_ray):
    storage = s3["uri"]("runs")
    client = s3["client"]
    cwd = tmp_path / "cwd"      # nothing may land on local disk: a cwd the run could write into, checked below
    cwd.mkdir()
    log1 = open(tmp_path / "first.log", "w+")
    p = subprocess.Popen(_cmd(storage), cwd=cwd, env=_env(local_ray), stdout=log1, stderr=subprocess.STDOUT,
                         start_new_session=True)
    ckpt_key = None
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and p.poll() is None:
            ks = [k for k in keys(client, "runs/") if k.endswith("/checkpoints/epoch_0001/manifest.json")]
            # result.json is rewritten right after the checkpoint upload: wait for both, then kill
            if ks and f"{ks[0].split('/checkpoints/')[0]}/result.json" in keys(client, "runs/"):
                ckpt_key = ks[0]
                break
            time.sleep(0.2)
    finally:
        kill_session(p.pid)     # SIGKILL the driver, by PID (its Ray Train actors go with its job)
        p.wait()
    log1.seek(0)
    first = log1.read()
    assert ckpt_key is not None, f"no checkpoint appeared in the bucket:\n{first[-3000:]}"
    exp_prefix = ckpt_key.split("/checkpoints/")[0]                       # runs/<experiment_id>
    assert any(k.startswith("runs/corpora/") and k.endswith("manifest.json") for k in keys(client, "runs/corpora/"))
    partial = json.loads(client.get_object(Bucket=BUCKET, Key=f"{exp_prefix}/result.json")["Body"].read())
    assert partial["status"] == "running" and partial["epochs_trained"] < 4, first[-2000:]

    time.sleep(3.5)
    second = subprocess.run(_cmd(storage), cwd=cwd, env=_env(local_ray), capture_output=True, text=True, timeout=240,
                            start_new_session=True)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "corpus reused" in out, out[-3000:]
    assert "taking over experiment" in out, out[-3000:]       # the killed driver's stale lease in the bucket
    assert f"{exp_prefix}/lease.json" not in keys(client, exp_prefix)   # released at the end
    assert "resuming from s3://" in out, out[-3000:]
    assert "resuming" in out
    r = json.loads(client.get_object(Bucket=BUCKET, Key=f"{exp_prefix}/result.json")["Body"].read())
    assert r["status"] == "failed" and r["epochs_trained"] == 4
    assert len(r["curves"]["edge_compliance"]) == 4 and len(r["curves"]["rule_compliance"]) == 4
    assert len(r["curves"]["train_loss"]) == 4 * r["steps_per_epoch"]
    # Epoch lines continue where the kill left off: the second run never trains epoch 1 again.
    assert "epoch 1/4 " not in second.stderr and "epoch 4/4" in out
    assert r["checkpoints"]["latest"].startswith(f"s3://{BUCKET}/{exp_prefix}/checkpoints/epoch_0004")
    assert r["checkpoints"]["latest"].endswith(f"?endpoint_override=127.0.0.1:{s3['port']}&scheme=http")
    kept = [k for k in keys(client, f"{exp_prefix}/checkpoints/") if k.endswith("/manifest.json")]
    assert len(kept) >= 3
    assert list(cwd.iterdir()) == [], "the run wrote to local disk instead of the bucket"
