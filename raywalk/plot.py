"""PNG plots of a run's curves and of a sweep's compliance against its swept axis."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from raywalk.records.layout import tmp_name  # noqa: E402


def plot_run(result: dict[str, Any], out: Path) -> Path:
    """Loss per step, compliance per epoch, and rule compliance per jump length at the final evaluation."""
    return _save(run_figure(result), out)


def run_figure(result: dict[str, Any]):
    c, g = result["curves"], result["gate"]
    fig, (a, b, j) = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    a.plot(range(1, len(c["train_loss"]) + 1), c["train_loss"], lw=0.8)
    a.set(xlabel="optimizer step", ylabel="train loss (cross-entropy)", title="training loss")
    epochs = range(1, len(c["edge_compliance"]) + 1)
    b.plot(epochs, c["edge_compliance"], "o-", label="edge compliance")
    b.plot(epochs, c["rule_compliance"], "s-", label="rule compliance")
    b.axhline(g["edge_threshold"], ls="--", c="C0", lw=0.8, label=f"edge gate {g['edge_threshold']}")
    b.axhline(g["rule_threshold"], ls="--", c="C1", lw=0.8, label=f"rule gate {g['rule_threshold']}")
    if g["epoch"]:
        b.axvline(g["epoch"], c="k", lw=0.6, ls=":", label=f"passed at epoch {g['epoch']}")
    # epochs are whole: no 1.5, 2.5 ticks, even for a run of one or two epochs
    b.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    b.set(xlabel="epoch", ylabel="compliance", ylim=(0, 1.02), xlim=(0.5, max(1, len(epochs)) + 0.5),
          title=f"gate: {result['status']}")
    b.legend(loc="lower right", fontsize=8)
    _by_jump_length(j, result)
    fig.suptitle(result["experiment_id"], fontsize=9)
    fig.tight_layout()
    return fig


def _by_jump_length(ax, result: dict[str, Any]) -> None:
    g = result["gate"]
    rows = g.get("by_jump_length") or []
    last = len(result["curves"]["rule_compliance"])
    ax.set(ylabel="rule compliance", ylim=(0, 1.18),
           title=f"rule compliance by jump length (final evaluation, epoch {last})")
    if not rows:   # result.json written before per-r figures existed, or no evaluation yet
        ax.text(0.5, 0.5, "no per-jump-length figures in this result.json", ha="center", va="center",
                transform=ax.transAxes, fontsize=9)
        ax.set_xticks([])
        return
    xs = range(len(rows))
    bars = ax.bar(xs, [r["rule_compliance"] or 0.0 for r in rows], edgecolor="k", lw=0.5,
                  color=["C3" if r["beyond_window"] else "C1" for r in rows])
    for bar, r in zip(bars, rows):
        if r["beyond_window"]:
            bar.set_hatch("//")
        v = r["rule_compliance"]   # None: no checks, no figure (never counted as a pass)
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, "n/a" if v is None else f"{v:.2f}",
                ha="center", va="bottom", fontsize=7)
    # the checks per bar go in the tick label: a bar of 0.00 from 300 checks and one of no checks differ
    ax.set_xticks(list(xs), [f"r={r['r']}\n{r['r_over_w']:.2g}w\nn={r['rule_checks']}" for r in rows],
                  fontsize=7)
    ax.axhline(g["rule_threshold"], ls="--", c="k", lw=0.8)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(facecolor="C1", edgecolor="k", label="r ≤ w"),
                       Patch(facecolor="C3", edgecolor="k", hatch="//", label="r > w (beyond the window)"),
                       plt.Line2D([], [], ls="--", c="k", lw=0.8, label=f"rule gate {g['rule_threshold']}")],
              loc="upper center", ncol=3, fontsize=7, frameon=False)
    ax.set_xlabel("jump length r, r/w, n = rule checks")


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
    tmp = out.with_name(tmp_name(out.name))   # layout's temp rule: hidden, never taken for the PNG
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(out)
    return out
