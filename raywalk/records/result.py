"""`ROOT/{experiment_id}/result.json`: raywalk's own record of a run (Ray Train V2 keeps none).

Rank 0 rewrites it atomically after every epoch; the driver finalises it. It
holds the config, the gate outcome, the curves (loss per optimizer step,
compliance per epoch), where the checkpoints are, and environment facts.
"""
from __future__ import annotations

import platform
import uuid
from datetime import datetime, timezone
from typing import Any

from raywalk import __version__
from raywalk.records.checkpoints import info as checkpoint_info   # the `checkpoints` block
from raywalk.science.compliance import Compliance
from raywalk.config import Config
from raywalk.records.lease import check_holder
from raywalk.records.storage import Store, warn

RESULT = "result.json"


def environment(workers: int, device: str) -> dict[str, Any]:
    import ray
    import torch

    return {"raywalk": __version__, "ray": ray.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "workers": workers, "device": device}


def record_worker_start(exp: Store, driver_token: str) -> tuple[int, int]:
    """Note a worker-group start; return (restarts of this experiment, restarts under this driver)."""
    exp.write_bytes(f"attempts/{driver_token}/{uuid.uuid4().hex}", b"")
    return count_restarts(exp), len(exp.listdir(f"attempts/{driver_token}")) - 1


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def record_notice(exp: Store, driver_token: str, attempt: int, notice: dict[str, Any]) -> None:
    """A preemption notice seen by worker-group start `attempt` of this driver (read when the next one resumes)."""
    exp.write_json(f"notices/{driver_token}/{attempt:04d}-{uuid.uuid4().hex[:8]}.json", notice)


def noticed(exp: Store, driver_token: str, attempt: int) -> bool:
    return any(n.startswith(f"{attempt:04d}-") for n in exp.listdir(f"notices/{driver_token}"))


def record_resume(exp: Store, entry: dict[str, Any]) -> None:
    """One resume, as its own file: written at once, so a kill right after cannot lose it."""
    exp.write_json(f"resumes/{entry['at'].replace(':', '')}-{uuid.uuid4().hex[:8]}.json", entry)


def list_resumes(exp: Store, log=warn) -> list[dict[str, Any]]:
    """Every resume of the experiment, oldest first; a torn record is skipped with a warning naming it."""
    out = []
    for n in exp.listdir("resumes"):
        if n.endswith(".json"):
            r = exp.read_json_or_warn(f"resumes/{n}", "resume record", log)
            if isinstance(r, dict):
                out.append(r)
    return out


def count_restarts(exp: Store) -> int:
    # Each driver run starts its worker group once; every further start is a restart.
    return sum(max(0, len(exp.listdir(f"attempts/{t}")) - 1) for t in exp.listdir("attempts"))


def by_jump_length(cfg: Config, by_r: Any) -> list[dict[str, Any]] | None:
    """The final evaluation's rule figures per jump length r (sorted), flagging r > w.

    by_r: {r: (rule_checks, compliant)}, or anything with as_dict() giving that
    (compliance.JumpLengthCounts). None gives None.
    """
    if by_r is None:
        return None
    if hasattr(by_r, "as_dict"):
        by_r = by_r.as_dict()
    rows = []
    for key in sorted(by_r, key=int):
        r = int(key)
        checks, ok = (int(x) for x in by_r[key])
        rows.append({"r": r, "r_over_w": round(r / cfg.w, 6), "beyond_window": r > cfg.w,
                     "rule_checks": checks, "compliant": ok,
                     "rule_compliance": ok / checks if checks else None})   # 0 checks: no figure, never a pass
    return rows


def compose(cfg: Config, experiment_id: str, curves: Any, last: Compliance | None, gate_epoch: int | None,
            epochs_trained: int, n_distinct: int | None, steps_per_epoch: int, exp: Store,
            env: dict[str, Any], restarts: int, finished: bool, by_r: Any = None) -> dict[str, Any]:
    """result.json's content. by_r: the last evaluation's counts per jump length (see by_jump_length)."""
    passed = gate_epoch is not None
    status = "passed" if passed else ("failed" if finished else "running")
    final = {"final_edge_compliance": last.edge if last else None,
             "final_rule_compliance": last.rule if last else None,
             "n_rule_checks": last.rule_total if last else None,
             "n_distinct_sequences": n_distinct}
    per_r = by_jump_length(cfg, by_r)
    failure = None
    if status == "failed":
        failure = {"reason": (f"gate not passed after {epochs_trained} epochs (max_epochs "
                              f"{cfg.train.max_epochs}): needs edge > {cfg.gate.edge} and rule > {cfg.gate.rule}"
                              + ("; no rule checks in the generated sequences" if last and last.rule_total == 0
                                 else "")),
                   **final, "by_jump_length": per_r}
    return {
        "experiment_id": experiment_id,
        "status": status,
        "svd_eligible": passed,
        "failure": failure,
        "gate": {"passed": passed, "epoch": gate_epoch, "edge_threshold": cfg.gate.edge,
                 "rule_threshold": cfg.gate.rule, "sequences": cfg.gate.sequences, **final,
                 "by_jump_length": per_r},
        "epochs_trained": epochs_trained,
        "steps_per_epoch": steps_per_epoch,
        "curves": {"train_loss": list(curves.train_loss), "edge_compliance": list(curves.edge_compliance),
                   "rule_compliance": list(curves.rule_compliance)},
        "gate_history": {"n_rule_checks": list(curves.n_rule_checks),
                         "n_distinct_sequences": list(curves.n_distinct_sequences)},
        "checkpoints": checkpoint_info(exp, gate_epoch),
        "restarts": restarts,
        "environment": env,
        "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
    }


class ResultWriter:
    """Rank 0's view: rewrites result.json after every epoch, and records resumes and notices as they happen."""

    def __init__(self, root: Store, experiment_id: str, cfg: Config, workers: int, device: str, driver_token: str,
                 corpus_uri: str, lease_holder: str = ""):
        self.exp = root.sub(experiment_id)
        self.experiment_id, self.cfg, self.driver_token = experiment_id, cfg, driver_token
        self.lease_holder = lease_holder
        self.env = environment(workers, device)
        self.corpus = {"id": cfg.corpus_id(), "uri": corpus_uri}
        self._check_lease()
        self.restarts, self.restarts_this_run = record_worker_start(self.exp, driver_token)

    def _check_lease(self) -> None:
        """LeaseLost unless our driver still holds the experiment: never write over a new holder's run."""
        check_holder(self.exp, self.experiment_id, self.lease_holder)

    def resumed(self, checkpoint: str | None, epoch: int, step: int) -> dict[str, Any]:
        """Record a resume: `epoch` is the epoch being trained (1-based), `step` the steps of it already done."""
        if not self.restarts_this_run:
            reason = "rerun"            # a new driver on an experiment with checkpoints
        elif noticed(self.exp, self.driver_token, self.restarts_this_run - 1):
            reason = "preemption"       # the previous worker group had a reclaim notice
        else:
            reason = "failure"
        entry = {"reason": reason, "checkpoint": checkpoint, "epoch": epoch, "step": step, "at": utc_now()}
        self._check_lease()
        record_resume(self.exp, entry)
        return entry

    def notice(self, notice: dict[str, Any]) -> None:
        self._check_lease()
        record_notice(self.exp, self.driver_token, self.restarts_this_run, notice)

    def epoch_done(self, curves: Any, last: Compliance, gate_epoch: int | None, epoch: int, n_distinct: int,
                   steps_per_epoch: int, by_r: Any = None, timing: Any = None, data: str | None = None) -> None:
        finished = gate_epoch is not None or epoch >= self.cfg.train.max_epochs
        r = compose(self.cfg, self.experiment_id, curves, last, gate_epoch, epoch, n_distinct, steps_per_epoch,
                    self.exp, self.env, self.restarts, finished, by_r=by_r)
        r["corpus"] = self.corpus
        r["resumes"] = list_resumes(self.exp)
        if data is not None:
            r["data_path"] = data
        if timing is not None:   # seconds per epoch (see README "The timing block"); not curves
            r["timing"] = timing.state_dict()
        self._check_lease()
        self.exp.write_json(RESULT, r)
