"""Driver side of a bucket: k same-shape experiments trained together by one single-worker TorchTrainer.

Members finished already are reported, not retrained; one left trains alone (`driver.train`,
today's path). Otherwise the driver holds every member's lease, builds or reuses each
member's corpus, and runs the bucket's TorchTrainer, whose Ray run lives at
`ROOT/buckets/<bucket_id>/` and holds no checkpoint: the members' checkpoints are theirs
(service/bucket_worker.py). At the end each member's result.json is finalised as a solo
run's is.
"""
from __future__ import annotations

import contextlib
import functools
from collections import Counter
import hashlib
import uuid
from typing import Any, Sequence

from raywalk.config import Config, ConfigError
from raywalk.messages import Tell, quiet, tell
from raywalk.records import lease, result
from raywalk.records.checkpoints import RUN_DIR
from raywalk.records.errors import StorageUnwritable
from raywalk.records.layout import BUCKETS
from raywalk.records.lease import LeaseLost
from raywalk.records.storage import Store
from raywalk.science.bucket import check_bucketable, differing
from raywalk.service import driver, ray_env, ray_private, stops

# a bucket is one trainer: what its worker asks of the cluster, and how often Ray Train restarts it (its one
# FailureConfig), must be one thing
SHARED_RUN = ("run.storage", "run.cpus_per_worker", "run.gpus_per_worker", "run.accelerator_type",
              "run.deterministic", "run.max_failures", "run.max_preemptions", "corpus.walk_length",
              "corpus.corpus_size")


def bucket_id(experiment_ids: Sequence[str]) -> str:
    return "bucket-" + hashlib.sha256(",".join(sorted(experiment_ids)).encode()).hexdigest()[:8]


def check_members(cfgs: Sequence[Config]) -> None:
    """Refuse, before any cluster resource is taken, members that cannot train as one bucket."""
    check_bucketable(cfgs)
    many = [c for c in cfgs if c.run.workers != 1]
    if many:
        raise ConfigError(f"run.workers: {many[0].run.workers} is invalid in a bucket ({many[0].experiment_id()}): "
                          f"a bucket trains on one worker; train it alone (--bucket 1)")
    streams = [c for c in cfgs if c.train.data == "stream"]
    if streams:
        raise ConfigError(f"train.data: 'stream' is invalid in a bucket ({streams[0].experiment_id()}): a bucket holds "
                          f"its members' windows resident; train it alone (--bucket 1)")
    shown = differing(cfgs, SHARED_RUN)
    if shown:
        raise ConfigError(f"bucket: members differ in {shown}: one trainer runs them all")
    ids = [c.experiment_id() for c in cfgs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"bucket: an experiment is listed twice ({sorted(i for i in ids if ids.count(i) > 1)[0]})")


def train_bucket(cfgs: Sequence[Config], *, verbose: bool = False, progress: bool = True,
                 callbacks: list | None = None, log: Tell = tell) -> list[dict[str, Any]]:
    """Train (or resume, or report) every member; returns their result.json contents, in order."""
    if not cfgs:
        raise ConfigError("bucket: no members")
    root = Store.open(cfgs[0].run.storage)
    cfgs = [c.replace(**{"run.storage": root.uri}) for c in cfgs]
    check_members(cfgs)
    for c in cfgs:
        driver.check_before_ray(c)
    ids = [c.experiment_id() for c in cfgs]
    done = {eid: result.read_finished(root.sub(eid), log) for eid in ids}
    results: dict[str, dict[str, Any] | None] = {eid: r.to_json() if r is not None else None for eid, r in done.items()}
    for eid, r in results.items():
        if r is not None:
            log(f"experiment {eid} already finished ({r['status']}); not training again")
    pending = [c for c, eid in zip(cfgs, ids) if results[eid] is None]
    if len(pending) == 1:   # a bucket of one is a solo run, on today's path
        results[pending[0].experiment_id()] = driver.train(
            pending[0], verbose=verbose, progress=progress, callbacks=callbacks, log=log)
    elif pending:
        try:
            results.update(_train_leased(pending, root, verbose=verbose, progress=progress, callbacks=callbacks,
                                         log=log))
        except Exception as e:   # full disk, quota, read-only, denied: every member stops as a solo run does
            u = driver.storage_cause(e, root.uri)
            if u is None:
                raise
            raise storage_stop(root, pending, u, log) from None
    return [results[eid] for eid in ids]


def storage_stop(root: Store, cfgs: Sequence[Config], u: StorageUnwritable, log: Tell) -> StorageUnwritable:
    """Each member `interrupted` with its own resume hint, as driver._leased leaves a solo run; one stop for all."""
    for c in cfgs:
        driver.storage_stop(root.sub(c.experiment_id()), c.experiment_id(), c, u, log)
    return StorageUnwritable(u.what, u.why, u.free, "the bucket's unfinished members interrupted, each at its newest "
                                                    "intact checkpoint; rerun the same command to resume them once "
                                                    "there is room")


def _train_leased(cfgs: list[Config], root: Store, *, verbose: bool, progress: bool, callbacks: list | None,
                  log: Tell) -> dict[str, dict[str, Any]]:
    ids = [c.experiment_id() for c in cfgs]
    fitting = driver.FitStop()   # any member's lease lost stops the bucket, as a solo driver's does

    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(lease.hold(root.sub(eid), eid, log=log, on_lost=fitting)) for eid in ids]
        for eid in ids:
            root.sub(eid).sweep_temps()
        ray_env.ensure_ray(cfgs[0], verbose=verbose)
        import ray

        driver.check_storage_reachable(root, ray.nodes())
        each = log if verbose else quiet   # per-member lines (corpus, start, outcome): a bucket of 64 says 64 less
        specs = [driver.worker_spec(c, root, eid, verbose=verbose, progress=False, log=each, holder=h.holder)
                 for c, eid, h in zip(cfgs, ids, held)]
        steps = {s.experiment_id: s.steps_per_epoch for s in specs}
        if len(set(steps.values())) > 1:
            raise ConfigError(f"bucket: members' corpora give different steps per epoch ({steps}); "
                              f"a bucket's members step together")
        for eid in ids:   # the members' checkpoints are written by the bucket now, not registered with Ray
            run = root.sub(eid, RUN_DIR)
            if run.is_file(ray_private.train_snapshot_file()):
                run.fs.delete_file(run.path(ray_private.train_snapshot_file()))
        from raywalk.service.bucket_worker import BucketSpec

        bid = bucket_id(ids)
        spec = BucketSpec(bid, tuple(specs), progress=progress, verbose=verbose, driver_token=uuid.uuid4().hex)
        log(f"bucket {bid}: {len(ids)} experiments in one worker, {specs[0].steps_per_epoch} steps/epoch: "
            + ", ".join(ids))
        driver.fit(_trainer(spec, root, callbacks), spec, root.sub(BUCKETS, bid), None, fitting)
        gone = [h for h in held if h.lost]
        if gone:
            raise LeaseLost(gone[0].lost)
        results = {eid: driver.finalise(root, eid, each, held=h) for eid, h in zip(ids, held)}
        log(f"bucket {bid}: " + outcome_counts(results.values()) + f"; results under {root.uri}")
        return results


def outcome_counts(results) -> str:
    """"2 passed, 1 failed, 1 interrupted": a bucket's members by status, in one phrase."""
    n = Counter(str(r.get("status")) for r in results)
    return ", ".join(f"{v} {k}" for k, v in sorted(n.items()))


def _trainer(spec, root: Store, callbacks: list | None):
    import ray.train
    from ray.train.torch import TorchTrainer

    from raywalk.service.bucket_worker import train_bucket_loop

    cfg, use_gpu = spec.config, spec.config.run.gpus_per_worker > 0
    resources = {"CPU": cfg.run.cpus_per_worker, **({"GPU": cfg.run.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        functools.partial(stops.guarded_loop, spec, train_bucket_loop),
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources,
                                               accelerator_type=cfg.run.accelerator_type or None),
        run_config=ray.train.RunConfig(
            name="train", storage_path=root.sub(BUCKETS, spec.bucket_id).path(), storage_filesystem=root.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures,   # shared (SHARED_RUN)
                                                   max_preemption_failures=cfg.run.max_preemptions),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": driver.worker_env(cfg, spec.verbose)},
            logging_config=None if spec.verbose else ray_env.quiet_train_logging(),
        ),
    )
