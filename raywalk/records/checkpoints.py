"""Checkpoints, the one home: names, file format, save, verify, resume point and hint, listing, retention, selection.

The Ray side — reporting a saved checkpoint to Ray Train, restoring Ray's registered one, removing
one whose upload failed — is service/checkpointing.py (this module imports no Ray).

A checkpoint is a directory `epoch_NNNN` (after NNNN whole epochs) or
`epoch_NNNN_step_SSSSSS` (a just-in-time one, SSSSSS steps into the next epoch)
under the run directory `ROOT/<experiment_id>/checkpoints` (Ray's RunConfig.name).
It holds one `state.pt` (the training state as plain data) and a `manifest.json`
written last, with the size and sha256 of every file: a checkpoint torn by a kill
mid-write, or edited afterwards, is detected and skipped in favour of the previous
good one. Loading uses `torch.load(weights_only=True)`: a checkpoint that would need
code to load (a pickled object) is refused.

Where a restarted run goes on from is Ray's: the checkpoint `ray.train.get_checkpoint()`
returns, the latest one Ray registered (after a worker-group restart, the controller's;
after a driver rerun, the one its checkpoint_manager_snapshot.json names). Ray registers
a report at its next poll of the workers (every 2 s), so a checkpoint reported just
before a crash may not be: a newer one on disk is then not resumed from (the restart
goes on from the registered one) and stays outside Ray's accounting. The run directory
is listed only when Ray's is torn (for the newest older one that verifies), or when
Ray has registered none yet: a driver killed within those 2 s of its first checkpoint
leaves no snapshot, and its rerun goes on from that checkpoint on disk.
"""
from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path
from typing import Any

from raywalk.messages import Tell
from raywalk.records.errors import first_line
from raywalk.records.layout import MANIFEST, RUN_DIR, STATE
from raywalk.records.manifest import Mismatch, check_bytes, entry, listed
from raywalk.records.storage import Store, replace_local

FORMAT = 1                     # the state's layout, recorded in it as "format"
KEEP = 3                       # Ray keeps the newest KEEP (CheckpointConfig.num_to_keep); the gate's is the last
CKPT_RE = re.compile(r"^epoch_(\d{4,})(?:_step_(\d{6,}))?$")   # epochs done (+ steps into the next)



class CheckpointError(RuntimeError):
    """A checkpoint that is torn, tampered with, not plain data, or not there."""


# ---- names -----------------------------------------------------------------------

def dir_name(epoch: int, step: int = 0) -> str:
    """epoch_NNNN after `epoch` whole epochs; epoch_NNNN_step_SSSSSS `step` steps into the next one."""
    return f"epoch_{epoch:04d}" + (f"_step_{step:06d}" if step else "")


def is_checkpoint(name: str) -> bool:
    return CKPT_RE.match(name) is not None


def position(name: str) -> tuple[int, int]:
    """(epochs done, steps into the next epoch) of a checkpoint directory name: its training order."""
    m = CKPT_RE.match(name)
    if m is None:
        raise ValueError(f"not a checkpoint directory name: {name!r}")
    return int(m.group(1)), int(m.group(2) or 0)


def is_mid_epoch(name: str) -> bool:
    """A just-in-time checkpoint (saved on a reclaim notice, steps into an epoch)."""
    return is_checkpoint(name) and position(name)[1] > 0


# ---- the file format ---------------------------------------------------------------

def pack(state: dict[str, Any], corpus: dict[str, Any] | None = None) -> dict[str, bytes]:
    """A checkpoint's files for a training state (TrainingState.state_dict): state.pt and its manifest
    (with `corpus`, the identity of the corpus trained on: a resume checks it without loading the state)."""
    import torch   # here, not at import: `raywalk ls` reads result.json (which names checkpoints) without torch

    buf = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buf)
    data = buf.getvalue()
    manifest = {"files": {STATE: entry(data)}, "epoch": int(state["epoch"])}
    if corpus is not None:
        manifest["corpus"] = corpus
    return {STATE: data, MANIFEST: json.dumps(manifest).encode()}


def verify(files: dict[str, bytes]) -> dict[str, Any]:
    """The manifest, once every file matches it; CheckpointError naming what does not."""
    if MANIFEST not in files:
        raise CheckpointError("manifest.json is missing (torn write?)")
    try:
        manifest = json.loads(files[MANIFEST])
    except ValueError as e:
        raise CheckpointError(f"manifest.json is unreadable ({e})") from None
    try:
        files_listed = dict(listed(manifest))
        if STATE not in files_listed:
            raise KeyError(STATE)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"manifest.json is incomplete (no entry {e})") from None
    try:
        check_bytes(files_listed, files)
    except Mismatch as e:
        raise CheckpointError(str(e)) from None
    return manifest


def unpack(files: dict[str, bytes]) -> dict[str, Any]:
    """The training state of a checkpoint's files, verified against the manifest and loaded as data only."""
    import torch

    verify(files)
    try:
        return torch.load(io.BytesIO(files[STATE]), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing a checkpoint that is not plain data (it would run code to load): "
                              f"{first_line(e)}") from None


# ---- save and read -------------------------------------------------------------------

def save(directory: str | Path, state: dict[str, Any], corpus: dict[str, Any] | None = None) -> None:
    """Write state.pt, then (temp name, rename) the manifest that vouches for it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = pack(state, corpus)
    (d / STATE).write_bytes(files[STATE])
    replace_local(str(d / MANIFEST), files[MANIFEST])   # layout's one temp rule: never listed, never read as a manifest


def write(run: Store, name: str, state: dict[str, Any], gate: str | None = None,
          corpus: dict[str, Any] | None = None) -> None:
    """A checkpoint written straight into `run` by raywalk itself (a bucket's member: no Ray run registers
    it), state.pt first and the manifest last; then, as Ray's num_to_keep, only the newest KEEP complete
    ones stay, and the gate's (`gate`). `corpus`: as `pack`'s."""
    files = pack(state, corpus)
    d = run.sub(name)
    d.write_bytes(STATE, files[STATE])
    d.write_bytes(MANIFEST, files[MANIFEST])
    prune(run, gate)


def prune(run: Store, gate: str | None, before_epoch: int | None = None) -> None:
    """As Ray's num_to_keep does for the checkpoints it registers: only the newest KEEP complete ones stay, and
    the gate's. `before_epoch`: only those older than that epoch go (a bucket member going on alone: the
    bucket wrote those, Ray manages the rest)."""
    for old in names(run, complete=True)[:-KEEP]:
        if old != gate and (before_epoch is None or position(old)[0] < before_epoch):
            run.delete_dir(old)


def common_point(runs: list[Store]) -> tuple[int, int] | None:
    """The newest (epochs done, steps into the next) at which every run has a complete checkpoint; None if none:
    where a bucket's members, which step together, all go on from."""
    have = [{position(n) for n in names(r, complete=True)} for r in runs]
    shared = set.intersection(*have) if have else set()
    return max(shared) if shared else None


def _files(store: Store) -> dict[str, bytes]:
    return {name: store.read_bytes(name) for name in (MANIFEST, STATE) if store.is_file(name)}


def read(store: Store) -> dict[str, Any]:
    """Load and verify the checkpoint directory `store`."""
    return unpack(_files(store))


# ---- listing ---------------------------------------------------------------------------

def names(run: Store, complete: bool = False) -> list[str]:
    """The checkpoint directories under `run` in training order (oldest first); `complete`: only
    those whose manifest is written (a checkpoint being written, or torn before it, has none)."""
    found = sorted((n for n in run.listdir() if is_checkpoint(n)), key=position)
    return [n for n in found if run.is_file(f"{n}/{MANIFEST}")] if complete else found


def candidates(run: Store, latest: str | None) -> list[str]:
    """Checkpoint directory names to try, newest first: `latest`, then the older ones on disk."""
    older = names(run)[::-1]
    return older if latest is None else [latest] + [n for n in older if position(n) < position(latest)]


def info(exp: Store, gate_epoch: int | None) -> dict[str, Any]:
    """result.json's `checkpoints` block: the run directory, the complete checkpoints, the latest and the gate's."""
    run = exp.sub(RUN_DIR)
    kept = names(run, complete=True)
    gate = dir_name(gate_epoch) if gate_epoch else None
    return {"directory": run.uri, "kept": [run.child_uri(n) for n in kept],
            "latest": run.child_uri(kept[-1]) if kept else None,
            "gate": run.child_uri(gate) if gate and gate in kept else None}


def newest_intact(run: Store) -> tuple[str, int] | None:
    """(name, epochs done) of the newest checkpoint under run whose files match their manifest."""
    for name in candidates(run, None):
        try:
            m = verify(_files(run.sub(name)))
            return name, int(m.get("epoch", position(name)[0]))
        except (CheckpointError, OSError, ValueError):
            continue
    return None


def corpora(run: Store) -> dict[str, dict[str, Any]]:
    """{checkpoint name: the corpus identity its manifest records} for every complete checkpoint under run
    that records one (checkpoints written before the record existed have none)."""
    out = {}
    for name in names(run, complete=True):
        try:
            c = json.loads(run.read_bytes(f"{name}/{MANIFEST}")).get("corpus")
        except (OSError, ValueError, AttributeError):
            continue   # a torn manifest: the resume skips that checkpoint anyway
        if isinstance(c, dict):
            out[name] = c
    return out


def _first_that_loads(tries: list[tuple[str, Store]], run: Store, warn: Tell) -> tuple[dict | None, str | None]:
    for name, store in tries:
        try:
            return read(store), name
        except (CheckpointError, OSError, RuntimeError) as e:
            warn(f"warning: skipping checkpoint {run.child_uri(name)}: {e}")
    return None, None


def newest(run: Store, warn: Tell) -> tuple[dict[str, Any] | None, str | None]:
    """The newest checkpoint state on disk that verifies (mid-epoch ones included); torn ones are warned about."""
    return _first_that_loads([(n, run.sub(n)) for n in candidates(run, None)], run, warn)


# ---- the resume point ----------------------------------------------------------------

def resume_point(run: Store, registered: Any, warn: Tell) -> tuple[dict[str, Any] | None, str | None]:
    """(state, name) to go on from, or (None, None): start at epoch 1.

    `registered` is what `ray.train.get_checkpoint()` returned (a ray.train.Checkpoint: `.path`
    on `.filesystem`), read where it points. Only when it is torn is `run` listed, for the newest
    older checkpoint that verifies (each skipped one is warned about): a directory on disk newer
    than Ray's (reported, not yet registered) is never used. None (Ray has registered nothing):
    the newest on disk that verifies, if any (see the module's note on Ray's registration lag).
    """
    if registered is None:
        return newest(run, warn)
    path = registered.path.rstrip("/")
    name = path.rsplit("/", 1)[-1]
    ray_own = Store(registered.filesystem, path, run.child_uri(name))
    older = candidates(run, name)[1:] if is_checkpoint(name) else []
    return _first_that_loads([(name, ray_own)] + [(n, run.sub(n)) for n in older], run, warn)


def resume_hint(exp: Store) -> str:
    """The newest intact checkpoint and how to go on from it (for a storage stop's one line)."""
    try:
        found = newest_intact(exp.sub(RUN_DIR))
    except Exception:   # the store itself is unreachable: say nothing we do not know
        found = None
    if found is None:
        return "no intact checkpoint yet; rerun the same command to start it again once there is room"
    name, epoch = found
    return (f"newest intact checkpoint {exp.sub(RUN_DIR).child_uri(name)} (epoch {epoch}); rerun the same "
            f"command to resume from it once there is room")


# ---- selection for raywalk.load / export --------------------------------------------------

def epochs_on_disk(run: Store) -> str:
    """The whole epochs with a checkpoint directory under run, for messages: "3, 4, 5" or "none"."""
    return ", ".join(str(position(n)[0]) for n in names(run) if not is_mid_epoch(n)) or "none"


def select(run: Store, epoch: int | None, warn: Tell) -> tuple[dict[str, Any], str]:
    """(state, name) of epoch `epoch`'s checkpoint, or with None the newest that verifies (mid-epoch
    ones included, torn ones warned about); CheckpointError saying what is on disk otherwise."""
    if epoch is None:
        state, name = newest(run, warn)
        if state is None:
            raise CheckpointError(f"no usable checkpoint under {run.uri} (epochs on disk: {epochs_on_disk(run)})")
        return state, name
    name = dir_name(epoch)
    if name not in names(run):
        raise CheckpointError(f"no checkpoint {run.child_uri(name)} (epochs on disk: {epochs_on_disk(run)}; "
                              f"the last {KEEP} and the gate checkpoint are kept)")
    try:
        return read(run.sub(name)), name
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {run.child_uri(name)} is unusable: {e}") from None
