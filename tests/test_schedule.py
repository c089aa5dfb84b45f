"""The LR schedule of SPEC §4: linear warmup over 10% of steps, cosine to a 10% floor."""
from __future__ import annotations

import math

import pytest
import torch

from raywalk.science.schedule import lr_factor, make_scheduler, warmup_steps


def lrs(total: int, warmup_frac: float = 0.1, floor: float = 0.1, peak: float = 3e-4) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=peak)
    sched = make_scheduler(opt, total, warmup_frac, floor)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_peak_and_floor():
    total = 1000
    x = lrs(total)
    warm = warmup_steps(total, 0.1)
    assert warm == 100
    assert x[0] == pytest.approx(3e-4 / 100)                  # first step already moves
    assert all(a < b for a, b in zip(x[:warm - 1], x[1:warm]))  # strictly rising during warmup
    assert max(x) == pytest.approx(3e-4) and x.index(max(x)) == warm - 1
    assert all(a >= b for a, b in zip(x[warm:], x[warm + 1:]))  # then never rising
    assert min(x[warm:]) >= 3e-5 - 1e-12 and x[-1] == pytest.approx(3e-5, rel=1e-3)
    mid = warm + (total - warm) // 2
    assert x[mid] == pytest.approx(3e-5 + (3e-4 - 3e-5) * 0.5, rel=1e-2)   # cosine midpoint


def test_factor_after_the_end_stays_at_the_floor():
    assert lr_factor(10_000, 1000, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 1000, 0, 0.1) == pytest.approx(1.0)


@pytest.mark.parametrize("total", [1, 7, 64, 999])
def test_any_length_is_well_formed(total):
    x = lrs(total)
    assert len(x) == total and all(math.isfinite(v) and 0 < v <= 3e-4 + 1e-12 for v in x)
