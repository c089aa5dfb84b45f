"""The per-worker training loop that Ray Train runs on every worker.

Shape: restore (from the newest checkpoint that verifies) -> for each epoch:
train over this worker's Ray Data shard, gate, report metrics + checkpoint,
stop at once when the gate passes. Everything an epoch depends on (shuffle
order, RNG streams) derives from (seed, epoch, rank), and every step of an
interrupted epoch is redone after a restart, so a resumed run continues
bit-for-bit.
"""
from __future__ import annotations

import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from . import gate
from .compliance import Compliance
from .config import Config
from .corpus import Corpus
from .model import GPT
from .result import ResultWriter
from .schedule import make_scheduler
from .storage import Store


@dataclass
class Curves:
    train_loss: list[float] = field(default_factory=list)
    edge_compliance: list[float] = field(default_factory=list)
    rule_compliance: list[float] = field(default_factory=list)
    n_rule_checks: list[int] = field(default_factory=list)
    n_distinct_sequences: list[int] = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"train_loss": torch.tensor(self.train_loss, dtype=torch.float64),
                "edge_compliance": list(self.edge_compliance), "rule_compliance": list(self.rule_compliance),
                "n_rule_checks": list(self.n_rule_checks), "n_distinct_sequences": list(self.n_distinct_sequences)}

    def load_state_dict(self, s: dict) -> None:
        self.train_loss = s["train_loss"].tolist()
        for k in ("edge_compliance", "rule_compliance", "n_rule_checks", "n_distinct_sequences"):
            setattr(self, k, list(s[k]))


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _seed_all(s: int) -> None:
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def _maybe_fault(spec: dict | None, rank: int, epoch: int, step: int, run: Store) -> None:
    """Fault injection for tests: SIGKILL this worker process once at (rank, epoch, step).

    With spec["truncate_latest"], first cut the newest checkpoint's state file in
    half, as a kill during its upload would.
    """
    if not spec or (spec["rank"], spec["epoch"], spec["step"]) != (rank, epoch, step):
        return
    marker = spec["marker"]
    if os.path.exists(marker):
        return
    with open(marker, "w") as f:
        f.write(f"{os.getpid()} {time.time()}\n")
    time.sleep(spec.get("delay", 0))   # let the controller register the last report first (SPEC §9: ~2 s)
    if spec.get("truncate_latest"):
        newest = ckpt.candidates(run, None)[0]
        data = run.read_bytes(f"{newest}/{ckpt.STATE}")
        run.write_bytes(f"{newest}/{ckpt.STATE}", data[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)


def optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched, tok: torch.Tensor,
                   grad_clip: float, bf16: bool) -> torch.Tensor:
    """One step on a batch of (w+1)-token windows; returns the detached loss."""
    with torch.autocast(tok.device.type, dtype=torch.bfloat16, enabled=bf16):
        _, loss = model(tok[:, :-1], tok[:, 1:])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    return loss.detach()


def train_loop_per_worker(lc: dict) -> None:
    import ray.train
    from ray.experimental.tqdm_ray import tqdm

    cfg = Config.from_dict(lc["config"])
    if not lc.get("verbose"):
        import logging

        logging.getLogger("ray.train").setLevel(logging.WARNING)   # per-report INFO lines
        from ray.train.v2._internal.execution import context as _ctx   # its logger is named by file path
        logging.getLogger(_ctx.__file__).setLevel(logging.WARNING)   # "Reporting training result N: ..."
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if rank == 0 else (lambda s: None)
    distributed = dist.is_available() and dist.is_initialized()

    root = Store.open(cfg.run.storage)
    corpus = Corpus(Store.open(lc["corpus_uri"]), lc["corpus_manifest"])
    table = corpus.rule_table()
    part = gate.share(np.asarray(lc["gate_starts"], dtype=np.int64), rank, world)
    steps_per_epoch = lc["steps_per_epoch"]
    per_worker_batch = cfg.train.batch_size // world
    L = cfg.corpus.walk_length

    _seed_all(cfg.seed)   # identical initial weights on every rank
    model = GPT(cfg.graph.n, cfg.w, cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads, cfg.model.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                            betas=(0.9, 0.95), foreach=True)
    sched = make_scheduler(opt, cfg.train.max_epochs * steps_per_epoch, cfg.train.warmup_frac,
                           cfg.train.min_lr_ratio)
    curves = Curves()
    start_epoch, gate_epoch = 0, None

    run = root.sub(lc["experiment_id"], "checkpoints")
    latest = ray.train.get_checkpoint()
    latest_name = latest.path.rstrip("/").rsplit("/", 1)[-1] if latest else None
    state, name = ckpt.find_resume_state(run, latest_name, say) if (latest or run.exists()) else (None, None)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        curves.load_state_dict(state["curves"])
        start_epoch, gate_epoch = int(state["epoch"]), state["gate_epoch"]
        rngs = state["rng"]
        if len(rngs) == world:
            ckpt.set_rng_state(rngs[rank])
    writer = ResultWriter(root, lc["experiment_id"], cfg, lc) if rank == 0 else None
    why = f"worker group restart {writer.restarts}" if writer and writer.restarts_this_run else "rerun"
    if state is not None:
        say(f"{why}: resuming from {run.child_uri(name)} (epoch {start_epoch} done), continuing at epoch "
            f"{start_epoch + 1}")
    elif writer and writer.restarts_this_run:
        say(f"{why}: no checkpoint yet, starting at epoch 1")

    ddp = ray.train.torch.prepare_model(model, move_to_device=True) if distributed else model
    device = next(model.parameters()).device
    shard = ray.train.get_dataset_shard("train")

    bf16 = cfg.train.precision == "bf16"
    fault = lc.get("fault")
    # after an injected kill, note when the first step runs again (benchmarks/resume.py)
    probe = f"{fault['marker']}.resumed" if fault and rank == 0 and os.path.exists(fault["marker"]) else None
    for epoch in range(start_epoch, cfg.train.max_epochs):
        if gate_epoch is not None:
            break
        _seed_all(epoch_seed(cfg.seed, epoch, rank))
        t0 = time.perf_counter()
        losses = torch.zeros(steps_per_epoch, dtype=torch.float64)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.train.max_epochs}", unit="step") \
            if rank == 0 and lc["progress"] else None
        step = 0
        ddp.train()
        batches = shard.iter_torch_batches(batch_size=per_worker_batch, dtypes=torch.long, drop_last=True,
                                           local_shuffle_buffer_size=cfg.train.shuffle_buffer,
                                           local_shuffle_seed=epoch_seed(cfg.seed, epoch, rank) % 2**31,
                                           device=str(device))
        t_first = None
        for batch in batches:
            if t_first is None:
                t_first = time.perf_counter()   # fixed per-epoch cost of starting the data stream ends here
            if step == steps_per_epoch:
                break
            _maybe_fault(fault, rank, epoch + 1, step, run)
            if probe:
                with open(probe, "w") as f:
                    f.write(f"{time.time()} {epoch + 1} {step}\n")
                probe = None
            losses[step] = optimizer_step(ddp, opt, sched, batch["tokens"], cfg.train.grad_clip, bf16).double()
            step += 1
            if bar is not None:
                bar.update(1)
        train_seconds = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        if step != steps_per_epoch:
            raise RuntimeError(f"rank {rank} saw {step} batches in epoch {epoch + 1}, expected {steps_per_epoch}")

        comp = gate.evaluate(model, part, table, L, cfg.w)
        counts = torch.tensor([comp.edge_ok, comp.edge_total, comp.rule_ok, comp.rule_total], dtype=torch.int64)
        if distributed:
            dist.all_reduce(losses)
            losses /= world
            dist.all_reduce(counts)
        comp = Compliance(*counts.tolist())
        passed = gate.passes(comp, cfg.gate)
        if passed:
            gate_epoch = epoch + 1
        curves.train_loss += losses.tolist()
        curves.edge_compliance.append(comp.edge)
        curves.rule_compliance.append(comp.rule)
        curves.n_rule_checks.append(comp.rule_total)
        curves.n_distinct_sequences.append(part.n_distinct)

        rng_all = [ckpt.rng_state()]
        if distributed:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, rng_all[0])
            rng_all = gathered
        metrics = {"epoch": epoch + 1, "loss": float(losses.mean()), "edge": comp.edge, "rule": comp.rule,
                   "rule_checks": comp.rule_total, "gate_passed": passed, "train_seconds": train_seconds,
                   "first_batch_seconds": t_first - t0,
                   "tokens_per_second": steps_per_epoch * cfg.train.batch_size * cfg.w / train_seconds}
        secs = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                ckpt.save(tmp, {"format": 1, "epoch": epoch + 1, "gate_epoch": gate_epoch,
                                "model": model.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "rng": rng_all, "curves": curves.state_dict(),
                                "experiment_id": lc["experiment_id"]})
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=ckpt.dir_name(epoch + 1))
        if writer is not None:
            writer.epoch_done(curves, comp, gate_epoch, epoch + 1, part.n_distinct, steps_per_epoch)
        say(f"epoch {epoch + 1}/{cfg.train.max_epochs}  loss {metrics['loss']:.3f}  edge {comp.edge:.3f}  "
            f"rule {comp.rule:.3f}  gate {'PASS' if passed else 'no'}  {secs:.0f}s")
