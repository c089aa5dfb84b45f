"""Errors raywalk tells apart, and the one table that classifies them.

- StorageError: a root or URI that cannot be used at all (bad input, before any work).
- StorageUnwritable: a write that will fail again on retry (full disk, quota, read-only,
  denied): `will_recur` says why, from the exception chain (`chain`: Ray task errors,
  pyarrow OSErrors that carry the errno only in their message, botocore ClientErrors).
- transient: an object-store read error worth retrying although the SDK gave up.

Messages quote an error by its first line (`first_line`).

Every raywalk error crosses Ray's process boundaries (a worker's error handed to its driver, a Tune trial's
to the sweep) by pickle: one whose __init__ takes other arguments than its message pickles with
`keeps_fields` (tests/test_error_pickling.py checks every one).
"""
from __future__ import annotations

import errno
import os
import re
import shutil


def rebuilt(cls: type, args: tuple, fields: dict) -> BaseException:
    """An error as it was pickled: its message (args) and fields as they were, its __init__ not run again
    (which would take other arguments, or recompute a message from a clock)."""
    e = cls.__new__(cls, *args)
    e.args = args
    e.__dict__.update(fields)
    return e


def keeps_fields(e: BaseException) -> tuple:
    """__reduce__ for an error whose __init__ takes other arguments than its message: pickle replays
    cls(*args) (here, the message alone) and would fail, e.g. in Ray's unpickling of a task's error."""
    return rebuilt, (type(e), e.args, dict(e.__dict__))


class StorageError(ValueError):
    """A storage root or URI that cannot be used; the message names it and why (CLI: exit 2)."""


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


def chain(e: BaseException | None):
    """e, then what caused it, to the root: the one walk every classification below uses."""
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
    for x in chain(e):
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


def byte_size(n: float) -> str:
    """Bytes for people, in powers of 1000: "512 B", "652.8 KB", "11.2 GB"."""
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
    return f"{byte_size(u.free)} free of {byte_size(u.total)}"


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

    __reduce__ = keeps_fields


def unwritable(e: BaseException, where: str) -> StorageUnwritable | None:
    """e as a StorageUnwritable (through Ray's task-error wrapping), None if it is not one."""
    for x in chain(e):
        if isinstance(x, StorageUnwritable) and getattr(x, "what", None):
            return StorageUnwritable(x.what, x.why, x.free)
    why = will_recur(e)
    if why is None:
        return None
    return StorageUnwritable(where, why, free_space(where) if "://" not in where else None)


def first_line(e: BaseException) -> str:
    """The first line of an error's message ("" for none)."""
    s = str(e)
    return s.splitlines()[0] if s else ""


# An error the AWS SDK gives up on although a retry would succeed: a 503 SlowDown answering a small ranged
# GET fails as "INTERNAL_FAILURE ... Failed to flush response stream" (its XML body does not fit the read
# buffer) and is marked not retryable. Ray Data retries it itself (DataContext.retried_io_errors); raywalk's
# own reads do too. (Connection errors and plain 503s the SDK has already retried S3_ATTEMPTS times.)
TRANSIENT = ("Failed to flush response stream",)
READ_ATTEMPTS = 5


def transient(e: BaseException) -> bool:
    return any(p in str(e) for p in TRANSIENT)
