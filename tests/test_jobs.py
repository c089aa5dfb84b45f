"""`ray job submit` for real: a `ray start --head` cluster on 127.0.0.1, the quickstart (shrunk) through the Jobs API.

The cluster is conftest's shared `head` (tests/clusters.py's `--block` in its own session, stopped by PID).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.clusters import cli_env
from tests.conftest import ROOT, tiny_overrides
from tests.helpers import submit_cmd



def test_quickstart_through_ray_job_submit(head, tmp_path):
    cluster = head
    storage = tmp_path / "store"      # the cluster is this machine: a local path is shared storage here
    sets = [s for s in tiny_overrides("unused") if not s.startswith("run.storage=")]
    sets += ["train.max_epochs=2", "gate.sequences=50", "run.cpus_per_worker=0.5"]
    args = [a for s in sets for a in ("--set", s)]
    t0 = time.monotonic()
    p = subprocess.run(submit_cmd(cluster.address, str(storage), *args), cwd=ROOT, env=cli_env(),
                       capture_output=True, text=True, timeout=420)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "succeeded" in out.lower(), out[-3000:]
    job_id = next(line.split("'")[1] for line in out.splitlines() if "submitted successfully" in line)

    # Status and logs through the CLI as a user would (an in-process client reads RAY_AUTH_MODE once, at
    # ray's import, so it cannot be switched to token auth inside a test process that already imported ray).
    def job(*a: str) -> str:
        q = subprocess.run(["ray", "job", *a, "--address", cluster.address, job_id], cwd=ROOT, env=cli_env(),
                           capture_output=True, text=True, timeout=120)
        assert q.returncode == 0, q.stdout + q.stderr
        return q.stdout + q.stderr

    assert "succeeded" in job("status").lower()
    logs = job("logs")
    # The job's own logs carry the per-epoch summary lines, nothing needed from the head's files.
    epochs = [line for line in logs.splitlines() if line.startswith("epoch ") and " loss " in line]
    assert len(epochs) >= 1 and epochs[0].startswith("epoch 1/2"), logs[-3000:]
    assert "result: " in logs
    # Ray Train's PreemptionWatcher (on here, as on any cluster) makes its core worker log an error
    # line about its constructor arguments; raywalk keeps it off the console (ray_env._NOISE)
    assert "PreemptionWatcher" not in out + logs and "Traceback" not in out + logs, (out + logs)[-3000:]

    [exp] = [d for d in storage.iterdir() if d.name != "corpora"]
    r = json.loads((exp / "result.json").read_text())
    assert r["status"] in ("passed", "failed") and r["epochs_trained"] == len(epochs)
    assert len(r["curves"]["edge_compliance"]) == r["epochs_trained"]
    assert r["environment"]["ray"] == "2.60.0"

    sys.stderr.write(f"ray job submit -> SUCCEEDED in {time.monotonic() - t0:.1f}s\n")


def test_the_working_dir_upload_excludes_outputs_and_caches(tmp_path):
    """The package Ray would upload for `--working-dir . --runtime-env runtime_env.yaml` skips them."""
    import yaml
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    excludes = yaml.safe_load((ROOT / "runtime_env.yaml").read_text())["excludes"]
    made_dir = not (ROOT / "results").exists()
    decoy = ROOT / "results" / ".raywalk-upload-probe"
    decoy.parent.mkdir(exist_ok=True)
    decoy.write_text("x")
    try:
        seen: list[Path] = []
        # include_gitignore=False: runtime_env.yaml's excludes alone must keep them out.
        _dir_travel(ROOT, [_get_excludes(ROOT, excludes)], lambda p: seen.append(p.relative_to(ROOT)),
                    include_gitignore=False)
    finally:
        decoy.unlink()
        if made_dir:
            decoy.parent.rmdir()
    top = {p.parts[0] for p in seen if p.parts}
    assert "results" not in top and "corpora" not in top and ".hypothesis" not in top
    assert not any("__pycache__" in p.parts for p in seen)
    assert "raywalk" in top and "configs" in top
