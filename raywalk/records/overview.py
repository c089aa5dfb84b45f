"""What is under a storage root: one row per experiment, one per sweep (`raywalk ls`).

Reads only ROOT/<id>/result.json, ROOT/<id>/lease.json (for runs recorded as
running) and ROOT/sweeps/<id>/summary.json, concurrently, so it stays fast on
hundreds of experiments, locally or on s3://.

Status: result.status_now, from the record and the lease (records/lease.py).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import pyarrow.fs as pafs

from raywalk.records import layout, lease, result
from raywalk.records.layout import RESULT, SUMMARY, SWEEPS, parse_utc, utc_iso
from raywalk.records.storage import Store

THREADS = 16   # concurrent reads: object stores answer each GET in tens of ms


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _read_result(exp: Store) -> tuple[dict[str, Any] | None, str | None]:
    """(result.json, None), (None, None) when absent, (None, why) when unreadable."""
    try:
        return result.load(exp), None
    except result.Unreadable as e:
        return None, str(e)


def _updated(exp: Store, rec: dict[str, Any]) -> float | None:
    updated = parse_utc(rec.get("updated_at"))
    if updated is None:   # written before updated_at existed
        info = exp.fs.get_file_info(exp.path(RESULT))
        updated = info.mtime.timestamp() if info.type == pafs.FileType.File and info.mtime else None
    return updated


def experiment_row(exp: Store, name: str, now: float) -> dict[str, Any] | None:
    """The row of ROOT/name, or None when it holds neither result.json nor lease.json."""
    rec, error = _read_result(exp)
    has_lease, held = (False, None) if rec is not None and result.is_finished(rec.get("status")) else lease.stored(exp)
    if rec is None and not has_lease and error is None:
        return None
    r = rec or {}
    updated = _updated(exp, rec) if rec is not None else None
    g = r.get("gate") if isinstance(r.get("gate"), dict) else {}   # partial records: missing fields are "-"
    live = (held is not None and held.live(now)) if has_lease else None
    status = "unreadable" if error else result.status_now(r.get("status"), live, updated, now)
    return {
        "experiment_id": r.get("experiment_id", name),
        "status": status,
        "recorded_status": r.get("status"),
        "epochs_trained": r.get("epochs_trained"),
        "max_epochs": _dig(r, "config", "train", "max_epochs"),
        "gate_epoch": g.get("epoch"),
        "final_edge_compliance": g.get("final_edge_compliance"),
        "final_rule_compliance": g.get("final_rule_compliance"),
        "restarts": r.get("restarts"),
        "updated_at": utc_iso(updated) if updated is not None else None,
        "host": held.host if held is not None and status == "running" else None,
        "error": error,
        "result": exp.child_uri(RESULT) if rec is not None else None,
    }


def sweep_row(sd: Store, name: str, by_id: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """A sweep's points counted by status: an experiment listed under this root gives its current
    status, any other point the status its summary recorded."""
    try:
        s = sd.read_json_if_exists(SUMMARY)
    except ValueError as e:
        return {"sweep_id": name, "points": None, "counts": {}, "error": f"{SUMMARY} unreadable: {e}"}
    if not isinstance(s, dict):
        return None
    counts: dict[str, int] = {}
    for row in s.get("rows") or []:
        exp = by_id.get(row.get("experiment_id"))
        st = exp["status"] if exp is not None else row.get("status", "not_run")
        counts[st] = counts.get(st, 0) + 1
    return {"sweep_id": s.get("sweep_id", name), "name": s.get("name"), "points": len(s.get("rows") or []),
            "counts": counts, "axes": s.get("axes"), "error": None, "summary": sd.child_uri(SUMMARY)}


def scan(root: Store, now: float | None = None) -> dict[str, Any]:
    """Every experiment and sweep under root (experiments sorted by id)."""
    now = time.time() if now is None else now
    names = [n for n in root.listdir() if layout.is_experiment(n)]
    sweeps = root.listdir(SWEEPS)
    with ThreadPoolExecutor(THREADS) as pool:
        rows = [r for r in pool.map(lambda n: experiment_row(root.sub(n), n, now), names) if r is not None]
        rows.sort(key=lambda r: r["experiment_id"])
        by_id = {r["experiment_id"]: r for r in rows}
        srows = [s for s in pool.map(lambda n: sweep_row(root.sub(SWEEPS, n), n, by_id), sweeps) if s is not None]
    counts = {s: 0 for s in result.STATUSES}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {"root": root.uri, "scanned_at": utc_iso(now),
            "counts": counts, "experiments": rows, "sweeps": srows}


def table_lines(head: Sequence[str], body: Sequence[Sequence[str]], rule: bool = False) -> list[str]:
    """Columns two spaces apart, each as wide as its widest cell; `rule`: a line of dashes under the head."""
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    rows = [head, *([["-" * w for w in widths]] if rule else []), *body]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]


def _fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def format_overview(ov: dict[str, Any]) -> str:
    """The table `raywalk ls` prints."""
    head = ["experiment", "status", "epochs", "gate@", "edge", "rule", "restarts", "updated (UTC)"]
    body = []
    for r in ov["experiments"]:
        ep = _fmt(r["epochs_trained"]) + ("/" + str(r["max_epochs"]) if r["max_epochs"] is not None else "")
        upd = r["updated_at"][:19].replace("T", " ") if r["updated_at"] else "-"
        body.append([r["experiment_id"], r["status"] + (f" ({r['host']})" if r["host"] else ""), ep,
                     _fmt(r["gate_epoch"]), _fmt(r["final_edge_compliance"], ".3f"),
                     _fmt(r["final_rule_compliance"], ".3f"), _fmt(r["restarts"]), upd])
    lines = table_lines(head, body) if body else []
    c = ov["counts"]
    lines.append(f"{len(body)} experiment(s) under {ov['root']}: "
                 + ", ".join(f"{c[k]} {k}" for k in c if c[k] or k in result.STATUSES))
    for s in ov["sweeps"]:
        if s["error"]:
            lines.append(f"sweep {s['sweep_id']}: {s['error']}")
            continue
        cs = ", ".join(f"{v} {k}" for k, v in sorted(s["counts"].items()))
        lines.append(f"sweep {s['sweep_id']}: {s['points']} point(s): {cs}")
    return "\n".join(lines)
