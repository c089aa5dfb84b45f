"""The SPEC §3 transformer: a small pre-norm GPT over vertex ids.

Kept deliberately plain so later phases can read it: Q, K and V are separate
projections, and `attention_maps` recomputes the softmax weights that the fused
SDPA kernel uses but never materialises.
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

    def __init__(self, model: "GPT", batch: int, max_len: int, dtype=torch.float32):
        shape = (batch, model.n_heads, max_len, model.d_model // model.n_heads)
        self.k = [torch.empty(shape, dtype=dtype) for _ in model.blocks]
        self.v = [torch.empty(shape, dtype=dtype) for _ in model.blocks]
        self.len = 0  # tokens already cached


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def _heads(self, x):  # (B, T, C) -> (B, H, T, C/H)
        B, T, C = x.shape
        return x.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)

    def forward(self, x, kv=None, last_only=False):
        # last_only: only the final query is needed (next-token decoding), keys/values still cover all of x
        q = self._heads(self.q_proj(x[:, -1:] if last_only else x))
        k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if kv is not None:  # write new keys/values at their positions, attend over everything cached
            kbuf, vbuf, t0 = kv
            T = x.size(1)
            assert t0 == 0 or q.size(2) == 1, "cache extension is one token at a time"
            kbuf[:, :, t0:t0 + T], vbuf[:, :, t0:t0 + T] = k, v
            k, v = kbuf[:, :, :t0 + T], vbuf[:, :, :t0 + T]
        # a single query sees every key; otherwise queries and keys are aligned and the mask is causal
        y = F.scaled_dot_product_attention(q, k, v, is_causal=q.size(2) > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(y.size(0), y.size(2), -1)
        return self.resid_drop(self.out_proj(y))

    def weights(self, x):
        """(B, H, T, T) causal softmax weights, computed the way SDPA does it."""
        q, k = self._heads(self.q_proj(x)), self._heads(self.k_proj(x))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        T = x.size(1)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        return att.masked_fill(mask, float("-inf")).softmax(-1)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

    def forward(self, x, kv=None, last_only=False):
        a = self.attn(self.ln_1(x), kv, last_only)
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

    def forward(self, idx, targets=None):
        """idx (B, T) -> logits (B, T, V), and the mean next-token cross-entropy if targets given."""
        x = self._embed(idx)
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
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

    def attention_maps(self, idx):
        """Per layer (B, H, T, T) attention weights for idx (rows sum to 1, zero above the diagonal)."""
        maps, x = [], self._embed(idx)
        for b in self.blocks:
            maps.append(b.attn.weights(b.ln_1(x)))
            x = b(x)
        return maps
