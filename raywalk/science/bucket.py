"""k same-shape experiments trained as one: their parameters stacked on a leading member dimension.

A bucket's members share the model shape and the schedule (`bucket_key`); the rest
is each member's own: initial weights from its seed, its windows and their order
per epoch, its loss (a step minimises the sum of the members' mean losses, so each
member's gradient is its own), its gradient-norm clipping and its gate.

Every member's parameters are one row of a single (k, N) leaf tensor, laid out as
its GPT's `parameters()` flattened in order. So one backward gives one (k, N)
gradient, one norm per row clips it per member, and one AdamW over the leaf
(elementwise: per member when all step together) does the work of k optimizers in
a handful of kernels. A row converts to and from today's solo checkpoint
(`TrainingState.state_dict`'s model, optimizer and scheduler entries), which is how
a member leaves the bucket, resumes in it, or goes on alone.

Chosen over `torch.func.vmap` + `functional_call` on stacked module state: per step
that runs one vmap-dispatched op per parameter for AdamW and clipping and pays
vmap's dispatch on every forward op; benchmarks/bucket.py prints both side by side.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from raywalk.config import Config, ConfigError
from raywalk.science.batches import ResidentWindows, epoch_permutation
from raywalk.science.gate import Gate, GateCounts
from raywalk.science.loop import (Curves, EpochEnd, EpochRun, Timing, compiled, epoch_seed, make_optimizer,
                                  rng_state, seed_all, set_rng_state, settle_epoch, sync)
from raywalk.science.model import GPT
from raywalk.science.schedule import make_scheduler

# What members of one bucket must share: the model's shape and everything that steps the optimizer.
# steps_per_epoch is the bucket's too, but it comes from the corpus, not the config: checked apart.
BUCKET_KEY = ("graph.n", "w", "model.d_model", "model.n_layers", "model.n_heads", "model.dropout",
              "train.batch_size", "train.lr", "train.weight_decay", "train.grad_clip", "train.warmup_frac",
              "train.min_lr_ratio", "train.max_epochs", "train.precision")


def key_value(cfg: Config, dotted: str) -> Any:
    v: Any = cfg
    for part in dotted.split("."):
        v = getattr(v, part)
    return v


def bucket_key(cfg: Config) -> tuple:
    return tuple(key_value(cfg, k) for k in BUCKET_KEY)


def differing(cfgs: Sequence[Config], keys: Sequence[str]) -> str | None:
    """The fields among `keys` on which cfgs disagree, each with its values ("k: [a, b]; ..."), or None."""
    diff = [k for k in keys if len({key_value(c, k) for c in cfgs}) > 1]
    return "; ".join(f"{k}: {sorted({key_value(c, k) for c in cfgs}, key=str)}" for k in diff) or None


def check_bucketable(cfgs: Sequence[Config]) -> None:
    """Refuse members that cannot share one batched step, naming the fields that differ and their values."""
    if not cfgs:
        raise ConfigError("bucket: no members")
    if cfgs[0].model.dropout != 0.0:
        # one dropout mask stream for k members would not be any member's own: such points train solo
        raise ConfigError(f"model.dropout: {cfgs[0].model.dropout} is invalid in a bucket: bucketed members "
                          f"train with dropout 0.0; use --bucket 1")
    shown = differing(cfgs, BUCKET_KEY)
    if shown:
        raise ConfigError(f"bucket: members differ in bucket-key field(s) {shown}: a bucket's members must "
                          f"share {', '.join(BUCKET_KEY)}")


# ---- one row per member ------------------------------------------------------------------

@dataclass(frozen=True)
class RowLayout:
    """Where each of a GPT's parameters sits in a member's row (its `parameters()` order)."""
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: GPT) -> "RowLayout":
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def width(self) -> int:
        return sum(self.sizes)

    def row(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in tensors])

    def split(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """(k, N) -> {name: (k, *shape)} views (through one split, so autograd sums them back in one cat)."""
        k = rows.size(0)
        return {n: p.view(k, *s) for n, s, p in zip(self.names, self.shapes, rows.split(self.sizes, dim=1))}

    def split_fused(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """As `split`, but each layer's adjacent q/k/v weights as one (k, 3d, d) view `...attn.qkv`:
        one batched GEMM for the three projections."""
        k, out, sizes, names = rows.size(0), {}, [], []
        for n, size in zip(self.names, self.sizes):
            if n.endswith(("attn.k_proj.weight", "attn.v_proj.weight")):
                sizes[-1] += size
            else:
                sizes.append(size)
                names.append(n.replace("q_proj.weight", "qkv") if n.endswith("attn.q_proj.weight") else n)
        shapes = dict(zip(self.names, self.shapes))
        for n, p in zip(names, rows.split(sizes, dim=1)):
            out[n] = p.view(k, -1, shapes[n.replace("qkv", "q_proj.weight")][1]) if n.endswith("qkv") \
                else p.view(k, *shapes[n])
        return out


def _ln(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(b.unsqueeze(1), F.layer_norm(x, x.shape[-1:]), w.unsqueeze(1))


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    wt = w.transpose(1, 2)
    return torch.bmm(x, wt) if b is None else torch.baddbmm(b.unsqueeze(1), x, wt)


def bucket_losses(p: dict[str, torch.Tensor], tok: torch.Tensor, n_layers: int, n_heads: int) -> torch.Tensor:
    """Each member's mean next-token loss (k,) on its (B, w+1) windows tok (k, B, w+1): GPT.forward, batched.

    p: RowLayout.split_fused's views of the rows."""
    k, B, T1 = tok.shape
    T = T1 - 1
    idx, targets = tok[:, :, :-1], tok[:, :, 1:]
    V, d = p["tok_emb.weight"].shape[1:]
    dh = d // n_heads
    x = F.embedding(idx + torch.arange(k, device=tok.device).view(k, 1, 1) * V, p["tok_emb.weight"].reshape(k * V, d))
    x = (x + p["pos_emb.weight"][:, None, :T]).view(k, B * T, d)
    for i in range(n_layers):
        a = f"blocks.{i}."
        h = _ln(x, p[a + "ln_1.weight"], p[a + "ln_1.bias"])
        qkv = _linear(h, p[a + "attn.qkv"]).view(k * B, T, 3, n_heads, dh)
        q, kk, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        y = F.scaled_dot_product_attention(q, kk, v, is_causal=True, scale=1.0 / math.sqrt(dh))
        x = x + _linear(y.transpose(1, 2).reshape(k, B * T, d), p[a + "attn.out_proj.weight"])
        h = F.gelu(_linear(_ln(x, p[a + "ln_2.weight"], p[a + "ln_2.bias"]), p[a + "mlp.0.weight"], p[a + "mlp.0.bias"]))
        x = x + _linear(h, p[a + "mlp.2.weight"], p[a + "mlp.2.bias"])
    logits = _linear(_ln(x, p["ln_f.weight"], p["ln_f.bias"]), p["head.weight"])
    # log_softmax + gather, as GPT.forward: no op that raises under deterministic CUDA
    logp = F.log_softmax(logits.float(), dim=-1)
    return -logp.gather(2, targets.reshape(k, B * T, 1)).view(k, B * T).mean(1)


def clip_rows_(grad: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Clip each member's gradient (a row) to global norm max_norm, as clip_grad_norm_ does one model's."""
    norms = torch.linalg.vector_norm(grad, dim=1)
    grad.mul_((max_norm / (norms + 1e-6)).clamp_(max=1.0).unsqueeze(1))
    return norms


# ---- a member's own record -------------------------------------------------------------------

@dataclass
class Member:
    """What one member carries that the stacked tensors do not: its config, progress and curves."""
    cfg: Config
    experiment_id: str = ""
    curves: Curves = field(default_factory=Curves)
    timing: Timing = field(default_factory=Timing)
    epoch: int = 0                            # epochs finished
    gate_epoch: int | None = None
    epoch_losses: torch.Tensor | None = None  # this epoch's losses so far (mid-epoch)
    data_path: str = "resident"

    @property
    def done(self) -> bool:
        return self.gate_epoch is not None or self.epoch >= self.cfg.train.max_epochs


class BucketState:
    """The stacked model rows, their one optimizer and scheduler, and each member's own record.

    `members` are the active ones, in row order; one that finishes leaves through `drop`.
    """

    def __init__(self, cfgs: Sequence[Config], steps_per_epoch: int, device: torch.device | str = "cpu",
                 experiment_ids: Sequence[str] | None = None):
        check_bucketable(cfgs)
        self.steps_per_epoch = steps_per_epoch
        rows, layout = [], None
        for c in cfgs:
            seed_all(c.seed)   # as TrainingState.create: the member's solo initial weights, bit for bit
            with torch.device("cpu"):
                m = GPT.from_config(c)
            layout = layout or RowLayout.of(m)
            rows.append(layout.row(m.parameters()))
        self.layout: RowLayout = layout
        self.step = 0   # steps of the members' current epoch done, as TrainingState.step (what step callbacks read)
        self.template = m.to(device)   # a GPT of the shape on the bucket's device: each member's gate runs in it
        self.members = [Member(c, eid) for c, eid in zip(cfgs, experiment_ids or [""] * len(cfgs))]
        # train.compile: the batched forward (and, through AOTAutograd, its backward) compiled; k changes recompile
        self._forward = compiled(self._losses, torch.device(device)) if cfgs[0].train.compile else self._losses
        self._build(torch.stack(rows).to(device))

    def _build(self, rows: torch.Tensor, opt_state: dict | None = None, group: dict | None = None,
               sched_state: dict | None = None) -> None:
        """Fresh leaf, optimizer and scheduler over `rows`; then the state to go on from, if any
        (`group`: the param group as saved, whose lr the next step uses)."""
        cfg = self.members[0].cfg
        self.rows = rows.detach().requires_grad_(True)
        self.optimizer = make_optimizer([self.rows], cfg, self.rows.device)
        self.scheduler = make_scheduler(self.optimizer, cfg.train.max_epochs * self.steps_per_epoch,
                                        cfg.train.warmup_frac, cfg.train.min_lr_ratio)
        if group is not None:
            self.optimizer.load_state_dict({"state": {0: opt_state} if opt_state else {},
                                            "param_groups": [{**group, "params": [0]}]})
        if sched_state is not None:
            self.scheduler.load_state_dict(sched_state)

    @property
    def k(self) -> int:
        return len(self.members)

    @property
    def epoch(self) -> int:
        """Epochs every active member has finished (members step in lockstep)."""
        return self.members[0].epoch

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def cfg(self) -> Config:
        return self.members[0].cfg

    # ---- training ----

    def _losses(self, rows: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        return bucket_losses(self.layout.split_fused(rows), tok, cfg.model.n_layers, cfg.model.n_heads)

    def train_step(self, tok: torch.Tensor) -> torch.Tensor:
        """One optimizer step for every member on its batch tok[i]; the (k,) losses, detached, on the device."""
        cfg = self.cfg
        with torch.autocast(tok.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            losses = self._forward(self.rows, tok)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()   # member i's loss depends on row i alone: its gradient is its own
        clip_rows_(self.rows.grad, cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return losses.detach()

    def model_of(self, i: int, into: GPT | None = None) -> GPT:
        """Member i's weights in a GPT (the template, on the bucket's device, unless `into`), for its gate."""
        m = self.template if into is None else into
        with torch.no_grad():
            for p, v in zip(m.parameters(), self.layout.split(self.rows[i:i + 1].detach()).values()):
                p.copy_(v[0])
        return m.eval()

    # ---- a member as its solo checkpoint ----

    def member_state(self, i: int, step: int = 0) -> dict[str, Any]:
        """Member i in TrainingState.state_dict's format (world 1); `step` > 0: mid-epoch, with its losses."""
        m = self.members[i]
        row = lambda t: [v[0].clone().cpu() for v in self.layout.split(t[i:i + 1].detach()).values()]  # noqa: E731
        st = self.optimizer.state.get(self.rows, {})
        opt = self.optimizer.state_dict()
        group = {**opt["param_groups"][0], "params": list(range(len(self.layout.names)))}
        state = {}
        if st:
            for j, (a, b) in enumerate(zip(row(st["exp_avg"]), row(st["exp_avg_sq"]))):
                state[j] = {"step": st["step"].clone().cpu(), "exp_avg": a, "exp_avg_sq": b}
        # the RNG streams a solo run holds here: reseeded from (seed, epoch) at each epoch start, and
        # nothing draws from them while training (dropout 0) or gating (greedy)
        here = rng_state()
        seed_all(epoch_seed(m.cfg.seed, m.epoch if step else max(0, m.epoch - 1), 0))
        rng = rng_state()
        set_rng_state(here)
        return {"epoch": m.epoch, "gate_epoch": m.gate_epoch, "step": step,
                "epoch_losses": [m.epoch_losses[:step].cpu()] if step else None,
                "model": dict(zip(self.layout.names, row(self.rows))),
                "optimizer": {"state": state, "param_groups": [group]},
                "scheduler": self.scheduler.state_dict(), "rng": [rng],
                "curves": m.curves.state_dict(), "timing": m.timing.state_dict(), "data_path": m.data_path,
                "experiment_id": m.experiment_id}

    def load_members(self, states: Sequence[dict[str, Any]]) -> None:
        """Restore every active member from its solo checkpoint; all must stand at the same point."""
        points = {(int(s["epoch"]), int(s.get("step", 0))) for s in states}
        steps = {int(s["scheduler"]["last_epoch"]) for s in states}
        if len(states) != self.k or len(points) > 1 or len(steps) > 1:
            raise ValueError(f"a bucket resumes only from its members' checkpoints at one point; got {sorted(points)}")
        rows = torch.stack([self.layout.row(s["model"][n] for n in self.layout.names) for s in states])
        opt = None
        if all(s["optimizer"]["state"] for s in states):
            per = [s["optimizer"]["state"] for s in states]
            opt = {"step": per[0][0]["step"].clone(),
                   **{k: torch.stack([self.layout.row(p[j][k] for j in range(len(self.layout.names))) for p in per])
                      .to(self.device) for k in ("exp_avg", "exp_avg_sq")}}
        self._build(rows.to(self.device), opt, states[0]["optimizer"]["param_groups"][0], states[0]["scheduler"])
        for m, s in zip(self.members, states):
            m.curves.load_state_dict(s["curves"])
            m.epoch, m.gate_epoch = int(s["epoch"]), s["gate_epoch"]
            step = int(s.get("step", 0))
            m.epoch_losses = s["epoch_losses"][0].to(self.device) if step else None
            m.timing.load_state_dict(s.get("timing"), m.epoch)
            m.data_path = s.get("data_path") or "resident"

    def drop(self, leaving: Iterable[int]) -> list[Member]:
        """Members leave (their rows, optimizer state with them); the rest go on unchanged. Returns them."""
        gone = sorted(set(leaving))
        if not gone:
            return []
        keep = [i for i in range(self.k) if i not in gone]
        left = [self.members[i] for i in gone]
        self.members = [self.members[i] for i in keep]
        if keep:
            st = self.optimizer.state.get(self.rows, {})
            opt = {"step": st["step"], "exp_avg": st["exp_avg"][keep].clone(),
                   "exp_avg_sq": st["exp_avg_sq"][keep].clone()} if st else None
            self._build(self.rows.detach()[keep].clone(), opt, self.optimizer.state_dict()["param_groups"][0],
                        self.scheduler.state_dict())
        return left


# ---- data ---------------------------------------------------------------------------------

class BucketWindows:
    """Every member's resident windows in one tensor; a step's batch is each member's own solo batch, stacked."""
    CHUNK = ResidentWindows.CHUNK

    def __init__(self, members: Sequence[ResidentWindows]):
        if len({m.batch_size for m in members}) != 1 or len({m.windows.size(1) for m in members}) != 1:
            raise ValueError("bucket members need one batch size and one window width")
        self.seeds = [m.seed for m in members]
        self.counts = [len(m.windows) for m in members]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).tolist()
        self.batch_size = members[0].batch_size
        self.windows = torch.cat([m.windows for m in members])
        self.active = list(range(len(members)))

    def steps(self) -> int:
        return min(self.counts[i] for i in self.active) // self.batch_size

    def keep(self, rows: Sequence[int]) -> None:
        """Only these of the current rows go on (in this order)."""
        self.active = [self.active[r] for r in rows]

    def epoch(self, epoch: int, start: int = 0, steps: int | None = None) -> Iterator[torch.Tensor]:
        """(k, B, w+1) int64 batches of epoch `epoch`: member i's is its solo run's batch of that step."""
        steps = self.steps() if steps is None else steps
        B = self.batch_size
        idx = torch.stack([epoch_permutation(self.counts[i], self.seeds[i], epoch)[: steps * B].view(steps, B)
                           + self.offsets[i] for i in self.active], dim=1)   # (steps, k, B)
        idx = idx.to(self.windows.device, non_blocking=True)
        k, W = len(self.active), self.windows.size(1)
        for s0 in range(start, steps, self.CHUNK):
            rows = torch.index_select(self.windows, 0, idx[s0:s0 + self.CHUNK].reshape(-1))
            yield from rows.long().view(-1, k, B, W).unbind(0)


# ---- one epoch ----------------------------------------------------------------------------

def run_bucket_epoch(state: BucketState, batches: Iterable[torch.Tensor], step0: int = 0,
                     callbacks: Iterable = (), previous_end: float | None = None) -> EpochRun:
    """Train every active member through its next epoch from step `step0`; losses (steps, k) on the device.

    Mid-epoch (step0 > 0) each member's `epoch_losses` holds the steps already done. Callbacks get
    the state (state.step: steps done) before every step, as run_epoch's do. `previous_end`: when the
    last epoch's last step ended in this process (each member's seam).
    """
    steps = state.steps_per_epoch
    losses = torch.zeros(steps, state.k, dtype=torch.float64, device=state.device)
    if step0:
        losses[:step0] = torch.stack([m.epoch_losses[:step0] for m in state.members], dim=1)
    for i, m in enumerate(state.members):   # views, filled in place: a just-in-time checkpoint reads them as they stand
        m.epoch_losses = losses[:, i]
    callbacks = tuple(callbacks)
    t0 = time.perf_counter()
    it = iter(batches)
    tok = next(it, None)
    started = time.perf_counter()
    if step0 == 0:
        for m in state.members:
            m.timing.seam(m.epoch, started, previous_end)
    state.step = step0
    while tok is not None and state.step < steps:
        for cb in callbacks:
            cb(state)
        losses[state.step] = state.train_step(tok)
        state.step += 1
        tok = next(it, None) if state.step < steps else None
    sync(state.device)
    ended = time.perf_counter()
    if state.step != steps:
        raise RuntimeError(f"the bucket saw {state.step} batches in its epoch, expected {steps}")
    return EpochRun(losses, ended - started, started - t0, started, ended, steps - step0)


def settle_members(state: BucketState, run: EpochRun, gates: Sequence[Gate], counts: Sequence[GateCounts],
                   gate_seconds: float) -> list[EpochEnd]:
    """Every member's epoch into its own record, as loop.epoch_end does a solo run's (the bucket's shared
    train and gate walls in each member's timing); one EpochEnd per member, in row order."""
    ends = []
    for i, (m, g, c) in enumerate(zip(state.members, gates, counts)):
        losses = run.losses[:, i].tolist()
        passed = settle_epoch(m, losses, c.comp, g, run.train_seconds, gate_seconds)
        ends.append(EpochEnd(float(np.mean(losses)), c.comp, c.by_r, passed))
    state.step = 0
    return ends


# ---- memory ---------------------------------------------------------------------------------

def member_bytes(cfg: Config, n_windows: int) -> int:
    """What one more member adds to a bucket's device memory: its weights, gradient and AdamW's two moments
    (4 fp32 copies of its row), the activations its step saves for backward (measured by running the
    batched forward on the meta device: sizes, no compute) and its resident windows."""
    with torch.device("meta"):
        layout = RowLayout.of(GPT.from_config(cfg))
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    rows = torch.empty(1, layout.width, device="meta", requires_grad=True)
    tok = torch.empty(1, cfg.train.batch_size, cfg.w + 1, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bucket_losses(layout.split_fused(rows), tok, cfg.model.n_layers, cfg.model.n_heads)
    window_bytes = 2 if cfg.graph.n <= 32768 else 4
    return 16 * layout.width + saved + n_windows * (cfg.w + 1) * window_bytes
