"""Preemption cost: time from a worker SIGKILL to the first training step after resume.

    python benchmarks/resume.py [--config configs/quickstart.yaml] [--epoch 2] [--step 150]

Runs the config for (epoch) epochs with a fault injected: worker rank 0 SIGKILLs
itself at (epoch, step). Ray restarts the worker group, which resumes from the
checkpoint of epoch-1. Prints the kill-to-first-step time and the work lost (the
steps of the interrupted epoch, redone from its start).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raywalk.config import Config  # noqa: E402
from raywalk.faults import WorkerKill  # noqa: E402
from raywalk.trainer import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"))
    ap.add_argument("--epoch", type=int, default=2)
    ap.add_argument("--step", type=int, default=150)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="raywalk-bench-resume-"))
    cfg = Config.load(args.config, [f"run.storage={tmp}", f"train.max_epochs={args.epoch}", "gate.rule=1.0"])
    marker = tmp / "killed"
    t0 = time.time()
    r = train(cfg, progress=False, hooks=WorkerKill(rank=0, epoch=args.epoch, step=args.step, marker=str(marker)))
    wall = time.time() - t0
    killed_at = float(marker.read_text().split()[1])
    resumed = (tmp / "killed.resumed").read_text().split()
    gap = float(resumed[0]) - killed_at
    steps = r["steps_per_epoch"]
    print(f"config {Path(args.config).name}: {steps} steps/epoch, killed at epoch {args.epoch} step {args.step}")
    print(f"kill -> first step after resume: {gap:.1f}s (resumed at epoch {resumed[1]}, step {resumed[2]})")
    print(f"work lost: {args.step} steps of epoch {args.epoch} redone ({args.step / steps:.0%} of an epoch)")
    print(f"restarts recorded: {r['restarts']}; whole run {wall:.0f}s")


if __name__ == "__main__":
    main()
