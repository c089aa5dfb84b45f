"""Speed of raywalk's GPT and greedy generation against straightforward versions.

    python benchmarks/model_speed.py [--quick]

1. Training tokens/s at the anchor shape (vocab 500, d 128, 4 layers, 1 head,
   w 64, batch 64): raywalk GPT + fused AdamW vs a plain fp32 model with
   hand-written attention + default AdamW. The two alternate step by step so
   that noise from other processes hits both alike.
2. One gate evaluation (1000 sequences, walk_length 256, window 64) with the
   model trained in part 1: greedy_generate (fp32, bf16) vs reference_generate.
"""
import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from raywalk.science.generate import greedy_generate, reference_generate  # noqa: E402
from raywalk.science.model import GPT  # noqa: E402

VOCAB, D, LAYERS, HEADS, W, BATCH = 500, 128, 4, 1, 64, 64


class NaiveGPT(nn.Module):
    """The straightforward baseline: same architecture, attention written out by hand."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, D), nn.Embedding(W, D)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(D), q=nn.Linear(D, D), k=nn.Linear(D, D), v=nn.Linear(D, D),
            o=nn.Linear(D, D), ln2=nn.LayerNorm(D), fc=nn.Linear(D, 4 * D), proj=nn.Linear(4 * D, D)))
            for _ in range(LAYERS))
        self.lnf, self.head = nn.LayerNorm(D), nn.Linear(D, VOCAB, bias=False)
        self.register_buffer("mask", torch.ones(W, W, dtype=torch.bool).triu(1))

    def forward(self, idx, targets):
        B, T = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(T))
        for b in self.blocks:
            h = b["ln1"](x)
            split = lambda t: t.view(B, T, HEADS, D // HEADS).transpose(1, 2)  # noqa: E731
            q, k, v = split(b["q"](h)), split(b["k"](h)), split(b["v"](h))
            att = (q @ k.transpose(-2, -1)) / math.sqrt(D // HEADS)
            att = att.masked_fill(self.mask[:T, :T], float("-inf")).softmax(-1)
            x = x + b["o"]((att @ v).transpose(1, 2).reshape(B, T, D))
            x = x + b["proj"](F.gelu(b["fc"](b["ln2"](x))))
        logits = self.head(self.lnf(x))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def random_graph_walks(n_walks, length, gen):
    """Walks on a random sparse digraph (out-degree 8): data with structure for the model to learn."""
    nbrs = torch.randint(0, VOCAB, (VOCAB, 8), generator=gen)
    walks = torch.empty(n_walks, length, dtype=torch.long)
    walks[:, 0] = torch.randint(0, VOCAB, (n_walks,), generator=gen)
    for t in range(1, length):
        walks[:, t] = nbrs[walks[:, t - 1], torch.randint(0, 8, (n_walks,), generator=gen)]
    return walks


def make_step(model, opt, loss_fn):
    def step(x, y):
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()
    return step


def bench_training(quick):
    gen = torch.Generator().manual_seed(0)
    warm, timed = (3, 10) if quick else (20, 240)
    n_batches = warm + timed
    walks = random_graph_walks(n_batches * BATCH, W + 1, gen).view(n_batches, BATCH, W + 1)
    data = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in walks]

    torch.manual_seed(0)
    gpt = GPT(VOCAB, W, D, LAYERS, HEADS)
    naive = NaiveGPT()
    steps = {
        "raywalk GPT (SDPA, fused AdamW)": make_step(
            gpt, torch.optim.AdamW(gpt.parameters(), lr=3e-4, weight_decay=0.01, fused=True),
            lambda m, x, y: m(x, y)[1]),
        "straightforward fp32 (manual attention, default AdamW)": make_step(
            naive, torch.optim.AdamW(naive.parameters(), lr=3e-4, weight_decay=0.01),
            lambda m, x, y: m(x, y)),
    }
    for step in steps.values():  # warm-up, untimed
        for x, y in data[:warm]:
            step(x, y)
    times = {k: [] for k in steps}
    for x, y in data[warm:]:  # alternate step by step so background load hits both alike
        for name, step in steps.items():
            t = time.perf_counter()
            loss = step(x, y)
            times[name].append(time.perf_counter() - t)
    tok = BATCH * W
    print(f"[train] {len(data) - warm} timed steps each after {warm} warm-up, batch {BATCH}x{W}, "
          f"{torch.get_num_threads()} threads; final GPT loss {loss:.3f} (ln V = {math.log(VOCAB):.3f})")
    for name, ts in times.items():
        print(f"[train]   {name:<55s} {tok * len(ts) / sum(ts):8,.0f} tokens/s overall, "
              f"{tok / statistics.median(ts):8,.0f} at the median step, {tok / min(ts):8,.0f} at the fastest")
    (a, ta), (b, tb) = times.items()
    print(f"[train]   speedup {sum(tb) / sum(ta):.2f}x overall, {statistics.median(tb) / statistics.median(ta):.2f}x "
          f"median step, {min(tb) / min(ta):.2f}x fastest step (target >= 1.25x)")
    return gpt


def bench_generation(model, quick):
    n, length, n_ref = (40, 80, 8) if quick else (1000, 256, 100)
    gen = torch.Generator().manual_seed(1)
    jumpers = torch.randperm(VOCAB, generator=gen)[:8]
    half = n // 2  # like the gate: eval walks start at cycled jumpers for half, uniform for the rest
    starts = torch.cat([jumpers.repeat(half // 8 + 1)[:half], torch.randint(0, VOCAB, (n - half,), generator=gen)])
    starts = starts[torch.randperm(n, generator=gen)]
    print(f"[gate] {n} sequences, length {length}, window {W}; {starts.unique().numel()} distinct starts")

    t = time.perf_counter()
    fast = greedy_generate(model, starts, length, W)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    fast16 = greedy_generate(model, starts, length, W, dtype=torch.bfloat16)
    t_bf16 = time.perf_counter() - t
    sub = torch.randperm(n, generator=gen)[:n_ref]
    t = time.perf_counter()
    ref = reference_generate(model, starts[sub], length, W)
    t_ref = (time.perf_counter() - t) * n / n_ref
    same = torch.equal(fast[sub], ref)

    print(f"[gate]   reference_generate: {t_ref:7.1f} s (timed on a random {n_ref}-sequence subset, "
          f"extrapolated linearly x{n / n_ref:g})")
    print(f"[gate]   greedy_generate fp32: {t_fast:7.1f} s   speedup {t_ref / t_fast:.1f}x (target >= 1.5x); "
          f"tokens identical to reference on the subset: {same} "
          f"({int((fast[sub] != ref).sum())} of {ref.numel()} differ)")
    print(f"[gate]   greedy_generate bf16: {t_bf16:7.1f} s   speedup {t_ref / t_bf16:.1f}x; "
          f"{int((fast16 != fast).sum())} of {fast.numel()} tokens differ from fp32 "
          f"({int((fast16 != fast).any(1).sum())} of {n} sequences)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, load average {load:.2f} at start")
    model = bench_training(args.quick)
    bench_generation(model, args.quick)
    print(f"load average {os.getloadavg()[0]:.2f} at end (other processes share these cores)")
