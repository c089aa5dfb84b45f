"""A sweep's summary: one row per point (its result.json figures and trial record), summary.json's
whole, summary.csv and the table `raywalk tune` prints."""
from __future__ import annotations

import csv
import io
from typing import Any, Mapping

from raywalk.records.overview import table_lines
from raywalk.records.result import sweep_status
from raywalk.service.sweep import SCALING_RULE, Point, Sweep

ROW_FIELDS = ("point", "experiment_id", "status", "epochs_trained", "final_edge_compliance",
              "final_rule_compliance", "gate_epoch", "svd_eligible", "wall_time_s", "trained_now",
              "failure_reason", "bucket", "result")


def summary_row(point: Point, result: Mapping[str, Any] | None, record: Mapping[str, Any] | None,
                result_uri: str | None) -> dict[str, Any]:
    """One row: the point's grid values, its result.json figures and the sweep's own trial record.

    status: result.sweep_status (the trial's error, if any, is the failure_reason).
    """
    record = record or {}
    status = sweep_status(None if result is None else result.get("status", "running"), record.get("error"))
    if result is None:
        g: Mapping[str, Any] = {}
        epochs = None
        reason = record.get("error")
    else:
        g = result.get("gate") or {}
        epochs = result.get("epochs_trained")
        reason = (result.get("failure") or {}).get("reason") if status == "failed" else record.get("error")
    return {
        "point": point.index,
        "grid": dict(point.grid),
        "experiment_id": point.experiment_id,
        "status": status,
        "epochs_trained": epochs,
        "final_edge_compliance": g.get("final_edge_compliance"),
        "final_rule_compliance": g.get("final_rule_compliance"),
        "gate_epoch": g.get("epoch"),
        "svd_eligible": bool(result.get("svd_eligible")) if result is not None else False,
        "wall_time_s": record.get("wall_time_s"),
        "trained_now": bool(record.get("trained_now", False)),
        "failure_reason": reason,
        "bucket": ((result or {}).get("bucket") or {}).get("id"),   # the bucket that trained it; None: alone
        "result": result_uri,
    }


def build_summary(sweep: Sweep, rows: list[dict[str, Any]], *, storage: str, wall_time_s: float | None,
                  max_concurrent: int | None, trials_run: int, points_run: int | None = None,
                  stops: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """summary.json. trials_run: the Tune trials this run started (a bucket of k points is one);
    points_run: the points they trained (default: one per trial); stops: what ended trials early
    ({"kind": "storage" | "lease", "line"}), empty when nothing did."""
    excluded = [{"point": r["point"], "experiment_id": r["experiment_id"], "grid": r["grid"], "status": r["status"],
                 "reason": r["failure_reason"]} for r in rows if not r["svd_eligible"]]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {
        "sweep_id": sweep.sweep_id,
        "name": sweep.name,
        "source": sweep.source,
        "storage": storage,
        "axes": list(sweep.axes),
        "axis": sweep.axis,
        "derived": dict(sweep.derived),
        "scaling_rule": SCALING_RULE,
        "thresholds": {"edge": sweep.base.gate.edge, "rule": sweep.base.gate.rule},
        "counts": counts,
        "trials_run": trials_run,
        "points_run": trials_run if points_run is None else points_run,
        "stops": list(stops or []),
        "max_concurrent": max_concurrent,
        "wall_time_s": wall_time_s,
        "rows": rows,
        "excluded_from_svd": excluded,
    }


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def csv_columns(axes: tuple[str, ...] | list[str]) -> list[str]:
    return ["point", *axes, *[f for f in ROW_FIELDS if f != "point"]]


def to_csv(summary: Mapping[str, Any]) -> str:
    cols = csv_columns(summary["axes"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in summary["rows"]:
        flat = {**r, **r["grid"]}
        w.writerow(["" if flat.get(c) is None else flat[c] for c in cols])
    return buf.getvalue()


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def format_table(summary: Mapping[str, Any]) -> str:
    """The table printed at the end of a sweep, then the points excluded from SVD analysis."""
    short = {"final_edge_compliance": "edge", "final_rule_compliance": "rule", "epochs_trained": "epochs",
             "gate_epoch": "gate@", "svd_eligible": "svd", "wall_time_s": "wall_s", "experiment_id": "experiment"}
    cols = ["point", *summary["axes"], "status", "epochs_trained", "final_edge_compliance",
            "final_rule_compliance", "gate_epoch", "svd_eligible", "wall_time_s", "experiment_id"]
    head = [short.get(c, c) for c in cols]
    body = []
    for r in summary["rows"]:
        flat = {**r, **r["grid"]}
        cells = []
        for c in cols:
            v = flat.get(c)
            if c == "wall_time_s" and v is not None:
                cells.append(f"{v:.0f}")
            elif c == "svd_eligible":
                cells.append("yes" if v else "no")
            else:
                cells.append(_cell(v))
        body.append(cells)
    return "\n".join([*table_lines(head, body, rule=True), "", *_excluded_lines(summary)])


def _excluded_lines(summary: Mapping[str, Any]) -> list[str]:
    ex, n = summary["excluded_from_svd"], len(summary["rows"])
    if not ex:
        return [f"all {n} points passed the gate; none excluded from SVD analysis"]
    lines = [f"excluded from SVD analysis ({len(ex)} of {n}):"]
    for e in ex:
        g = ", ".join(f"{k}={v}" for k, v in e["grid"].items())
        lines.append(f"  point {e['point']} ({g}) {e['experiment_id']}: {e['status']}"
                     + (f": {e['reason']}" if e["reason"] else ""))
    return lines
