"""`ROOT/{experiment_id}/result.json`: raywalk's own record of a run (Ray Train V2 keeps none).

A `Result` is built by pure functions from the run's state (`build` after each epoch, then
`finalised` or `interrupted`) and written only at the edges, by `write`: rank 0 after every
epoch (ResultWriter.epoch_done), the driver once at the end (finalise, or a storage stop). It
holds the config, the gate outcome, the curves (loss per optimizer step, compliance per epoch),
where the checkpoints are, and environment facts. The run's accounting beside it (attempts/,
notices/, resumes/: see layout.py) is written as it happens, one file per event.
"""
from __future__ import annotations

import dataclasses
import platform
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raywalk import __version__
from raywalk.config import Config
from raywalk.messages import Tell, tell
from raywalk.records import layout
from raywalk.records.checkpoints import info as checkpoint_info   # the `checkpoints` block
from raywalk.records.layout import RESULT, utc_iso
from raywalk.records.lease import check_holder
from raywalk.records.storage import Store


# ---- status: the one place it is derived ----------------------------------------------------
STATUSES = ("running", "passed", "failed", "interrupted")   # what a record says
FINISHED = ("passed", "failed")   # the gate decided: never trained again, never written over
NO_LEASE_GRACE_S = 120.0


def is_finished(status: object) -> bool:
    return status in FINISHED


def status_now(recorded: object, lease_live: bool | None, updated: float | None, now: float) -> str:
    """What a run is now (`raywalk ls`): finished as recorded; otherwise `running` while its driver's lease is
    live and `interrupted` once it is stale (lease_live None: no lease file; False: stale, torn or foreign).

    Without a lease file a record says `interrupted` for a storage stop; one saying `running` is
    `running` if written within NO_LEASE_GRACE_S: a driver between writing result.json and taking
    or dropping its lease, or one older than leases in its first minutes."""
    recorded = recorded or "running"
    if is_finished(recorded):
        return str(recorded)
    if lease_live is not None:
        return "running" if lease_live else "interrupted"
    if recorded == "interrupted":
        return "interrupted"
    return "running" if updated is not None and now - updated < NO_LEASE_GRACE_S else "interrupted"


def sweep_status(recorded: object, trial_error: object) -> str:
    """A sweep point's status: passed | failed (finished) | running (interrupted; a rerun resumes) |
    error (its trial raised) | not_run (recorded None: no readable result.json)."""
    if recorded is None:
        return "error" if trial_error else "not_run"
    if trial_error and not is_finished(recorded):
        return "error"
    return str(recorded or "running")

if TYPE_CHECKING:
    from raywalk.science.compliance import Compliance


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()   # a key the file does not hold (a partial record, or one older than the key)


@dataclass(frozen=True)
class Result:
    """result.json, key for key in the file's order; UNSET fields are not written.

    Values are kept as read (a partial or hand-edited record round-trips unchanged); keys this
    version does not know go to `extra`, written after the known ones.
    """
    experiment_id: str = UNSET
    status: str = UNSET                     # running / passed / failed / interrupted
    svd_eligible: bool = UNSET
    failure: dict | None = UNSET            # why the gate was not passed (failed runs), else None
    gate: dict = UNSET
    epochs_trained: int = UNSET
    steps_per_epoch: int = UNSET
    curves: dict = UNSET                    # train_loss, edge_compliance, rule_compliance
    gate_history: dict = UNSET              # n_rule_checks, n_distinct_sequences per epoch
    checkpoints: dict = UNSET               # directory, kept, latest, gate
    restarts: int = UNSET
    environment: dict = UNSET
    updated_at: str = UNSET
    config: dict = UNSET
    corpus: dict = UNSET                    # id, uri
    resumes: list = UNSET
    data_path: str = UNSET                  # resident / stream
    timing: dict = UNSET                    # seconds per epoch (README "The timing block")
    interrupted: dict = UNSET               # reason, at (a storage stop, a missing record)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in _FIELDS if getattr(self, f) is not UNSET}
        return {**out, **{k: v for k, v in self.extra.items() if k not in out}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Result":
        return cls(**{k: d[k] for k in _FIELDS if k in d}, extra={k: v for k, v in d.items() if k not in _FIELDS})

    @property
    def finished(self) -> bool:
        return is_finished(self.status)

    @property
    def gate_epoch(self) -> int | None:
        return self.gate.get("epoch") if isinstance(self.gate, dict) else None


_FIELDS = tuple(f.name for f in dataclasses.fields(Result) if f.name != "extra")


@dataclass(frozen=True)
class EpochFacts:
    """What rank 0 knows after an epoch, as plain facts."""
    curves: Any                  # science.loop.Curves (or anything with its five lists)
    last: Compliance | None      # the gate's counts of this epoch
    gate_epoch: int | None       # the epoch the gate passed at, None while not passed
    epochs_trained: int
    n_distinct: int | None       # distinct gate sequences
    steps_per_epoch: int
    by_r: Any = None             # the counts per jump length (see by_jump_length)
    timing: dict | None = None   # Timing.state_dict()
    data_path: str | None = None


def environment(workers: int, device: str) -> dict[str, Any]:
    from importlib.metadata import version   # the installed versions, without importing Ray here

    return {"raywalk": __version__, "ray": version("ray"), "torch": version("torch"),
            "python": platform.python_version(), "workers": workers, "device": device}


# ---- the run's accounting: one file per event ---------------------------------------------

def record_worker_start(exp: Store, driver_token: str) -> tuple[int, int]:
    """Note a worker-group start (its attempt marker); return (restarts of this experiment, restarts under
    this driver)."""
    exp.write_bytes(layout.attempt_marker(driver_token), b"")
    return count_restarts(exp), len(exp.listdir(f"{layout.ATTEMPTS}/{driver_token}")) - 1


def record_notice(exp: Store, driver_token: str, attempt: int, notice: dict[str, Any]) -> None:
    """A preemption notice seen by worker-group start `attempt` of this driver (read when the next one resumes)."""
    exp.write_json(layout.notice_name(driver_token, attempt), notice)


def noticed(exp: Store, driver_token: str, attempt: int) -> bool:
    return any(layout.notice_of(n, attempt) for n in exp.listdir(f"{layout.NOTICES}/{driver_token}"))


def record_resume(exp: Store, entry: dict[str, Any]) -> None:
    """One resume, as its own file: written at once, so a kill right after cannot lose it."""
    exp.write_json(layout.resume_name(entry["at"]), entry)


def list_resumes(exp: Store, log: Tell = tell) -> list[dict[str, Any]]:
    """Every resume of the experiment, oldest first; a torn record is skipped with a warning naming it."""
    out = []
    for n in exp.listdir(layout.RESUMES):
        if n.endswith(".json"):
            r = exp.read_json_or_warn(f"{layout.RESUMES}/{n}", "resume record", log)
            if isinstance(r, dict):
                out.append(r)
    return out


def count_restarts(exp: Store) -> int:
    # Each driver run starts its worker group once; every further start is a restart.
    return sum(max(0, len(exp.listdir(f"{layout.ATTEMPTS}/{t}")) - 1) for t in exp.listdir(layout.ATTEMPTS))


# ---- the record, built by pure functions ------------------------------------------------

def by_jump_length(by_r: Any, w: int) -> list[dict[str, Any]] | None:
    """The rule figures per jump length r (sorted), flagging r > w: result.json's gate.by_jump_length.

    by_r: {r: (rule_checks, compliant)} (keys may be strings, as result.json gives them back), or
    anything with as_dict() giving that (JumpLengthCounts). None gives None.
    """
    if by_r is None:
        return None
    if hasattr(by_r, "as_dict"):
        by_r = by_r.as_dict()
    rows = []
    for key in sorted(by_r, key=int):
        r = int(key)
        checks, ok = (int(x) for x in by_r[key])
        rows.append({"r": r, "r_over_w": round(r / w, 6), "beyond_window": r > w,
                     "rule_checks": checks, "compliant": ok,
                     "rule_compliance": ok / checks if checks else None})   # 0 checks: no figure, never a pass
    return rows


def gate_block(cfg: Config, e: EpochFacts) -> dict[str, Any]:
    last = e.last
    return {"passed": e.gate_epoch is not None, "epoch": e.gate_epoch, "edge_threshold": cfg.gate.edge,
            "rule_threshold": cfg.gate.rule, "sequences": cfg.gate.sequences,
            "final_edge_compliance": last.edge if last else None,
            "final_rule_compliance": last.rule if last else None,
            "n_rule_checks": last.rule_total if last else None,
            "n_distinct_sequences": e.n_distinct,
            "by_jump_length": by_jump_length(e.by_r, cfg.w)}


def failure_block(cfg: Config, e: EpochFacts, gate: dict[str, Any]) -> dict[str, Any]:
    """Why a finished run did not pass: the reason, then the gate's final figures."""
    none_checked = e.last is not None and e.last.rule_total == 0
    reason = (f"gate not passed after {e.epochs_trained} epochs (max_epochs {cfg.train.max_epochs}): needs edge > "
              f"{cfg.gate.edge} and rule > {cfg.gate.rule}"
              + ("; no rule checks in the generated sequences" if none_checked else ""))
    keep = ("final_edge_compliance", "final_rule_compliance", "n_rule_checks", "n_distinct_sequences",
            "by_jump_length")
    return {"reason": reason, **{k: gate[k] for k in keep}}


def status_after_epoch(cfg: Config, e: EpochFacts) -> str:
    if e.gate_epoch is not None:
        return "passed"
    return "failed" if e.epochs_trained >= cfg.train.max_epochs else "running"


def build(cfg: Config, experiment_id: str, e: EpochFacts, *, checkpoints: dict[str, Any],
          environment: dict[str, Any], restarts: int, corpus: dict[str, Any] = UNSET,
          resumes: list[dict[str, Any]] = UNSET, updated_at: str | None = None) -> Result:
    """The record after an epoch. corpus and resumes: UNSET leaves them out (the worker always gives them)."""
    status, gate = status_after_epoch(cfg, e), gate_block(cfg, e)
    c = e.curves
    return Result(
        experiment_id=experiment_id, status=status, svd_eligible=status == "passed",
        failure=failure_block(cfg, e, gate) if status == "failed" else None, gate=gate,
        epochs_trained=e.epochs_trained, steps_per_epoch=e.steps_per_epoch,
        curves={"train_loss": list(c.train_loss), "edge_compliance": list(c.edge_compliance),
                "rule_compliance": list(c.rule_compliance)},
        gate_history={"n_rule_checks": list(c.n_rule_checks), "n_distinct_sequences": list(c.n_distinct_sequences)},
        checkpoints=checkpoints, restarts=restarts, environment=environment,
        updated_at=updated_at or utc_iso(), config=cfg.to_dict(), corpus=corpus, resumes=resumes,
        data_path=UNSET if e.data_path is None else e.data_path, timing=UNSET if e.timing is None else e.timing)


def finalised(r: Result, checkpoints: dict[str, Any], restarts: int) -> Result:
    """The driver's last word: the checkpoints Ray kept and every restart, counted after the last epoch."""
    return dataclasses.replace(r, checkpoints=checkpoints, restarts=restarts)


def interrupted(r: Result, reason: str, checkpoints: dict[str, Any] = UNSET, at: str | None = None) -> Result:
    """The record of a run that stopped unfinished (a storage stop, a record missing at the end)."""
    r = dataclasses.replace(r, status="interrupted", interrupted={"reason": reason, "at": at or utc_iso()})
    return r if checkpoints is UNSET else dataclasses.replace(r, checkpoints=checkpoints)


# ---- the edges: read and write --------------------------------------------------------

class Unreadable(ValueError):
    """result.json is there but torn, not JSON, or not a JSON object; the message says which."""


def load(exp: Store) -> dict[str, Any] | None:
    """The one reader of result.json: its content; None when there is none; Unreadable when it is there but
    not a record (other storage errors propagate). Callers choose what an unreadable one means."""
    try:
        r = exp.read_json_if_exists(RESULT)
    except ValueError as e:
        raise Unreadable(f"{exp.child_uri(RESULT)} is not valid JSON ({e})") from None
    if r is not None and not isinstance(r, dict):
        raise Unreadable(f"{exp.child_uri(RESULT)} is not a raywalk result (not a JSON object)")
    return r


def read(exp: Store, log: Tell = tell) -> Result | None:
    """The experiment's record; None when there is none, or it is unreadable (then logged: it is rewritten)."""
    try:
        r = load(exp)
    except Unreadable as e:
        log(f"warning: skipping unreadable result: {e}")
        return None
    return None if r is None else Result.from_json(r)


def read_finished(exp: Store, log: Tell = tell) -> Result | None:
    """The record if the run is finished (never trained again); an unreadable one is not finished."""
    r = read(exp, log)
    return r if r is not None and r.finished else None


def write(exp: Store, experiment_id: str, r: Result, lease_holder: str = "") -> None:
    """Write the record; first LeaseLost unless `lease_holder` (when given) still holds the experiment,
    so a paused or cut-off driver's run never writes over a new holder's."""
    check_holder(exp, experiment_id, lease_holder)
    exp.write_json(RESULT, r.to_json())


class ResultWriter:
    """Rank 0's view: rewrites result.json after every epoch, and records resumes and notices as they happen."""

    def __init__(self, root: Store, experiment_id: str, cfg: Config, workers: int, device: str, driver_token: str,
                 corpus_uri: str, lease_holder: str = "", bucket: dict | None = None):
        self.exp = root.sub(experiment_id)
        self.bucket = bucket   # {id, members}: trained in a bucket (result.json's `bucket` block)
        self.experiment_id, self.cfg, self.driver_token = experiment_id, cfg, driver_token
        self.lease_holder = lease_holder
        self.env = environment(workers, device)
        self.corpus = {"id": cfg.corpus_id(), "uri": corpus_uri}
        self.restarts = self.restarts_this_run = 0

    def start(self) -> "ResultWriter":
        """Record this worker-group start (its attempt marker) and count the restarts so far."""
        self._check_lease()
        self.restarts, self.restarts_this_run = record_worker_start(self.exp, self.driver_token)
        earlier = read(self.exp)
        block = earlier.extra.get("bucket") if earlier is not None else None
        if self.bucket is None and isinstance(block, dict):   # a member of a bucket, now going on alone
            self.bucket = {**block, "continued_solo_from_epoch": block.get("continued_solo_from_epoch")
                           or (earlier.epochs_trained if isinstance(earlier.epochs_trained, int) else 0) + 1}
        return self

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
        entry = {"reason": reason, "checkpoint": checkpoint, "epoch": epoch, "step": step, "at": utc_iso()}
        self._check_lease()
        record_resume(self.exp, entry)
        return entry

    def notice(self, notice: dict[str, Any]) -> None:
        self._check_lease()
        record_notice(self.exp, self.driver_token, self.restarts_this_run, notice)

    def epoch_done(self, curves: Any, last: Compliance, gate_epoch: int | None, epoch: int, n_distinct: int,
                   steps_per_epoch: int, by_r: Any = None, timing: Any = None, data: str | None = None) -> None:
        e = EpochFacts(curves, last, gate_epoch, epoch, n_distinct, steps_per_epoch, by_r,
                       timing.state_dict() if timing is not None else None, data)
        r = build(self.cfg, self.experiment_id, e, checkpoints=checkpoint_info(self.exp, gate_epoch),
                  environment=self.env, restarts=self.restarts, corpus=self.corpus, resumes=list_resumes(self.exp))
        if self.bucket is not None:
            r = dataclasses.replace(r, extra={**r.extra, "bucket": self.bucket})
        write(self.exp, self.experiment_id, r, self.lease_holder)
