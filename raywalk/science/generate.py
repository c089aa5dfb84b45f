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
The windows seen are remembered on the host (bytes keys, a sync per token) or, with
on_device and for a bucket's members generated together (science/bucket_gate.py),
on the device (WindowMemo, driven by `decode`).
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


_NO_KEY = torch.iinfo(torch.int64).max   # above every real key (those stay below 2**62)


def _wrap(v: int) -> int:
    """v mod 2**64 as a signed int64 (what int64 tensor arithmetic wraps to)."""
    v %= 1 << 64
    return v - (1 << 64) if v >= 1 << 63 else v


class WindowMemo:
    """Windows already decoded -> their next token, on the device, for k models at once (model i's
    rows are seq[i]): the job of a dict keyed by window bytes, without a Python key per row.

    A key is a random rolling hash of the window's tokens in its low bits and the model's index in
    its high bits; a key found in the table is confirmed against the window itself (the table points
    at where that window sits in `seq`, which is never rewritten), so a hash collision costs a
    recomputation, never a wrong token.

    A row whose window was found is from then on a copy of the walk it was found in, shifted:
    that walk went on from the same window, so its tokens are this row's next ones, and they are
    already there (it is at least a step ahead). Such a row follows a pointer instead of being
    looked up; once every row does, a step is one gather and no host sync.
    """

    def __init__(self, seq: torch.Tensor, window: int, vocab: int, width: int = 1):
        k, self.B, self.L = seq.shape
        dev = seq.device
        g = torch.Generator(device="cpu").manual_seed(20261)   # its own stream: the run's RNG is untouched
        self.tok_hash = torch.randint(-2**62, 2**62, (vocab,), generator=g, dtype=torch.int64, device="cpu").to(dev)
        P = int(torch.randint(1, 2**62, (1,), generator=g, dtype=torch.int64, device="cpu")) | 1
        self.P, self.P_w = _wrap(P), _wrap(pow(P, window, 1 << 64))
        self.pows = torch.tensor([_wrap(pow(P, window - 1 - j, 1 << 64)) for j in range(window)],
                                 dtype=torch.int64, device=dev)
        bits = max(1, (k - 1).bit_length())
        self.low = (1 << (62 - bits)) - 1
        self.model_bits = torch.arange(k, device=dev).view(k, 1) << (62 - bits)
        self.model = torch.arange(k, device=dev).view(k, 1)
        self.seq, self.window = seq, window
        self.keys = self.next = self.src = torch.empty(0, dtype=torch.int64, device=dev)
        self.ar_w = torch.arange(window, device=dev)
        self.sync_free = dev.type == "cpu"   # an extra look at the host costs nothing there
        # padded passes (see _compute) below this much work (tokens x width: d_model): a CPU's time follows
        # the work from about there (measured), a GPU's the launches until passes are large (not measured)
        self.width, self.pad_below = width, (1 << 16) if self.sync_free else (1 << 27)
        self.repack_below = 0.7   # repack only when that leaves at most this share of the padded work
        self.h, self.t = None, -1            # the last step's rolling hashes, and its t
        self.follow = torch.zeros(k, self.B, dtype=torch.bool, device=dev)   # rows copying an earlier walk
        self.at = torch.zeros(k, self.B, dtype=torch.long, device=dev)       # where: its window's start in seq
        self.all_follow = False

    def _hash(self, win: torch.Tensor, t: int) -> torch.Tensor:
        # sum_j R[x_j] P^(w-1-j) in wrapping int64: equal windows, equal hashes, whatever the path
        if self.t == t - 1:
            x_out, x_in = self.seq[:, :, t - 1 - self.window], win[:, :, -1]
            h = self.h * self.P - torch.take(self.tok_hash, x_out) * self.P_w + torch.take(self.tok_hash, x_in)
        else:
            h = (torch.take(self.tok_hash, win) * self.pows).sum(-1)
        self.h, self.t = h, t
        return (h & self.low) | self.model_bits

    def next_tokens(self, win: torch.Tensor, t: int, win_next) -> torch.Tensor:
        """(k, B, window) windows (seq[:, :, t - window:t]) -> (k, B) next tokens; computes only the
        windows not in the table, each once, and adds them. At most one host sync (how many to compute)."""
        k, b, w = win.shape
        dev = win.device
        if self.all_follow:
            self.at += 1
            return torch.take(self.seq, self.at - 1 + w)
        h = self._hash(win, t)
        known, tok = self.follow, torch.take(self.seq, self.at + w)   # tok: right where known
        M = self.keys.numel()
        if M:
            idx = torch.searchsorted(self.keys, h.view(-1)).clamp_(max=M - 1).view(k, b)
            found, src = torch.take(self.keys, idx), torch.take(self.src, idx)
            stored = torch.take(self.seq, src[..., None] + self.ar_w)
            hit = ~known & (found == h) & (stored == win).all(-1)
            tok = torch.where(hit, torch.take(self.next, idx), tok)
            self.at = torch.where(hit, src, self.at)
            known = known | hit
        self.follow = known
        self.at += 1   # the next step's windows start one token on
        if self.sync_free and bool(known.all()):   # a look at the host that costs nothing here
            self.all_follow = True
            return tok
        key = torch.where(known, _NO_KEY, h)
        # the misses, grouped by key within each model: one window per group is computed
        key, perm = key.sort(dim=1)
        miss = key != _NO_KEY
        first = miss.clone()
        same_key = key[:, 1:] == key[:, :-1]
        first[:, 1:] &= ~same_key
        ws = win.gather(1, perm[..., None].expand(-1, -1, w))   # the windows in sorted order
        # a group's windows must all be equal (else two windows share a key: never seen)
        mixed = (same_key & miss[:, 1:] & (ws[:, 1:] != ws[:, :-1]).any(-1)).any()
        count = first.sum(1)
        got = torch.cat([count, mixed.view(1)]).tolist()                    # the step's one host sync
        if got[k]:   # compute every unknown row and remember none
            return torch.where(known, tok, win_next(win))
        U = max(got[:k])
        if U == 0:   # every row known: from now on all follow
            self.all_follow = True
            return tok
        slot = first.cumsum(1) - 1                                          # a sorted row's group
        at = torch.where(first, slot, U)   # firsts to their group's column, the rest to a spare one
        reps = torch.zeros(k, U + 1, dtype=torch.long, device=dev).scatter_(1, at, perm)[:, :U]
        groups = ws.new_zeros(k, U + 1, w).scatter_(1, at[..., None].expand(-1, -1, w), ws)[:, :U]
        fresh = self._compute(groups, got[:k], win_next)
        out = torch.empty_like(h).scatter_(1, perm, fresh.gather(1, slot.clamp_(0, U - 1)))
        # the table gains each group's window (models with fewer groups pad: key _NO_KEY, sorted last, cut)
        valid = torch.arange(U, device=dev) < count[:, None]
        src = (self.model * self.B + reps) * self.L + (t - w)
        self._insert(torch.where(valid, h.gather(1, reps), _NO_KEY), fresh, src, sum(got[:k]))
        return torch.where(known, tok, out)

    def _compute(self, groups: torch.Tensor, counts: list[int], win_next) -> torch.Tensor:
        """Next tokens (k, U) of the (k, U, w) group windows, of which model i has counts[i] (the rest pad).

        One pass over every model's padded groups, while that work is small (launches or per-op costs
        dominate). Past that, padding to the largest count wastes work when counts differ: a CPU then
        runs each model's own groups (its weights are views), a GPU repacks the groups into equal slots
        (a model with more groups takes several, its weights gathered once per slot) when that saves
        at least 30%."""
        k, U, w = groups.shape
        if k == 1 or k * U * w * self.width < self.pad_below:
            return win_next(groups)
        fresh = torch.zeros(k, U + 1, dtype=torch.long, device=groups.device)   # column U: padding
        if self.sync_free:
            for m, c in enumerate(counts):
                if c:
                    fresh[m:m + 1, :c] = win_next(groups[m:m + 1, :c], slice(m, m + 1))
            return fresh[:, :U]
        u = -(-sum(counts) // sum(1 for c in counts if c))   # the mean count over models with any
        plan = [(m, s, counts[m]) for m, c in enumerate(counts) for s in range(0, c, u)]
        if len(plan) * u > self.repack_below * k * U:
            return win_next(groups)
        dev = groups.device
        m, s, c = (torch.tensor(v, dtype=torch.long, device=dev) for v in zip(*plan))
        col = s[:, None] + torch.arange(u, device=dev)                  # (slots, u): a slot's groups
        got = win_next(groups[m[:, None], torch.minimum(col, c[:, None] - 1)], m)
        fresh[m[:, None].expand(-1, u), torch.where(col < c[:, None], col, U)] = got
        return fresh[:, :U]

    def _insert(self, keys: torch.Tensor, nxt: torch.Tensor, src: torch.Tensor, n: int) -> None:
        """Add the n lowest keys (the real ones) to the table: a merge of two sorted runs, not a sort."""
        keys, order = keys.view(-1).sort()
        order = order[:n]
        keys, nxt, src = keys[:n], nxt.reshape(-1)[order], src.reshape(-1)[order]
        M = self.keys.numel()
        if M == 0:
            self.keys, self.next, self.src = keys, nxt, src
            return
        dev = keys.device
        at_old = torch.arange(M, device=dev) + torch.searchsorted(keys, self.keys)
        at_new = torch.arange(n, device=dev) + torch.searchsorted(self.keys, keys, right=True)
        merged = []
        for old, new in ((self.keys, keys), (self.next, nxt), (self.src, src)):
            o = torch.empty(M + n, dtype=torch.int64, device=dev)
            o[at_old], o[at_new] = old, new
            merged.append(o)
        self.keys, self.next, self.src = merged


def pass_tokens(d_model: int, device: torch.device) -> int:
    """Tokens per window pass: on a CPU, what keeps the MLP's hidden activations (4 d fp32 a token) near
    2 MB, in cache (measured: the anchor's 320-window pass 35% faster in 1,024-token pieces); elsewhere
    a bound on memory."""
    return max(1, (2 << 20) // (16 * d_model)) if device.type == "cpu" else 1 << 20


def in_passes(win_next, tokens: int):
    """win_next(win, models) over (k, u, w) windows in pieces of at most `tokens` tokens (one window at least)."""
    def run(win: torch.Tensor, models: torch.Tensor | slice | None = None) -> torch.Tensor:
        k, u, w = win.shape
        step = max(1, tokens // (k * w))
        if u <= step:
            return win_next(win, models)
        return torch.cat([win_next(win[:, i:i + step], models) for i in range(0, u, step)], 1)
    return run


def decode(seq: torch.Tensor, window: int, kv_chunks, win_next, memo: WindowMemo | None) -> None:
    """Fill seq[:, :, 1:] (k models' greedy walks, column 0 the starts) in place, on seq's device.

    kv_chunks: (rows, kv_next) pairs covering seq's rows; kv_next(tok (k, b)) -> (k, b) feeds the tokens
    at positions 0, 1, ... (in order) through its own KV cache while t <= window. After that every
    position slides: win_next(win (k', u, window), models) -> (k', u), the tokens after whole windows,
    of all k models in order (models None) or of the models named (a (k',) index or a slice); all rows
    together (the caches are gone by then). With a memo, at most one host sync per step after the
    window fills (see WindowMemo); without, none at all.
    """
    L = seq.size(2)
    for rows, kv_next in kv_chunks:   # nothing has slid yet: one token at a time through a cache
        for t in range(1, min(window, L - 1) + 1):
            seq[:, rows, t] = kv_next(seq[:, rows, t - 1])
    for t in range(window + 1, L):
        win = seq[:, :, t - window:t]
        seq[:, :, t] = win_next(win) if memo is None else memo.next_tokens(win, t, win_next)


def _host_chunk(net, starts, length, window, memo, dtype, per_pass):
    """Sequences for one chunk of starts, kept on the host: memo maps window bytes -> next token, shared
    across chunks (device="cpu" on purpose: the keys are bytes); only the model's inputs go to its device,
    only argmaxes come back (a sync per token)."""
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
            new = win[rows].to(device)
            nxt = torch.cat([net.next_logits(new[i:i + per_pass]).argmax(-1) for i in range(0, len(rows), per_pass)])
            memo.update(zip(todo.keys(), nxt.tolist()))
        seq[:, t] = torch.tensor([memo[k] for k in keys], dtype=torch.long, device="cpu")
    return seq


@torch.inference_mode()
def greedy_generate(model: GPT, starts, length: int, window: int, batch_size: int = 512,
                    dtype: torch.dtype = torch.float32, on_device: bool = False):
    """(N,) start tokens -> (N, length) greedy sequences (CPU), token for token those of reference_generate.

    Every start is generated as given: a caller with repeated starts passes the distinct ones
    (as the Gate does) and repeats the sequences itself.

    The sequences are kept on the host (a bytes-keyed memo, a sync per token), or with on_device
    on the model's device until the end (WindowMemo, at most one sync per token once the window
    slides): on a CPU the host memo measured faster (benchmarks/gate.py); benchmarks/gpu.py times both.

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
    device = next(net.parameters()).device
    N = starts.numel()
    if N == 0:
        model.train(was_training)
        return torch.empty(0, length, dtype=torch.long, device="cpu")
    if not on_device:
        memo: dict = {}
        per_pass = max(1, pass_tokens(net.d_model, device) // window)   # windows
        parts = [_host_chunk(net, c, length, window, memo, dtype, per_pass)
                 for c in starts.long().cpu().split(batch_size)]
        model.train(was_training)
        return torch.cat(parts)
    seq = torch.empty(1, N, length, dtype=torch.long, device=device)
    seq[0, :, 0] = starts.long().to(device)
    table = WindowMemo(seq, window, net.vocab_size, net.d_model) if length > window + 1 else None

    def kv_chunks():
        for b0 in range(0, N, batch_size):
            kv = KVCache(net, min(N, b0 + batch_size) - b0, min(window, length), dtype, device)
            yield slice(b0, b0 + batch_size), \
                lambda tok, kv=kv: net.next_logits(tok.reshape(-1, 1), kv).argmax(-1).view(1, -1)

    win_next = in_passes(lambda win, _=None: net.next_logits(win.reshape(-1, window)).argmax(-1).view(1, -1),
                         pass_tokens(net.d_model, device))
    decode(seq, window, kv_chunks(), win_next, table)
    model.train(was_training)
    return seq[0].cpu()
