"""The sufficiency gate: greedy walks from held-out starts, checked like the corpus.

One `Gate` per run: its starts de-duplicated once (greedy decoding is a pure
function of the start, so equal starts give equal sequences: each distinct
start is generated once and weighted by its multiplicity), `shard`ed over the
ranks, `evaluate`d on a model, its counts `reduce`d over ranks, judged by
and judged by `passes`; the counts per jump length go to result.json as counts (records/result.py
shapes them).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raywalk.config import Config
from raywalk.science.compliance import Compliance, JumpLengthCounts, RuleTable, check_sequences, rule_counts_by_jump_length
from raywalk.science.generate import greedy_generate


@dataclass(frozen=True)
class GateCounts:
    """One evaluation's counts, weighted to stand for every gate sequence: overall and per jump length."""
    comp: Compliance
    by_r: JumpLengthCounts


class Gate:
    """The gate's distinct starts (this rank's share of them after `shard`), its rule table and thresholds."""

    def __init__(self, starts: Any, table: RuleTable, cfg: Config):
        uniq, counts = np.unique(np.asarray(starts, dtype=np.int64), return_counts=True)
        self.starts: np.ndarray = uniq        # distinct start vertices, sorted
        self.counts: np.ndarray = counts      # how many of the gate's sequences each stands for
        self.n_distinct = len(uniq)           # distinct starts (= distinct greedy sequences) over all ranks
        self.table, self.cfg = table, cfg

    def shard(self, rank: int, world: int) -> "Gate":
        """This rank's share: every world-th distinct start from the rank-th (n_distinct stays the whole's)."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is invalid: must be in [0, world={world})")
        part = copy.copy(self)
        part.starts, part.counts = self.starts[rank::world], self.counts[rank::world]
        return part

    def evaluate(self, model: torch.nn.Module) -> GateCounts:
        """This share's counts: its greedy sequences, each repeated by its start's multiplicity."""
        length, window = self.cfg.corpus.walk_length, self.cfg.w
        starts = torch.as_tensor(self.starts, dtype=torch.long, device="cpu")   # generation moves what it needs
        seqs = greedy_generate(model, starts, length, window) if len(self.starts) else \
            torch.empty(0, length, dtype=torch.long, device="cpu")
        return self.count(seqs.numpy())

    def count(self, seqs: np.ndarray) -> GateCounts:
        """The counts of this share's sequences (one per distinct start, in order), each weighted by its start's
        multiplicity: those of the gate's sequences, without repeating them."""
        return GateCounts(check_sequences(seqs, self.table, self.counts),
                          rule_counts_by_jump_length(seqs, self.table, self.counts))

    @staticmethod
    def all_reduce(mine: GateCounts, device: torch.device) -> torch.Tensor:
        """Every rank's counts summed, as one int64 tensor on `device` (the process group's: NCCL
        refuses CPU tensors), still there: [edge_ok, edge_total, rule_ok, rule_total, checks..., ok...]."""
        c, r = mine.comp, mine.by_r
        counts = torch.tensor([c.edge_ok, c.edge_total, c.rule_ok, c.rule_total, *r.checks.tolist(),
                               *r.ok.tolist()], dtype=torch.int64, device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        return counts

    @classmethod
    def reduce(cls, mine: GateCounts, device: torch.device) -> GateCounts:
        """all_reduce, brought to the host once."""
        c, k, r = cls.all_reduce(mine, device).tolist(), len(mine.by_r.r), mine.by_r.r
        return GateCounts(Compliance(*c[:4]), JumpLengthCounts(r, np.array(c[4:4 + k], dtype=np.int64),
                                                               np.array(c[4 + k:], dtype=np.int64)))

    def passes(self, c: Compliance) -> bool:
        """Edge and rule strictly above their thresholds; zero rule checks is never a pass."""
        return c.rule_total > 0 and c.edge > self.cfg.gate.edge and c.rule > self.cfg.gate.rule
