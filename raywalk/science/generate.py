"""Greedy generation for the sufficiency gate.

Semantics: each sequence starts from its start token; every next token is the
argmax of the model over the last `window` tokens, positions counted from 0
inside the window. `reference_generate` is that, literally. `greedy_generate`
returns the same tokens faster, using three facts:
  * the next token is a pure function of the current window, so a window
    seen before (another sequence, or the same one going round a cycle) has
    a known successor (equal starts give equal sequences: the gate generates
    each distinct start once, science/gate.py);
  * while the sequence still fits the window nothing slides, so a KV cache is
    exact; after that every position moves and the window is recomputed;
  * only the last position's logits are needed.
"""
import copy

import torch

from raywalk.science.model import GPT, KVCache


def _check(model, starts, length, window):
    if starts.dim() != 1:
        raise ValueError(f"starts must be 1-D, got shape {tuple(starts.shape)}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if not 1 <= window <= model.block_size:
        raise ValueError(f"window must be in [1, block_size={model.block_size}], got {window}")


@torch.inference_mode()
def reference_generate(model: GPT, starts, length: int, window: int, batch_size: int = 512):
    """The straightforward loop: full forward over the window for every token, no reuse at all.

    Runs on the model's device; returns a CPU tensor.
    """
    _check(model, starts, length, window)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for chunk in starts.long().split(batch_size):
        seq = chunk[:, None].to(device)
        while seq.size(1) < length:
            logits, _ = model(seq[:, -window:])
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        out.append(seq.cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, length, dtype=torch.long, device="cpu")


def _generate_chunk(net, starts, length, window, memo, dtype):
    """Sequences for one chunk of starts; memo maps window bytes -> next token, shared across chunks.

    The sequences and the memo are host-side bookkeeping (device="cpu" on purpose: the memo
    keys are bytes); only the model's inputs go to its device, and only argmaxes come back.
    """
    device = next(net.parameters()).device
    B = starts.numel()
    seq = torch.empty(B, length, dtype=torch.long, device="cpu")
    seq[:, 0] = starts.cpu()
    kv = KVCache(net, B, min(window, length), dtype, device)
    for t in range(1, length):  # predict token t from seq[:, max(0, t - window):t]
        if t <= window:  # nothing has slid yet: feed one token through the cache
            seq[:, t] = net.next_logits(seq[:, t - 1:t].to(device), kv).argmax(-1).cpu()
            continue
        win = seq[:, t - window:t]
        keys = [r.tobytes() for r in win.to(torch.int32).numpy()]
        todo = {}  # unseen window -> first row holding it
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
def greedy_generate(model: GPT, starts, length: int, window: int, batch_size: int = 512,
                    dtype: torch.dtype = torch.float32):
    """(N,) start tokens -> (N, length) greedy sequences (CPU), token for token those of reference_generate.

    Every start is generated as given: a caller with repeated starts passes the distinct ones
    (as the Gate does) and repeats the sequences itself.

    dtype=torch.bfloat16 runs the transformer body in bf16 (head and final LayerNorm
    stay fp32): faster, but near-tied argmaxes may flip, so tokens can differ.
    """
    _check(model, starts, length, window)
    net = model
    if dtype != torch.float32:
        net = copy.deepcopy(model).to(dtype)
        net.ln_f.float(), net.head.float()
    was_training = model.training
    net.eval()
    memo = {}
    parts = [_generate_chunk(net, c, length, window, memo, dtype) for c in starts.long().cpu().split(batch_size)]
    model.train(was_training)
    if not parts:
        return torch.empty(0, length, dtype=torch.long, device="cpu")
    return torch.cat(parts)
