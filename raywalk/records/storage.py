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

import contextlib
import errno
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from raywalk.records.layout import is_temp, tmp_name  # noqa: F401  (storage's temp rule, named in layout)


class StorageError(ValueError):
    """A storage root or URI that cannot be used; the message names it and why (CLI: exit 2)."""


def warn(msg: str) -> None:
    """One line to stderr, flushed: the default `log` of every driver-side writer."""
    print(msg, file=sys.stderr, flush=True)


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




# ---- errors that will recur: full disk, quota, read-only, no permission ---------------------
RECUR_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only filesystem", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}
# The same on object stores (S3 and compatible servers): retrying cannot help.
RECUR_S3 = {"AccessDenied": "access denied", "AllAccessDisabled": "access denied",
            "InvalidAccessKeyId": "invalid access key", "SignatureDoesNotMatch": "bad credentials",
            "QuotaExceeded": "quota exceeded", "XMinioStorageFull": "storage full",
            "XMinioAdminBucketQuotaExceeded": "quota exceeded", "NoSuchBucket": "bucket does not exist",
            "Insufficient Storage": "storage full", "ACCESS_DENIED": "access denied"}
_ERRNO_RE = re.compile(r"\[errno (\d+)\]", re.I)


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        cause = getattr(e, "cause", None)   # ray.exceptions.RayTaskError keeps the task's own error here
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)


def will_recur(e: BaseException) -> str | None:
    """Why a write error will happen again on retry (full disk, quota, read-only, denied), else None.

    Looks through the exception chain (Ray task errors, pyarrow's OSErrors that carry the errno
    only in their message, botocore ClientErrors by code).
    """
    for x in _chain(e):
        code = getattr(x, "errno", None)
        if code in RECUR_ERRNOS:
            return RECUR_ERRNOS[code]
        resp = getattr(x, "response", None)
        if isinstance(resp, dict):
            c = resp.get("Error", {}).get("Code", "")
            if c in RECUR_S3:
                return RECUR_S3[c]
            if resp.get("ResponseMetadata", {}).get("HTTPStatusCode") in (403, 507):
                return "access denied" if resp["ResponseMetadata"]["HTTPStatusCode"] == 403 else "storage full"
        text = str(x)
        m = _ERRNO_RE.search(text)
        if m and int(m.group(1)) in RECUR_ERRNOS:
            return RECUR_ERRNOS[int(m.group(1))]
        for c, why in RECUR_S3.items():
            if c in text:
                return why
        if "No space left on device" in text:
            return RECUR_ERRNOS[errno.ENOSPC]
    return None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def free_space(path: str) -> str | None:
    """'N free of M' for the local filesystem holding path (None for object stores / unknown)."""
    p = path
    while p and not os.path.exists(p):
        p = os.path.dirname(p)
    try:
        u = shutil.disk_usage(p or "/")
    except OSError:
        return None
    return f"{_size(u.free)} free of {_size(u.total)}"


class StorageUnwritable(RuntimeError):
    """A write that cannot succeed until someone acts (full disk, quota, read-only, denied).

    Not retried: the run stops at once with one line (CLI exit code 4) that says what could not be
    written, where, the free space when known, and how to resume.
    """

    def __init__(self, what: str, why: str, free: str | None = None, resume: str | None = None):
        self.what, self.why, self.free, self.resume = what, why, free, resume
        super().__init__(self.line())

    def line(self) -> str:
        s = f"storage unwritable ({self.why}): could not write {self.what}"
        if self.free:
            s += f" ({self.free})"
        if self.resume is not None:
            s += f"; {self.resume}"
        return s

    def to_dict(self) -> dict:
        return {"what": self.what, "why": self.why, "free": self.free}


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


# An error the AWS SDK gives up on although a retry would succeed: a 503 SlowDown answering a small ranged
# GET fails as "INTERNAL_FAILURE ... Failed to flush response stream" (its XML body does not fit the read
# buffer) and is marked not retryable. Ray Data retries it itself (DataContext.retried_io_errors); raywalk's
# own reads do too. (Connection errors and plain 503s the SDK has already retried S3_ATTEMPTS times.)
TRANSIENT = ("Failed to flush response stream",)
READ_ATTEMPTS = 5


def transient(e: BaseException) -> bool:
    return any(p in str(e) for p in TRANSIENT)


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

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under rel (empty when it does not exist); temp files are never listed."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        return sorted(i.base_name for i in self.fs.get_file_info(sel) if not is_temp(i.base_name))

    def read_json_or_warn(self, rel: str, what: str = "record", log=warn) -> Any | None:
        """The JSON at rel; None with a one-line warning naming it when it is torn or unreadable."""
        try:
            return json.loads(self.read_bytes(rel))
        except (ValueError, OSError) as e:
            log(f"warning: skipping unreadable {what} {self.child_uri(rel)} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'empty'})")
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
        """Atomic write; StorageUnwritable when the error will recur (full, quota, read-only, denied)."""
        dest = self.path(rel)
        try:
            self._write(dest, data)
        except OSError as e:
            why = will_recur(e)
            if why is None:
                raise
            raise StorageUnwritable(self.child_uri(rel), why, free_space(dest) if self.local else None) from e

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
