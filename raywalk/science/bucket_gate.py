"""Every member of a bucket gated in one pass: their greedy walks generated together.

`gate_members(state, gates)` gives each member the counts its own `Gate.evaluate` gives on
the same weights, from one generation over the bucket's stacked rows: each projection is one
bmm over the k members' rows (as `bucket_losses`, inference only, last position only), a KV
cache while the window fills, the window recomputed after (science/generate.py's `decode`,
whose WindowMemo decodes each member's distinct windows once). The sequences stay on the
bucket's device until the end: at most one host sync per generated token (how many windows are
new), none while the window fills nor once every walk follows an earlier one. Members' distinct starts differ in number, so the shorter
lists are padded with their own first start (a duplicate the memo merges) and the padding is
dropped before counting, which is Gate.evaluate's (each sequence repeated by its start's
multiplicity). fp32 whatever train.precision, as the solo gate.

Batched kernels round differently from the solo ones (an ulp or so), so a near-tied argmax
could flip a token: benchmarks/gate.py counts how often.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raywalk.science.bucket import BucketState, RowLayout
from raywalk.science.gate import Gate, GateCounts
from raywalk.science.generate import WindowMemo, decode, in_passes, pass_tokens

# the KV caches of one chunk of rows (all members, all layers) at most this (CPU, other devices):
# every chunk runs its own t <= w steps, so fewer chunks, fewer launches
CACHE_BYTES = (1 << 30, 4 << 30)


class _Stacked:
    """k models (rows of a bucket's stacked weights) as one batched decoder: GPT.next_logits, batched.
    Weights are views of the rows, transposed once here; `sub` takes some members (a gather of their rows)."""

    def __init__(self, rows: torch.Tensor, layout: RowLayout, n_layers: int, n_heads: int):
        self.rows, self.layout, self.n_layers, self.H = rows, layout, n_layers, n_heads
        p = layout.split_fused(rows)
        self.k, self.V, self.d = p["tok_emb.weight"].shape
        self.dh = self.d // n_heads
        self.scale = 1.0 / math.sqrt(self.dh)
        self.emb = p["tok_emb.weight"].reshape(self.k * self.V, self.d)
        self.pos = p["pos_emb.weight"][:, None]                                   # (k, 1, block, d)
        self.offset = torch.arange(self.k, device=rows.device).view(self.k, 1, 1) * self.V
        row = lambda v: v.unsqueeze(1)   # noqa: E731  (k, n) -> (k, 1, n): broadcast over tokens
        self.blocks = []
        for i in range(n_layers):
            a = f"blocks.{i}."
            wqkv = p[a + "attn.qkv"].transpose(1, 2)                              # (k, d, 3d): q | k | v
            self.blocks.append(dict(
                ln1=(row(p[a + "ln_1.weight"]), row(p[a + "ln_1.bias"])), qkv=wqkv,
                q=wqkv[:, :, :self.d], kv=wqkv[:, :, self.d:], out=p[a + "attn.out_proj.weight"].transpose(1, 2),
                ln2=(row(p[a + "ln_2.weight"]), row(p[a + "ln_2.bias"])),
                fc=(p[a + "mlp.0.weight"].transpose(1, 2), row(p[a + "mlp.0.bias"])),
                proj=(p[a + "mlp.2.weight"].transpose(1, 2), row(p[a + "mlp.2.bias"]))))
        self.lnf = (row(p["ln_f.weight"]), row(p["ln_f.bias"]))
        self.head = p["head.weight"].transpose(1, 2)

    def sub(self, members: torch.Tensor | slice) -> "_Stacked":
        """Some members: a slice is a view of their rows, an index gathers them."""
        rows = self.rows[members] if isinstance(members, slice) else self.rows.index_select(0, members)
        return _Stacked(rows, self.layout, self.n_layers, self.H)

    @staticmethod
    def _ln(x: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.addcmul(wb[1], F.layer_norm(x, x.shape[-1:]), wb[0])   # as bucket_losses

    def _heads(self, y: torch.Tensor, n: int, parts: int) -> list[torch.Tensor]:
        """(k, n*T, parts*d) -> parts x (k*n, H, T, dh)."""
        y = y.view(self.k * n, -1, parts, self.H, self.dh)
        return [y[:, :, j].transpose(1, 2) for j in range(parts)]

    def _rest(self, x: torch.Tensor, y: torch.Tensor, blk: dict) -> torch.Tensor:
        """The block after attention: y (k*n, H, T, dh) through out_proj into x (k, n*T, d), then the MLP."""
        x = x + torch.bmm(y.transpose(1, 2).reshape(self.k, -1, self.d), blk["out"])
        h = F.gelu(torch.baddbmm(blk["fc"][1], self._ln(x, blk["ln2"]), blk["fc"][0]))
        return x + torch.baddbmm(blk["proj"][1], h, blk["proj"][0])

    def _next(self, x: torch.Tensor) -> torch.Tensor:   # (k, n, d) at the last positions -> (k, n) tokens
        return torch.bmm(self._ln(x, self.lnf), self.head).argmax(-1)

    def kv_step(self, cache: list[tuple[torch.Tensor, torch.Tensor]], t0: int, tok: torch.Tensor) -> torch.Tensor:
        """tok (k, n) at position t0 -> (k, n) next tokens, its keys and values added to `cache`."""
        n = tok.size(1)
        x = (F.embedding(tok + self.offset[:, :, 0], self.emb) + self.pos[:, 0, t0:t0 + 1])   # (k, n, d)
        for blk, (kc, vc) in zip(self.blocks, cache):
            q, k, v = self._heads(torch.bmm(self._ln(x, blk["ln1"]), blk["qkv"]), n, 3)
            kc[:, :, t0:t0 + 1], vc[:, :, t0:t0 + 1] = k, v
            x = self._rest(x, F.scaled_dot_product_attention(q, kc[:, :, :t0 + 1], vc[:, :, :t0 + 1],
                                                              scale=self.scale), blk)
        return self._next(x)

    def window_step(self, win: torch.Tensor, members: torch.Tensor | slice | None = None) -> torch.Tensor:
        """(k', u, w) windows -> (k', u) next tokens, for every member or for `members`: every layer
        over the window, the last one's query (and all after it) at the last position only."""
        if members is not None:
            return self.sub(members).window_step(win)
        k, u, w = win.shape
        x = (F.embedding(win + self.offset, self.emb) + self.pos[:, :, :w]).view(k, u * w, self.d)
        for i, blk in enumerate(self.blocks):
            h = self._ln(x, blk["ln1"])
            if i < self.n_layers - 1:
                q, kk, v = self._heads(torch.bmm(h, blk["qkv"]), u, 3)
                x = self._rest(x, F.scaled_dot_product_attention(q, kk, v, is_causal=True, scale=self.scale), blk)
            else:
                kk, v = self._heads(torch.bmm(h, blk["kv"]), u, 2)
                last = x.view(k, u, w, self.d)[:, :, -1]
                q, = self._heads(torch.bmm(h.view(k, u, w, self.d)[:, :, -1], blk["q"]), u, 1)
                x = self._rest(last, F.scaled_dot_product_attention(q, kk, v, scale=self.scale), blk)
        return self._next(x)


@torch.inference_mode()
def member_sequences(state: BucketState, starts: Sequence[np.ndarray], lengths: Sequence[int],
                     memo: bool = True) -> list[np.ndarray]:
    """Member i's greedy sequences (len(starts[i]), lengths[i]) from its starts, all members generated
    together on the bucket's device (window state.cfg.w); brought to the host once, at the end."""
    if len(starts) != state.k or len(lengths) != state.k:
        raise ValueError(f"member_sequences: {len(starts)} start lists, {len(lengths)} lengths for "
                         f"{state.k} members")
    cfg = state.cfg
    window, dev, k = cfg.w, state.device, state.k
    L, B = max(lengths), max(len(s) for s in starts)
    if B == 0:
        return [np.empty((0, n), dtype=np.int64) for n in lengths]
    # a member with fewer starts repeats its first one (no start at all: vertex 0); the rows are dropped below
    pad = np.zeros((k, B), dtype=np.int64)
    for i, s in enumerate(starts):
        pad[i] = s[0] if len(s) else 0
        pad[i, :len(s)] = s
    seq = torch.empty(k, B, L, dtype=torch.long, device=dev)
    seq[:, :, 0] = torch.as_tensor(pad, device=dev)
    net = _Stacked(state.rows.detach(), state.layout, cfg.model.n_layers, cfg.model.n_heads)
    table = WindowMemo(seq, window, net.V, net.d) if memo and L > window + 1 else None
    fill = min(window, L)
    per_row = k * net.n_layers * 2 * fill * net.d * net.emb.element_size()
    chunk = max(1, CACHE_BYTES[dev.type != "cpu"] // per_row)

    def kv_chunks():
        for b0 in range(0, B, chunk):
            b = min(B, b0 + chunk) - b0
            cache = [tuple(torch.empty(k * b, net.H, fill, net.dh, dtype=net.emb.dtype, device=dev)
                           for _ in range(2)) for _ in range(net.n_layers)]
            pos = iter(range(fill))   # decode feeds positions 0, 1, ... in order
            yield slice(b0, b0 + b), lambda tok, cache=cache, pos=pos: net.kv_step(cache, next(pos), tok)

    decode(seq, window, kv_chunks(), in_passes(net.window_step, pass_tokens(net.d, dev)), table)
    host = seq.cpu().numpy()   # the one copy to the host
    return [host[i, :len(s), :n] for i, (s, n) in enumerate(zip(starts, lengths))]


def gate_members(state: BucketState, gates: Sequence[Gate], memo: bool = True) -> list[GateCounts]:
    """Each member's gate counts (gates[i] is state.members[i]'s, unsharded), from one batched generation:
    member i's equal `gates[i].evaluate(state.model_of(i))` on the same weights (up to batched rounding:
    an ulp can flip a near-tied argmax; benchmarks/gate.py counts how often)."""
    if len(gates) != state.k:
        raise ValueError(f"gate_members: {len(gates)} gates for {state.k} members")
    if any(g.cfg.w != state.cfg.w for g in gates):
        raise ValueError(f"gate_members: every gate must use the bucket's window w={state.cfg.w}")
    seqs = member_sequences(state, [g.starts for g in gates], [g.cfg.corpus.walk_length for g in gates], memo)
    return [g.count(s) for g, s in zip(gates, seqs)]   # as Gate.evaluate counts a solo run's
