"""What a step costs beyond the step, and what an epoch boundary costs, under `raywalk train`.

    python benchmarks/pace.py [--epochs 2] [--storage DIR] [--skip-seam]

1. Framework overhead, with a model so small that the step is cheap, as on a GPU
   (quickstart graph, model.d_model 8, 1 layer, 64,000 walks: 3,000 steps per epoch,
   one worker, one thread): `raywalk train`'s steps/s (steps / timing.train_seconds of
   result.json, which runs first step to last, data included) against a bare PyTorch
   loop over the same model, optimizer and number of steps fed from an in-memory tensor.
   Goal: >= 0.9 of the bare loop.
2. The epoch seam at the anchor (d_model 128, 4 layers, 200,000 walks), on CPU: from the
   last step of an epoch to the first of the next (reduction, checkpoint, report,
   result.json, the next epoch's first batch), the gate left out (seam - gate seconds).
   Epochs cut to 20 steps and an 8-sequence gate. Goal: <= 1 s.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raywalk.config import Config  # noqa: E402
from raywalk.science.model import GPT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(cfg: Config, steps: int) -> float:
    """Steps/s of the plainest loop: the same model and AdamW, batches sliced from one tensor."""
    torch.manual_seed(0)
    model = GPT.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            betas=(0.9, 0.95), foreach=True)
    B, T = cfg.train.batch_size, cfg.w + 1
    data = torch.randint(0, cfg.graph.n, (steps * B, T))
    model.train()
    t = time.perf_counter()
    for s in range(steps):
        tok = data[s * B:(s + 1) * B]
        _, loss = model(tok[:, :-1], tok[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip, foreach=True)
        opt.step()
    return steps / (time.perf_counter() - t)


def overhead(tmp: Path, epochs: int) -> None:
    from raywalk.service.driver import train

    cfg = Config.load(ROOT / "configs" / "quickstart.yaml", [
        f"run.storage={tmp / 'overhead'}", "model.d_model=8", "model.n_layers=1", "corpus.corpus_size=64000",
        f"train.max_epochs={epochs}", "gate.rule=1.0", "gate.sequences=64"])
    r = train(cfg, progress=True, log=lambda s: None)
    steps = r["steps_per_epoch"]
    torch.set_num_threads(1)   # the worker's: run.cpus_per_worker = 1
    bare = [bare_loop(cfg, steps) for _ in range(2)]
    ours = [steps / s for s in r["timing"]["train_seconds"]]
    print(f"\n1. framework overhead: {steps:,} steps per epoch, d_model 8, 1 layer, 1 thread "
          f"(data path: {r.get('data_path')})")
    print(f"   bare PyTorch loop       {max(bare):8,.0f} steps/s  (runs {', '.join(f'{b:,.0f}' for b in bare)})")
    print(f"   raywalk train, epochs   {max(ours):8,.0f} steps/s  (epochs {', '.join(f'{o:,.0f}' for o in ours)})")
    print(f"   ratio (best epoch / best bare run): {max(ours) / max(bare):.2f}  (goal >= 0.9)")


def seam(tmp: Path, anchor: Path | None) -> None:
    from raywalk.service.driver import train
    from tests.faults import instrumented

    storage = anchor or tmp / "seam"
    cfg = Config.load(ROOT / "configs" / "anchor.yaml", [
        f"run.storage={storage}", "train.max_epochs=3", "gate.rule=1.0", "gate.sequences=8"])
    with instrumented(max_steps_per_epoch=20):
        r = train(cfg, progress=False, log=lambda s: None, fresh=True)
    t = r["timing"]
    print("\n2. epoch seam at the anchor on CPU (20-step epochs, 8-sequence gate)")
    print(f"   {'epoch':>5s} {'train s':>8s} {'gate s':>7s} {'ckpt s':>7s} {'seam s':>7s} {'seam - gate':>12s}")
    for e in range(len(t["train_seconds"])):
        s = t["seam_seconds"][e] if e < len(t["seam_seconds"]) else None
        g = t["gate_seconds"][e]
        print(f"   {e + 1:5d} {t['train_seconds'][e]:8.2f} {g:7.2f} {t['checkpoint_seconds'][e]:7.2f} "
              + (f"{s:7.2f} {s - g:12.2f}" if s is not None else f"{'-':>7s} {'-':>12s}"))
    worst = max(s - g for s, g in zip(t["seam_seconds"], t["gate_seconds"]) if s is not None)
    print(f"   worst seam without the gate: {worst:.2f}s (goal <= 1 s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--storage", help="a storage root with the anchor corpus already built (else a temp dir)")
    ap.add_argument("--skip-seam", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="raywalk-bench-pace-"))
    overhead(tmp, args.epochs)
    if not args.skip_seam:
        seam(tmp, Path(args.storage) if args.storage else None)


if __name__ == "__main__":
    main()
