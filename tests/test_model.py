import math

import pytest
import torch

from raywalk.model import GPT

V, W, D = 20, 8, 32


def tiny(n_heads=1, n_layers=2, seed=0):
    torch.manual_seed(seed)
    return GPT(V, W, d_model=D, n_layers=n_layers, n_heads=n_heads)


def test_shapes_and_initial_loss():
    m = tiny()
    idx = torch.randint(0, V, (4, W))
    logits, loss = m(idx)
    assert logits.shape == (4, W, V) and loss is None
    logits, loss = m(idx, idx)
    assert torch.isfinite(loss)
    assert abs(loss.item() - math.log(V)) < 0.1  # near-uniform predictions at init


def test_longer_than_block_size_rejected():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, W + 1, dtype=torch.long))


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_causal(n_heads):
    m = tiny(n_heads)
    idx = torch.randint(0, V, (2, W))
    idx2 = idx.clone()
    idx2[:, 5] = (idx[:, 5] + 1) % V
    a, b = m(idx)[0], m(idx2)[0]
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_init_statistics():
    m = GPT(V, W, d_model=128, n_layers=4)
    for b in m.blocks:
        for lin in (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.mlp[0]):
            assert abs(lin.weight.std().item() - 0.02) < 0.002
        for lin in (b.attn.out_proj, b.mlp[2]):  # residual projections
            assert abs(lin.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001
        for lin in (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.attn.out_proj, b.mlp[0], b.mlp[2]):
            assert torch.count_nonzero(lin.bias) == 0
    assert abs(m.tok_emb.weight.std().item() - 0.02) < 0.002
    assert abs(m.head.weight.std().item() - 0.02) < 0.002
    assert m.head.weight.data_ptr() != m.tok_emb.weight.data_ptr()  # untied


def test_separate_qkv_modules():
    attn = tiny(2).blocks[0].attn
    mods = [attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj]
    assert all(isinstance(x, torch.nn.Linear) and x.weight.shape == (D, D) for x in mods)
    assert len({x.weight.data_ptr() for x in mods}) == 4


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_attention_maps_match_sdpa(n_heads):
    m = tiny(n_heads)
    idx = torch.randint(0, V, (3, W))
    with torch.no_grad():
        maps = m.attention_maps(idx)
        assert len(maps) == m.n_layers
        x = m._embed(idx)
        for b, att in zip(m.blocks, maps):
            assert att.shape == (3, n_heads, W, W)
            assert torch.allclose(att.sum(-1), torch.ones(3, n_heads, W), atol=1e-6)
            assert torch.all(att.triu(1) == 0)
            h = b.ln_1(x)  # redo the attention by hand with these weights
            v = b.attn._heads(b.attn.v_proj(h))
            y = (att @ v).transpose(1, 2).reshape(3, W, D)
            assert torch.allclose(b.attn.out_proj(y), b.attn(h), atol=1e-6)
            x = b(x)


@pytest.mark.parametrize("n_heads", [0, 3, 8])
def test_invalid_heads(n_heads):
    with pytest.raises(ValueError, match=r"n_heads.*\(1, 2, 4\)"):
        GPT(V, W, d_model=D, n_heads=n_heads)


def test_next_logits_match_forward():
    from raywalk.model import KVCache
    m = tiny(2).eval()
    idx = torch.randint(0, V, (3, W))
    with torch.no_grad():
        full = m(idx)[0]
        assert torch.allclose(m.next_logits(idx), full[:, -1], atol=1e-5)
        kv = KVCache(m, 3, W)
        for t in range(W):
            assert torch.allclose(m.next_logits(idx[:, t:t + 1], kv), full[:, t], atol=1e-5)


def test_overfits_tiny_sequence():
    m = tiny()
    idx = torch.randint(0, V, (2, W + 1))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
