"""What is under a storage root: one row per experiment, one per sweep (`raywalk ls`).

Reads only ROOT/<id>/result.json, ROOT/<id>/lease.json (for runs recorded as
running) and ROOT/sweeps/<id>/summary.json, concurrently, so it stays fast on
hundreds of experiments, locally or on s3://.

Status: result.json's "passed" / "failed" as recorded; "interrupted" as recorded (a storage
stop) unless a live lease says a driver runs it again. A run recorded as "running" is
"running" while its driver's lease is live (layout.lease_live) and "interrupted" once the
lease is stale. With no lease file it is "interrupted", unless result.json was updated within
NO_LEASE_GRACE_S: that covers a driver between writing result.json and taking or
dropping its lease, and a driver older than leases in its first minutes.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import pyarrow.fs as pafs

from raywalk.records import layout
from raywalk.records.layout import LEASE, RESULT, SUMMARY, SWEEPS, parse_utc, utc_iso
from raywalk.records.storage import Store

NO_LEASE_GRACE_S = 120.0
STATUSES = ("running", "passed", "failed", "interrupted")
THREADS = 16   # concurrent reads: object stores answer each GET in tens of ms


def _read_json(store: Store, rel: str) -> Any | None:
    """The JSON at rel, None if absent; ValueError if it is there but unreadable."""
    try:
        return json.loads(store.read_bytes(rel))
    except FileNotFoundError:
        return None
    except OSError:
        if not store.exists(rel):   # object stores raise a plain OSError for a missing key
            return None
        raise


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def lease_live(lease: dict[str, Any] | None, now: float) -> bool:
    """layout's liveness rule on a lease file as read; a torn or foreign one is not live."""
    try:
        return layout.lease_live(float(lease["heartbeat_unix"]), float(lease["stale_after_s"]), now)  # type: ignore
    except (TypeError, KeyError, ValueError):
        return False


def status_of(result: dict[str, Any] | None, lease: dict[str, Any] | None, updated: float | None,
              now: float) -> str:
    recorded = (result or {}).get("status", "running")
    if recorded in ("passed", "failed"):
        return recorded
    if lease is not None:
        return "running" if lease_live(lease, now) else "interrupted"
    if recorded == "interrupted":   # a driver stopped by a storage fault says so itself
        return "interrupted"
    return "running" if updated is not None and now - updated < NO_LEASE_GRACE_S else "interrupted"


def _read_result(exp: Store) -> tuple[dict[str, Any] | None, str | None]:
    """(result.json, None), (None, None) when absent, (None, why) when unreadable."""
    try:
        result = _read_json(exp, RESULT)
        if result is not None and not isinstance(result, dict):
            raise ValueError("not a JSON object")
        return result, None
    except ValueError as e:
        return None, f"{RESULT} unreadable: {e}"


def _read_lease(exp: Store) -> dict[str, Any] | None:
    try:
        return _read_json(exp, LEASE)
    except ValueError:
        return {}   # torn or foreign: counts as present but not live


def _updated(exp: Store, result: dict[str, Any]) -> float | None:
    updated = parse_utc(result.get("updated_at"))
    if updated is None:   # written before updated_at existed
        info = exp.fs.get_file_info(exp.path(RESULT))
        updated = info.mtime.timestamp() if info.type == pafs.FileType.File and info.mtime else None
    return updated


def experiment_row(exp: Store, name: str, now: float) -> dict[str, Any] | None:
    """The row of ROOT/name, or None when it holds neither result.json nor lease.json."""
    result, error = _read_result(exp)
    lease = _read_lease(exp) if result is None or result.get("status") not in ("passed", "failed") else None
    if result is None and lease is None and error is None:
        return None
    r = result or {}
    updated = _updated(exp, result) if result is not None else None
    g = r.get("gate") if isinstance(r.get("gate"), dict) else {}   # partial records: missing fields are "-"
    status = "unreadable" if error else status_of(result, lease, updated, now)
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
        "host": (lease or {}).get("host") if status == "running" else None,
        "error": error,
        "result": exp.child_uri(RESULT) if result is not None else None,
    }


def sweep_row(sd: Store, name: str, by_id: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """A sweep's points counted by status: an experiment listed under this root gives its current
    status, any other point the status its summary recorded."""
    try:
        s = _read_json(sd, SUMMARY)
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
    counts = {s: 0 for s in STATUSES}
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
                 + ", ".join(f"{c[k]} {k}" for k in c if c[k] or k in STATUSES))
    for s in ov["sweeps"]:
        if s["error"]:
            lines.append(f"sweep {s['sweep_id']}: {s['error']}")
            continue
        cs = ", ".join(f"{v} {k}" for k, v in sorted(s["counts"].items()))
        lines.append(f"sweep {s['sweep_id']}: {s['points']} point(s): {cs}")
    return "\n".join(lines)
