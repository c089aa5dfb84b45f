"""Driver side of a training run: corpus, Ray Data, TorchTrainer, resume, result.json.

The experiment lives at `ROOT/{experiment_id}/` (ROOT local or s3://...):
result.json, checkpoints/ (Ray's run directory: epoch_NNNN checkpoints and its
checkpoint_manager_snapshot.json) and attempts/ (worker-group starts, counted
as restarts). A fixed RunConfig(storage_path, name) is what makes Ray resume a
killed driver's run when the same command runs again.
"""
from __future__ import annotations

import functools
import os
import signal
import threading
import uuid
from typing import Any, Callable

from raywalk.records import layout, lease, result
from raywalk.service import ray_env
from raywalk.service import stops
from raywalk.service import trackers
from raywalk.records.checkpoints import KEEP, corpora, info as checkpoint_info, resume_hint
from raywalk.config import Config, ConfigError
from raywalk.service.windows import planned_windows
from raywalk.service.corpus import build_corpus, ray_mapper
from raywalk.records.lease import LeaseLost
from raywalk.records.result import count_restarts
from raywalk.records.layout import RESULT, RUN_DIR
from raywalk.records.errors import StorageUnwritable, unwritable
from raywalk.records.storage import Store
from raywalk.messages import Tell, tell



def steps_per_epoch(cfg: Config, n_windows: int) -> int:
    per_worker = n_windows // cfg.run.workers          # the equal split drops the remainder
    return per_worker // (cfg.train.batch_size // cfg.run.workers)


def retire(root: Store, experiment_id: str, log: Tell) -> None:
    """--fresh: move an earlier run aside (never delete it) and say where it went."""
    if not root.exists(experiment_id):
        return
    aside = layout.aside(experiment_id)
    root.move(experiment_id, aside)
    log(f"--fresh: moved the earlier run to {root.child_uri(aside)}")


def mark_interrupted(exp: Store, exp_id: str, cfg: Config, reason: str, log: Tell) -> bool:
    """result.json says `interrupted` with the reason, if it can still be written (never over a finished run)."""
    try:
        r = result.read(exp, log) or result.Result(experiment_id=exp_id, config=cfg.to_dict())
        if r.finished:
            return False
        result.write(exp, exp_id, result.interrupted(r, reason, checkpoint_info(exp, r.gate_epoch)))
        return True
    except Exception:   # the disk that stopped the run may refuse this too; the line says it all
        return False


def check_same_corpus(exp: Store, exp_id: str, corpus) -> None:
    """ConfigError unless every checkpoint that records its corpus was trained on this one: a resume over
    another (a rebuild in a newer format, other walks under the same id) would change the data between epochs.
    Checkpoints from before the record have nothing to compare and are accepted; those written from now on
    record it."""
    now = corpus.identity
    for name, was in corpora(exp.sub(RUN_DIR)).items():
        if (was.get("format_version"), was.get("sha256")) != (now["format_version"], now["sha256"]):
            raise ConfigError(f"corpus: experiment {exp_id} was trained on corpus {was.get('id')} format "
                              f"{was.get('format_version')} (sha256 {str(was.get('sha256'))[:12]}, checkpoint "
                              f"{name}), not the one at {corpus.uri} (format {now['format_version']}, sha256 "
                              f"{now['sha256'][:12]}): resuming would change its data between epochs; finish it "
                              f"with the raywalk that built its corpus, or start over with --fresh")


def check_storage_reachable(root: Store, nodes: list[dict]) -> None:
    """A local storage root works only when every node is on this one host (tests run several there)."""
    hosts = sorted({n["NodeManagerAddress"] for n in nodes if n.get("Alive")})
    if root.local and len(hosts) > 1:
        raise ConfigError(f"run.storage: {root.uri!r} is invalid: the cluster's nodes are on {len(hosts)} hosts "
                          f"({', '.join(hosts[:4])}{', ...' if len(hosts) > 4 else ''}) and workers elsewhere cannot "
                          f"see a local path; use a URI every node reaches, e.g. s3://bucket/prefix")


def worker_env(cfg: Config, verbose: bool) -> dict[str, str]:
    env = ray_env.worker_env(verbose)
    if cfg.run.deterministic and cfg.run.gpus_per_worker > 0:
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"   # read when CUDA starts: deterministic cuBLAS
    return env


def train(cfg: Config, *, fresh: bool = False, verbose: bool = False, progress: bool = True,
          callbacks: list | None = None, log: Tell = tell) -> dict[str, Any]:
    """Run (or resume, or report) the experiment for cfg; returns its result.json content.

    `callbacks` are Ray Train UserCallbacks (a Tune trial passes TuneReportCallback).
    """
    root = Store.open(cfg.run.storage)
    cfg = cfg.replace(**{"run.storage": root.uri})   # absolute: workers run in other directories
    exp_id = cfg.experiment_id()
    if fresh:
        lease.Lease(root.sub(exp_id), exp_id).check_free()   # never move a running driver's experiment
        retire(root, exp_id, log)
    done = result.read_finished(root.sub(exp_id), log)   # torn: not finished, train (and rewrite it)
    if done is not None:
        log(f"experiment {exp_id} already finished ({done.status}); not training again "
            f"(use --fresh to start over)")
        return done.to_json()
    check_before_ray(cfg)
    run = functools.partial(_train_leased, cfg, root, exp_id, verbose=verbose, progress=progress,
                            callbacks=callbacks, log=log)
    return _leased(cfg, root.sub(exp_id), exp_id, run, log)


def check_before_ray(cfg: Config) -> None:
    """Refuse what cannot train before any cluster resources are taken."""
    planned = planned_windows(cfg)
    if steps_per_epoch(cfg, planned) < 1:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is invalid: the corpus gives only {planned} "
                          f"windows of w+1 tokens, fewer than one batch per worker")
    trackers.check(cfg.run.trackers, cfg.run.storage)   # a missing tracker package


class FitStop:
    """Stops the fit in progress once the lease is lost. Where fit() runs in the main thread, Ray's own Ctrl-C
    handler aborts the run's controller and workers (SIGINT). Elsewhere (a Tune trial runs it in a thread,
    where Ray installs no handler) the stop is recorded under the driver run's token, and rank 0, which polls
    for it between steps (stops.StopPoll), ends the run as a worker that meets a lost lease does."""

    def __init__(self):
        self._lock = threading.Lock()
        self.token: str | None = None   # the driver run's, while fit() runs
        self.in_main = False
        self.reason: str | None = None

    def start(self, token: str) -> None:
        with self._lock:
            self.token, self.in_main = token, threading.current_thread() is threading.main_thread()
            lost = self.reason
        if lost is not None:   # lost before fit() began: the workers stop at their first poll
            stops.record(token, stops.LEASE, lost)

    def end(self) -> None:
        with self._lock:
            self.token = None

    def __call__(self, reason: str) -> None:
        with self._lock:
            self.reason = reason
            token, in_main = self.token, self.in_main
        if token is None:
            return
        if in_main:
            os.kill(os.getpid(), signal.SIGINT)
        else:
            stops.record(token, stops.LEASE, reason)


def _leased(cfg: Config, exp: Store, exp_id: str, run: Callable, log: Tell) -> dict[str, Any]:
    """run(held=, fitting=) under the experiment's lease; a storage that refuses writes stops it in one line."""
    fitting = FitStop()

    try:
        with lease.hold(exp, exp_id, log=log, on_lost=fitting) as held:   # one driver per experiment
            exp.sweep_temps()   # the lease holder is the only writer here: leftovers of killed writes go
            return run(held=held, fitting=fitting)
    except Exception as e:   # full disk, quota, read-only, denied: stop at once, say how to go on
        u = storage_cause(e, exp.uri)
        if u is None:
            raise
        raise storage_stop(exp, exp_id, cfg, u, log) from None


def storage_cause(e: BaseException, where: str) -> StorageUnwritable | None:
    """The storage fault that stopped a run (full disk, quota, read-only, denied), None for anything else
    (a lease lost or held is its own stop)."""
    return None if isinstance(e, (LeaseLost, lease.LeaseHeld)) else unwritable(e, where)


def storage_stop(exp: Store, exp_id: str, cfg: Config, u: StorageUnwritable, log: Tell) -> StorageUnwritable:
    """The run marked `interrupted` (if the storage still takes that) and the one-line stop, with its resume hint."""
    stop = StorageUnwritable(u.what, u.why, u.free, resume_hint(exp))
    mark_interrupted(exp, exp_id, cfg, stop.line(), log)
    return stop


def _train_leased(cfg: Config, root: Store, exp_id: str, *, verbose: bool, progress: bool, callbacks: list | None,
                  log: Tell, held: lease.Lease | None = None,
                  fitting: FitStop | None = None) -> dict[str, Any]:
    ray_env.ensure_ray(cfg, verbose=verbose)
    import ray

    check_storage_reachable(root, ray.nodes())
    spec = worker_spec(cfg, root, exp_id, verbose=verbose, progress=progress, log=log,
                        holder=held.holder if held is not None else "")
    fit(_trainer(spec, root, callbacks), spec, root.sub(exp_id), held, fitting)
    return finalise(root, exp_id, log, held=held)


def driver_streams(cfg: Config, exp: Store) -> bool:
    """Whether the driver builds the streaming path's windows for the workers: train.data=stream, unless the
    run took the resident path (a choice kept for the whole run, dataset.plan_data), whose windows would then
    sit in the object store beside every worker's tensor, twice in host memory."""
    if cfg.train.data != "stream":
        return False
    r = result.read(exp, log=lambda s: None)   # torn or missing: result.read_finished has said so
    return r is None or r.data_path != "resident"


def worker_spec(cfg: Config, root: Store, exp_id: str, *, verbose: bool, progress: bool, log: Tell, holder: str):
    """The corpus (built or reused), the epoch's steps and what every worker is handed."""
    from raywalk.service.dataset import window_dataset, windows_per_epoch
    from raywalk.service.worker import WorkerSpec

    corpus, summary = build_corpus(cfg, root, mapper=ray_mapper(), progress=progress, log=log)
    log(f"corpus {'reused' if summary['reused'] else 'built'}: {corpus.uri}")
    n_windows = windows_per_epoch(corpus, cfg.w)
    steps = steps_per_epoch(cfg, n_windows)
    exp = root.sub(exp_id)
    check_same_corpus(exp, exp_id, corpus)
    log(f"experiment {exp_id}: {'resuming' if exp.exists(RUN_DIR) else 'starting'}; {steps} steps/epoch, "
        f"{cfg.run.workers} worker(s), results in {exp.uri}")
    return WorkerSpec(config=cfg, experiment_id=exp_id, corpus_uri=corpus.uri, corpus_manifest=corpus.manifest,
                      gate_starts=tuple(corpus.gate_starts(cfg.gate.sequences).tolist()), steps_per_epoch=steps,
                      driver_token=uuid.uuid4().hex, progress=progress, verbose=verbose,
                      windows=window_dataset(corpus, cfg.w, materialize=True) if driver_streams(cfg, exp) else None,
                      n_windows=n_windows, lease_holder=holder)


def _trainer(spec, root: Store, callbacks: list | None):
    """The TorchTrainer: a fixed RunConfig(storage_path, name) is what lets a rerun resume Ray's run."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raywalk.service.worker import train_loop_per_worker

    cfg, use_gpu = spec.config, spec.config.run.gpus_per_worker > 0
    resources = {"CPU": cfg.run.cpus_per_worker, **({"GPU": cfg.run.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        functools.partial(stops.guarded_loop, spec, train_loop_per_worker),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               accelerator_type=cfg.run.accelerator_type or None),
        run_config=ray.train.RunConfig(
            name=RUN_DIR,
            storage_path=root.sub(spec.experiment_id).path(),
            storage_filesystem=root.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures,
                                                   max_preemption_failures=cfg.run.max_preemptions),
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP),
            worker_runtime_env={"env_vars": worker_env(cfg, spec.verbose)},
            logging_config=None if spec.verbose else ray_env.quiet_train_logging(),
        ),
    )


def fit(trainer, spec, exp: Store, held: lease.Lease | None, fitting: FitStop | None) -> None:
    """trainer.fit(), then the stop it ended on, as the one error that says what happened."""
    in_main = threading.current_thread() is threading.main_thread()
    ctrl_c = signal.getsignal(signal.SIGINT) if in_main else None
    error: BaseException | None = None
    try:
        if fitting is not None:
            fitting.start(spec.driver_token)
        trainer.fit()
    except BaseException as e:   # SystemExit/KeyboardInterrupt too: Ray's SIGINT abort on a lost lease
        error = e
    finally:
        if fitting is not None:
            fitting.end()
        if ctrl_c is not None:
            # fit() leaves its Ctrl-C handler in place, holding the run's controller: that actor (and its
            # dataset manager) would outlive the run, and a later Ctrl-C would abort a finished run, not
            # interrupt the caller.
            signal.signal(signal.SIGINT, ctrl_c)
        stop = stops.recorded(spec.driver_token)
        stops.clear(spec.driver_token)
    if held is not None and held.lost:
        raise LeaseLost(held.lost) from None
    if stop is not None and stop["kind"] == stops.LEASE:
        raise LeaseLost(stop["line"]) from None
    if stop is not None:
        raise StorageUnwritable(stop.get("what") or exp.uri, stop.get("why") or "unwritable", stop.get("free"))
    if error is not None:
        raise error


def _f(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def finalise(root: Store, exp_id: str, log: Tell, held: lease.Lease | None = None) -> dict[str, Any]:
    """Complete result.json (checkpoints, restarts) and print the outcome; tolerates partial records."""
    exp = root.sub(exp_id)
    r = result.read(exp, log)
    if r is None:
        log(f"warning: {exp.child_uri(RESULT)} is missing or unreadable; recording the run as interrupted")
        r = result.interrupted(result.Result(experiment_id=exp_id),
                               "result.json missing or unreadable at the end of the run")
    r = result.finalised(r, checkpoint_info(exp, r.gate_epoch), count_restarts(exp))
    try:
        result.write(exp, exp_id, r, held.holder if held is not None else "")
    except LeaseLost as e:
        raise LeaseLost(str(e)) from None
    log(outcome_line(r))
    log(f"result: {exp.child_uri(RESULT)}")
    return r.to_json()


def outcome_line(r: result.Result) -> str:
    """What the driver prints at the end; tolerates partial records."""
    g = r.gate if isinstance(r.gate, dict) else {}
    edge, rule = _f(g.get("final_edge_compliance")), _f(g.get("final_rule_compliance"))
    if r.status == "passed":
        return (f"gate PASSED at epoch {g.get('epoch')} (edge {edge}, rule {rule}); "
                f"gate checkpoint {r.checkpoints['gate']}")
    if r.status == "failed":
        reason = (r.failure if isinstance(r.failure, dict) else {}).get("reason") or "gate not passed"
        return f"gate FAILED: {reason}; final edge {edge}, rule {rule}; not eligible for SVD analysis"
    epochs = 0 if r.epochs_trained is result.UNSET else r.epochs_trained
    status = None if r.status is result.UNSET else r.status
    return (f"run not finished: result.json says {status!r} after {epochs} epoch(s); "
            f"rerun the same command to resume from the newest checkpoint")
