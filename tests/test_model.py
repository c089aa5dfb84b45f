import math

import pytest
import torch

from raywalk.science.model import GPT
from tests.helpers import reference_forward, to_reference

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
        for lin in (b.mlp[0], b.mlp[2]):
            assert torch.count_nonzero(lin.bias) == 0
        for lin in (b.attn.q_proj, b.attn.k_proj, b.attn.v_proj, b.attn.out_proj):
            assert lin.bias is None  # bias-free: QKᵀ and OV are linear maps
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
    from raywalk.science.model import KVCache
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


def test_from_config():
    from raywalk.config import Config

    cfg = Config().replace(**{"graph.n": 64, "w": 16, "model.d_model": 32, "model.n_layers": 3,
                              "model.n_heads": 2, "corpus.walk_length": 64})
    m = GPT.from_config(cfg)
    assert (m.vocab_size, m.block_size, m.d_model, m.n_layers, m.n_heads) == (64, 16, 32, 3, 2)


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_internals_come_from_the_forward_pass(n_heads):
    m = tiny(n_heads, n_layers=3).eval()
    idx = torch.randint(0, V, (3, W))
    with torch.no_grad():
        plain = m(idx, idx)
        internals: list = []
        traced = m(idx, idx, internals=internals)
    assert torch.allclose(traced[0], plain[0], atol=1e-5) and torch.allclose(traced[1], plain[1], atol=1e-6)
    got = m.attention_internals(idx)
    assert len(got) == len(internals) == 3
    dh = D // n_heads
    for d, e in zip(got, internals):
        for k in ("q", "k", "v"):
            assert d[k].shape == (3, n_heads, W, dh)
        for k in ("scores", "weights"):
            assert d[k].shape == (3, n_heads, W, W)
        assert d["x"].shape == (3, W, D)
        assert all(torch.equal(d[k], e[k]) for k in d)
        future = torch.ones(W, W, dtype=torch.bool).triu(1)
        assert torch.all(d["scores"][..., future] == float("-inf"))
        assert torch.all(torch.isfinite(d["scores"][..., ~future]))
        assert torch.allclose(d["scores"][..., ~future], (d["q"] @ d["k"].transpose(-2, -1))[..., ~future]
                              / math.sqrt(dh), atol=1e-6)
        assert torch.equal(d["qkt_svd"][..., future], torch.zeros_like(d["qkt_svd"][..., future]))
        assert torch.equal(d["qkt_svd"][..., ~future], d["scores"][..., ~future])
        assert torch.allclose(d["weights"], d["scores"].softmax(-1)) and torch.all(d["weights"][..., future] == 0)
        assert not d["weights"].requires_grad   # ready for .numpy() in a notebook


def test_internals_need_the_full_pass():
    from raywalk.science.model import KVCache

    m = tiny().eval()
    with pytest.raises(ValueError, match="full causal pass"):
        m.blocks[0].attn(torch.zeros(1, 3, D), kv=(*[torch.zeros(1, 1, W, D)] * 2, 0), internals=[])
    with pytest.raises(ValueError, match="full causal pass"):
        m.blocks[0].attn(torch.zeros(1, 3, D), last_only=True, internals=[])
    assert KVCache(m, 1, W).len == 0


@pytest.mark.parametrize("n_heads", [1, 2, 4])
def test_circuits_reproduce_scores_and_output(n_heads):
    """QK and OV, in the docstring's row-vector convention, against the forward pass's own numbers."""
    m = tiny(n_heads, n_layers=2).eval()
    for p in m.parameters():   # make every weight matter (init shrinks out_proj)
        torch.nn.init.normal_(p, 0.0, 0.3)
    idx = torch.randint(0, V, (2, W))
    qk, ov = m.qk_circuits(), m.ov_circuits()
    assert qk.shape == ov.shape == (2, n_heads, D, D)
    dh = D // n_heads
    future = torch.ones(W, W, dtype=torch.bool).triu(1)
    with torch.no_grad():
        for layer, (b, d) in enumerate(zip(m.blocks, m.attention_internals(idx))):
            x = d["x"]
            for h in range(n_heads):
                s = x @ qk[layer, h] @ x.transpose(-2, -1) / math.sqrt(dh)
                assert torch.allclose(s[..., ~future], d["scores"][:, h][..., ~future], atol=1e-4, rtol=1e-4)
                # brute force from the weight matrices, head by head
                hs = slice(h * dh, (h + 1) * dh)
                wq, wk = b.attn.q_proj.weight[hs], b.attn.k_proj.weight[hs]
                assert torch.allclose(qk[layer, h], wq.T @ wk, atol=1e-6)
            out = sum(d["weights"][:, h] @ x @ ov[layer, h] for h in range(n_heads))
            assert torch.allclose(out, b.attn(x), atol=1e-4, rtol=1e-4)
            assert not torch.allclose(ov[layer, 0], ov[layer, 0].T)   # the transpose would be wrong


# ---- the study's reference model (tests/helpers.py re-states it) -------------------------------

@pytest.mark.parametrize("d_model,n_heads", [(16, 1), (32, 1), (64, 1), (128, 1), (128, 4)])
def test_bit_identical_to_the_reference_attention(d_model, n_heads):
    """Every d_head (16, 32, 64, 128; 32 also as 4 heads of d_model 128): the same bits, not allclose."""
    torch.manual_seed(d_model + n_heads)
    m = GPT(V, W, d_model=d_model, n_layers=2, n_heads=n_heads).eval()
    for p in m.parameters():   # trained-scale weights, so every ulp of the scores reaches the logits
        torch.nn.init.normal_(p, 0.0, 0.3)
    idx = torch.randint(0, V, (4, W))
    with torch.no_grad():
        ref_logits, ref_qkt = reference_forward(to_reference(m.state_dict()), 2, n_heads, idx)
        internals: list = []
        logits, _ = m(idx, internals=internals)
        fused, _ = m(idx)
    assert torch.equal(logits, ref_logits)
    for d, r in zip(internals, ref_qkt):
        assert torch.equal(d["qkt_svd"], r)
    assert torch.allclose(fused, ref_logits, atol=1e-4, rtol=1e-4)   # SDPA's kernel: same math, own order
