"""The GPU path, measured on a machine with a CUDA GPU (prints one line and exits 0 without one).

    PYTHONPATH=. python benchmarks/gpu.py [--walks 200000] [--storage DIR] [--quick] [--ray]

Without Ray (the lent GPU machine has none): on the anchor (vocab 500, d_model 128, 4
layers, w 64, batch 64; 200,000 walks of 256 = 600,000 windows, 9,375 steps per epoch),
side by side in one run:
  * the resident feed alone: batches/s on the GPU, and the one-off load;
  * framework overhead: raywalk's epoch runner (loop.run_epoch on the resident path)
    against a bare loop of the same model and optimizer over an in-memory tensor;
  * an anchor epoch, train + gate (1000 greedy sequences of 256 tokens), seconds, for
    compile off/on x deterministic on/off (goal: <= 10 s on one H100/H200);
  * determinism: two runs of 200 steps from one state give identical losses with
    run.deterministic on; greedy tokens equal reference_generate's on a sample;
  * buckets (k = 1, 4, 16, 64 anchor-shape members in one batched step): member-steps/s
    against the solo runner's steps/s, peak GPU memory against science/bucket.member_bytes;
  * bucket gates (k = 1, 8, 24, 64 anchor-shape members, trained together briefly): the
    members gated in one pass (science/bucket_gate.gate_members) against k solo gates one
    after another, and the solo gate's generation kept on the host or on the device.
With --ray (and Ray installed): the same epoch under TorchTrainer, resident and streaming.
--quick cuts every epoch to 1,000 steps (and scales the epoch time up). A CPU dry run of the
bucket-gate rows alone (seconds, not minutes):
    python benchmarks/gpu.py --device cpu --walks 50000 --only bucket-gate --gate-sequences 40 \
        --bucket-gate-ks 1,2 --steps 20
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--walks", type=int, default=200_000)
    ap.add_argument("--storage", help="where the corpus goes (default: a temp dir; reused when there)")
    ap.add_argument("--quick", action="store_true", help="1,000-step epochs")
    ap.add_argument("--steps", type=int, help="timed steps per epoch (overrides --quick)")
    ap.add_argument("--ray", action="store_true", help="also the TorchTrainer rows (needs Ray)")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script's logic on a CPU")
    ap.add_argument("--only", choices=("all", "bucket-gate"), default="all", help="bucket-gate: those rows alone")
    ap.add_argument("--gate-sequences", type=int, help="the gate's sequences (default the anchor's 1000)")
    ap.add_argument("--bucket-gate-ks", default="1,8,24,64", help="bucket sizes of the bucket-gate rows")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA GPU on this machine; nothing measured")
        return

    from benchmarks.pace import bare_loop
    from raywalk.science.gate import Gate
    from raywalk.science.batches import ResidentWindows, token_dtype
    from raywalk.config import Config
    from raywalk.service.corpus import build_corpus
    from raywalk.service.windows import walks_to_windows
    from raywalk.science.generate import greedy_generate, reference_generate
    from raywalk.records.storage import Store
    from raywalk.science.loop import TrainingState, compiled, epoch_end, run_epoch, set_determinism, sync

    tmp = args.storage or tempfile.mkdtemp(prefix="raywalk-bench-gpu-")
    cfg = Config.load(ROOT / "configs" / "anchor.yaml", [f"run.storage={tmp}", f"corpus.corpus_size={args.walks}",
                                                         "gate.rule=1.0"])
    if args.gate_sequences:
        cfg = cfg.replace(**{"gate.sequences": args.gate_sequences})
    dev = torch.device(args.device, 0) if args.device == "cuda" else torch.device(args.device)
    if dev.type == "cuda":
        name, cap = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
        print(f"GPU: {name} (compute capability {cap[0]}.{cap[1]}); torch {torch.__version__}")
    t = time.perf_counter()
    corpus, _ = build_corpus(cfg, Store.open(tmp), progress=False, log=lambda s: None)   # no Ray: in-process
    print(f"corpus: {time.perf_counter() - t:.0f}s")
    t = time.perf_counter()
    host = torch.from_numpy(walks_to_windows(corpus.walks("train"), cfg.w)).to(token_dtype(cfg.graph.n))
    feed = ResidentWindows(host.to(dev), cfg.seed, cfg.train.batch_size)
    sync(dev)
    load = time.perf_counter() - t
    full = feed.steps()
    steps = min(full, args.steps or (1000 if args.quick else full))
    gate = Gate(corpus.gate_starts(cfg.gate.sequences), corpus.rule_table(), cfg)
    gate_ks = tuple(int(k) for k in args.bucket_gate_ks.split(","))
    if args.only == "bucket-gate":
        bucket_gates(cfg, host, gate, dev, min(steps, 200), gate_ks)
        return

    sync(dev)
    t = time.perf_counter()
    k = sum(1 for _ in feed.epoch(0, steps=steps))
    sync(dev)
    print(f"\nresident feed on {dev}: {k / (time.perf_counter() - t):,.0f} batches/s "
          f"({feed.nbytes / 1e6:.0f} MB int16, loaded in {load:.2f}s)")

    set_determinism(True)
    with torch.device(dev):
        bare = bare_loop(cfg, steps)   # the same model and AdamW, in-memory batches
    s = TrainingState.create(cfg, full, dev)
    r = run_epoch(s, feed.epoch(0, steps=steps), steps)
    print(f"framework overhead, eager, deterministic: run_epoch {steps / r.train_seconds:,.0f} steps/s, bare "
          f"loop {bare:,.0f} steps/s, ratio {steps / r.train_seconds / bare:.2f}")

    print(f"\nanchor epoch ({full:,} steps{'; timed on ' + format(steps, ',') if steps < full else ''}) + gate "
          f"({cfg.gate.sequences} sequences of {cfg.corpus.walk_length})")
    print(f"{'compile':>8s} {'determ.':>8s} {'train s':>9s} {'gate s':>7s} {'epoch s':>8s} {'steps/s':>9s}")
    for comp in (False, True):
        for det in (True, False):
            set_determinism(det)
            s = TrainingState.create(cfg, full, dev)
            net = compiled(s.model, dev) if comp else None
            if comp:   # compile and capture outside the clock (a run pays it once)
                run_epoch(s, feed.epoch(1, steps=20), 20, net=net)
                s = TrainingState.create(cfg, full, dev)
            r = run_epoch(s, feed.epoch(0, steps=steps), steps, net=net)
            s.step = full   # as if the epoch ran whole
            run = type(r)(torch.zeros(full, dtype=torch.float64, device=dev), r.train_seconds * full / steps,
                          r.first_batch_seconds, r.started, r.ended)
            epoch_end(s, run, gate)
            tr, g = s.timing.train_seconds[-1], s.timing.gate_seconds[-1]
            print(f"{'on' if comp else 'off':>8s} {'on' if det else 'off':>8s} {tr:9.2f} {g:7.2f} {tr + g:8.2f} "
                  f"{steps / r.train_seconds:9,.0f}")

    set_determinism(True)
    a, b = (TrainingState.create(cfg, full, dev) for _ in range(2))
    la, lb = (run_epoch(x, feed.epoch(0, steps=200), 200).losses for x in (a, b))
    starts = torch.from_numpy(corpus.gate_starts(cfg.gate.sequences))[::31]
    same = torch.equal(greedy_generate(a.model, starts, cfg.corpus.walk_length, cfg.w),
                       reference_generate(a.model, starts, cfg.corpus.walk_length, cfg.w))
    print(f"\ndeterministic on: two 200-step runs identical {torch.equal(la, lb)}; greedy == reference_generate "
          f"on {len(starts)} starts: {same}")

    buckets(cfg, host, dev, min(steps, 200), solo=steps / r.train_seconds)
    bucket_gates(cfg, host, gate, dev, min(steps, 200), gate_ks)

    if args.ray:
        under_ray(cfg, tmp, steps)


def buckets(cfg, host: torch.Tensor, dev: torch.device, steps: int, solo: float, ks=(1, 4, 16, 64)) -> None:
    """Anchor-shape buckets: member-steps/s and peak memory for k members in one batched step, against the
    solo path's steps/s (run_epoch above). Every member gets the anchor's windows (its own seed, so its own
    order and initial weights): throughput, not science."""
    from raywalk.science.batches import ResidentWindows
    from raywalk.science.bucket import BucketState, BucketWindows, member_bytes, run_bucket_epoch
    from raywalk.science.loop import set_determinism

    set_determinism(True)
    print(f"\nbuckets at the anchor shape ({steps} steps each; solo run_epoch {solo:,.0f} steps/s)")
    print(f"{'k':>4s} {'member-steps/s':>15s} {'x solo':>7s} {'peak GiB':>9s} {'estimate GiB':>13s}")
    for k in ks:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        cfgs = [cfg.replace(seed=cfg.seed + i) for i in range(k)]
        try:
            b = BucketState(cfgs, steps, dev)
            data = BucketWindows([ResidentWindows(host.to(dev), c.seed, c.train.batch_size) for c in cfgs])
            run_bucket_epoch(b, data.epoch(1, steps=20))   # warm-up: allocator, kernels
            b = BucketState(cfgs, steps, dev)
            r = run_bucket_epoch(b, data.epoch(0, steps=steps))
        except torch.OutOfMemoryError:
            print(f"{k:4d}  out of memory")
            break
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
        est = k * member_bytes(cfg, len(host)) / 2**30
        rate = k * steps / r.train_seconds
        print(f"{k:4d} {rate:15,.0f} {rate / solo:7.2f} {peak:9.2f} {est:13.2f}")
        del b, data


def bucket_gates(cfg, host: torch.Tensor, gate, dev: torch.device, steps: int, ks=(1, 8, 24, 64),
                 solo_cap: int = 4) -> None:
    """Anchor-shape members (max(ks), trained `steps` steps together so their walks are a trained model's,
    not random ones) gated in one pass, k at a time, against k solo gates one after another: Gate.evaluate
    (state.model_of(i)), today's path, timed on min(k, solo_cap) members and scaled to k. Ray-free."""
    import numpy as np

    from raywalk.science.batches import ResidentWindows
    from raywalk.science.bucket import BucketState, BucketWindows, run_bucket_epoch
    from raywalk.science.bucket_gate import gate_members
    from raywalk.science.compliance import check_sequences, rule_counts_by_jump_length
    from raywalk.science.generate import greedy_generate
    from raywalk.science.loop import set_determinism, sync

    set_determinism(True)
    cfgs = [cfg.replace(seed=cfg.seed + i) for i in range(max(ks))]
    win = host[: steps * cfg.train.batch_size].to(dev)   # a step's worth of windows each: enough for `steps`
    data = BucketWindows([ResidentWindows(win, c.seed, c.train.batch_size) for c in cfgs])
    trained = BucketState(cfgs, data.steps(), dev)
    t = time.perf_counter()
    run_bucket_epoch(trained, data.epoch(0))
    rows = trained.rows.detach()
    del trained, data
    print(f"\nbucket gates at the anchor shape ({cfg.gate.sequences} sequences of {cfg.corpus.walk_length}, "
          f"{len(gate.starts)} distinct starts; {max(ks)} members trained {steps} steps together in "
          f"{time.perf_counter() - t:.1f}s)")

    def bucket_of(k):
        b = BucketState(cfgs[:k], 1, dev)
        with torch.no_grad():
            b.rows.copy_(rows[:k])
        return b

    def timed(f):
        sync(dev)
        t0 = time.perf_counter()
        out = f()
        sync(dev)
        return time.perf_counter() - t0, out

    same = lambda a, b: a.comp == b.comp and a.by_r.as_dict() == b.by_r.as_dict()   # noqa: E731
    one = bucket_of(1)
    gate_members(one, [gate])   # warm-up: kernels, allocator
    t_host, want = timed(lambda: gate.evaluate(one.model_of(0)))

    def on_device():
        seqs = greedy_generate(one.model_of(0), torch.as_tensor(gate.starts, device="cpu"), cfg.corpus.walk_length,
                               cfg.w, on_device=True)
        w = np.repeat(seqs.numpy(), gate.counts, axis=0)
        return check_sequences(w, gate.table), rule_counts_by_jump_length(w, gate.table)

    t_dev, (comp, _) = timed(on_device)
    print(f"  one solo gate (member 0): {t_host:.2f}s with the host memo (today), {t_dev:.2f}s on the device "
          f"(greedy_generate on_device=True); counts equal: {comp == want.comp}")
    print(f"{'k':>4s} {'k solo gates s':>15s} {'gate_members s':>15s} {'no memo s':>10s} {'x faster':>9s} "
          f"{'/ one solo':>11s} {'counts equal':>13s}")
    for k in ks:
        b = bucket_of(k)
        n = min(k, solo_cap)
        t_solo, solo = timed(lambda: [gate.evaluate(b.model_of(i)) for i in range(n)])
        t_solo *= k / n
        try:
            t_b, got = timed(lambda: gate_members(b, [gate] * k))
        except torch.OutOfMemoryError:
            print(f"{k:4d}  out of memory")
            break
        t_nm = timed(lambda: gate_members(b, [gate] * k, memo=False))[0] if k <= 8 else float("nan")
        eq = all(same(got[i], solo[i]) for i in range(n))
        print(f"{k:4d} {t_solo:15.2f} {t_b:15.2f} {t_nm:10.2f} {t_solo / t_b:9.2f} {t_b / t_host:11.2f} "
              f"{('yes' if eq else 'NO') + f' ({n} solo)':>13s}")
        del b


def under_ray(cfg, tmp: str, steps: int) -> None:
    """One epoch under TorchTrainer (1 worker, 1 GPU) per data path, from result.json's timing."""
    from raywalk.service.driver import train
    from tests.faults import instrumented

    print("\nTorchTrainer, 1 GPU, one epoch")
    for data in ("resident", "stream"):
        c = cfg.replace(**{"run.gpus_per_worker": 1.0, "run.cpus_per_worker": 4.0, "train.max_epochs": 1,
                           "train.data": data, "run.storage": f"{tmp}/ray-{data}"})
        Path(f"{tmp}/ray-{data}").mkdir(parents=True, exist_ok=True)
        if not Path(f"{tmp}/ray-{data}/corpora").exists():
            Path(f"{tmp}/ray-{data}/corpora").symlink_to(Path(tmp) / "corpora")
        with instrumented(max_steps_per_epoch=steps):
            r = train(c, progress=False, log=lambda s: None)
        t = r["timing"]
        print(f"  {data:<9s} train {t['train_seconds'][0]:.2f}s ({steps / t['train_seconds'][0]:,.0f} steps/s), "
              f"gate {t['gate_seconds'][0]:.2f}s, checkpoint {t['checkpoint_seconds'][0]:.2f}s")


if __name__ == "__main__":
    main()
