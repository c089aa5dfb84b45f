"""Checkpoints as plain data: one `state.pt` plus a `manifest.json` written last.

The manifest holds the size and sha256 of every file, so a checkpoint torn by a
kill mid-write, or edited afterwards, is detected and skipped in favour of the
previous good one. Loading uses `torch.load(weights_only=True)`: a checkpoint
that would need code to load (a pickled object) is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from raywalk.records.layout import MANIFEST, RUN_DIR, STATE  # noqa: F401  (RUN_DIR: callers say ckpt.RUN_DIR)
from raywalk.records.storage import Store, replace_local

CKPT_RE = re.compile(r"^epoch_(\d{4,})(?:_step_(\d{6,}))?$")   # epochs done (+ steps into the next)


class CheckpointError(RuntimeError):
    """A checkpoint that is torn, tampered with, or not plain data."""


def dir_name(epoch: int, step: int = 0) -> str:
    """epoch_NNNN after `epoch` whole epochs; epoch_NNNN_step_SSSSSS `step` steps into the next one."""
    return f"epoch_{epoch:04d}" + (f"_step_{step:06d}" if step else "")


def position(name: str) -> tuple[int, int]:
    """(epochs done, steps into the next epoch) of a checkpoint directory name: its training order."""
    m = CKPT_RE.match(name)
    if m is None:
        raise ValueError(f"not a checkpoint directory name: {name!r}")
    return int(m.group(1)), int(m.group(2) or 0)


def save(directory: str | Path, state: dict[str, Any]) -> None:
    """Write state.pt, then the manifest that vouches for it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    (d / STATE).write_bytes(data)
    manifest = {"files": {STATE: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}},
                "epoch": int(state["epoch"])}
    # layout's one temp rule (never listed, never read as a manifest); tests: RAYWALK_FAULT_BEFORE_RENAME=checkpoint:...
    replace_local(str(d / MANIFEST), json.dumps(manifest).encode(), fault=f"checkpoint:{d / MANIFEST}")


def load_bytes(files: dict[str, bytes]) -> dict[str, Any]:
    """Verify a checkpoint's files against its manifest and load its state as data only."""
    verify_bytes(files)
    return loads(files[STATE])


def verify_bytes(files: dict[str, bytes]) -> dict[str, Any]:
    """The manifest, once every file matches it; CheckpointError naming what does not."""
    if MANIFEST not in files:
        raise CheckpointError("manifest.json is missing (torn write?)")
    try:
        manifest = json.loads(files[MANIFEST])
    except ValueError as e:
        raise CheckpointError(f"manifest.json is unreadable ({e})") from None
    try:
        listed = dict(manifest["files"])
        if STATE not in listed:
            raise KeyError(STATE)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"manifest.json is incomplete (no entry {e})") from None
    for name, meta in listed.items():
        data = files.get(name)
        if data is None:
            raise CheckpointError(f"{name} is missing")
        if len(data) != meta["size"]:
            raise CheckpointError(f"{name} has {len(data)} bytes, manifest says {meta['size']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise CheckpointError(f"{name} does not match its sha256 (corrupt or modified)")
    return manifest


def loads(data: bytes) -> dict[str, Any]:
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing a checkpoint that is not plain data (it would run code to load): "
                              f"{str(e).splitlines()[0]}") from None


def _files(store: Store) -> dict[str, bytes]:
    return {name: store.read_bytes(name) for name in (MANIFEST, STATE) if store.is_file(name)}


def read(store: Store) -> dict[str, Any]:
    """Load and verify the checkpoint directory `store`."""
    return load_bytes(_files(store))


def newest_intact(run: Store) -> tuple[str, int] | None:
    """(name, epochs done) of the newest checkpoint under run whose files match their manifest."""
    for name in candidates(run, None):
        try:
            m = verify_bytes(_files(run.sub(name)))
            return name, int(m.get("epoch", position(name)[0]))
        except (CheckpointError, OSError, ValueError):
            continue
    return None


def candidates(run: Store, latest: str | None) -> list[str]:
    """Checkpoint directory names to try, newest first: `latest`, then older epoch dirs."""
    names = sorted((n for n in run.listdir() if CKPT_RE.match(n)), key=position, reverse=True)
    if latest is not None:
        names = [latest] + [n for n in names if position(n) < position(latest)]
    return names


def find_resume_state(run: Store, latest: str | None, warn) -> tuple[dict[str, Any] | None, str | None]:
    """The newest checkpoint state that verifies; torn ones are skipped with a warning naming them."""
    for name in candidates(run, latest):
        try:
            return read(run.sub(name)), name
        except (CheckpointError, OSError, RuntimeError) as e:
            warn(f"warning: skipping checkpoint {run.child_uri(name)}: {e}")
    return None, None
