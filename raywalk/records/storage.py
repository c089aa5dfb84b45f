"""`Store`: one storage root, local path or remote URI (s3://...), through pyarrow.fs; the local write path.

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

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from raywalk.messages import Tell, tell
from raywalk.records.errors import READ_ATTEMPTS, StorageError, first_line, transient, unwritable
from raywalk.records.layout import is_temp, tmp_name
from raywalk.records.uris import check_uri, is_remote, join_uri, pyarrow_uri, split_query


# ---- local files: temp name, fsync, rename ---------------------------------------------

def write_synced(path: str, data: bytes) -> None:
    """data in the file at path, on the disk before this returns."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_temp(dest: str, data: bytes) -> str:
    """data in a new temp file beside dest (layout's temp rule, fsynced); returns its path.

    A failure leaves no temp behind (a full disk must not fill up further)."""
    tmp = os.path.join(os.path.dirname(dest), tmp_name(os.path.basename(dest)))
    try:
        write_synced(tmp, data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def rename_into(tmp: str, dest: str) -> None:
    """os.replace(tmp, dest), removing tmp if that fails."""
    try:
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def replace_local(dest: str, data: bytes) -> None:
    """Atomic local write: readers see the old file or the new one, never a part."""
    rename_into(write_temp(dest, data), dest)




# Transient object-store errors (503 SlowDown, connection resets, timeouts) are retried with backoff by
# the AWS SDK's standard strategy; pyarrow's default is 3 attempts, too few for a throttled bucket.
S3_ATTEMPTS = 10


class _RetryingS3(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with S3_ATTEMPTS standard retries, kept when pickled: pyarrow 26 drops
    retry_strategy from S3FileSystem.__reduce__, so the filesystem Ray hands its workers (storage_filesystem,
    Ray Data reads) would silently fall back to 3 attempts."""

    def __reduce__(self):
        return _s3_with_retries, (super().__reduce__()[1][0],)


def _s3_with_retries(kwargs: dict) -> pafs.S3FileSystem:
    return _RetryingS3(**kwargs, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS))


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
                fs, path = pafs.FileSystem.from_uri(pyarrow_uri(uri))
            except (ValueError, OSError) as e:   # unknown scheme, bad options, unresolvable bucket region
                raise StorageError(f"storage URI {uri!r} cannot be opened: {first_line(e)}") from None
            if isinstance(fs, pafs.S3FileSystem):   # the URI's options, with an explicit retry policy
                fs = _s3_with_retries(fs.__reduce__()[1][0])
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
        for attempt in range(READ_ATTEMPTS):
            try:
                with self.fs.open_input_stream(self.path(rel)) as f:
                    return f.read()
            except OSError as e:
                if self.local or attempt == READ_ATTEMPTS - 1 or not transient(e):
                    raise
                time.sleep(min(2.0, 0.05 * 2 ** attempt))
        raise AssertionError("unreachable")

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_if_exists(self, rel: str) -> bytes | None:
        """The bytes at rel; None when there is no file."""
        try:
            return self.read_bytes(rel)
        except FileNotFoundError:
            return None
        except OSError:
            if not self.exists(rel):   # object stores raise a plain OSError for a missing key
                return None
            raise

    def read_json_if_exists(self, rel: str) -> Any | None:
        """The JSON at rel; None when there is no file; ValueError when it is not JSON."""
        data = self.read_if_exists(rel)
        return None if data is None else json.loads(data)

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under rel (empty when it does not exist); temp files are never listed."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        return sorted(i.base_name for i in self.fs.get_file_info(sel) if not is_temp(i.base_name))

    def read_json_or_warn(self, rel: str, what: str = "record", log: Tell = tell) -> Any | None:
        """The JSON at rel; None with a one-line warning naming it when it is torn or unreadable."""
        try:
            return json.loads(self.read_bytes(rel))
        except (ValueError, OSError) as e:
            log(f"warning: skipping unreadable {what} {self.child_uri(rel)} ({type(e).__name__}: "
                f"{first_line(e) or 'empty'})")
            return None

    def sweep_temps(self, rel: str = "", older_than_s: float = 0.0) -> int:
        """Remove temp files left by killed or failed writes under rel (recursively, local roots only);
        call only where no other writer is active (the lease holder, before its workers start)."""
        if not self.local:
            return 0   # object stores: a PUT is all-or-nothing, nothing is left behind
        n, now = 0, time.time()
        for dirpath, _, files in os.walk(self.path(rel)):
            for f in files:
                p = os.path.join(dirpath, f)
                try:
                    if is_temp(f) and now - os.path.getmtime(p) >= older_than_s:
                        os.unlink(p)
                        n += 1
                except OSError:
                    pass
        return n

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
                raise StorageError(f"storage {self.uri!r} cannot be reached: {first_line(e)}") from None
            if not found:
                raise StorageError(f"storage {self.uri!r}: bucket {bucket!r} does not exist")
            return
        p = self.root
        while not os.path.lexists(p):
            p = os.path.dirname(p)
        if not os.path.isdir(p):
            raise StorageError(f"storage root {self.uri!r} cannot be created: {p} is a file, not a directory")
        probe = os.path.join(p, tmp_name("probe"))   # the temp rule: swept if a kill leaves it
        try:
            os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            os.unlink(probe)
        except OSError as e:
            what = "is not writable" if p == self.root else f"cannot be created in {p}"
            raise StorageError(f"storage root {self.uri!r} {what}: {e.strerror}") from None

    def makedirs(self, rel: str = "") -> None:
        self.fs.create_dir(self.path(rel), recursive=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic write; StorageUnwritable when the error will recur (full, quota, read-only, denied)."""
        dest = self.path(rel)
        try:
            self._write(dest, data)
        except OSError as e:
            u = unwritable(e, self.child_uri(rel))
            if u is None:
                raise
            raise u from e

    def _write(self, dest: str, data: bytes) -> None:
        self.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        if not self.local:
            with self.fs.open_output_stream(dest) as f:
                f.write(data)
            return
        replace_local(dest, data)

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
