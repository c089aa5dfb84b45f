"""A sweep as a Ray Tune grid: one trial per point, each a full raywalk experiment.

Shape (Ray 2.60, Train V2): `Tuner(Tuner(TorchTrainer))` is refused, so each
trial is a function trainable that calls `trainer.train(cfg,
callbacks=[TuneReportCallback()])`, which builds the TorchTrainer and calls
`fit()`. Every trial writes `ROOT/{experiment_id}/result.json` exactly as
`raywalk train` does; the sweep writes `ROOT/sweeps/{sweep_id}/summary.json`,
`summary.csv`, `trials/{experiment_id}.json` (wall time, errors) and Tune's own
directory `tune/`.

Resources (why trials never deadlock on 2 CPUs and still fill a cluster):
- a trial (the function trainable: corpus check, driver of one TorchTrainer)
  reserves TRIAL_CPU = 0.1 CPU through `tune.with_resources`; its training
  workers request their own `run.workers x run.cpus_per_worker` CPUs when the
  TorchTrainer starts (Train V2 makes its own placement group);
- so a trial needs `TRIAL_CPU + run.workers * run.cpus_per_worker` CPUs, and
  DATA_CPU = 1 CPU is kept free for Ray Data's read tasks (SPEC §9: workers
  holding every CPU starve the data pipeline);
- `max_concurrent_trials` = --max-concurrent, else floor((cluster CPUs -
  DATA_CPU) / largest trial need), at least 1: all of a big cluster, one or two
  trials on a laptop;
- a local Ray started by the sweep gets enough logical CPUs for that many
  trials plus DATA_CPU (`num_cpus` above the core count is bookkeeping, not
  speed: the trials then share the cores).
- corpora are built on the driver before the Tuner starts: a Tune trial's
  placement group captures child tasks, so the 1-CPU corpus tasks could never
  be scheduled inside a 0.1-CPU trial, and two points sharing a corpus (an
  axis on model or gate keys) must not build it twice at once. The trial's
  `train()` then finds and verifies the corpus, as a rerun of `raywalk train`
  would.

Reruns: finished points (result.json passed/failed) are skipped before the
Tuner is built (no trial at all); interrupted points get a trial whose
`train()` resumes from the experiment's checkpoints.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable

from .config import Config
from .storage import Store
from .sweep import Point, Sweep, build_summary, format_table, summary_row, to_csv

TRIAL_CPU = 0.1
DATA_CPU = 1.0

Log = Callable[[str], None]


def _stderr(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def trial_need(cfg: Config) -> float:
    """CPUs one trial holds while training: its own reservation plus its training workers."""
    return TRIAL_CPU + cfg.run.workers * cfg.run.cpus_per_worker


def default_concurrency(cluster_cpus: float, points: list[Point] | tuple[Point, ...]) -> int:
    need = max(trial_need(p.cfg) for p in points)
    return max(1, int(math.floor((cluster_cpus - DATA_CPU) / need + 1e-9)))


def sweep_dir(root: Store, sweep_id: str) -> Store:
    return root.sub("sweeps", sweep_id)


def ensure_sweep_ray(sweep: Sweep, max_concurrent: int | None, verbose: bool) -> bool:
    """Join RAY_ADDRESS / the job's cluster, else start a local Ray sized for the trials. True if started here."""
    from . import ray_env

    ray_env.quiet_defaults(verbose)
    import ray

    if ray.is_initialized():
        return False
    k = max_concurrent or default_concurrency(os.cpu_count() or 1, sweep.points)
    need = k * max(trial_need(p.cfg) for p in sweep.points) + DATA_CPU
    # ensure_ray sizes a local Ray for one run as workers*cpus_per_worker + 1 CPUs; ask it for `need`.
    probe = sweep.base.replace(**{"run.workers": 1, "run.cpus_per_worker": min(64.0, max(need - 1.0, 0.01)),
                                  "train.batch_size": 64})
    ray_env.ensure_ray(probe, verbose=verbose)
    return True


def _trial(config: dict[str, Any], *, points: dict[str, dict[str, Any]], sweep_store: str,
           verbose: bool) -> None:
    """One Tune trial = one raywalk experiment (train() builds the TorchTrainer and calls fit())."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from . import trainer

    eid = config["experiment_id"]
    cfg = Config.from_dict(points[eid])
    rec_store = Store.open(sweep_store)
    rec = f"trials/{eid}.json"

    def log(s: str) -> None:
        print(f"[{eid}] {s}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    try:
        r = trainer.train(cfg, callbacks=[TuneReportCallback()], progress=False, verbose=verbose, log=log)
    except BaseException as e:
        rec_store.write_json(rec, {"experiment_id": eid, "wall_time_s": time.perf_counter() - t0,
                                   "trained_now": True, "error": f"{type(e).__name__}: {e}"})
        raise
    wall = time.perf_counter() - t0
    rec_store.write_json(rec, {"experiment_id": eid, "wall_time_s": wall, "trained_now": True, "error": None})
    g = r["gate"]
    tune.report({"status": r["status"], "epochs_trained": r["epochs_trained"], "gate_passed": g["passed"],
                 "edge": g["final_edge_compliance"], "rule": g["final_rule_compliance"], "wall_time_s": wall,
                 "done": True})


def _prebuild_corpora(points: list[Point], root: Store, log: Log) -> None:
    from .corpus import build_corpus, ray_mapper

    done: set[str] = set()
    for p in points:
        cid = p.cfg.corpus_id()
        if cid in done:
            continue
        done.add(cid)
        _, s = build_corpus(p.cfg, root, mapper=ray_mapper(), progress=False, log=log)
        log(f"corpus {'reused' if s['reused'] else 'built'} for point {p.index}: {cid} ({s['seconds']:.1f}s)")


def run_sweep(sweep: Sweep, *, storage: str | None = None, max_concurrent: int | None = None,
              verbose: bool = False, log: Log = _stderr) -> dict[str, Any]:
    """Run the sweep's unfinished points as Tune trials; write and return the summary."""
    from .trainer import finished_result

    root = Store.open(storage or sweep.base.run.storage)
    sweep = sweep.with_storage(root.uri)      # absolute: trials run in other directories
    sd = sweep_dir(root, sweep.sweep_id)
    t0 = time.perf_counter()

    pending = [p for p in sweep.points if finished_result(root, p.experiment_id) is None]
    skipped = len(sweep.points) - len(pending)
    log(f"sweep {sweep.sweep_id}: {len(sweep.points)} points, {skipped} already finished, "
        f"{len(pending)} to run; results under {root.uri}")
    k_used = None
    if pending:
        if not verbose:
            # Tune's newer console output prints its experiment box and paths even at verbose=0;
            # the classic reporter at verbose=0 prints nothing. --verbose keeps Tune's status tables.
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        started = ensure_sweep_ray(sweep, max_concurrent, verbose)
        try:
            import ray
            from ray import tune

            cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
            k_used = max_concurrent or default_concurrency(cluster_cpus, pending)
            k_used = min(k_used, len(pending))
            log(f"up to {k_used} trial(s) at once; each holds {TRIAL_CPU} CPU + "
                f"{pending[0].cfg.run.workers} worker(s) x {pending[0].cfg.run.cpus_per_worker} CPU "
                f"(cluster: {cluster_cpus:g} CPUs)")
            _prebuild_corpora(pending, root, log)
            for p in pending:   # a rerun of an interrupted sweep: forget the last attempt's error
                if sd.is_file(f"trials/{p.experiment_id}.json"):
                    sd.write_json(f"trials/{p.experiment_id}.json",
                                  {"experiment_id": p.experiment_id, "wall_time_s": None, "error": None})
            trainable = tune.with_resources(
                tune.with_parameters(_trial, points={p.experiment_id: p.cfg.to_dict() for p in pending},
                                     sweep_store=sd.uri, verbose=verbose),
                {"CPU": TRIAL_CPU})
            tuner = tune.Tuner(
                trainable,
                param_space={"experiment_id": tune.grid_search([p.experiment_id for p in pending])},
                tune_config=tune.TuneConfig(max_concurrent_trials=k_used,
                                            trial_dirname_creator=lambda t: t.config["experiment_id"]),
                run_config=tune.RunConfig(
                    name="tune", storage_path=sd.path(), storage_filesystem=root.fs,   # as trainer.py does
                    verbose=None if verbose else 0,
                    failure_config=tune.FailureConfig(max_failures=0),   # Train restarts workers itself
                ),
            )
            tuner.fit()
        finally:
            if started:
                import ray

                ray.shutdown()
    wall = time.perf_counter() - t0

    rows = []
    ran = {p.experiment_id for p in pending}
    for p in sweep.points:
        exp = root.sub(p.experiment_id)
        result = exp.read_json("result.json") if exp.is_file("result.json") else None
        rec = sd.read_json(f"trials/{p.experiment_id}.json") if sd.is_file(f"trials/{p.experiment_id}.json") else {}
        rec = {**rec, "trained_now": p.experiment_id in ran}
        rows.append(summary_row(p, result, rec, exp.child_uri("result.json") if result is not None else None))
    summary = build_summary(sweep, rows, storage=root.uri, wall_time_s=wall, max_concurrent=k_used,
                            trials_run=len(pending))
    sd.write_json("summary.json", summary)
    sd.write_bytes("summary.csv", to_csv(summary).encode())
    return summary


def print_summary(summary: dict[str, Any], root_uri: str, out=None) -> None:
    out = out or sys.stdout
    print(format_table(summary), file=out)
    print(f"summary: {root_uri}/sweeps/{summary['sweep_id']}/summary.json (and summary.csv); "
          f"{summary['trials_run']} trial(s) run in {summary['wall_time_s']:.0f}s", file=out)
