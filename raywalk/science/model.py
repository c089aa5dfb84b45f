"""A small pre-norm GPT over vertex ids.

Kept deliberately plain so later phases can read it: Q, K, V and the output
projection are separate bias-free linear maps (so the per-head QKᵀ and OV maps
are matrices, not affine maps), and `attention_internals` runs the forward pass
with the attention computed explicitly, returning what the fused SDPA kernel
never materialises.

Weight convention (row vectors, as the code computes them): nn.Linear stores
its weight as (out, in) and computes x @ weight.T, so for head h with columns
hs = h*d_head:(h+1)*d_head

    W_Q^h = q_proj.weight[hs].T     (d_model, d_head), likewise W_K^h, W_V^h
    W_O^h = out_proj.weight[:, hs].T (d_head, d_model)
    q^h = x W_Q^h,   scores^h = x W_Q^h W_K^hᵀ xᵀ · (1/√d_head)   (x = ln_1 of the residual stream)
    attention output = Σ_h weights^h x W_V^h W_O^h

`qk_circuits()` returns W_Q^h W_K^hᵀ and `ov_circuits()` returns W_V^h W_O^h,
both (n_layers, n_heads, d_model, d_model) in this row-vector convention.

Scores are scaled by multiplying with 1/√d_head (not dividing by √d_head), on the
explicit path and in SDPA (its `scale=`): that is what the study's reference model
does, and the two differ by an ulp wherever √d_head is not a power of two
(d_head 32, 128), which would break bit-identity of exported models.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ALLOWED_HEADS = (1, 2, 4)


class KVCache:
    """Preallocated keys/values for every layer, for decoding one token at a time.

    Only valid while the whole sequence fits the context: positions are
    absolute from 0, so once a window slides every key changes.
    """

    def __init__(self, model: "GPT", batch: int, max_len: int, dtype=torch.float32, device=None):
        shape = (batch, model.n_heads, max_len, model.d_model // model.n_heads)
        device = device if device is not None else next(model.parameters()).device
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in model.blocks]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in model.blocks]
        self.len = 0  # tokens already cached


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        # no bias: the per-head QKᵀ and OV maps stay linear (the study's reference model has none)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.resid_drop = nn.Dropout(dropout)

    def _heads(self, x):  # (B, T, C) -> (B, H, T, C/H)
        B, T, C = x.shape
        return x.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)

    def forward(self, x, kv=None, last_only=False, internals: list | None = None):
        # last_only: only the final query is needed (next-token decoding), keys/values still cover all of x
        # internals: a list to append this layer's q, k, v, scores, weights to (full causal pass only)
        q = self._heads(self.q_proj(x[:, -1:] if last_only else x))
        k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if kv is not None:  # write new keys/values at their positions, attend over everything cached
            kbuf, vbuf, t0 = kv
            T = x.size(1)
            assert t0 == 0 or q.size(2) == 1, "cache extension is one token at a time"
            kbuf[:, :, t0:t0 + T], vbuf[:, :, t0:t0 + T] = k, v
            k, v = kbuf[:, :, :t0 + T], vbuf[:, :, :t0 + T]
        # a single query sees every key; otherwise queries and keys are aligned and the mask is causal
        p = self.dropout if self.training else 0.0
        if internals is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=q.size(2) > 1, dropout_p=p,
                                               scale=1.0 / math.sqrt(q.size(-1)))
        else:
            if kv is not None or last_only:
                raise ValueError("attention internals need the full causal pass (no cache, every query)")
            y = self._explicit(x, q, k, v, p, internals)
        y = y.transpose(1, 2).reshape(y.size(0), y.size(2), -1)
        return self.resid_drop(self.out_proj(y))

    @staticmethod
    def _explicit(x, q, k, v, p, internals):
        """What SDPA computes, step by step, keeping every intermediate."""
        qkt = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))   # multiply: see the module doc
        T = q.size(2)
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = qkt.masked_fill(future, float("-inf"))   # the softmax input
        weights = scores.softmax(-1)
        internals.append({"x": x, "q": q, "k": k, "v": v, "scores": scores, "weights": weights,
                          "qkt_svd": qkt.masked_fill(future, 0.0)})
        return F.dropout(weights, p, training=p > 0) @ v


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x, kv=None, last_only=False, internals: list | None = None):
        a = self.attn(self.ln_1(x), kv, last_only, internals)
        x = (x[:, -1:] if last_only else x) + a
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, d_model: int = 128, n_layers: int = 4,
                 n_heads: int = 1, dropout: float = 0.0):
        super().__init__()
        if n_heads not in ALLOWED_HEADS or d_model % n_heads:
            raise ValueError(f"n_heads must be one of {ALLOWED_HEADS} and divide d_model={d_model}; "
                             f"got n_heads={n_heads}")
        self.vocab_size, self.block_size = vocab_size, block_size
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)  # untied from tok_emb

        # GPT-2 init; the two projections that add into the residual stream are shrunk
        # so the stream's variance does not grow with depth
        self.apply(self._init)
        for b in self.blocks:
            for p in (b.attn.out_proj.weight, b.mlp[2].weight):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layers))

    @classmethod
    def from_config(cls, cfg) -> "GPT":
        """The model a raywalk Config describes (vocabulary n, context w)."""
        m = cfg.model
        return cls(cfg.graph.n, cfg.w, m.d_model, m.n_layers, m.n_heads, m.dropout)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _embed(self, idx, t0=0):
        T = idx.size(1)
        if t0 + T > self.block_size:
            raise ValueError(f"sequence of length {t0 + T} exceeds block_size={self.block_size}")
        pos = torch.arange(t0, t0 + T, device=idx.device)
        return self.drop(self.tok_emb(idx) + self.pos_emb(pos))

    def forward(self, idx, targets=None, internals: list | None = None):
        """idx (B, T) -> logits (B, T, V), and the mean next-token cross-entropy if targets given.

        With `internals` (a list), the attention is computed explicitly instead of by the fused
        kernel and each layer appends its dict (see `attention_internals`); the output is the same.
        """
        x = self._embed(idx)
        for b in self.blocks:
            x = b(x, internals=internals)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            # = F.cross_entropy (to float tolerance) from ops none of which is on torch's list of ops
            # that raise under run.deterministic on CUDA; NLLLoss is (tests/test_determinism.py)
            logp = F.log_softmax(logits.flatten(0, 1).float(), dim=-1)
            loss = -logp.gather(1, targets.reshape(-1, 1)).mean()
        return logits, loss

    def next_logits(self, idx, kv: KVCache | None = None):
        """(B, V) logits for the token after idx, skipping all work the last position does not need.

        With a cache, idx holds only the new tokens and their positions continue at kv.len.
        """
        t0 = kv.len if kv is not None else 0
        x = self._embed(idx, t0)
        for i, b in enumerate(self.blocks):
            x = b(x, None if kv is None else (kv.k[i], kv.v[i], t0), last_only=i == self.n_layers - 1)
        if kv is not None:
            kv.len += idx.size(1)
        x = x[:, -1].to(self.head.weight.dtype)  # the head may be kept in fp32 under a bf16 body
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def attention_internals(self, idx) -> list[dict[str, torch.Tensor]]:
        """One dict per layer from a forward pass over idx (B, T), T <= block_size:

        q, k, v   (B, H, T, d_head)  the heads of x W_Q, x W_K, x W_V
        scores    (B, H, T, T)       q·kᵀ/√d_head, future positions -inf: the softmax input
        qkt_svd   (B, H, T, T)       q·kᵀ/√d_head, future positions ZERO: the study's SVD target
                                     (the reference's `qkt`); never feed `scores` to an SVD, the
                                     -inf entries shift stable rank by 0.7-2.2
        weights   (B, H, T, T)       softmax(scores): the attention the forward pass applies
        x         (B, T, d_model)    the layer's ln_1 output, which the projections read

        Computed by the forward pass itself (`forward(idx, internals=[])`, which gives the
        same logits); under no_grad: call that directly for gradients. Dropout is applied
        only in training mode, so call this on a model in eval mode for clean maps.
        """
        internals: list[dict[str, torch.Tensor]] = []
        self(idx, internals=internals)
        return internals

    def attention_maps(self, idx):
        """Per layer (B, H, T, T) attention weights for idx (rows sum to 1, zero above the diagonal)."""
        return [d["weights"] for d in self.attention_internals(idx)]

    def _head_slices(self):
        dh = self.d_model // self.n_heads
        return [slice(h * dh, (h + 1) * dh) for h in range(self.n_heads)]

    @torch.no_grad()
    def qk_circuits(self) -> torch.Tensor:
        """(n_layers, n_heads, d_model, d_model): W_Q^h W_K^hᵀ, so scores^h = x QK^h xᵀ / √d_head."""
        return torch.stack([torch.stack([b.attn.q_proj.weight[hs].T @ b.attn.k_proj.weight[hs]
                                         for hs in self._head_slices()]) for b in self.blocks])

    @torch.no_grad()
    def ov_circuits(self) -> torch.Tensor:
        """(n_layers, n_heads, d_model, d_model): W_V^h W_O^h, so attention out = Σ_h weights^h x OV^h."""
        return torch.stack([torch.stack([b.attn.v_proj.weight[hs].T @ b.attn.out_proj.weight[:, hs].T
                                         for hs in self._head_slices()]) for b in self.blocks])
