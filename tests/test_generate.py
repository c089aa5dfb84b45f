import pytest
import torch

from raywalk.science.generate import greedy_generate, reference_generate
from raywalk.science.model import GPT

V, W = 20, 8


def random_model(seed, n_heads=1, spread=1.0):
    torch.manual_seed(seed)
    m = GPT(V, W, d_model=32, n_layers=2, n_heads=n_heads)
    with torch.no_grad():  # sharpen the random model so trajectories are varied, not near-uniform
        for p in m.parameters():
            p.mul_(spread)
    return m


@pytest.mark.parametrize("seed,n_heads,spread", [(0, 1, 1.0), (1, 2, 5.0), (2, 4, 10.0), (3, 1, 20.0)])
@pytest.mark.parametrize("length", [1, 2, 5, W, W + 1, 3 * W + 5])
@pytest.mark.parametrize("on_device", [False, True], ids=["host memo", "on device"])
def test_matches_reference(seed, n_heads, spread, length, on_device):
    m = random_model(seed, n_heads, spread)
    starts = torch.cat([torch.arange(4).repeat(6), torch.randint(0, V, (20,))])  # repeats on purpose
    fast = greedy_generate(m, starts, length, W, batch_size=7, on_device=on_device)
    ref = reference_generate(m, starts, length, W)
    assert fast.shape == (starts.numel(), length) and fast.dtype == torch.long
    assert torch.equal(fast, ref)
    assert torch.equal(fast[:, 0], starts)


@pytest.mark.parametrize("on_device", [False, True], ids=["host memo", "on device"])
def test_window_smaller_than_block_size(on_device):
    m = random_model(4, spread=10.0)
    starts = torch.randint(0, V, (30,))
    assert torch.equal(greedy_generate(m, starts, 25, 5, on_device=on_device), reference_generate(m, starts, 25, 5))


def test_deterministic_and_restores_mode():
    m = random_model(5, spread=10.0).train()
    starts = torch.randint(0, V, (40,))
    a = greedy_generate(m, starts, 20, W)
    assert m.training
    assert torch.equal(a, greedy_generate(m, starts, 20, W))
    assert torch.equal(a[starts == starts[0]], a[:1].expand(int((starts == starts[0]).sum()), -1))


@pytest.mark.parametrize("on_device", [False, True], ids=["host memo", "on device"])
def test_bf16_mode_runs(on_device):
    m = random_model(6, spread=10.0)
    starts = torch.randint(0, V, (30,))
    out = greedy_generate(m, starts, 20, W, dtype=torch.bfloat16, on_device=on_device)
    assert out.shape == (30, 20) and torch.equal(out[:, 0], starts)
    assert ((0 <= out) & (out < V)).all()
    assert next(m.parameters()).dtype == torch.float32  # the caller's model is untouched


def test_bad_window_rejected():
    with pytest.raises(ValueError, match="window"):
        greedy_generate(random_model(0), torch.zeros(3, dtype=torch.long), 10, W + 1)
