"""The gate: a bucket's members gated in one pass against one solo gate after another.

    python benchmarks/gate.py [--quick] [--rounds N]

1. Bucket gates (CPU, 1 thread, as a worker with run.cpus_per_worker 1), for the quickstart
   graph with d_model 8 / one layer and for the quickstart model, members trained briefly
   together (a bucket of 16 on the quickstart corpus, built here without Ray): the gate wall
   of one epoch for k = 1, 8, 16 members, "before" = k solo gates one after another (today's
   path: Gate.evaluate(state.model_of(i)) with the host-memo greedy_generate kept below as
   `old_greedy_generate`) and "after" = bucket_gate.gate_members; each against ONE solo gate
   (before). Alternating rounds, medians. Goal: d_model 8, k = 8, after <= 2x one solo gate.
2. The solo gate before/after (old_greedy_generate against today's greedy_generate, and its
   on_device=True generation) at the quickstart shape (the trained member above) and the
   anchor shape (random init, its corpus' gate starts: 1000 sequences of 256, w 64; --quick:
   100; one round, minutes on a CPU).
3. Flips at the anchor shape: the sequences gate_members generates for a bucket of random-init
   anchor members against each member's solo greedy_generate on the same weights: how many
   sequences and tokens differ (batched kernels round differently; a near-tied argmax can flip).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from raywalk.config import Config  # noqa: E402
from raywalk.records.storage import Store  # noqa: E402
from raywalk.science.batches import ResidentWindows, token_dtype  # noqa: E402
from raywalk.science.bucket import BucketState, BucketWindows, run_bucket_epoch  # noqa: E402
from raywalk.science.bucket_gate import gate_members, member_sequences  # noqa: E402
from raywalk.science.compliance import check_sequences, rule_counts_by_jump_length  # noqa: E402
from raywalk.science.gate import Gate, GateCounts  # noqa: E402
from raywalk.science.generate import greedy_generate  # noqa: E402
from raywalk.science.model import GPT, KVCache  # noqa: E402
from raywalk.service.corpus import build_corpus  # noqa: E402
from raywalk.service.windows import walks_to_windows  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
QUICKSTART = os.path.join(HERE, "..", "configs", "quickstart.yaml")
ANCHOR = os.path.join(HERE, "..", "configs", "anchor.yaml")
MODELS = {"d8/L1": {"model.d_model": 8, "model.n_layers": 1}, "quickstart d64/L2": {}}
KS = (1, 8, 16)


# ---- the solo gate before this change: greedy_generate with its host-side memo, as it was -------------

def _old_chunk(net, starts, length, window, memo, dtype):
    device = next(net.parameters()).device
    B = starts.numel()
    seq = torch.empty(B, length, dtype=torch.long, device="cpu")
    seq[:, 0] = starts.cpu()
    kv = KVCache(net, B, min(window, length), dtype, device)
    for t in range(1, length):
        if t <= window:
            seq[:, t] = net.next_logits(seq[:, t - 1:t].to(device), kv).argmax(-1).cpu()
            continue
        win = seq[:, t - window:t]
        keys = [r.tobytes() for r in win.to(torch.int32).numpy()]
        todo = {}
        for i, key in enumerate(keys):
            if key not in memo:
                todo.setdefault(key, i)
        if todo:
            rows = torch.tensor(list(todo.values()), dtype=torch.long, device="cpu")
            nxt = net.next_logits(win[rows].to(device)).argmax(-1).tolist()
            memo.update(zip(todo.keys(), nxt))
        seq[:, t] = torch.tensor([memo[k] for k in keys], dtype=torch.long, device="cpu")
    return seq


@torch.inference_mode()
def old_greedy_generate(model, starts, length, window, batch_size=512, dtype=torch.float32):
    net = model
    if dtype != torch.float32:
        net = copy.deepcopy(model).to(dtype)
        net.ln_f.float(), net.head.float()
    was_training = model.training
    net.eval()
    memo: dict = {}
    parts = [_old_chunk(net, c, length, window, memo, dtype) for c in starts.long().cpu().split(batch_size)]
    model.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0, length, dtype=torch.long, device="cpu")


def old_evaluate(gate: Gate, model) -> GateCounts:
    """Gate.evaluate as it was: the old generation, every gate sequence counted (repeated by its start's
    multiplicity; Gate.count now weights each distinct one instead)."""
    length, window = gate.cfg.corpus.walk_length, gate.cfg.w
    seqs = old_greedy_generate(model, torch.as_tensor(gate.starts, dtype=torch.long, device="cpu"), length, window)
    weighted = np.repeat(seqs.numpy(), gate.counts, axis=0)
    return GateCounts(check_sequences(weighted, gate.table), rule_counts_by_jump_length(weighted, gate.table))


# ---- helpers --------------------------------------------------------------------------------

def clock(f):
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out


def same(a: GateCounts, b: GateCounts) -> bool:
    return a.comp == b.comp and a.by_r.as_dict() == b.by_r.as_dict()


def corpus_of(cfg: Config, root: str):
    c, _ = build_corpus(cfg, Store.open(root), progress=False, log=lambda s: None)   # in-process, no Ray
    return c


def trained_rows(cfgs: list[Config], corpus, epochs: int) -> torch.Tensor:
    """A bucket of len(cfgs) members trained `epochs` epochs on the corpus' windows (each member its own order)."""
    cfg = cfgs[0]
    windows = torch.from_numpy(walks_to_windows(corpus.walks("train"), cfg.w)).to(token_dtype(cfg.graph.n))
    data = BucketWindows([ResidentWindows(windows, c.seed, c.train.batch_size) for c in cfgs])
    state = BucketState(cfgs, data.steps())
    for e in range(epochs):
        run_bucket_epoch(state, data.epoch(e))
    return state.rows.detach().clone()


def bucket_of(cfgs: list[Config], rows: torch.Tensor) -> BucketState:
    state = BucketState(cfgs, 1)
    with torch.no_grad():
        state.rows.copy_(rows[:len(cfgs)])
    return state


# ---- 1. bucket gates ------------------------------------------------------------------------------

def bench_buckets(root: str, rounds: int, epochs: int) -> dict:
    """Part 1; returns each model's trained member 0 (for part 2)."""
    base = Config.load(QUICKSTART, [f"run.storage={root}"])
    corpus = corpus_of(base, root)
    starts, table = corpus.gate_starts(base.gate.sequences), corpus.rule_table()
    kept = {}
    for name, over in MODELS.items():
        cfgs = [base.replace(**over, seed=s) for s in range(1, max(KS) + 1)]
        t, rows = clock(lambda: trained_rows(cfgs, corpus, epochs))
        gates = [Gate(starts, table, c) for c in cfgs]
        states = {k: bucket_of(cfgs[:k], rows) for k in KS}
        kept[name] = (cfgs[0], rows[:1], gates[0])
        before = {k: [] for k in KS}
        after = {k: [] for k in KS}
        one_new: list[float] = []
        gen8: list[float] = []   # gate_members' generation alone at k = 8 (the rest is counting)
        equal = {k: True for k in KS}
        for r in range(rounds + 1):   # round 0 warms up, unrecorded
            for k in KS:
                s = states[k]
                tb, want = clock(lambda: [old_evaluate(g, s.model_of(i)) for i, g in enumerate(gates[:k])])
                ta, got = clock(lambda: gate_members(s, gates[:k]))
                equal[k] &= all(same(a, b) for a, b in zip(got, want))
                if r:
                    before[k].append(tb)
                    after[k].append(ta)
                if r and k == 8:
                    L = base.corpus.walk_length
                    gen8.append(clock(lambda: member_sequences(s, [g.starts for g in gates[:k]], [L] * k))[0])
            tn = clock(lambda: gates[0].evaluate(states[1].model_of(0)))[0]
            if r:
                one_new.append(tn)
        one = statistics.median(before[1])
        print(f"\n{name}: quickstart graph, {base.gate.sequences} gate sequences of {base.corpus.walk_length} "
              f"({len(gates[0].starts)} distinct starts), w {base.w}; members trained {epochs} epoch(s) together "
              f"({t:.0f}s); median of {rounds} round(s)")
        print(f"  one solo gate: before {one * 1e3:.1f} ms, after (today's greedy_generate) "
              f"{statistics.median(one_new) * 1e3:.1f} ms")
        print(f"  {'k':>3} {'k solo gates (before)':>22} {'gate_members (after)':>21} {'before/one':>11} "
              f"{'after/one':>10} {'speed-up':>9} {'counts equal':>13}")
        for k in KS:
            b, a = statistics.median(before[k]), statistics.median(after[k])
            print(f"  {k:>3} {b * 1e3:>19.1f} ms {a * 1e3:>18.1f} ms {b / one:>11.2f} {a / one:>10.2f} "
                  f"{b / a:>9.2f} {'yes' if equal[k] else 'NO':>13}")
        a8, g8 = statistics.median(after[8]), statistics.median(gen8)
        print(f"  k = 8 after: generation {g8 * 1e3:.1f} ms, counting {(a8 - g8) * 1e3:.1f} ms (Gate.evaluate's: "
              f"each member's distinct sequences counted once, weighted by their starts' multiplicities)")
        if name == "d8/L1":
            r = a8 / one
            mean = statistics.median(before[8]) / 8   # a member's solo gate, on average over the bucket's 8
            print(f"  goal (d_model 8, k = 8: the bucket's gate wall at most 2x one solo gate): {r:.2f}x member 1's "
                  f"solo gate ({a8 / statistics.median(one_new):.2f}x it as it now is); {a8 / mean:.2f}x the members' "
                  f"mean solo gate ({mean * 1e3:.1f} ms): {'met' if a8 / mean <= 2.0 else 'NOT met'} against "
                  f"the mean, {'met' if r <= 2.0 else 'NOT met'} against member 1's")
    return kept


# ---- 2. the solo gate before / after -------------------------------------------------------------

def evaluate_on_device(gate: Gate, model) -> GateCounts:
    """Gate.evaluate with the on-device generation (greedy_generate(on_device=True))."""
    length, window = gate.cfg.corpus.walk_length, gate.cfg.w
    seqs = greedy_generate(model, torch.as_tensor(gate.starts, dtype=torch.long, device="cpu"), length, window,
                           on_device=True)
    return gate.count(seqs.numpy())


def bench_solo(kept: dict, root: str, rounds: int, anchor_sequences: int):
    cfg, rows, gate = kept["quickstart d64/L2"]
    model = bucket_of([cfg], rows).model_of(0)
    acfg = Config.load(ANCHOR, [f"run.storage={root}/anchor", "corpus.corpus_size=50000",
                                f"gate.sequences={anchor_sequences}"])
    corpus = corpus_of(acfg, f"{root}/anchor")
    agate = Gate(corpus.gate_starts(acfg.gate.sequences), corpus.rule_table(), acfg)
    torch.manual_seed(acfg.seed)
    amodel = GPT.from_config(acfg).eval()
    print(f"\nthe solo gate: before (the host memo as it was), after (Gate.evaluate today: the host memo, its "
          f"window passes in cache-sized pieces), and the on-device generation; median of the rounds")
    print(f"  {'shape':<42} {'before':>9} {'after':>9} {'on-device':>10} {'after x':>8} {'on-dev. x':>10} "
          f"{'counts equal':>13}")
    runs = (("quickstart (d64/L2, trained, " + str(len(gate.starts)) + " starts)", gate, model, rounds),
            (f"anchor (d128/L4, random init, {len(agate.starts)} starts)", agate, amodel, 1))   # minutes a round
    for label, g, m, n in runs:
        t = {"before": [], "after": [], "device": []}
        eq = True
        for _ in range(n):
            for key, f in (("before", old_evaluate), ("after", Gate.evaluate), ("device", evaluate_on_device)):
                dt, got = clock(lambda: f(g, m))
                t[key].append(dt)
                if key == "before":
                    want = got
                eq &= same(got, want)
        b, a, d = (statistics.median(t[x]) for x in ("before", "after", "device"))
        print(f"  {label:<42} {b:>8.3f}s {a:>8.3f}s {d:>9.3f}s {b / a:>8.2f} {b / d:>10.2f} "
              f"{'yes' if eq else 'NO':>13}")
    return acfg, agate


# ---- 3. flips at the anchor shape ----------------------------------------------------------------

def bench_flips(acfg: Config, agate: Gate, k: int) -> None:
    cfgs = [acfg.replace(seed=acfg.seed + i) for i in range(k)]
    state = BucketState(cfgs, 1)
    L = acfg.corpus.walk_length
    t, batched = clock(lambda: member_sequences(state, [agate.starts] * k, [L] * k))
    seqs = diff_seqs = diff_toks = 0
    for i in range(k):
        solo = greedy_generate(state.model_of(i), torch.as_tensor(agate.starts, device="cpu"), L, acfg.w).numpy()
        d = batched[i] != solo
        seqs += len(solo)
        diff_seqs += int(d.any(1).sum())
        diff_toks += int(d.sum())
    print(f"\nflips at the anchor shape: {k} random-init members x {len(agate.starts)} distinct starts x {L} "
          f"tokens, gate_members' sequences ({t:.0f}s) against each member's solo greedy_generate: "
          f"{diff_seqs} of {seqs} sequences differ, {diff_toks} of {seqs * (L - 1)} generated tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round, one training epoch, 100 anchor sequences")
    ap.add_argument("--rounds", type=int, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rounds = a.rounds or (1 if a.quick else 5)
    root = tempfile.mkdtemp(prefix="raywalk-bench-gate-")
    print(f"CPU, {torch.get_num_threads()} thread; torch {torch.__version__}")
    kept = bench_buckets(root, rounds, 1 if a.quick else 2)
    acfg, agate = bench_solo(kept, root, rounds, 100 if a.quick else 1000)
    bench_flips(acfg, agate, 2)


if __name__ == "__main__":
    main()
