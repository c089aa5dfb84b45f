"""Epochs to the gate and seconds per epoch, over seeds: how the data order changes learning and cost.

    python benchmarks/shuffle.py [--config configs/quickstart.yaml] [--seeds 42 43 44]

Trains the config to the gate once per seed (a fresh storage root each) and prints, per
seed, the epoch the gate passed and the mean training and data-start seconds per epoch
(the workers' own metrics), then the means. Run it on two versions of raywalk to compare
their data orders side by side.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raywalk.config import Config  # noqa: E402
from raywalk.service.driver import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    args = ap.parse_args()
    import ray.train

    rows = []
    for seed in args.seeds:
        tmp = Path(tempfile.mkdtemp(prefix="raywalk-bench-shuffle-"))
        out = tmp / "metrics.jsonl"

        class Capture(ray.train.UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                with open(out, "a") as f:
                    f.write(json.dumps(metrics[0]) + "\n")

        cfg = Config.load(args.config, [f"seed={seed}", f"run.storage={tmp}"])
        t = time.perf_counter()
        r = train(cfg, progress=False, callbacks=[Capture()], log=lambda s: None)
        wall = time.perf_counter() - t
        m = [json.loads(x) for x in out.read_text().splitlines() if "train_seconds" in x]
        train_s = sum(x["train_seconds"] for x in m) / len(m)
        first_s = sum(x["first_batch_seconds"] for x in m) / len(m)
        rows.append((seed, r["gate"]["epoch"], r["epochs_trained"], train_s, first_s, wall))
        print(f"seed {seed}: gate {'passed at epoch ' + str(r['gate']['epoch']) if r['gate']['passed'] else 'FAILED'}"
              f" ({r['epochs_trained']} epochs); {train_s:.2f}s training per epoch, of which {first_s:.2f}s until "
              f"the first batch; whole run {wall:.0f}s", flush=True)
    passed = [x[1] for x in rows if x[1] is not None]
    print(f"mean: epochs to gate {sum(passed) / max(1, len(passed)):.2f} ({len(passed)}/{len(rows)} passed), "
          f"{sum(x[3] for x in rows) / len(rows):.2f}s per epoch, {sum(x[4] for x in rows) / len(rows):.2f}s of it "
          f"to the first batch")


if __name__ == "__main__":
    main()
