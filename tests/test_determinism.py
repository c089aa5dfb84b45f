"""run.deterministic on CUDA, proven on CPU.

With torch.use_deterministic_algorithms(True) (run.deterministic, the default) torch
raises at the first call of any op that has only a nondeterministic CUDA kernel. No GPU
here, so: record every aten op that an epoch's steps, the gate and the epoch-end reduction
run (a TorchDispatchMode sees them after autograd, forward and backward alike) and check
them against torch's own list of such ops (THROWS: each docstring line, mapped once).

Limits: the recorder sees the ops dispatch reaches on CPU. What a CUDA kernel picks inside
itself (the SDPA backend, cuBLAS) is no aten op; torch runs those deterministically in this
mode (flash / memory-efficient attention switch to a deterministic backward; cuBLAS needs
CUBLAS_WORKSPACE_CONFIG, which trainer.worker_env sets).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from raywalk.science.gate import Gate
from raywalk.science.model import GPT
from raywalk.science.loop import TrainingState, epoch_end, optimizer_step, run_epoch
from tests.helpers import resident

THROWS_HEAD = "The following normally-nondeterministic operations will throw a"


def throw_list(doc: str) -> list[str]:
    """The bullets of the docstring's throw-list, each as one whitespace-normalised line."""
    section = doc.split(THROWS_HEAD, 1)[1].split("In addition,", 1)[0]
    return [" ".join(b.split()) for b in re.split(r"\n\s*\* ", section)[1:]]


def always(a: dict, out) -> bool:
    return True


@dataclass(frozen=True)
class Throws:
    ops: tuple[str, ...]      # aten overload packets ("aten.histc") or overloads ("aten.median.dim")
    when: Callable[[dict, object], bool] = always   # (arguments by schema name, output) -> on the list

    def hit(self, func, a: dict, out) -> bool:
        return (str(func) in self.ops or f"aten.{func.overloadpacket.__name__}" in self.ops) and self.when(a, out)


def floating(out) -> bool:
    return out.dtype.is_floating_point or out.dtype.is_complex


# torch 2.13's throw-list, bullet by bullet (keys are the bullets as throw_list reads them).
# Backward entries name the backward ops autograd dispatches; "on a CUDA tensor" is ignored
# (everything is flagged whatever its device: a CUDA worker runs these ops on cuda).
# The bullets "X when attempting to differentiate a CUDA tensor" that name only backward ops.
DIFFERENTIATED = {
    ":class:`torch.nn.AvgPool3d`": ("aten.avg_pool3d_backward",),
    ":class:`torch.nn.AdaptiveAvgPool2d`": ("aten._adaptive_avg_pool2d_backward",),
    ":class:`torch.nn.AdaptiveAvgPool3d`": ("aten._adaptive_avg_pool3d_backward", "aten.adaptive_avg_pool3d_backward"),
    ":class:`torch.nn.AdaptiveMaxPool2d`": ("aten.adaptive_max_pool2d_backward",),
    ":class:`torch.nn.FractionalMaxPool2d`": ("aten.fractional_max_pool2d_backward",),
    ":class:`torch.nn.FractionalMaxPool3d`": ("aten.fractional_max_pool3d_backward",),
    ":class:`torch.nn.ReflectionPad1d`": ("aten.reflection_pad1d_backward",),
    ":class:`torch.nn.ReflectionPad2d`": ("aten.reflection_pad2d_backward",),
    ":class:`torch.nn.ReflectionPad3d`": ("aten.reflection_pad3d_backward",),
    ":class:`torch.nn.CTCLoss`": ("aten._ctc_loss_backward",),
    ":func:`torch.nn.functional.grid_sample`": ("aten.grid_sampler_2d_backward", "aten.grid_sampler_3d_backward"),
}
THROWS: dict[str, Throws] = {
    **{f"{what} when attempting to differentiate a CUDA tensor": Throws(ops) for what, ops in DIFFERENTIATED.items()},
    ":class:`torch.nn.MaxUnpool1d`": Throws(("aten.max_unpool2d",)),   # 1-d runs the 2-d op on (N, C, 1, L)
    ":class:`torch.nn.MaxUnpool2d`": Throws(("aten.max_unpool2d",)),
    ":class:`torch.nn.MaxUnpool3d`": Throws(("aten.max_unpool3d",)),
    ":func:`torch.nn.functional.interpolate` when attempting to differentiate a CUDA tensor and one of the "
    "following modes is used: - ``linear`` - ``bilinear`` - ``bicubic`` - ``trilinear``":
        Throws(("aten.upsample_linear1d_backward", "aten.upsample_bilinear2d_backward",
                "aten.upsample_bicubic2d_backward", "aten.upsample_trilinear3d_backward",
                "aten._upsample_bilinear2d_aa_backward", "aten._upsample_bicubic2d_aa_backward")),
    # torch's own test of this line (test_nondeterministic_alert_NLLLoss) feeds a 4-d input: the
    # kernel that raises is nll_loss2d's; the 2-d nll_loss kernels reduce in one block. The line
    # does not say so, so all four are on it.
    ":class:`torch.nn.NLLLoss` when called on a CUDA tensor":
        Throws(("aten.nll_loss_forward", "aten.nll_loss_backward", "aten.nll_loss2d_forward",
                "aten.nll_loss2d_backward")),
    ":class:`torch.nn.EmbeddingBag` when attempting to differentiate a CUDA tensor when ``mode='max'``":
        Throws(("aten._embedding_bag_backward", "aten._embedding_bag_dense_backward"),
               lambda a, out: a["mode"] == 2),   # 0 sum, 1 mean, 2 max
    ":func:`torch.Tensor.put_` when ``accumulate=False``":
        Throws(("aten.put_", "aten.put"), lambda a, out: not a.get("accumulate", False)),
    ":func:`torch.Tensor.put_` when ``accumulate=True`` and called on a CUDA tensor":
        Throws(("aten.put_", "aten.put"), lambda a, out: a.get("accumulate", False)),
    ":func:`torch.histc` when called on a CUDA tensor": Throws(("aten.histc",)),
    ":func:`torch.bincount` when called on a CUDA tensor and ``weights`` tensor is given":
        Throws(("aten.bincount",), lambda a, out: a.get("weights") is not None),
    # nanmedian(dim) runs the same CUDA kernel (median_with_indices_impl)
    ":func:`torch.median` with indices output when called on a CUDA tensor":
        Throws(("aten.median.dim", "aten.median.dim_values", "aten.nanmedian.dim", "aten.nanmedian.dim_values")),
    ":func:`torch.cumsum` when called on a CUDA tensor when dtype is floating point or complex":
        Throws(("aten.cumsum", "aten.cumsum_"), lambda a, out: floating(out)),
    ":func:`torch.Tensor.scatter_reduce` when ``reduce='prod'`` and called on CUDA tensor":
        Throws(("aten.scatter_reduce", "aten.scatter_reduce_"), lambda a, out: a["reduce"] == "prod"),
    ":func:`torch.Tensor.resize_` when called with a quantized tensor":
        Throws(("aten.resize_",), lambda a, out: a["self"].is_quantized),
}


class Recorder(TorchDispatchMode):
    """Every aten op run inside it, and the throw-list lines they hit (line -> ops)."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()
        self.hits: dict[str, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.add(str(func))
        out = NotImplemented
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            # reached undecomposed (under inference_mode or autocast): record the ops it is made of too,
            # as the backend runs them
            with self:
                out = func.decompose(*args, **kwargs)
        if out is NotImplemented:
            out = func(*args, **kwargs)
        named = {**dict(zip((x.name for x in func._schema.arguments), args)), **kwargs}
        for line, t in THROWS.items():
            if t.hit(func, named, out):
                self.hits.setdefault(line, set()).add(str(func))
        return out


# ---- the list itself ---------------------------------------------------------------

def test_every_line_of_torchs_throw_list_is_mapped():
    lines = throw_list(torch.use_deterministic_algorithms.__doc__)
    assert len(lines) >= 20   # the parse found the list
    # a torch upgrade that adds, drops or rewords a line fails here until THROWS follows it
    assert set(lines) == set(THROWS), (f"unmapped: {sorted(set(lines) - set(THROWS))}; "
                                       f"gone: {sorted(set(THROWS) - set(lines))}")
    for t in THROWS.values():
        for name in t.ops:   # every name is an op of this torch (no typo can hide an entry)
            _, packet, *overload = name.split(".")
            op = getattr(torch.ops.aten, packet)
            assert not overload or overload[0] in op.overloads(), name


def _grad(*shape):
    return torch.rand(*shape, requires_grad=True)


def _back(y):
    y.float().sum().backward()


# one small CPU call per line: each must hit its own line, so the mapping names what torch dispatches
EXAMPLES: dict[str, Callable[[], object]] = {
    "nn.AvgPool3d`": lambda: _back(F.avg_pool3d(_grad(1, 1, 4, 4, 4), 2)),
    "nn.AdaptiveAvgPool2d`": lambda: _back(F.adaptive_avg_pool2d(_grad(1, 1, 4, 4), 3)),
    "nn.AdaptiveAvgPool3d`": lambda: _back(F.adaptive_avg_pool3d(_grad(1, 1, 4, 4, 4), 3)),
    "nn.AdaptiveMaxPool2d`": lambda: _back(F.adaptive_max_pool2d(_grad(1, 1, 4, 4), 3)),
    "nn.FractionalMaxPool2d`": lambda: _back(F.fractional_max_pool2d(_grad(1, 1, 4, 4), 2, output_size=2)),
    "nn.FractionalMaxPool3d`": lambda: _back(F.fractional_max_pool3d(_grad(1, 1, 4, 4, 4), 2, output_size=2)),
    "nn.MaxUnpool1d`": lambda: F.max_unpool1d(*F.max_pool1d(torch.rand(1, 1, 4), 2, return_indices=True), 2),
    "nn.MaxUnpool2d`": lambda: F.max_unpool2d(*F.max_pool2d(torch.rand(1, 1, 4, 4), 2, return_indices=True), 2),
    "nn.MaxUnpool3d`": lambda: F.max_unpool3d(*F.max_pool3d(torch.rand(1, 1, 4, 4, 4), 2, return_indices=True), 2),
    "interpolate": lambda: [_back(F.interpolate(_grad(*(1, 1) + (4,) * d), scale_factor=2, mode=m))
                            for m, d in (("linear", 1), ("bilinear", 2), ("bicubic", 2), ("trilinear", 3))],
    "nn.ReflectionPad1d`": lambda: _back(F.pad(_grad(1, 1, 4), (1, 1), mode="reflect")),
    "nn.ReflectionPad2d`": lambda: _back(F.pad(_grad(1, 1, 4, 4), (1,) * 4, mode="reflect")),
    "nn.ReflectionPad3d`": lambda: _back(F.pad(_grad(1, 1, 4, 4, 4), (1,) * 6, mode="reflect")),
    "nn.NLLLoss`": lambda: _back(F.nll_loss(_grad(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5)))),
    "nn.CTCLoss`": lambda: _back(F.ctc_loss(_grad(6, 1, 4).log_softmax(2), torch.tensor([[1, 2]]), [6], [2])),
    "nn.EmbeddingBag`": lambda: _back(F.embedding_bag(torch.tensor([0, 2, 1, 3]), _grad(5, 3),
                                                  torch.tensor([0, 2]), mode="max")),
    "accumulate=False": lambda: torch.zeros(3).put_(torch.tensor([1]), torch.ones(1)),
    "accumulate=True": lambda: torch.zeros(3).put_(torch.tensor([1]), torch.ones(1), accumulate=True),
    "histc": lambda: torch.histc(torch.rand(8), bins=4),
    "bincount": lambda: torch.bincount(torch.tensor([0, 1, 1]), weights=torch.ones(3)),
    "median": lambda: torch.median(torch.rand(3, 4), dim=1),
    "grid_sample": lambda: _back(F.grid_sample(_grad(1, 1, 4, 4), torch.rand(1, 2, 2, 2) * 2 - 1,
                                               align_corners=False)),
    "cumsum": lambda: torch.cumsum(torch.rand(4), 0),
    "scatter_reduce": lambda: torch.ones(3).scatter_reduce(0, torch.tensor([0, 0]), torch.rand(2), "prod"),
    "resize_": lambda: torch.quantize_per_tensor(torch.rand(4), 0.1, 0, torch.quint8).resize_(2),
}

# the same ops in their deterministic variants: off the list
DETERMINISTIC = {
    "cumsum of integers": lambda: torch.cumsum(torch.arange(4, device="cpu"), 0),
    "bincount without weights": lambda: torch.bincount(torch.tensor([0, 1, 1])),
    "median without indices": lambda: torch.median(torch.rand(3, 4)),
    "scatter_reduce sum": lambda: torch.ones(3).scatter_reduce(0, torch.tensor([0, 0]), torch.rand(2), "sum"),
    "EmbeddingBag sum": lambda: _back(F.embedding_bag(torch.tensor([0, 2, 1, 3]), _grad(5, 3),
                                                      torch.tensor([0, 2]), mode="sum")),
    "resize_ of a float tensor": lambda: torch.zeros(4).resize_(2),
    "cross-entropy the raywalk way": lambda: _back(-_grad(6, 5).log_softmax(1).gather(1, torch.zeros(6, 1).long())
                                                   .mean()),
}


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")   # resize_'s example
def test_the_recorder_flags_each_line_by_an_example_and_passes_deterministic_variants():
    for line in THROWS:
        [key] = [k for k in EXAMPLES if k in line]
        with Recorder() as r:
            EXAMPLES[key]()
        assert line in r.hits, (key, sorted(r.ops))
    for name, fn in DETERMINISTIC.items():
        with Recorder() as r:
            fn()
        assert not r.hits, (name, r.hits)


def test_the_recorder_catches_f_cross_entropy():
    """What raywalk's loss ran on before: fails the check that training must pass."""
    logits = torch.randn(8, 5, requires_grad=True)
    with Recorder() as r:
        F.cross_entropy(logits, torch.randint(0, 5, (8,))).backward()
    assert r.hits == {":class:`torch.nn.NLLLoss` when called on a CUDA tensor":
                      {"aten.nll_loss_forward.default", "aten.nll_loss_backward.default"}}


# ---- what raywalk runs -------------------------------------------------------------

# the recorder saw forward, backward, clipping, AdamW and the gate's decoding
SEEN = {"aten._log_softmax.default", "aten.gather.default", "aten._log_softmax_backward_data.default",
        "aten.scatter_add.default", "aten.embedding_dense_backward.default", "aten._foreach_norm.Scalar"}


def test_an_epoch_step_reduction_and_gate_run_no_op_on_the_list(corpus):
    """Two steps of run_epoch on the resident feed, then epoch_end: Gate.evaluate (greedy
    generation with its KV cache and window recompute), Gate.reduce and all_reduce_losses."""
    cfg, c = corpus
    feed = resident(cfg, c)
    gate = Gate(c.gate_starts(cfg.gate.sequences), c.rule_table(), cfg)

    def epoch():
        state = TrainingState.create(cfg, 2)
        end = epoch_end(state, run_epoch(state, feed.epoch(0, steps=2), 2), gate)
        return state.curves, end.loss, end.comp

    plain = epoch()
    with Recorder() as r:
        recorded = epoch()
    assert r.hits == {}, r.hits
    assert recorded == plain and plain[2].edge_total > 0   # the recorder changed nothing it saw
    assert SEEN | {"aten._foreach_lerp_.Scalar", "aten.argmax.default", "aten.index_select.default"} <= r.ops


@pytest.mark.parametrize("precision,dropout", [("fp32", 0.1), ("bf16", 0.0), ("bf16", 0.1)])
def test_a_step_under_bf16_dropout_and_fused_adamw_runs_no_op_on_the_list(corpus, precision, dropout):
    """optimizer_step with what a CUDA worker builds: AdamW fused (CPU has that kernel too)."""
    cfg, c = corpus
    cfg = cfg.replace(**{"train.precision": precision, "model.dropout": dropout})
    torch.manual_seed(0)
    model = GPT.from_config(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tok = next(iter(resident(cfg, c).epoch(0, steps=1)))
    with Recorder() as r:
        loss = optimizer_step(model, opt, sched, tok, 1.0, precision == "bf16")
    assert r.hits == {}, r.hits
    assert torch.isfinite(loss)
    assert SEEN | {"aten._fused_adamw_.default"} <= r.ops
    if dropout:
        assert any("bernoulli" in op or "dropout" in op for op in r.ops)


# ---- the loss, computed from ops with deterministic kernels ------------------------

@pytest.mark.parametrize("V,B,T,bf16", [(16, 64, 4, False), (16, 64, 4, True), (500, 64, 64, False)])
def test_the_loss_and_its_gradients_are_f_cross_entropys(V, B, T, bf16):
    """GPT.forward's log_softmax + gather + mean against F.cross_entropy on the same logits.

    Not bitwise: both take the same log_softmax, but sum the N = B*T picked log-probs in their
    own order (nll_loss's accumulation vs aten.mean's), and float addition is not associative.
    Each cascade sum is off by at most ~log2(N) ulps relative, so the two differ by at most
    rtol = 2*log2(N)*eps (eps = 2^-23, fp32: 1.9e-6 at N = 256, 2.9e-6 at N = 4096).
    The gradients get -1/N at each target from either backward, then the same log_softmax
    backward: on CPU they come out bitwise equal; they are held to the same rtol.
    """
    torch.manual_seed(0)
    model = GPT(V, T, d_model=32, n_layers=1, n_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10.0)   # sharp logits: losses far from log V
    idx = torch.randint(0, V, (B, T + 1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        want = F.cross_entropy(logits.flatten(0, 1).float(), idx[:, 1:].reshape(-1))
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    want_grads = torch.autograd.grad(want, params)
    rtol = 2 * math.log2(B * T) * torch.finfo(torch.float32).eps
    assert loss.dtype == want.dtype == torch.float32
    torch.testing.assert_close(loss, want, rtol=rtol, atol=0.0)
    for p, g, w in zip(params, grads, want_grads):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * w.abs().max().item())
