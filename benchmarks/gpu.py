"""The GPU path, measured on a machine with a CUDA GPU (prints one line and exits 0 without one).

    python benchmarks/gpu.py [--steps 200] [--storage DIR] [--skip-kill]

At the anchor shape (vocab 500, d_model 128, 4 layers, w 64, batch 64) on an
anchor-shaped corpus (50,000 walks of 256), side by side in one run:
  * training tokens/s: raywalk's epoch runner without Ray, and raywalk's worker
    loop under TorchTrainer (1 worker, 1 GPU), each fp32 / bf16 x deterministic on / off;
  * the gate's generation: 1000 greedy sequences of 256 tokens, seconds;
  * greedy tokens on the GPU equal `reference_generate`'s for a sample of starts;
  * a 2-epoch `raywalk train` on the GPU with the worker SIGKILLed mid-epoch 2, its curves
    and final weights compared with an uninterrupted run's (run.deterministic on).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--storage", help="where corpora and runs go (default: a temp dir)")
    ap.add_argument("--skip-kill", action="store_true", help="leave out the killed-worker comparison")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU on this machine; nothing measured")
        return

    from benchmarks.train import anchor_shaped, plain_loop, under_ray
    from raywalk.corpus import build_corpus, ray_mapper
    from raywalk.dataset import walks_to_windows
    from raywalk.generate import greedy_generate, reference_generate
    from raywalk.ray_env import ensure_ray
    from raywalk.storage import Store
    from raywalk.training import TrainingState, run_epoch, set_determinism, sync

    tmp = Path(args.storage or tempfile.mkdtemp(prefix="raywalk-bench-gpu-"))
    cfg = anchor_shaped(str(tmp)).replace(**{"run.gpus_per_worker": 1.0, "run.cpus_per_worker": 2.0})
    name, cap = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
    print(f"GPU: {name} (compute capability {cap[0]}.{cap[1]}); torch {torch.__version__}")
    ensure_ray(cfg)
    corpus, _ = build_corpus(cfg, Store.open(str(tmp)), mapper=ray_mapper(), progress=False)
    windows = walks_to_windows(corpus.walks("train"), cfg.w)

    rows = []
    bf16_ok = cap[0] >= 8
    for precision in ("fp32", "bf16") if bf16_ok else ("fp32",):
        for det in (True, False):
            c = cfg.replace(**{"train.precision": precision, "run.deterministic": det})
            set_determinism(det)
            whole, steady = plain_loop(c, windows, args.steps, device="cuda")
            rows.append((f"epoch runner, no Ray, {precision}, deterministic {'on' if det else 'off'}", whole, steady))
            whole, steady, first = under_ray(c, 1, args.steps, tmp, tag=f"{precision}-{det}")
            rows.append((f"TorchTrainer 1 GPU, {precision}, deterministic {'on' if det else 'off'}", whole, steady))
    set_determinism(True)
    print(f"\ntraining, {args.steps} steps each (steady leaves out the first step)")
    print(f"{'':58s} {'tokens/s':>12s} {'steady':>12s}")
    for label, whole, steady in rows:
        print(f"{label:58s} {whole:12,.0f} {steady:12,.0f}")
    if not bf16_ok:
        print("bf16 not measured: this GPU has no native bf16 (raywalk refuses train.precision=bf16 on it)")

    # the gate's generation, on a model trained for one short epoch so trajectories are not trivial
    state = TrainingState.create(cfg, args.steps, "cuda")
    batches = ({"tokens": torch.from_numpy(windows[i * 64:(i + 1) * 64]).long()} for i in range(args.steps))
    run_epoch(state, batches, args.steps)
    starts = torch.from_numpy(corpus.gate_starts(cfg.gate.sequences))
    state.model.eval()
    sync(state.device)
    t = time.perf_counter()
    seqs = greedy_generate(state.model, starts, cfg.corpus.walk_length, cfg.w)
    sync(state.device)
    gen = time.perf_counter() - t
    sample = starts[:: max(1, len(starts) // 32)]
    ref = reference_generate(state.model, sample, cfg.corpus.walk_length, cfg.w)
    same = torch.equal(ref, greedy_generate(state.model, sample, cfg.corpus.walk_length, cfg.w))
    print(f"\ngate generation: {len(starts)} x {cfg.corpus.walk_length} tokens in {gen:.2f}s "
          f"({seqs.shape[0] * seqs.shape[1] / gen:,.0f} tokens/s); greedy == reference_generate on "
          f"{len(sample)} starts: {same}")

    if not args.skip_kill:
        kill_comparison(tmp)


def kill_comparison(tmp: Path) -> None:
    """2 epochs of the quickstart on the GPU, uninterrupted and with the worker killed mid-epoch 2."""
    from raywalk.checkpoint import read
    from raywalk.config import Config
    from raywalk.faults import WorkerKill
    from raywalk.storage import Store
    from raywalk.trainer import train

    root = Path(__file__).resolve().parents[1]
    base = Config.load(root / "configs" / "quickstart.yaml", [
        "train.max_epochs=2", "gate.rule=1.0", "run.gpus_per_worker=1", "run.cpus_per_worker=2",
        "run.deterministic=true"])
    runs = {}
    for label, hooks in (("uninterrupted", None),
                         ("killed", WorkerKill(rank=0, epoch=2, step=100, marker=str(tmp / "killed")))):
        cfg = base.replace(**{"run.storage": str(tmp / f"kill-{label}")})
        t = time.perf_counter()
        runs[label] = (train(cfg, progress=False, hooks=hooks, log=lambda s: None), time.perf_counter() - t)
    (a, ta), (b, tb) = runs["uninterrupted"], runs["killed"]
    wa, wb = (read(Store.open(r["checkpoints"]["latest"]))["model"] for r in (a, b))
    same_w = all(torch.equal(wa[k], wb[k]) for k in wa)
    print(f"\nkilled worker (epoch 2, step 100): restarts {b['restarts']}, curves identical "
          f"{a['curves'] == b['curves']}, final weights identical {same_w}; {ta:.0f}s vs {tb:.0f}s")


if __name__ == "__main__":
    main()
