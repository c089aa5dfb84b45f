"""Helpers several test modules (and benchmarks) share; fixtures and the tiny configs are in conftest.py."""
from __future__ import annotations

import inspect
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from raywalk.science.batches import ResidentWindows, token_dtype
from raywalk.service import trackers
from raywalk.service.windows import walks_to_windows


# ---- runs compared --------------------------------------------------------------------

def comparable(r: dict) -> dict:
    """What must be identical between an interrupted and an uninterrupted run."""
    return {k: r[k] for k in ("curves", "gate", "epochs_trained", "steps_per_epoch", "status", "failure",
                              "experiment_id")}


# ---- tracked curves, read back with each library's own reader ---------------------------

def tb_scalars(d) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under d, by tag, as TensorBoard's own reader gives them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(d), size_guidance={"scalars": 0})
    ea.Reload()
    return {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}


def mlflow_runs(root, eid):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=f"file://{root}/mlruns")
    x = c.get_experiment_by_name("raywalk")
    return c, c.search_runs([x.experiment_id], filter_string=f"tags.`raywalk.experiment_id` = '{eid}'")


def mlflow_scalars(c, run_id) -> dict[str, list[tuple[int, float]]]:
    return {k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, k)) for k in trackers.CURVES}


def expected(curves: dict, f32: bool) -> dict[str, list[tuple[int, float]]]:
    """result.json's curves as (step, value): steps 1.. for the loss, epochs 1.. for compliance."""
    cast = (lambda v: float(np.float32(v))) if f32 else float
    return {k: [(i + 1, cast(v)) for i, v in enumerate(curves[k])] for k in trackers.CURVES}


# ---- the resident path's windows --------------------------------------------------------

def resident(cfg, corpus, device="cpu"):
    """The train windows on the resident path, as a worker holds them."""
    windows = torch.from_numpy(walks_to_windows(corpus.walks("train"), cfg.w)).to(token_dtype(cfg.graph.n))
    return ResidentWindows(windows.to(device), cfg.seed, cfg.train.batch_size)


# ---- the study's reference model, re-stated from its documented conventions -----------------
# (ParkerWilliams/dcsbm-transformer src/model/: keys token_embedding, position_embedding,
# blocks.i.attention.W_{q,k,v,o}, lm_head; scores multiplied by 1/sqrt(d_head); future -inf
# for the softmax, zero for the SVD target). Written here from those facts, not imported.

REF_KEYS = {"tok_emb.": "token_embedding.", "pos_emb.": "position_embedding.", "head.": "lm_head.",
            "attn.q_proj.": "attention.W_q.", "attn.k_proj.": "attention.W_k.",
            "attn.v_proj.": "attention.W_v.", "attn.out_proj.": "attention.W_o."}


def to_reference(sd):
    """raywalk's GPT state_dict under the reference's names."""
    out = {}
    for k, v in sd.items():
        for a, b in REF_KEYS.items():
            k = k.replace(a, b)
        out[k] = v
    return out


def reference_forward(sd, n_layers, n_heads, idx, divide=False):
    """Logits and per-layer zero-filled QKᵀ/√d as the reference computes them.

    divide=True scales by dividing with √d_head instead (raywalk before it scaled by multiplying; for the benchmark)."""
    F = torch.nn.functional
    B, T = idx.shape
    d_model = sd["token_embedding.weight"].shape[1]
    dh = d_model // n_heads
    x = F.embedding(idx, sd["token_embedding.weight"]) + F.embedding(torch.arange(T), sd["position_embedding.weight"])
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    qkts = []
    for i in range(n_layers):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (d_model,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, v = (F.linear(h, sd[p + f"attention.W_{n}.weight"]).view(B, T, n_heads, dh).transpose(1, 2)
                   for n in "qkv")
        raw = q @ k.transpose(-2, -1)
        raw = raw / math.sqrt(dh) if divide else raw * (1.0 / math.sqrt(dh))
        qkts.append(raw.masked_fill(~mask, 0.0))
        att = raw.masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, d_model)
        x = x + F.linear(y, sd[p + "attention.W_o.weight"])
        h = F.layer_norm(x, (d_model,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"])),
                         sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
    x = F.layer_norm(x, (d_model,), sd["ln_f.weight"], sd["ln_f.bias"])
    return F.linear(x, sd["lm_head.weight"]), qkts


# ---- `ray job submit` of a training run ---------------------------------------------------

def submit_cmd(address: str, storage: str, *train_args: str, no_wait: bool = False) -> list[str]:
    return ["ray", "job", "submit", "--address", address, "--working-dir", ".",
            "--runtime-env", "runtime_env.yaml", *(["--no-wait"] if no_wait else []),
            "--", "raywalk", "train", "configs/quickstart.yaml", "--storage", storage, *train_args]


# ---- a CUDA worker's device trap, on a CPU ------------------------------------------------

PKG = str(Path(__file__).resolve().parents[1] / "raywalk")
FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand,
             torch.randn, torch.randint, torch.as_tensor, torch.zeros_like, torch.eye, torch.linspace}
# *_like factories follow their input's device; as_tensor/tensor/zeros... need device= when called by raywalk
NEEDS_DEVICE = FACTORIES - {torch.zeros_like}


class RefuseHostDefaults(TorchFunctionMode):
    """A CUDA worker's trap, on a CPU: raywalk code that makes a tensor without `device=` fails.

    Only factory calls made from raywalk's own files are checked (torch's internals decide
    their own devices, as AdamW does for its step counter).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in NEEDS_DEVICE and "device" not in kwargs:
            caller = inspect.currentframe().f_back
            while caller is not None and caller.f_code.co_filename.startswith(str(Path(torch.__file__).parent)):
                caller = caller.f_back
            if caller is not None and caller.f_code.co_filename.startswith(PKG):
                raise AssertionError(f"{func.__name__} without device= at {caller.f_code.co_filename}:"
                                     f"{caller.f_lineno}")
        return func(*args, **kwargs)
