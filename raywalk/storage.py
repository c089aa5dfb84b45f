"""One storage root, local path or remote URI (s3://...), through pyarrow.fs.

Every durable write goes through `write_bytes`, which is atomic: locally a temp
name then rename; on object stores a single PUT is already all-or-nothing.
Credentials for remote stores come only from the environment (pyarrow's S3
resolution: AWS_* variables, profiles, instance roles).

A remote URI may carry pyarrow's filesystem options as a query string, e.g.
`s3://bucket/prefix?endpoint_override=127.0.0.1:9000&scheme=http` for an
S3-compatible server; child URIs keep that query at the end, so every URI
raywalk hands on (corpus, checkpoints, result.json) opens the same store.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs


class StorageError(ValueError):
    """A storage root or URI that cannot be used; the message names it and why (CLI: exit 2)."""


def check_uri(uri: str) -> None:
    """A remote URI must name a bucket: scheme://BUCKET[/prefix][?options]."""
    base, _ = split_query(uri)
    scheme, _, rest = base.partition("://")
    if not scheme or not rest.split("/", 1)[0]:
        raise StorageError(f"storage URI {uri!r} is malformed: no bucket (expected {scheme or 's3'}://BUCKET/PREFIX)")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def split_query(uri: str) -> tuple[str, str]:
    """(base, query) of a remote URI; local paths never have a query ('?' may be in a file name)."""
    if not is_remote(uri):
        return uri, ""
    base, _, query = uri.partition("?")
    return base, query


def join_uri(uri: str, *parts: str) -> str:
    """uri/part/part, with a remote URI's query string kept at the end."""
    base, query = split_query(uri)
    out = "/".join([base.rstrip("/") if parts else base, *[p.strip("/") for p in parts if p]])
    return f"{out}?{query}" if query else out


def _fs_uri(uri: str) -> str:
    """The URI pyarrow opens: for s3, `allow_delayed_open=true` unless the user chose otherwise.

    With it, a small object (result.json, a manifest, a checkpoint) is one PutObject
    instead of a multipart upload: fewer requests, all-or-nothing, and accepted by
    S3-compatible servers whose CompleteMultipartUpload pyarrow rejects (moto 5.2).
    """
    base, query = split_query(uri)
    if not base.startswith("s3://") or "allow_delayed_open=" in query:
        return uri
    return f"{base}?{query + '&' if query else ''}allow_delayed_open=true"


@dataclass(frozen=True)
class Store:
    fs: pafs.FileSystem
    root: str   # filesystem path of the root (no scheme)
    uri: str    # the root as the user gave it (scheme kept), for Ray's storage_path

    @classmethod
    def open(cls, uri: str) -> "Store":
        if is_remote(uri):
            check_uri(uri)
            try:
                fs, path = pafs.FileSystem.from_uri(_fs_uri(uri))
            except (ValueError, OSError) as e:   # unknown scheme, bad options, unresolvable bucket region
                raise StorageError(f"storage URI {uri!r} cannot be opened: {str(e).splitlines()[0]}") from None
            base, query = split_query(uri)
            return cls(fs, path.rstrip("/"), base.rstrip("/") + (f"?{query}" if query else ""))
        path = os.path.abspath(uri.removeprefix("file://"))
        return cls(pafs.LocalFileSystem(), path, path)

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def child_uri(self, *parts: str) -> str:
        return join_uri(self.uri, *parts)

    def sub(self, *parts: str) -> "Store":
        return Store(self.fs, self.path(*parts), self.child_uri(*parts))

    # ---- reads ---------------------------------------------------------------

    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def is_file(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def size(self, rel: str) -> int:
        return self.fs.get_file_info(self.path(rel)).size

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under rel (empty when it does not exist)."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        return sorted(i.base_name for i in self.fs.get_file_info(sel))

    # ---- writes --------------------------------------------------------------

    def check_writable(self) -> None:
        """StorageError unless this root exists or can be created, and files can be written in it.

        Nothing is left behind: locally the nearest existing directory gets a probe file that is
        removed at once (permission bits alone mislead: root ignores them, read-only mounts do not);
        remotely the bucket must exist (a HEAD request).
        """
        if not self.local:
            bucket = self.root.split("/", 1)[0]
            try:
                found = self.fs.get_file_info(bucket).type != pafs.FileType.NotFound
            except OSError as e:
                raise StorageError(f"storage {self.uri!r} cannot be reached: {str(e).splitlines()[0]}") from None
            if not found:
                raise StorageError(f"storage {self.uri!r}: bucket {bucket!r} does not exist")
            return
        p = self.root
        while not os.path.lexists(p):
            p = os.path.dirname(p)
        if not os.path.isdir(p):
            raise StorageError(f"storage root {self.uri!r} cannot be created: {p} is a file, not a directory")
        probe = os.path.join(p, f".raywalk-probe-{uuid.uuid4().hex}")
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            os.unlink(probe)
        except OSError as e:
            what = "is not writable" if p == self.root else f"cannot be created in {p}"
            raise StorageError(f"storage root {self.uri!r} {what}: {e.strerror}") from None

    def makedirs(self, rel: str = "") -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        dest = self.path(rel)
        parent = dest.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not self.local:
            with self.fs.open_output_stream(dest) as f:
                f.write(data)
            return
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{dest.rsplit('/', 1)[1]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())

    def delete_dir(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.delete_dir(self.path(rel))

    def move(self, src: str, dst: str) -> None:
        """Rename a directory (local) or copy-then-delete (object stores)."""
        if self.local:
            os.replace(self.path(src), self.path(dst))
            return
        sel = pafs.FileSelector(self.path(src), recursive=True)
        for info in self.fs.get_file_info(sel):
            if info.type == pafs.FileType.File:
                rel = info.path[len(self.path(src)):].lstrip("/")
                self.fs.copy_file(info.path, self.path(dst, rel))
        self.fs.delete_dir(self.path(src))
