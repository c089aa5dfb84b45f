"""A manifest's file list, one format for checkpoints, corpora and exports, and its one verifier.

Each file a manifest vouches for is listed as `rel: {"size": bytes, "sha256": hex}` (an export
adds "what": the file's description). The list sits under the key each record has always used
— a checkpoint's and an export's "files", a corpus's "checksums" — and `listed` reads either,
so every checkpoint and corpus ever written still verifies.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable

KEYS = ("files", "checksums")   # where a manifest keeps its list: checkpoints/exports, corpora


class Mismatch(ValueError):
    """A file that is not as its manifest says; the message names it and how it differs."""


def entry(data: bytes, **extra: Any) -> dict[str, Any]:
    """The list entry of a file holding `data` (extra keys, e.g. what=, go first)."""
    return {**extra, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def listed(manifest: Any) -> dict[str, dict[str, Any]]:
    """The manifest's file list, under whichever key it was written; KeyError when it has none."""
    for key in KEYS:
        if isinstance(manifest, dict) and isinstance(manifest.get(key), dict):
            return manifest[key]
    raise KeyError(" or ".join(KEYS))


def check(files: dict[str, dict[str, Any]], size_of: Callable[[str], int | None],
          sha256_of: Callable[[str], str] | None = None, only: Iterable[str] | None = None) -> None:
    """Mismatch unless every listed file (or those in `only`) has its size (size_of: None when absent)
    and, with sha256_of, its sha256; sizes are all checked before any file is hashed."""
    rels = list(files) if only is None else list(only)
    for rel in rels:
        size = size_of(rel) if rel in files else None
        if size is None:
            raise Mismatch(f"{rel} is missing")
        if size != files[rel]["size"]:
            raise Mismatch(f"{rel} has {size} bytes, manifest says {files[rel]['size']} (truncated?)")
    for rel in rels if sha256_of is not None else ():
        if sha256_of(rel) != files[rel]["sha256"]:
            raise Mismatch(f"{rel} does not match its sha256 (corrupt or modified)")


def check_bytes(files: dict[str, dict[str, Any]], data: dict[str, bytes]) -> None:
    """check() of files held in memory, sha256 included."""
    check(files, lambda rel: len(data[rel]) if rel in data else None,
          lambda rel: hashlib.sha256(data[rel]).hexdigest())
