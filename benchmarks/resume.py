"""Preemption cost on a local multi-node cluster: work redone with and without the reclaim notice,
the cost of polling for notices, and kill -> first step again.

    python benchmarks/resume.py [--anchor] [--step 100] [--kill-after 3]

A `ray.cluster_utils.Cluster` (0-CPU head, two 3-CPU worker nodes) runs the config for 2
epochs (epochs cut to --max-steps for --anchor). Side by side:
  * notice: at epoch 2 step --step the training worker's node is drained with reason
    PREEMPTION (what the autoscaler does on a spot reclaim notice); the worker saves a
    just-in-time checkpoint at its next poll; --kill-after seconds after that checkpoint
    is on disk the node is killed. Work redone = steps done at the kill - the checkpoint's step;
  * no notice: the node is killed --kill-after seconds after step --step. Work redone = steps
    done at the kill (the epoch restarts from its beginning);
  * polling: the same 2 epochs never polling, polling every step, and every 5 s (the default), no
    preemption: tokens/s side by side give the cost of one poll and the cost per step.
Each kill also gives kill -> first training step of the restarted worker group.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raywalk.records import checkpoints as ckpt  # noqa: E402
from raywalk.config import Config  # noqa: E402
from raywalk.service.driver import train  # noqa: E402
from tests.faults import Preempt, instrumented  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def staged_kill(c, nodes, marker: Path, run_dir: Path, notice: bool, kill_after: float, out: dict) -> threading.Thread:
    def run():
        while not marker.exists():
            time.sleep(0.05)
        t_ready = time.time()
        if notice:
            while not any((p / ckpt.MANIFEST).exists() for p in run_dir.glob("epoch_*_step_*")):
                time.sleep(0.05)
            t_ready = time.time()
        while time.time() - t_ready < kill_after:
            time.sleep(0.05)
        node_id = marker.read_text().split()[0]
        victim = next(n for n in nodes if n.node_id == node_id)
        out["progress"] = (Path(f"{marker}.progress").read_text().split())
        out["killed_at"] = time.time()
        c.remove_node(victim, allow_graceful=False)
        nodes.remove(victim)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--anchor", action="store_true", help="an anchor-shaped corpus (n=500, w=64, 50k walks)")
    ap.add_argument("--max-steps", type=int, default=400, help="steps per epoch with --anchor")
    ap.add_argument("--step", type=int, default=100, help="where in epoch 2 the reclaim happens")
    ap.add_argument("--kill-after", type=float, default=3.0, help="seconds from notice checkpoint (or step) to kill")
    args = ap.parse_args()

    from ray.cluster_utils import Cluster

    from raywalk.service.ray_env import quiet_defaults

    quiet_defaults()
    import ray

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [c.add_node(num_cpus=3) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level="WARNING")
    tmp = Path(tempfile.mkdtemp(prefix="raywalk-bench-resume-"))
    if args.anchor:
        base = Config.load(ROOT / "configs" / "anchor.yaml", ["corpus.corpus_size=50000", "gate.sequences=8"])
        max_steps = args.max_steps
    else:
        base = Config.load(ROOT / "configs" / "quickstart.yaml")
        max_steps = None
    base = base.replace(**{"train.max_epochs": 2, "gate.rule": 1.0, "run.storage": str(tmp / "corpus-root")})
    poll_every_s = base.run.preemption_check_seconds
    try:
        # the shared corpus, built once
        with instrumented(max_steps_per_epoch=1):
            train(base.replace(**{"train.max_epochs": 1}), progress=False, log=lambda s: None)

        def run(label: str, hooks=None, every: int | None = None, **dotted):
            store = tmp / label
            store.mkdir()
            (store / "corpora").symlink_to(tmp / "corpus-root" / "corpora")
            cfg = base.replace(**{"run.storage": str(store), **dotted})
            metrics = store / "metrics.jsonl"
            t = time.time()
            with instrumented(hooks, max_steps_per_epoch=max_steps, notice_every_steps=every):
                r = train(cfg, progress=False, log=lambda s: None, callbacks=[_Capture(str(metrics))])
            return r, time.time() - t, [json.loads(x) for x in metrics.read_text().splitlines()], cfg

        rows = []
        for label, every, dotted in (("never", None, {"run.preemption_check_seconds": 0.0}),
                                     ("every step", 1, {}),
                                     (f"every {poll_every_s:g} s (default)", None, {})):
            r, wall, m, cfg = run(f"poll-{len(rows)}", every=every, **dotted)
            tps = [x["tokens_per_second"] for x in m if "tokens_per_second" in x]
            rows.append((label, sum(tps) / len(tps), r["steps_per_epoch"]))
        print(f"config: {'anchor-shaped' if args.anchor else 'quickstart'}, {rows[0][2]} steps/epoch, 2 epochs")
        print("\nnotice polling (no preemption)      tokens/s")
        for label, tps, _ in rows:
            print(f"  {label:<32s} {tps:12,.0f}")
        base_tps, every1 = rows[0][1], rows[1][1]
        step_s = base.train.batch_size * base.w / base_tps
        poll_s = max(0.0, base.train.batch_size * base.w / every1 - step_s)
        print(f"  one poll ~ {poll_s * 1000:.1f} ms against a {step_s * 1000:.1f} ms step: every {poll_every_s:g} s "
              f"that is {poll_s / poll_every_s:.2%} of training time at any step time")

        print("\npreemption at epoch 2 step", args.step)
        for notice in (True, False):
            label = "notice" if notice else "no-notice"
            marker, out = tmp / f"{label}.marker", {}
            run_dir = tmp / label / base.experiment_id() / ckpt.RUN_DIR
            killer = staged_kill(c, nodes, marker, run_dir, notice, args.kill_after, out)
            r, wall, m, cfg = run(label, hooks=Preempt(epoch=2, step=args.step, marker=str(marker), slow_s=0.0,
                                                       notice=notice))
            killer.join(timeout=60)
            nodes.append(c.add_node(num_cpus=3))   # Ray starts nodes from the main thread only
            (res,) = r["resumes"]
            done_at_kill = int(out["progress"][1]) + 1
            redone = done_at_kill - res["step"]
            first = float(Path(f"{marker}.resumed").read_text().split()[0])
            print(f"  {label:9s}: resumed from {res['checkpoint']} ({res['reason']}); steps done at the kill "
                  f"{done_at_kill}, redone {redone} ({redone * step_s:.1f}s of training); kill -> first step "
                  f"{first - out['killed_at']:.1f}s; whole run {wall:.0f}s")
    finally:
        ray.shutdown()
        c.shutdown()


class _Capture:
    """A Ray Train callback appending every report's metrics to a file (built lazily: ray imported)."""

    def __new__(cls, path: str):
        import ray.train

        class Capture(ray.train.UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                with open(path, "a") as f:
                    f.write(json.dumps(metrics[0]) + "\n")

        return Capture()


if __name__ == "__main__":
    main()
