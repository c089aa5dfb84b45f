"""A sweep as a Ray Tune grid: one trial per point, each a full raywalk experiment.

Shape (Ray 2.60, Train V2): `Tuner(Tuner(TorchTrainer))` is refused, so each
trial is a function trainable that calls `trainer.train(cfg,
callbacks=[TuneReportCallback()])`, which builds the TorchTrainer and calls
`fit()`. Every trial writes `ROOT/{experiment_id}/result.json` exactly as
`raywalk train` does; the sweep writes `ROOT/sweeps/{sweep_id}/summary.json`,
`summary.csv`, `trials/{experiment_id}.json` (start, end, wall time, driver node,
errors) and Tune's own
directory `tune/`.

Resources (why trials never deadlock on 2 CPUs and still fill a cluster):
- a trial's driver (the function trainable: corpus check, driver of one
  TorchTrainer) reserves, through `tune.with_resources`, one unit of the
  custom resource DRIVER_RESOURCE when the cluster declares it (cluster.yaml's
  head node does: drivers then live on the on-demand head, where spot reclaims
  cannot take them, and Train V2 pins each trial's controller to its driver's
  node), else 0.1 CPU (a laptop). Its training workers request their own
  `run.workers x run.cpus_per_worker` CPUs (and GPUs) when the TorchTrainer
  starts (Train V2 makes its own placement group);
- one CPU is kept free for Ray Data's read tasks (workers holding
  every CPU starve the data pipeline);
- `max_concurrent_trials` = --max-concurrent, else what the cluster can grow
  to: for each resource a trial needs, floor((capacity - reserve) / need), at
  most the head's driver slots, at least 1. Capacity comes from the autoscaler
  (`autoscaler_capacity`: the cluster config it reported to the GCS, else the
  config file the head's monitor runs with), so a cold cluster with no workers
  yet still fans out; without an autoscaler (a laptop, a fixed cluster) it is
  the cluster's resources now;
- a local Ray started by the sweep gets enough logical CPUs for that many
  trials plus the data CPU (`num_cpus` above the core count is bookkeeping,
  not speed: the trials then share the cores);
- corpora are built on the sweep's driver before the Tuner starts: a Tune
  trial's placement group captures child tasks, so the 1-CPU corpus tasks could
  never be scheduled inside a trial's bundle, and two points sharing a corpus
  (an axis on model or gate keys) must not build it twice at once. The trial's
  `train()` then finds and verifies the corpus, as a rerun of `raywalk train`
  would;
- a trial whose driver or node is lost is retried by Tune (FailureConfig
  max_failures = the largest run.max_failures, at least 1); the retry's
  `train()` resumes the experiment from its checkpoints.

Stops that a retry cannot fix are not raised to Tune (which would retry them): a
storage that refuses writes (full disk, quota, read-only, denied) and a lease lost
to another driver. The trial's experiments are marked `interrupted` as `raywalk
train` marks one (each with its resume hint), the stop is recorded in Ray's KV
store under the sweep's token, and the trial ends normally. A trial that starts
after a storage stop trains nothing (it would meet the same full disk). After the
Tuner, `run_sweep` raises the storage stop (CLI: one line, exit 4) or, for a lost
lease, returns the summary with it in `stops` (CLI: the table, then exit 5).
Tune's own experiment-state sync failing on that storage is not printed (raywalk's
line says it).

Reruns: finished points (result.json passed/failed) are skipped before the
Tuner is built (no trial at all); interrupted points get a trial whose
`train()` resumes from the experiment's checkpoints.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from raywalk.config import Config
from raywalk.records import layout, result
from raywalk.records.errors import StorageUnwritable, will_recur
from raywalk.records.layout import utc_iso
from raywalk.records.lease import LeaseLost
from raywalk.records.storage import Store
from raywalk.records.uris import join_uri
from raywalk.messages import Tell, tell
from raywalk.service import stops
from raywalk.service.sweep import Point, Sweep
from raywalk.service.sweep_summary import build_summary, format_table, summary_row, to_csv

TRIAL_CPU = 0.1
DATA_CPU = 1.0
DRIVER_RESOURCE = "raywalk_driver"   # declared by the head node in cluster.yaml
DRIVER_UNIT = 1.0                    # what one trial driver takes of it



def trial_need(cfg: Config, on_head: bool = False) -> dict[str, float]:
    """Resources one trial holds while training: its driver's CPU (none on the head) plus its workers'."""
    need = {"CPU": (0.0 if on_head else TRIAL_CPU) + cfg.run.workers * cfg.run.cpus_per_worker}
    if cfg.run.gpus_per_worker > 0:
        need["GPU"] = cfg.run.workers * cfg.run.gpus_per_worker
    return need


def trial_resources(on_head: bool) -> dict[str, float]:
    """What a trial's driver reserves through tune.with_resources."""
    return {"CPU": 0.0, DRIVER_RESOURCE: DRIVER_UNIT} if on_head else {"CPU": TRIAL_CPU}


def concurrency(capacity: dict[str, float], points: list[Point] | tuple[Point, ...], on_head: bool = False,
                driver_slots: float = 0.0) -> int:
    """Trials that fit `capacity` at once: the scarcest resource decides, DATA_CPU stays free."""
    k = math.inf
    for r in {r for p in points for r in trial_need(p.cfg, on_head)}:
        need = max(trial_need(p.cfg, on_head).get(r, 0.0) for p in points)
        if need > 0:
            free = capacity.get(r, 0.0) - (DATA_CPU if r == "CPU" else 0.0)
            k = min(k, math.floor(free / need + 1e-9))
    if on_head:
        k = min(k, math.floor(driver_slots / DRIVER_UNIT + 1e-9))
    return max(1, int(min(k, 1 << 30)))


def default_concurrency(cluster_cpus: float, points: list[Point] | tuple[Point, ...]) -> int:
    """A laptop's concurrency: its CPUs, drivers on CPU."""
    return concurrency({"CPU": cluster_cpus, "GPU": math.inf}, points)


def capacity_from_autoscaling_config(cfg: dict[str, Any]) -> dict[str, float]:
    """Most of each resource a cluster config can grow to: the head plus, per resource, the worker
    types richest in it, each up to its own max_workers and all together up to the global max_workers."""
    types = cfg.get("available_node_types") or {}
    head = cfg.get("head_node_type")
    cap = {k: float(v) for k, v in (types.get(head, {}).get("resources") or {}).items()}
    workers = [t for name, t in types.items() if name != head]
    overall = cfg.get("max_workers")
    for r in {r for t in workers for r in (t.get("resources") or {})}:
        left = math.inf if overall is None else overall
        for t in sorted(workers, key=lambda t: -float((t.get("resources") or {}).get(r, 0))):
            n = min(t.get("max_workers", overall if overall is not None else 0), left)
            cap[r] = cap.get(r, 0.0) + n * float((t.get("resources") or {}).get(r, 0))
            left -= n
    return cap


def monitor_config_path(gcs_address: str, proc: Path = Path("/proc")) -> str | None:
    """The --autoscaling-config of the autoscaler monitor serving this GCS, if it runs on this machine.

    `ray start --head --autoscaling-config=F` starts `monitor.py --gcs-address=IP:PORT
    --autoscaling-config=F`; `ray up` clusters use ~/ray_bootstrap_config.yaml. The GCS port
    tells this cluster's monitor from another Ray's on the same machine.
    """
    port = gcs_address.rsplit(":", 1)[-1]
    try:
        entries = list(proc.iterdir())
    except OSError:
        return None
    for d in entries:
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("monitor.py") for a in argv):
            continue
        opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        if opts.get("gcs-address", "").rsplit(":", 1)[-1] == port and opts.get("autoscaling-config"):
            return os.path.expanduser(opts["autoscaling-config"])
    return None


def autoscaler_capacity() -> tuple[dict[str, float], str] | None:
    """(capacity the cluster can grow to, where that came from), or None when no autoscaler runs."""
    import ray

    from raywalk.service import ray_private

    reported = ray_private.autoscaler_max_resources()
    if reported:
        return reported, "the autoscaler's cluster config"
    path = monitor_config_path(ray.get_runtime_context().gcs_address)
    if path:
        import yaml

        try:
            cfg = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            return None
        if isinstance(cfg, dict) and cfg.get("available_node_types"):
            return capacity_from_autoscaling_config(cfg), path
    return None


def sweep_dir(root: Store, sweep_id: str) -> Store:
    return root.sub(layout.SWEEPS, sweep_id)


def ensure_sweep_ray(sweep: Sweep, max_concurrent: int | None, verbose: bool) -> bool:
    """Join RAY_ADDRESS / the job's cluster, else start a local Ray sized for the trials. True if started here."""
    from raywalk.service import ray_env

    ray_env.quiet_defaults(verbose)
    import ray

    if ray.is_initialized():
        return False
    k = max_concurrent or default_concurrency(os.cpu_count() or 1, sweep.points)
    ray_env.ensure_ray_cpus(k * max(trial_need(p.cfg)["CPU"] for p in sweep.points) + DATA_CPU, verbose)
    return True


def _trial(config: dict[str, Any], *, buckets: dict[str, list[str]], points: dict[str, dict[str, Any]],
           sweep_store: str, verbose: bool, sweep_id: str = "", grids: dict[str, dict[str, Any]] | None = None,
           stop_token: str = "") -> None:
    """One Tune trial = one bucket of experiments (a bucket of one: `train()`, today's solo path)."""
    from ray import tune

    from raywalk.records.lease import ENV_WAIT, timings

    # A Tune retry after a lost driver finds that driver's lease still fresh: wait for it to go stale.
    os.environ.setdefault(ENV_WAIT, str(2 * timings()[0]))
    tid = config["trial"]
    eids = buckets[tid]
    if stop_token and stops.recorded(stop_token) is not None:   # the sweep's storage has refused a write
        tune.report({"status": "not_run", "members": len(eids), "stopped": stops.STORAGE, "done": True})
        return
    cfgs = [Config.from_dict(points[eid]) for eid in eids]
    try:
        for eid, cfg in zip(eids, cfgs):
            if "mlflow" in cfg.run.trackers and grids:   # the MLflow run tags its sweep and grid point (trackers.py)
                from raywalk.records.layout import SWEEP_FILE
                Store.open(cfg.run.storage).sub(eid).write_json(SWEEP_FILE, {"sweep_id": sweep_id, "grid": grids[eid]})
        results, wall = _train_recorded(cfgs, tid, Store.open(sweep_store), verbose)
    except (StorageUnwritable, LeaseLost) as e:
        # Not raised: Tune would retry the trial into the same full disk, or into another driver's experiment.
        # A storage stop has marked its experiments interrupted (driver._leased, bucket_driver.storage_stop),
        # a lost lease has been said in the driver's one line; run_sweep tells the sweep's outcome.
        kind = stops.STORAGE if isinstance(e, StorageUnwritable) else stops.LEASE
        if stop_token:
            stops.record(_stop_key(stop_token, kind), kind, str(e),
                         e.to_dict() if isinstance(e, StorageUnwritable) else None)
        tune.report({"status": "interrupted", "members": len(eids), "stopped": kind, "done": True})
        return
    g = [r["gate"] for r in results]
    tune.report({"status": ",".join(r["status"] for r in results), "members": len(results),
                 "epochs_trained": max(r["epochs_trained"] for r in results),
                 "gate_passed": sum(bool(x["passed"]) for x in g), "wall_time_s": wall, "done": True})


def _stop_key(token: str, kind: str) -> str:
    """Where a sweep's trials record a stop of this kind (the first one recorded is the one told)."""
    return token if kind == stops.STORAGE else f"{token}-{kind}"


def _train_recorded(cfgs: list[Config], tid: str, sweep_store: Store,
                    verbose: bool) -> tuple[list[dict[str, Any]], float]:
    """Train the trial's experiments, each one's trial record (start, end, wall time, driver node, bucket,
    error) written either way; returns (results, wall seconds)."""
    import ray
    from ray.tune.integration.ray_train import TuneReportCallback

    from raywalk.service import driver
    from raywalk.service.bucket_driver import train_bucket

    def log(s: str) -> None:
        tell(f"[{tid}] {s}" if len(cfgs) > 1 or not s.startswith("[") else s)

    eids = [c.experiment_id() for c in cfgs]
    base = {"trained_now": True, "started_at": utc_iso(), "bucket": tid if len(cfgs) > 1 else None,
            "driver_node_id": ray.get_runtime_context().get_node_id()}
    t0 = time.perf_counter()
    try:
        if len(cfgs) == 1:
            results = [driver.train(cfgs[0], callbacks=[TuneReportCallback()], progress=False, verbose=verbose,
                                    log=log)]
        else:
            results = train_bucket(cfgs, callbacks=[TuneReportCallback()], progress=False, verbose=verbose, log=log)
    except BaseException as e:
        if isinstance(e, LeaseLost):   # the driver's one line, as `raywalk train` prints it
            log(str(e))
        # the records, if the storage still takes them (a full disk may be why the trial ended: this error
        # is the one to tell, not that one)
        with contextlib.suppress(StorageUnwritable):
            for eid in eids:
                sweep_store.write_json(layout.trial_record(eid), {**base, "experiment_id": eid,
                                                                 "finished_at": utc_iso(),
                                                                 "wall_time_s": time.perf_counter() - t0,
                                                                 "error": f"{type(e).__name__}: {e}"})
        raise
    wall = time.perf_counter() - t0
    for eid in eids:
        sweep_store.write_json(layout.trial_record(eid), {**base, "experiment_id": eid, "finished_at": utc_iso(),
                                                         "wall_time_s": wall, "error": None})
    return results, wall


def _prebuild_corpora(points: list[Point], root: Store, log: Tell) -> None:
    from raywalk.service.corpus import build_corpus, ray_mapper

    done: set[str] = set()
    for p in points:
        cid = p.cfg.corpus_id()
        if cid in done:
            continue
        done.add(cid)
        _, s = build_corpus(p.cfg, root, mapper=ray_mapper(), progress=False, log=log)
        log(f"corpus {'reused' if s['reused'] else 'built'} for point {p.index}: {cid} ({s['seconds']:.1f}s)")


def plan_buckets(points: list[Point], bucket: int | None, sweep_bucket: int | None = None) -> list[tuple[str, list[Point]]]:
    """The trials: points grouped into buckets of at most --bucket (else the sweep's `bucket`, else what fits
    the worker), each checked against its worker's memory before any cluster resource is taken."""
    from raywalk.service import bucketing
    from raywalk.service.dataset import free_memory

    import torch

    host = free_memory(torch.device("cpu"))
    k = bucket or sweep_bucket or (bucketing.default_k(points[0].cfg, host) if points else 1)
    buckets = bucketing.group(points, k, host)
    for _, members in buckets:
        if len(members) > 1:
            bucketing.check_fits([p.cfg for p in members], host)
    return buckets


def run_sweep(sweep: Sweep, *, storage: str | None = None, max_concurrent: int | None = None,
              verbose: bool = False, log: Tell = tell, bucket: int | None = None) -> dict[str, Any]:
    """Run the sweep's unfinished points as Tune trials, same-shape points bucketed; write and return the summary.

    StorageUnwritable when a trial's storage refused a write (its points are `interrupted`, resumable);
    a lease lost to another driver is in the summary's `stops`."""
    root = Store.open(storage or sweep.base.run.storage)
    sweep = sweep.with_storage(root.uri)      # absolute: trials run in other directories
    sd = sweep_dir(root, sweep.sweep_id)
    t0 = time.perf_counter()
    pending = [p for p in sweep.points if result.read_finished(root.sub(p.experiment_id), log) is None]
    buckets = plan_buckets(pending, bucket, sweep.bucket)
    log(f"sweep {sweep.sweep_id}: {len(sweep.points)} points, {len(sweep.points) - len(pending)} already "
        f"finished, {len(pending)} to run in {len(buckets)} trial(s) (at most "
        f"{max((len(b) for _, b in buckets), default=0)} experiments each); results under {root.uri}")
    k_used, stopped = _run_trials(sweep, buckets, root, sd, max_concurrent, verbose, log) if pending else (None, {})
    wall = time.perf_counter() - t0
    rows = _summary_rows(sweep, root, sd, {p.experiment_id for p in pending})
    summary = build_summary(sweep, rows, storage=root.uri, wall_time_s=wall, max_concurrent=k_used,
                            trials_run=len(buckets), points_run=len(pending),
                            stops=[{"kind": k, "line": v["line"]} for k, v in stopped.items()])
    full = stopped.get(stops.STORAGE)
    try:
        sd.write_json(layout.SUMMARY, summary)
        sd.write_bytes(layout.SUMMARY_CSV, to_csv(summary).encode())
    except StorageUnwritable:
        if full is None:
            raise
    if full is not None:
        raise sweep_storage_stop(full, rows)
    return summary


def sweep_storage_stop(stop: dict[str, Any], rows: list[dict[str, Any]]) -> StorageUnwritable:
    """A trial's storage stop, told for the sweep: what could not be written, and how the sweep goes on."""
    left = sum(not result.is_finished(r["status"]) for r in rows)
    return StorageUnwritable(stop.get("what") or "the sweep's storage", stop.get("why") or "unwritable",
                             stop.get("free"),
                             f"{left} of {len(rows)} point(s) not finished (each one's result.json names its "
                             f"newest intact checkpoint); rerun the same command to resume them once there is room")


class _StorageSyncNoise(logging.Filter):
    """Drops what Ray logs while handling a write error that will recur (full disk, quota, read-only): Tune's
    experiment-state sync failing on the sweep's storage, each time with a traceback. The sweep's own line
    says it, once. (Ray logs these inside the `except` that caught the error.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        e = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return e is None or will_recur(e) is None


@contextlib.contextmanager
def _quiet_storage_errors(verbose: bool):
    """_StorageSyncNoise on the handlers of Ray's logger (every Ray logger's records reach them) while the
    Tuner runs; --verbose shows them."""
    handlers = [] if verbose else list(logging.getLogger("ray").handlers)
    quiet = _StorageSyncNoise()
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(quiet)


def _run_trials(sweep: Sweep, buckets: list[tuple[str, list[Point]]], root: Store, sd: Store,
                max_concurrent: int | None, verbose: bool, log: Tell) -> tuple[int, dict[str, dict[str, Any]]]:
    """The buckets as one Tuner's trials, on the joined or a local Ray; returns the concurrency used and the
    stops the trials recorded ({kind: {"line", ...}}: storage, lease)."""
    pending = [p for _, b in buckets for p in b]
    if not verbose:
        # Tune's newer console output prints its experiment box and paths even at verbose=0;
        # the classic reporter at verbose=0 prints nothing. --verbose keeps Tune's status tables.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started = ensure_sweep_ray(sweep, max_concurrent, verbose)
    token = uuid.uuid4().hex
    try:
        k_used, on_head = _plan_concurrency([b[0] for _, b in buckets], max_concurrent, log)
        _prebuild_corpora(pending, root, log)
        for p in pending:   # a rerun of an interrupted sweep: forget the last attempt's error
            if sd.is_file(layout.trial_record(p.experiment_id)):
                sd.write_json(layout.trial_record(p.experiment_id),
                              {"experiment_id": p.experiment_id, "wall_time_s": None, "error": None})
        try:
            with _quiet_storage_errors(verbose):
                _tuner(sweep, buckets, root, sd, k_used, on_head, verbose, token).fit()
        finally:
            stopped = {k: v for k in (stops.STORAGE, stops.LEASE) if (v := stops.recorded(_stop_key(token, k)))}
            for k in (stops.STORAGE, stops.LEASE):
                stops.clear(_stop_key(token, k))
    finally:
        if started:
            import ray

            ray.shutdown()
    return k_used, stopped


def _plan_concurrency(pending: list[Point], max_concurrent: int | None, log: Tell) -> tuple[int, bool]:
    """(trials at once, drivers on the head), said in one line with what a trial holds and where it came from."""
    import ray

    now = ray.cluster_resources()
    on_head = now.get(DRIVER_RESOURCE, 0.0) >= DRIVER_UNIT
    capacity, source = autoscaler_capacity() or (now, "the cluster now")
    k = max_concurrent or concurrency(capacity, pending, on_head, now.get(DRIVER_RESOURCE, 0.0))
    k = min(k, len(pending))
    need = trial_need(pending[0].cfg, on_head)
    where = f"on the head ({DRIVER_RESOURCE})" if on_head else f"on {TRIAL_CPU} CPU each"
    log(f"up to {k} trial(s) at once; drivers {where}; a trial holds "
        + ", ".join(f"{v:g} {r}" for r, v in need.items())
        + f"; capacity {', '.join(f'{capacity.get(r, 0):g} {r}' for r in need)} from {source}")
    return k, on_head


def _tuner(sweep: Sweep, buckets: list[tuple[str, list[Point]]], root: Store, sd: Store, k_used: int, on_head: bool,
           verbose: bool, stop_token: str = ""):
    from ray import tune

    pending = [p for _, b in buckets for p in b]
    trainable = tune.with_resources(
        tune.with_parameters(_trial, buckets={tid: [p.experiment_id for p in b] for tid, b in buckets},
                             points={p.experiment_id: p.cfg.to_dict() for p in pending},
                             sweep_store=sd.uri, verbose=verbose, sweep_id=sweep.sweep_id,
                             grids={p.experiment_id: p.grid for p in pending}, stop_token=stop_token),
        trial_resources(on_head))
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([tid for tid, _ in buckets])},
        tune_config=tune.TuneConfig(max_concurrent_trials=k_used,
                                    trial_dirname_creator=lambda t: t.config["trial"]),
        run_config=tune.RunConfig(
            name=layout.TUNE_DIR, storage_path=sd.path(), storage_filesystem=root.fs,   # as the driver does
            verbose=None if verbose else 0,
            # Train restarts lost workers itself; Tune restarts a lost driver, whose train() resumes (a trial
            # never raises a stop a retry cannot fix: _trial).
            failure_config=tune.FailureConfig(max_failures=max(1, *(p.cfg.run.max_failures for p in pending))),
        ),
    )


def _summary_rows(sweep: Sweep, root: Store, sd: Store, ran: set[str]) -> list[dict[str, Any]]:
    """One row per point from its result.json and trial record; a torn one counts as not there."""
    rows = []
    for p in sweep.points:
        exp = root.sub(p.experiment_id)
        r = result.read(exp)   # torn: the point counts as not run
        rec = sd.read_json_or_warn(layout.trial_record(p.experiment_id), "trial record") \
            if sd.is_file(layout.trial_record(p.experiment_id)) else {}
        rec = rec if isinstance(rec, dict) else {}
        rec = {**rec, "trained_now": p.experiment_id in ran}
        rows.append(summary_row(p, r.to_json() if r is not None else None, rec,
                                exp.child_uri(layout.RESULT) if r is not None else None))
    return rows


def print_summary(summary: dict[str, Any], root_uri: str, out=None) -> None:
    out = out or sys.stdout
    print(format_table(summary), file=out)
    where = join_uri(root_uri, layout.SWEEPS, summary["sweep_id"], layout.SUMMARY)
    print(f"summary: {where} (and {layout.SUMMARY_CSV}); {ran(summary)} in {summary['wall_time_s']:.0f}s", file=out)


def ran(summary: dict[str, Any]) -> str:
    """"8 points run in 1 Tune trial": points and trials counted apart (a bucket is one trial of many points)."""
    points, trials = summary.get("points_run", summary["trials_run"]), summary["trials_run"]
    return f"{points} point(s) run in {trials} Tune trial(s)"
