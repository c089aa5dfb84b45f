"""How far raywalk's logits are from the study's reference model, per d_head.

Run: PYTHONPATH=. python benchmarks/reference_logits.py

For d_model = d_head (one head) 16, 32, 64, 128, plus 4 heads of 32, two layers, weights
N(0, 0.3) (trained scale, so score ulps reach the logits) and 64 random windows of 64
tokens: max |Δlogit| and the count of differing logits between the reference's attention
(re-stated in tests/helpers.py) and raywalk's explicit path, raywalk's fused SDPA path,
and the former divide-by-√d_head explicit path.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raywalk.science.model import GPT  # noqa: E402
from tests.helpers import reference_forward, to_reference  # noqa: E402

V, W, B = 64, 64, 64
print(f"{'d_model':>7} {'heads':>5} {'d_head':>6} | {'explicit':>18} | {'fused SDPA':>18} | {'old divide':>18}")
for d_model, heads in [(16, 1), (32, 1), (64, 1), (128, 1), (128, 4)]:
    torch.manual_seed(d_model)
    m = GPT(V, W, d_model=d_model, n_layers=2, n_heads=heads).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)
    idx = torch.randint(0, V, (B, W))
    with torch.no_grad():
        sd = to_reference(m.state_dict())
        ref, _ = reference_forward(sd, 2, heads, idx)
        old, _ = reference_forward(sd, 2, heads, idx, divide=True)
        explicit, _ = m(idx, internals=[])
        fused, _ = m(idx)

    def cell(x):
        return f"{(x - ref).abs().max().item():9.2e} ({int((x != ref).sum()):>6})"

    print(f"{d_model:>7} {heads:>5} {d_model // heads:>6} | {cell(explicit)} | {cell(fused)} | {cell(old)}")
print(f"max |Δlogit| (logits that differ, of {B * W * V})")
