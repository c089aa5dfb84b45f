"""Checkpoints on the Ray side: save and report to Ray Train, restore Ray's registered one, clean up a failed upload.

records/checkpoints.py holds everything else about checkpoints (names, format, verification,
the resume point, the resume hint) and imports no Ray; this module is the part that must call
`ray.train` (report, get_checkpoint), so it lives in the service layer beside the worker.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from typing import Any

from raywalk.records import checkpoints as ckpt
from raywalk.records.corpus import identity
from raywalk.records.errors import StorageUnwritable, free_space, unwritable
from raywalk.records.layout import RUN_DIR
from raywalk.records.lease import check_holder
from raywalk.records.storage import Store
from raywalk.science.loop import TrainingState, gather_epoch_losses, gather_rng


def restore(state: TrainingState, run: Store, rank: int, world: int, say) -> str | None:
    """Load the resume point into `state` (Ray's latest registered checkpoint, see records/checkpoints.py); its name."""
    import ray.train

    s, name = ckpt.resume_point(run, ray.train.get_checkpoint(), say)
    if s is not None:
        state.load_state_dict(s, rank, world)   # the model is on its device already
    return name


def report(state: TrainingState, spec: Any, rank: int, metrics: dict[str, Any], upload_async: bool = False) -> str:
    """Checkpoint the state where it stands (epoch end or mid-epoch) and report it; returns its name.

    With `upload_async` (an epoch checkpoint bound for remote storage) Ray uploads it in a
    background thread and registers it only once uploaded, so a resume never sees half of
    one (and the manifest check stays). A just-in-time checkpoint is always synchronous:
    it must be in storage before the node goes.
    """
    import ray.train

    mid = state.step > 0
    losses = gather_epoch_losses(state) if mid else None   # collectives: every rank takes part
    rng = gather_rng()
    name = ckpt.dir_name(state.epoch, state.step)
    mode = ray.train.CheckpointUploadMode.ASYNC if upload_async else ray.train.CheckpointUploadMode.SYNC
    tmp = tempfile.mkdtemp(prefix="raywalk-ckpt-")   # Ray deletes it after the upload
    checkpoint = None
    try:
        if rank == 0:
            check_lease(spec)   # never write into a run that another driver has taken over
            ckpt.save(tmp, state.state_dict(rng, spec.experiment_id, losses), corpus=identity(spec.corpus_manifest))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        with _removed_if_upload_fails(spec, name, uploading=rank == 0):   # a full disk: one clear stop
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name, checkpoint_upload_mode=mode,
                             delete_local_checkpoint_after_upload=True if checkpoint is not None else None)
    finally:
        if checkpoint is None or not upload_async:   # an async upload deletes its own directory when done
            shutil.rmtree(tmp, ignore_errors=True)
    return name


def check_lease(spec: Any) -> None:
    """LeaseLost unless this worker's driver still holds the experiment's lease (before a durable write)."""
    holder = getattr(spec, "lease_holder", "")
    if holder:
        check_holder(Store.open(spec.config.run.storage).sub(spec.experiment_id), spec.experiment_id, holder)


@contextlib.contextmanager
def _removed_if_upload_fails(spec: Any, name: str, uploading: bool):
    """Around ray.train.report: a checkpoint whose upload failed for good is removed (it was never
    registered, and a torn copy only takes room), and the error names it."""
    try:
        yield
    except Exception as e:
        if not uploading:
            raise
        ckpts = Store.open(spec.config.run.storage).sub(spec.experiment_id, RUN_DIR)
        u = unwritable(e, ckpts.child_uri(name))
        if u is None:
            raise
        with contextlib.suppress(Exception):
            ckpts.delete_dir(name)
        u = StorageUnwritable(ckpts.child_uri(name), u.why, free_space(ckpts.path(name)) if ckpts.local else None)
        raise u from None
