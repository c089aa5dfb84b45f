"""Wall time of the tiny sweep (configs/sweep_tiny.yaml) with --max-concurrent 1 and 2, and of the
same points run one by one with `raywalk train`: the sweep's overhead.

    python benchmarks/sweep.py [--sweep configs/sweep_tiny.yaml] [--out /tmp/raywalk-bench-sweep]

Each variant starts from an empty storage root (corpus, training and gate all included) and runs
as a fresh CLI process, as a user would. On a shared 2-core machine the figures are noisy.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raywalk.service.sweep import load_sweep  # noqa: E402


def timed(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    dt = time.perf_counter() - t0
    if p.returncode not in (0,):
        print(f"  (exit {p.returncode}; see {log})")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", default=str(ROOT / "configs" / "sweep_tiny.yaml"))
    ap.add_argument("--out", default="/tmp/raywalk-bench-sweep")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    sweep = load_sweep(args.sweep)
    figs: dict[str, float] = {}
    for k in (1, 2):
        st = out / f"tune_k{k}"
        figs[f"tune_max_concurrent_{k}_s"] = timed(
            ["raywalk", "tune", args.sweep, "--storage", str(st), "--max-concurrent", str(k)], out / f"tune_k{k}.log")
        print(f"raywalk tune --max-concurrent {k}: {figs[f'tune_max_concurrent_{k}_s']:.1f} s", flush=True)
        s = json.loads((st / "sweeps" / sweep.sweep_id / "summary.json").read_text())
        print("   per-trial wall (s):", [round(r["wall_time_s"] or 0, 1) for r in s["rows"]],
              " statuses:", [r["status"] for r in s["rows"]], flush=True)
    st = out / "one_by_one"
    total = 0.0
    for p in sweep.points:
        cfg_file = out / f"point{p.index}.yaml"
        cfg_file.write_text(yaml.safe_dump(p.cfg.to_dict()))
        dt = timed(["raywalk", "train", str(cfg_file), "--storage", str(st), "--no-progress"],
                   out / f"train_point{p.index}.log")
        print(f"raywalk train point {p.index}: {dt:.1f} s", flush=True)
        total += dt
    figs["train_one_by_one_s"] = total
    print(f"one by one total: {total:.1f} s")
    for k in (1, 2):
        t = figs[f"tune_max_concurrent_{k}_s"]
        print(f"sweep overhead, max-concurrent {k}: {t - total:+.1f} s ({t / total:.2f}x)")
    (out / "figures.json").write_text(json.dumps(figs, indent=1))


if __name__ == "__main__":
    main()
