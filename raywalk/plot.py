"""PNG plots of a run's curves and of a sweep's compliance against its swept axis."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(result: dict[str, Any], out: Path) -> Path:
    c, g = result["curves"], result["gate"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(range(1, len(c["train_loss"]) + 1), c["train_loss"], lw=0.8)
    a.set(xlabel="optimizer step", ylabel="train loss (cross-entropy)", title="training loss")
    epochs = range(1, len(c["edge_compliance"]) + 1)
    b.plot(epochs, c["edge_compliance"], "o-", label="edge compliance")
    b.plot(epochs, c["rule_compliance"], "s-", label="rule compliance")
    b.axhline(g["edge_threshold"], ls="--", c="C0", lw=0.8, label=f"edge gate {g['edge_threshold']}")
    b.axhline(g["rule_threshold"], ls="--", c="C1", lw=0.8, label=f"rule gate {g['rule_threshold']}")
    if g["epoch"]:
        b.axvline(g["epoch"], c="k", lw=0.6, ls=":", label=f"passed at epoch {g['epoch']}")
    b.set(xlabel="epoch", ylabel="compliance", ylim=(0, 1.02), title=f"gate: {result['status']}")
    b.legend(loc="lower right", fontsize=8)
    fig.suptitle(result["experiment_id"], fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def plot_sweep(summary: dict[str, Any], out: Path) -> Path:
    rows, axis = summary["rows"], summary["axis"]
    fig, ax = plt.subplots(figsize=(7, 4))
    groups: dict[Any, list] = {}
    for r in rows:
        key = tuple((k, v) for k, v in r["grid"].items() if k != axis)
        groups.setdefault(key, []).append(r)
    for i, (key, rs) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        rs = sorted(rs, key=lambda r: r["grid"][axis])
        xs = [r["grid"][axis] for r in rs]
        lab = ", ".join(f"{k}={v}" for k, v in key)
        ax.plot(xs, [r["final_rule_compliance"] for r in rs], "s-", c=f"C{i}", label=f"rule {lab}".strip())
        ax.plot(xs, [r["final_edge_compliance"] for r in rs], "o--", c=f"C{i}", label=f"edge {lab}".strip())
    th = summary.get("thresholds", {})
    if th:
        ax.axhline(th["rule"], c="gray", lw=0.7, ls=":")
        ax.axhline(th["edge"], c="gray", lw=0.7, ls="--")
    ax.set(xlabel=axis, ylabel="final compliance", ylim=(0, 1.02), title=f"sweep {summary['sweep_id']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    out = Path(out)
    tmp = out.with_name(f".tmp-{out.name}")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out
