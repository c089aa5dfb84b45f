"""The sufficiency gate: greedy walks from held-out starts, checked like the corpus."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from raywalk.science.compliance import Compliance, JumpLengthCounts, RuleTable, check_sequences, rule_counts_by_jump_length
from raywalk.config import GateConfig
from raywalk.science.generate import greedy_generate


def passes(c: Compliance, cfg: GateConfig) -> bool:
    """Edge and rule strictly above their thresholds; zero rule checks is never a pass."""
    return c.rule_total > 0 and c.edge > cfg.edge and c.rule > cfg.rule


@dataclass(frozen=True)
class GateShare:
    """This worker's share of one evaluation: the distinct starts it generates and their weights."""
    starts: np.ndarray    # distinct start vertices
    counts: np.ndarray    # how many of the gate's sequences each stands for
    n_distinct: int       # distinct starts (= distinct greedy sequences) over all workers


def share(starts: np.ndarray, rank: int, world: int) -> GateShare:
    # Greedy decoding is deterministic: equal starts give equal sequences, so each
    # distinct start is generated once and weighted by its multiplicity.
    uniq, counts = np.unique(starts, return_counts=True)
    return GateShare(uniq[rank::world], counts[rank::world], len(uniq))


def evaluate(model: torch.nn.Module, part: GateShare, table: RuleTable, length: int, window: int
             ) -> tuple[Compliance, JumpLengthCounts]:
    """Compliance counts of this worker's share (overall and per jump length), weighted to stand for all
    gate sequences."""
    starts = torch.as_tensor(part.starts, dtype=torch.long, device="cpu")   # generation moves what it needs
    seqs = greedy_generate(model, starts, length, window) if len(part.starts) else \
        torch.empty(0, length, dtype=torch.long, device="cpu")
    weighted = np.repeat(seqs.numpy(), part.counts, axis=0)
    return check_sequences(weighted, table), rule_counts_by_jump_length(weighted, table)
