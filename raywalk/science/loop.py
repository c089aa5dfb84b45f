"""Training without Ray: the state one run carries, and the epoch the workers (and benchmarks) run.

`TrainingState` owns everything a checkpoint holds (model, optimizer, scheduler,
curves, epochs done, gate epoch) behind `state_dict` / `load_state_dict`.
`run_epoch` trains one epoch over any iterable of token batches and
`epoch_end` gates it (a science/gate.py Gate) and reduces it; the Ray worker
(service/worker.py) only feeds them its data shard and reports what they
return, so CPU tests call the same code a GPU worker runs.

Device rules (a GPU worker's model sits on cuda:k and its process group is NCCL,
which refuses CPU tensors): every tensor made here says `device=`; the
optimizer is built, and its state loaded, only after the model is on its
device; the per-step loss stays on the device (no host sync per step).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from raywalk.science.compliance import Compliance, JumpLengthCounts
from raywalk.science.gate import Gate
from raywalk.config import Config, ConfigError
from raywalk.science.model import GPT
from raywalk.science.schedule import make_scheduler

# ---- seeds and RNG state ------------------------------------------------------------

def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's epoch: its shuffle and its RNG streams derive from it."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_all(s: int) -> None:
    torch.manual_seed(s)   # CPU and every CUDA device
    np.random.seed(s)
    random.seed(s)


def rng_state() -> dict[str, Any]:
    """Every RNG stream of this process as plain data (tensors, ints, lists)."""
    np_state = np.random.get_state()
    s = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state()   # dropout on a GPU draws from the device's generator
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = s["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


# ---- devices -----------------------------------------------------------------------

def set_determinism(on: bool) -> None:
    """Deterministic kernels (run.deterministic): a resumed GPU run then repeats an uninterrupted one.

    cuBLAS also needs CUBLAS_WORKSPACE_CONFIG set before CUDA starts; the driver puts it in
    the workers' environment (service/driver.worker_env).
    """
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = not on


def check_precision(precision: str, device: torch.device, capability: tuple[int, int] | None = None) -> None:
    """Refuse bf16 on a GPU that only emulates it (compute capability < 8.0, e.g. T4, V100)."""
    if precision != "bf16" or device.type != "cuda":
        return
    major, minor = capability or torch.cuda.get_device_capability(device)
    if major < 8:
        name = torch.cuda.get_device_name(device) if capability is None else "this GPU"
        raise ConfigError(f"train.precision: 'bf16' is invalid on {name} (compute capability {major}.{minor}): "
                          f"bf16 needs compute capability >= 8.0 (A10G, A100, L4, H100); use fp32")


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a timing covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the state a run carries ---------------------------------------------------------

@dataclass
class Curves:
    train_loss: list[float] = field(default_factory=list)
    edge_compliance: list[float] = field(default_factory=list)
    rule_compliance: list[float] = field(default_factory=list)
    n_rule_checks: list[int] = field(default_factory=list)
    n_distinct_sequences: list[int] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"train_loss": torch.tensor(self.train_loss, dtype=torch.float64, device="cpu"),
                "edge_compliance": list(self.edge_compliance), "rule_compliance": list(self.rule_compliance),
                "n_rule_checks": list(self.n_rule_checks), "n_distinct_sequences": list(self.n_distinct_sequences)}

    def load_state_dict(self, s: dict) -> None:
        self.train_loss = s["train_loss"].tolist()
        for k in ("edge_compliance", "rule_compliance", "n_rule_checks", "n_distinct_sequences"):
            setattr(self, k, list(s[k]))


@dataclass
class Timing:
    """Seconds per epoch, outside `curves` (which holds the study's three curves and nothing else)."""
    train_seconds: list[float] = field(default_factory=list)        # first step to last, synchronised
    gate_seconds: list[float] = field(default_factory=list)
    checkpoint_seconds: list[float] = field(default_factory=list)   # save + report (+ upload when synchronous)
    seam_seconds: list[float | None] = field(default_factory=list)  # last step of e to first of e+1; None: restarted

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.__dict__.items()}

    def load_state_dict(self, s: dict | None, epochs: int) -> None:
        # unknown entries are None: checkpoints from before timing existed, and the checkpoint's
        # own save time (measured after it was written)
        for k in self.__dict__:
            v = list((s or {}).get(k, []))
            n = max(0, epochs - 1) if k == "seam_seconds" else epochs
            setattr(self, k, v[:n] + [None] * (n - len(v)))

    def seam(self, epochs_done: int, started: float, previous_end: float | None) -> None:
        """At the first step of an epoch: the seam since the last step of the one before (None: restarted)."""
        if epochs_done >= 1 and len(self.seam_seconds) == epochs_done - 1:
            self.seam_seconds.append(None if previous_end is None else started - previous_end)


def make_optimizer(params, cfg: Config, device: torch.device | str) -> torch.optim.AdamW:
    """The run's AdamW. fused on CUDA: one kernel per step instead of a few per parameter group
    (foreach is CPU's fastest)."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, betas=(0.9, 0.95),
                             fused=fused or None, foreach=None if fused else True)


@dataclass
class TrainingState:
    """Model, optimizer, scheduler, curves and progress of one run, on one device."""
    cfg: Config
    model: GPT
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    curves: Curves
    epoch: int = 0                    # epochs finished
    gate_epoch: int | None = None     # the epoch whose gate passed
    step: int = 0                     # steps of epoch `epoch + 1` already done (0 at an epoch boundary)
    epoch_losses: torch.Tensor | None = None   # this rank's losses of those steps
    timing: Timing = field(default_factory=Timing)
    data_path: str | None = None      # "resident" | "stream": chosen once, kept on every resume

    @classmethod
    def create(cls, cfg: Config, steps_per_epoch: int, device: torch.device | str = "cpu") -> "TrainingState":
        seed_all(cfg.seed)   # identical initial weights on every rank, and on CPU and GPU alike
        with torch.device("cpu"):
            model = GPT.from_config(cfg)
        model.to(device)
        opt = make_optimizer(model.parameters(), cfg, device)   # after the move: its state follows the parameters
        sched = make_scheduler(opt, cfg.train.max_epochs * steps_per_epoch, cfg.train.warmup_frac,
                               cfg.train.min_lr_ratio)
        return cls(cfg, model, opt, sched, Curves())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def done(self) -> bool:
        return self.gate_epoch is not None or self.epoch >= self.cfg.train.max_epochs

    def state_dict(self, rng: list[dict[str, Any]], experiment_id: str,
                   epoch_losses: list[torch.Tensor] | None = None) -> dict[str, Any]:
        """Plain data for a checkpoint. `rng`: every rank's RNG state, in rank order; mid-epoch,
        `epoch_losses`: every rank's losses of the `step` steps done (the epoch-end mean needs them)."""
        return {"epoch": self.epoch, "gate_epoch": self.gate_epoch, "step": self.step,
                "epoch_losses": epoch_losses if self.step else None,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng, "curves": self.curves.state_dict(),
                "timing": self.timing.state_dict(), "data_path": self.data_path, "experiment_id": experiment_id}

    def load_state_dict(self, s: dict[str, Any], rank: int = 0, world: int = 1) -> None:
        """Restore in place; tensors land on this state's device (CPU-loaded checkpoints included)."""
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])   # casts to the parameters' device
        self.scheduler.load_state_dict(s["scheduler"])
        self.curves.load_state_dict(s["curves"])
        self.epoch, self.gate_epoch, self.step = int(s["epoch"]), s["gate_epoch"], int(s.get("step", 0))
        self.epoch_losses = s["epoch_losses"][rank] if self.step else None
        self.timing.load_state_dict(s.get("timing"), self.epoch)
        self.data_path = s.get("data_path", "stream")   # checkpoints from before the resident path streamed
        if len(s["rng"]) == world:
            set_rng_state(s["rng"][rank])
        elif self.step:
            raise ValueError(f"a mid-epoch checkpoint of {len(s['rng'])} ranks cannot resume {world} ranks")


# ---- one epoch ---------------------------------------------------------------------

StepCallback = Callable[["TrainingState"], None]
"""Called before every step with the state (state.step = steps done): progress, notice polls, test probes."""


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, tok: torch.Tensor,
                   grad_clip: float, bf16: bool) -> torch.Tensor:
    """One step on a batch of (w+1)-token windows; returns the detached loss, still on the device."""
    with torch.autocast(tok.device.type, dtype=torch.bfloat16, enabled=bf16):
        _, loss = model(tok[:, :-1], tok[:, 1:])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    opt.step()
    sched.step()
    return loss.detach()


def compiled(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """train.compile: the forward (and with it, through AOTAutograd, the backward) compiled;
    on CUDA with CUDA graphs, where launch overhead bounds a small model's step."""
    return torch.compile(net, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)


@dataclass(frozen=True)
class EpochRun:
    losses: torch.Tensor        # (steps,) float64 on the model's device
    train_seconds: float        # first step to last step, synchronised: device work included
    first_batch_seconds: float  # from the call until the first batch was in hand
    started: float              # perf_counter() when the first step began
    ended: float                # perf_counter() when the last step's work was done
    steps: int                  # steps run by this call (fewer than the epoch's after a mid-epoch resume)


def run_epoch(state: TrainingState, batches: Iterable[torch.Tensor], steps: int, rank: int = 0,
              net: torch.nn.Module | None = None, callbacks: Iterable[StepCallback] = (),
              previous_end: float | None = None) -> EpochRun:
    """Train epoch state.epoch + 1 until `steps` steps are done.

    `batches` yields this rank's (B, w+1) int64 token windows on the model's device, from
    step state.step on: after a just-in-time checkpoint (state.step > 0, RNG and losses
    restored) the epoch goes on exactly where it stopped. At an epoch start the RNG streams
    are reseeded from (seed, epoch, rank). `net` runs forward/backward (a DDP wrapper or a
    compiled state.model; default the model). The loop does the step and nothing else:
    every callback runs before every step, so there should be few and cheap ones.
    `previous_end`: when the last epoch's last step ended in this process (for the seam).
    """
    cfg = state.cfg
    net = state.model if net is None else net
    device = state.device
    start = state.step
    losses = torch.zeros(steps, dtype=torch.float64, device=device)
    if start == 0:
        seed_all(epoch_seed(cfg.seed, state.epoch, rank))
    else:
        losses[:start] = state.epoch_losses.to(device)
    state.epoch_losses = losses
    bf16 = cfg.train.precision == "bf16"
    opt, sched, clip = state.optimizer, state.scheduler, cfg.train.grad_clip
    callbacks = tuple(callbacks)
    net.train()
    t0 = time.perf_counter()
    it = iter(batches)
    tok = next(it, None)
    started = time.perf_counter()
    if start == 0:
        state.timing.seam(state.epoch, started, previous_end)
    while tok is not None and state.step < steps:
        for cb in callbacks:
            cb(state)
        losses[state.step] = optimizer_step(net, opt, sched, tok, clip, bf16)
        state.step += 1
        tok = next(it, None) if state.step < steps else None
    sync(device)
    ended = time.perf_counter()
    if state.step != steps:
        raise RuntimeError(f"rank {rank} saw {state.step} batches in epoch {state.epoch + 1}, expected {steps}")
    return EpochRun(losses, ended - started, started - t0, started, ended, steps - start)


def gather_epoch_losses(state: TrainingState) -> list[torch.Tensor]:
    """Every rank's losses of the steps done so far in this epoch (host copies, rank order)."""
    mine = state.epoch_losses[: state.step]
    if not (dist.is_available() and dist.is_initialized()):
        return [mine.cpu()]
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine.contiguous())   # on the losses' device, like every collective here
    return [t.cpu() for t in out]


# ---- the end of an epoch -------------------------------------------------------------

def all_reduce_losses(losses: torch.Tensor) -> torch.Tensor:
    """The mean loss per step over ranks, still on the losses' device.

    Under Ray Train the model's device is the process group's (NCCL <=> cuda): every tensor
    handed to a collective is built there, never on the CPU by default.
    """
    if dist.is_available() and dist.is_initialized():
        losses = losses.clone()
        dist.all_reduce(losses)
        losses /= dist.get_world_size()
    return losses


def gather_rng() -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (object collective: torch picks its device)."""
    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


@dataclass(frozen=True)
class EpochEnd:
    loss: float                 # mean over the epoch's steps and ranks
    comp: Compliance            # the gate's counts over all ranks
    by_r: JumpLengthCounts      # the same rule counts split by jump length
    passed: bool


def epoch_end(state: TrainingState, run: EpochRun, gate: Gate) -> EpochEnd:
    """Gate this rank's share, reduce over ranks, and record the epoch in the state's curves and timing."""
    t = time.perf_counter()
    counts = Gate.reduce(gate.evaluate(state.model), run.losses.device)
    losses = all_reduce_losses(run.losses).tolist()
    state.step = 0
    passed = settle_epoch(state, losses, counts.comp, gate, run.train_seconds, time.perf_counter() - t)
    return EpochEnd(float(np.mean(losses)), counts.comp, counts.by_r, passed)


def settle_epoch(rec: Any, losses: list[float], comp: Compliance, gate: Gate, train_seconds: float,
                 gate_seconds: float) -> bool:
    """An epoch's figures into one experiment's record (a TrainingState or a bucket Member: curves, timing,
    epoch, gate_epoch, epoch_losses), the epoch counted done; whether its gate passed."""
    c, timing = rec.curves, rec.timing
    timing.train_seconds.append(train_seconds)
    timing.gate_seconds.append(gate_seconds)
    c.train_loss += losses
    c.edge_compliance.append(comp.edge)
    c.rule_compliance.append(comp.rule)
    c.n_rule_checks.append(comp.rule_total)
    c.n_distinct_sequences.append(gate.n_distinct)
    passed = gate.passes(comp)
    rec.epoch += 1
    rec.epoch_losses = None
    if passed:
        rec.gate_epoch = rec.epoch
    return passed
