"""Driver side of a training run: corpus, Ray Data, TorchTrainer, resume, result.json.

The experiment lives at `ROOT/{experiment_id}/` (ROOT local or s3://...):
result.json, checkpoints/ (Ray's run directory: epoch_NNNN checkpoints and its
checkpoint_manager_snapshot.json) and attempts/ (worker-group starts, counted
as restarts). A fixed RunConfig(storage_path, name) is what makes Ray resume a
killed driver's run when the same command runs again.
"""
from __future__ import annotations

import functools
import sys
import time
import uuid
from typing import Any, Callable

from . import lease, ray_env, trackers
from .checkpoint import RUN_DIR
from .config import Config, ConfigError
from .dataset import windows_per_walk
from .corpus import build_corpus, ray_mapper
from .result import RESULT, checkpoint_info, count_restarts
from .storage import Store

Log = Callable[[str], None]


def _stderr(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def steps_per_epoch(cfg: Config, n_windows: int) -> int:
    per_worker = n_windows // cfg.run.workers          # the equal split drops the remainder
    return per_worker // (cfg.train.batch_size // cfg.run.workers)


def retire(root: Store, experiment_id: str, log: Log) -> None:
    """--fresh: move an earlier run aside (never delete it) and say where it went."""
    if not root.exists(experiment_id):
        return
    aside = f"{experiment_id}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    root.move(experiment_id, aside)
    log(f"--fresh: moved the earlier run to {root.child_uri(aside)}")


def finished_result(root: Store, experiment_id: str) -> dict[str, Any] | None:
    exp = root.sub(experiment_id)
    if exp.is_file(RESULT):
        r = exp.read_json(RESULT)
        if r.get("status") in ("passed", "failed"):
            return r
    return None


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
          hooks: Any = None, callbacks: list | None = None, max_steps_per_epoch: int | None = None,
          log: Log = _stderr) -> dict[str, Any]:
    """Run (or resume, or report) the experiment for cfg; returns its result.json content.

    `hooks` is a fault-injection factory for tests (faults.WorkerKill); `callbacks` are
    Ray Train UserCallbacks (a Tune trial passes TuneReportCallback); `max_steps_per_epoch`
    shortens epochs for benchmarks.
    """
    root = Store.open(cfg.run.storage)
    cfg = cfg.replace(**{"run.storage": root.uri})   # absolute: workers run in other directories
    exp_id = cfg.experiment_id()
    if fresh:
        lease.Lease(root.sub(exp_id), exp_id).check_free()   # never move a running driver's experiment
        retire(root, exp_id, log)
    done = finished_result(root, exp_id)
    if done is not None:
        log(f"experiment {exp_id} already finished ({done['status']}); not training again "
            f"(use --fresh to start over)")
        return done

    planned = cfg.corpus.corpus_size * windows_per_walk(cfg.corpus.walk_length, cfg.w)
    if steps_per_epoch(cfg, planned) < 1:   # refuse before any cluster resources are taken
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is invalid: the corpus gives only {planned} "
                          f"windows of w+1 tokens, fewer than one batch per worker")
    trackers.check(cfg.run.trackers, cfg.run.storage)   # a missing tracker package: refused before Ray starts
    with lease.hold(root.sub(exp_id), exp_id, log=log):   # one driver per experiment: LeaseHeld if another runs it
        return _train_leased(cfg, root, exp_id, verbose=verbose, progress=progress, hooks=hooks,
                             callbacks=callbacks, max_steps_per_epoch=max_steps_per_epoch, log=log)


def _train_leased(cfg: Config, root: Store, exp_id: str, *, verbose: bool, progress: bool, hooks: Any,
                  callbacks: list | None, max_steps_per_epoch: int | None, log: Log) -> dict[str, Any]:
    ray_env.ensure_ray(cfg, verbose=verbose)
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from .dataset import window_dataset, windows_per_epoch
    from .train_loop import WorkerSpec, train_loop_per_worker

    check_storage_reachable(root, ray.nodes())
    corpus, summary = build_corpus(cfg, root, mapper=ray_mapper(), progress=progress, log=log)
    log(f"corpus {'reused' if summary['reused'] else 'built'}: {corpus.uri}")
    n_windows = windows_per_epoch(corpus, cfg.w)
    steps = steps_per_epoch(cfg, n_windows)
    if max_steps_per_epoch:
        steps = min(steps, max_steps_per_epoch)
    exp = root.sub(exp_id)
    resuming = exp.exists(RUN_DIR)
    log(f"experiment {exp_id}: {'resuming' if resuming else 'starting'}; {steps} steps/epoch, "
        f"{cfg.run.workers} worker(s), results in {exp.uri}")

    use_gpu = cfg.run.gpus_per_worker > 0
    resources = {"CPU": cfg.run.cpus_per_worker, **({"GPU": cfg.run.gpus_per_worker} if use_gpu else {})}
    spec = WorkerSpec(config=cfg, experiment_id=exp_id, corpus_uri=corpus.uri, corpus_manifest=corpus.manifest,
                      gate_starts=tuple(corpus.gate_starts(cfg.gate.sequences).tolist()), steps_per_epoch=steps,
                      driver_token=uuid.uuid4().hex, progress=progress, verbose=verbose, hooks=hooks,
                      windows=window_dataset(corpus, cfg.w, materialize=True), n_windows=n_windows)
    trainer = TorchTrainer(
        functools.partial(train_loop_per_worker, spec),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources,
                                               accelerator_type=cfg.run.accelerator_type or None),
        run_config=ray.train.RunConfig(
            name=RUN_DIR,
            storage_path=exp.path(),
            storage_filesystem=root.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures,
                                                   max_preemption_failures=cfg.run.max_preemptions),
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=3),
            worker_runtime_env={"env_vars": worker_env(cfg, verbose)},
            logging_config=None if verbose else ray_env.quiet_train_logging(),
        ),
    )
    trainer.fit()
    return finalise(root, exp_id, log)


def finalise(root: Store, exp_id: str, log: Log) -> dict[str, Any]:
    exp = root.sub(exp_id)
    r = exp.read_json(RESULT)
    r["checkpoints"] = checkpoint_info(exp, r["gate"]["epoch"])
    r["restarts"] = count_restarts(exp)
    exp.write_json(RESULT, r)
    g = r["gate"]
    if r["status"] == "passed":
        log(f"gate PASSED at epoch {g['epoch']} (edge {g['final_edge_compliance']:.3f}, rule "
            f"{g['final_rule_compliance']:.3f}); gate checkpoint {r['checkpoints']['gate']}")
    else:
        log(f"gate FAILED: {r['failure']['reason']}; final edge {g['final_edge_compliance']:.3f}, "
            f"rule {g['final_rule_compliance']:.3f}; not eligible for SVD analysis")
    log(f"result: {exp.child_uri(RESULT)}")
    return r
