"""`ray job submit` against a direct `raywalk train`, side by side, on a local `ray start --head` cluster.

    python benchmarks/jobs.py                 # the quickstart as shipped (minutes per path)
    python benchmarks/jobs.py --tiny          # the test-sized config (seconds per epoch)

Measures, for each path, from the moment the command is launched:
  first step   arrival of the "epoch 1/N ... Ks" line minus the K seconds that epoch
               reports for itself (its clock starts just before the first training step);
               so it is the time to the first training step, to about a second.
  end to end   the command's wall time until it exits (job: `ray job submit` streams the
               logs and returns when the job has finished).
Each path builds its corpus from scratch (a fresh storage root). The cluster's own start-up
(`ray start --head`) is reported separately: a cluster is started once and serves many jobs.
The cluster gets as many CPUs as a direct run's embedded Ray (os.cpu_count()).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.clusters import LocalCluster, cli_env  # noqa: E402
from tests.conftest import kill_session, tiny_overrides  # noqa: E402
from tests.helpers import submit_cmd  # noqa: E402

EPOCH = re.compile(r"^epoch (\d+)/(\d+) .* (\d+)s\s*$")


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict:
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True, bufsize=1)
    first_step = None
    lines = []
    try:
        for line in p.stdout:
            now = time.monotonic() - t0
            lines.append(line)
            m = EPOCH.match(line.strip())
            if m and m.group(1) == "1" and first_step is None:
                first_step = now - int(m.group(3))
        rc = p.wait()
    finally:
        kill_session(p.pid)
    total = time.monotonic() - t0
    if rc != 0:
        sys.stderr.write("".join(lines[-60:]))
        raise SystemExit(f"{cmd[:4]} failed with {rc}")
    epochs = sum(1 for line in lines if EPOCH.match(line.strip()))
    return {"first_step_s": None if first_step is None else round(first_step, 1), "end_to_end_s": round(total, 1),
            "epochs": epochs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the test-sized config instead of the full quickstart")
    args = ap.parse_args()
    sets: list[str] = []
    if args.tiny:
        sets = [s for s in tiny_overrides("unused") if not s.startswith("run.storage=")]
        sets += ["train.max_epochs=2", "gate.sequences=50", "run.cpus_per_worker=0.5"]
    train_args = ["--no-progress", *[a for s in sets for a in ("--set", s)]]
    out: dict = {"config": "tiny" if args.tiny else "configs/quickstart.yaml",
                 "load_average_at_start": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="raywalk-bench-") as tmp:
        tmp = Path(tmp)
        t0 = time.monotonic()
        cluster = LocalCluster(tmp / "head", num_cpus=os.cpu_count() or 2)
        try:
            cluster.wait_ready(timeout=300)
            out["cluster_start_s"] = round(time.monotonic() - t0, 1)
            out["job"] = timed(submit_cmd(cluster.address, str(tmp / "job-store"), *train_args), ROOT, cli_env())
            print(f"cluster start-up {out['cluster_start_s']}s; job: {out['job']}", flush=True)
        finally:
            cluster.stop()
        direct = [sys.executable, "-c", "import sys; from raywalk.cli import main; sys.exit(main())",
                  "train", "configs/quickstart.yaml", "--storage", str(tmp / "direct-store"), *train_args]
        out["direct"] = timed(direct, ROOT, cli_env())
        print(f"direct: {out['direct']}", flush=True)
    out["load_average_at_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    j, d = out["job"], out["direct"]
    print(f"{'':14}{'ray job submit':>16}{'raywalk train':>16}")
    print(f"{'first step':14}{j['first_step_s']:>15}s{d['first_step_s']:>15}s")
    print(f"{'end to end':14}{j['end_to_end_s']:>15}s{d['end_to_end_s']:>15}s")
    print(f"(cluster start-up, once: {out['cluster_start_s']}s; epochs {j['epochs']} vs {d['epochs']})")


if __name__ == "__main__":
    main()
