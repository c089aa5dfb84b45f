"""One driver per experiment: a lease at ROOT/<experiment_id>/lease.json.

    {"holder": uuid hex, "host", "pid", "started_at", "heartbeat_at" (ISO-8601 UTC),
     "heartbeat_unix": float, "stale_after_s": float}

A lease is live while `time.time() - heartbeat_unix < stale_after_s`. Every change is
atomic and conditional, so two drivers can never both believe they hold it:

- local root: the first lease is created with link() (fails if the file exists);
  renewal, takeover and release compare-and-swap under an flock on `lease.lock`
  (released by the kernel when a process dies, so it never goes stale itself).
- s3:// root: PutObject with `If-None-Match: *` creates it; renewal and takeover are
  PutObject with `If-Match: <ETag>` of the version the driver last wrote or read,
  release a DeleteObject with `If-Match`. pyarrow.fs has no conditional writes, so
  these few requests go through boto3, with the same credential chain (environment,
  profile, instance role) and the endpoint options of the storage URI.

The holder renews every `heartbeat_s` from a daemon thread; a second driver finding a
live lease raises LeaseHeld naming the holder; one finding a stale lease (the holder
was killed) takes it over with a one-line notice. Defaults: stale after 60 s, heartbeat
every 10 s; `RAYWALK_LEASE_STALE_AFTER_S` overrides the first (the heartbeat follows at
1/6 of it unless `RAYWALK_LEASE_HEARTBEAT_S` is set); `RAYWALK_LEASE_WAIT_S` makes a
driver wait that long for a held lease to be freed or go stale before it gives up (for
retried Tune trials: a trial's earlier driver may have died with its node). The
staleness test compares the reader's clock with the holder's: drivers of one study
should run on hosts with synchronised clocks (the cluster's head runs them all).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Iterator
from urllib.parse import parse_qs

from raywalk.records.layout import LEASE, LEASE_LOCK, utc_iso
from raywalk.messages import Tell, tell
from raywalk.records.errors import first_line, keeps_fields, unwritable
from raywalk.records.storage import S3_ATTEMPTS, Store, rename_into, write_temp
from raywalk.records.uris import split_query

STALE_AFTER_S = 60.0
ENV_STALE = "RAYWALK_LEASE_STALE_AFTER_S"
ENV_HEARTBEAT = "RAYWALK_LEASE_HEARTBEAT_S"
ENV_WAIT = "RAYWALK_LEASE_WAIT_S"



def _env_seconds(name: str) -> float | None:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        v = float(raw)
    except ValueError:
        v = float("nan")
    if not v > 0:
        raise ValueError(f"{name}: {raw!r} is invalid: must be a number of seconds > 0")
    return v


def lease_live(heartbeat_unix: float, stale_after_s: float, now: float | None = None) -> bool:
    """The one liveness rule: live while its holder renewed it less than stale_after_s ago (the holder's clock)."""
    return (time.time() if now is None else now) - heartbeat_unix < stale_after_s


def timings(stale_after_s: float | None = None, heartbeat_s: float | None = None) -> tuple[float, float]:
    """(stale_after_s, heartbeat_s): arguments, else the environment, else 60 s and stale/6."""
    stale = stale_after_s if stale_after_s is not None else _env_seconds(ENV_STALE) or STALE_AFTER_S
    beat = heartbeat_s if heartbeat_s is not None else _env_seconds(ENV_HEARTBEAT) or stale / 6
    if not 0 < beat < stale:
        raise ValueError(f"lease heartbeat: {beat} s is invalid: must be > 0 and below stale_after_s={stale}")
    return float(stale), float(beat)


@dataclass(frozen=True)
class LeaseInfo:
    holder: str
    """Random id of the holding driver (uuid hex), new for every acquisition."""
    host: str
    """Host name of the holding driver."""
    pid: int
    """Process id of the holding driver on that host."""
    started_at: str
    """When the holder took the lease (ISO-8601 UTC)."""
    heartbeat_at: str
    """Last renewal (ISO-8601 UTC)."""
    heartbeat_unix: float
    """Last renewal, seconds since the epoch (holder's clock)."""
    stale_after_s: float
    """The lease is live while now - heartbeat_unix < this."""

    def encode(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes) -> "LeaseInfo | None":
        """The lease, or None for a file that is not one (then treated as stale)."""
        try:
            d = json.loads(data)
            return cls(str(d["holder"]), str(d["host"]), int(d["pid"]), str(d["started_at"]),
                       str(d["heartbeat_at"]), float(d["heartbeat_unix"]), float(d["stale_after_s"]))
        except (ValueError, KeyError, TypeError):
            return None

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.heartbeat_unix

    def live(self, now: float | None = None) -> bool:
        return lease_live(self.heartbeat_unix, self.stale_after_s, now)

    def describe(self) -> str:
        return (f"host {self.host}, pid {self.pid}, started {self.started_at}, last heartbeat {self.heartbeat_at} "
                f"({max(0.0, self.age()):.0f}s ago)")


class LeaseHeld(RuntimeError):
    """Another driver holds a live lease on the experiment."""

    def __init__(self, experiment_id: str, info: LeaseInfo, uri: str):
        self.experiment_id, self.info, self.uri = experiment_id, info, uri
        left = max(0.0, info.stale_after_s - info.age())
        super().__init__(f"experiment {experiment_id} is already being run by another driver ({info.describe()}); "
                         f"not starting. Its lease ({uri}) is taken over only if its heartbeat stops for "
                         f"{info.stale_after_s:.0f}s (another {left:.0f}s at least)")

    __reduce__ = keeps_fields   # the message as it was said (its ages are the holder's then, not now)


class LeaseLost(RuntimeError):
    """The lease this driver held was taken over or removed by someone else."""


# ---- backends: create / read / replace / delete, each atomic and conditional ----------

class _Local:
    """Files on a local (or shared POSIX) filesystem; the token of a version is its content."""

    def __init__(self, exp: Store):
        self.dir, self.path = exp.path(), exp.path(LEASE)

    def create(self, data: bytes):
        os.makedirs(self.dir, exist_ok=True)
        tmp = self._write_tmp(data)
        try:
            os.link(tmp, self.path)          # atomic, and fails if a lease exists
            return data
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)

    def _write_tmp(self, data: bytes) -> str:
        """A temp file (layout's temp rule: never listed, swept by the next holder) holding data."""
        try:
            return write_temp(self.path, data)
        except OSError as e:
            u = unwritable(e, self.path)
            if u is not None:   # full disk, quota, read-only: the run stops with one line
                raise u from e
            raise

    def read(self):
        try:
            with open(self.path, "rb") as f:
                data = f.read()
            return data, data
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        os.makedirs(self.dir, exist_ok=True)
        fd = os.open(os.path.join(self.dir, LEASE_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)                    # closing releases the flock

    def replace(self, data: bytes, token):
        with self._locked():
            cur = self.read()
            if cur is None or cur[1] != token:
                return None
            rename_into(self._write_tmp(data), self.path)
            return data

    def delete(self, token) -> bool:
        with self._locked():
            cur = self.read()
            if cur is None or cur[1] != token:
                return False
            os.unlink(self.path)
            return True


class _S3:
    """An S3 object; the token of a version is its ETag. Conditional requests through boto3."""

    def __init__(self, exp: Store):
        import boto3
        from botocore.config import Config as BotoConfig

        base, query = split_query(exp.uri)
        opts = {k: v[-1] for k, v in parse_qs(query).items()}
        self.bucket, _, prefix = base.removeprefix("s3://").partition("/")
        self.key = f"{prefix.strip('/')}/{LEASE}".lstrip("/")
        endpoint = opts.get("endpoint_override")
        if endpoint and "://" not in endpoint:
            endpoint = f"{opts.get('scheme', 'https')}://{endpoint}"
        creds = {k: opts[q] for k, q in (("aws_access_key_id", "access_key"), ("aws_secret_access_key", "secret_key"),
                                         ("aws_session_token", "session_token")) if q in opts}
        self.client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name=opts.get("region"), **creds,
            config=BotoConfig(retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"},   # 503s, resets, timeouts
                              connect_timeout=10, read_timeout=20))

    @staticmethod
    def _failed(e: Exception) -> bool:
        """A refused condition: 412, or 409 when another conditional write to the key is in progress."""
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        status = getattr(e, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404") \
            or status in (404, 409, 412)

    def _put(self, data: bytes, **cond):
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data,
                                          ContentType="application/json", **cond)["ETag"]
        except ClientError as e:
            if self._failed(e):
                return None
            raise

    def create(self, data: bytes):
        return self._put(data, IfNoneMatch="*")

    def read(self):
        from botocore.exceptions import ClientError

        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if self._failed(e):
                return None
            raise
        return r["Body"].read(), r["ETag"]

    def replace(self, data: bytes, token):
        return self._put(data, IfMatch=token)

    def delete(self, token) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
            return True
        except ClientError as e:
            if self._failed(e):
                return False
            if e.response.get("Error", {}).get("Code") not in ("NotImplemented", "InvalidArgument"):
                raise
        # A server without conditional deletes: compare, then delete. Not atomic, but a takeover
        # needs a stale lease, and this holder renewed it within the last heartbeat.
        got = self.read()
        if got is None or got[1] != token:
            return False
        self.client.delete_object(Bucket=self.bucket, Key=self.key)
        return True


def stored(exp: Store) -> tuple[bool, LeaseInfo | None]:
    """(whether a lease file is there, the lease it holds: None when torn or foreign), read through the
    Store, so it works on any root `raywalk ls` lists (no conditional-write backend needed)."""
    data = exp.read_if_exists(LEASE)
    return (False, None) if data is None else (True, LeaseInfo.decode(data))


def supported(exp: Store) -> bool:
    """Leases need atomic conditional writes: local paths and s3:// have them here."""
    return exp.local or exp.uri.startswith("s3://")


def _backend(exp: Store):
    if exp.local:
        return _Local(exp)
    if exp.uri.startswith("s3://"):
        return _S3(exp)
    raise ValueError(f"{exp.uri}: experiment leases need a local path or s3://")


# ---- the lease ------------------------------------------------------------------------

class Lease:
    """This driver's claim on one experiment (see the module doc)."""

    def __init__(self, exp: Store, experiment_id: str, *, stale_after_s: float | None = None,
                 heartbeat_s: float | None = None, log: Tell = tell):
        self.exp, self.experiment_id, self.log = exp, experiment_id, log
        self.stale_after_s, self.heartbeat_s = timings(stale_after_s, heartbeat_s)
        self.holder = uuid.uuid4().hex
        self.info: LeaseInfo | None = None
        self._token = None
        self._backend = _backend(exp) if supported(exp) else None
        self._mutex = threading.Lock()      # the heartbeat thread and release() never interleave
        self.lost: str | None = None        # why this driver lost the lease (set by hold()'s heartbeat)

    @property
    def uri(self) -> str:
        return self.exp.child_uri(LEASE)

    def _stamp(self, started_at: str | None = None) -> LeaseInfo:
        now = time.time()
        stamp = utc_iso(now)
        return LeaseInfo(self.holder, socket.gethostname(), os.getpid(), started_at or stamp, stamp, now,
                         self.stale_after_s)

    def current(self) -> LeaseInfo | None:
        """Whoever holds the lease now (None: nobody, or a file that is not a lease)."""
        got = self._backend.read()
        return LeaseInfo.decode(got[0]) if got else None

    def check_free(self) -> None:
        """LeaseHeld if another driver holds a live lease (e.g. before --fresh moves the experiment)."""
        if self._backend is None:
            return
        cur = self.current()
        if cur is not None and cur.holder != self.holder and cur.live():
            raise LeaseHeld(self.experiment_id, cur, self.uri)

    def acquire(self, wait_s: float | None = None) -> "Lease":
        """Take the lease, or take over a stale one; LeaseHeld if another driver holds it live.

        With `wait_s` > 0 (default: $RAYWALK_LEASE_WAIT_S, else 0), a held lease is polled until
        it is released or goes stale, for at most that long (e.g. a retried Tune trial whose
        earlier driver died with its node).
        """
        deadline = time.monotonic() + (wait_s if wait_s is not None else _env_seconds(ENV_WAIT) or 0.0)
        while True:
            try:
                return self._acquire_once()
            except LeaseHeld:
                if time.monotonic() + self.heartbeat_s > deadline:
                    raise
                time.sleep(self.heartbeat_s)

    def _acquire_once(self) -> "Lease":
        for _ in range(5):            # each round loses only to another driver's successful change
            info = self._stamp()
            token = self._backend.create(info.encode())
            if token is not None:
                self.info, self._token = info, token
                return self
            got = self._backend.read()
            if got is None:
                continue              # released in between: try to create again
            cur = LeaseInfo.decode(got[0])
            if cur is not None and cur.holder == self.holder:   # our write landed, its reply was lost
                self.info, self._token = cur, got[1]
                return self
            if cur is not None and cur.live():
                raise LeaseHeld(self.experiment_id, cur, self.uri)
            token = self._backend.replace(info.encode(), got[1])
            if token is not None:
                self.info, self._token = info, token
                was = cur.describe() if cur else "an unreadable lease file"
                self.log(f"taking over experiment {self.experiment_id} from a driver that stopped renewing its "
                         f"lease ({was}; stale after {cur.stale_after_s if cur else self.stale_after_s:.0f}s)")
                return self
        cur = self.current()
        if cur is not None:
            raise LeaseHeld(self.experiment_id, cur, self.uri)
        raise LeaseLost(f"could not take the lease {self.uri}: it kept changing")

    def renew(self) -> None:
        """Refresh the heartbeat; LeaseLost if this driver no longer holds the lease."""
        with self._mutex:
            if self._token is None:
                raise LeaseLost(f"{self.uri}: not held by this driver")
            info = self._stamp(self.info.started_at)
            token = self._backend.replace(info.encode(), self._token)
            if token is None:
                got = self._backend.read()
                cur = LeaseInfo.decode(got[0]) if got else None
                if cur is not None and cur.holder == self.holder:   # a retried request whose first try landed
                    self.info, self._token = cur, got[1]
                    return
                self._token = None
                raise LeaseLost(f"lease on experiment {self.experiment_id} was taken over"
                                + (f" by another driver ({cur.describe()})" if cur else " or removed"))
            self.info, self._token = info, token

    def release(self) -> bool:
        """Remove the lease if this driver still holds it; True when removed."""
        with self._mutex:
            token, self._token = self._token, None
            return token is not None and self._backend.delete(token)


def check_holder(exp: Store, experiment_id: str, holder: str) -> None:
    """LeaseLost unless `holder` still holds a live lease on the experiment (workers call this
    before each durable write, so a paused or cut-off driver's workers never write over a new
    holder's run). No lease support (not local, not s3): nothing to check."""
    if not holder or not supported(exp):
        return
    got = _backend(exp).read()
    cur = LeaseInfo.decode(got[0]) if got else None
    if cur is None or cur.holder != holder:
        raise LeaseLost(lost_line(experiment_id, cur))
    if not cur.live():
        raise LeaseLost(f"lost the lease on experiment {experiment_id}: its driver has not renewed it for "
                        f"{cur.age():.0f}s (stale after {cur.stale_after_s:.0f}s), so another driver may take "
                        f"it over; stopped without writing more")


def lost_line(experiment_id: str, cur: "LeaseInfo | None") -> str:
    who = f"another driver holds it now ({cur.describe()})" if cur else "it was removed"
    return f"lost the lease on experiment {experiment_id}: {who}; this driver stopped training and writes nothing more"


class _Heartbeat(threading.Thread):
    """Renews the lease every heartbeat_s. Once it cannot (another holder, or renewing has failed
    for longer than the stale limit) it sets `lease.lost` to the one-line reason, calls on_lost
    once, and ends."""

    def __init__(self, lease: Lease, log: Tell, on_lost: Callable[[str], None] | None):
        super().__init__(name=f"raywalk-lease-{lease.experiment_id}", daemon=True)
        self.lease, self.log, self.on_lost = lease, log, on_lost
        self.stopped = threading.Event()
        lease.lost = None

    def run(self) -> None:
        lease, warned, last_ok = self.lease, False, time.monotonic()
        while not self.stopped.wait(lease.heartbeat_s):
            try:
                lease.renew()
                warned, last_ok = False, time.monotonic()
            except LeaseLost:
                cur = None
                with contextlib.suppress(Exception):
                    cur = lease.current()
                return self._lose(lost_line(lease.experiment_id, cur))
            except Exception as e:   # a storage hiccup: keep trying until the lease goes stale
                down = time.monotonic() - last_ok
                if down >= lease.stale_after_s:
                    return self._lose(f"lost the lease on experiment {lease.experiment_id}: could not renew "
                                      f"{lease.uri} for {down:.0f}s, longer than its stale limit "
                                      f"({lease.stale_after_s:.0f}s; {type(e).__name__}: {first_line(e)}); "
                                      f"another driver may take it over, so this one stopped training")
                if not warned:
                    self.log(f"warning: could not renew the lease {lease.uri} ({type(e).__name__}: {e}); retrying")
                    warned = True

    def _lose(self, reason: str) -> None:
        if self.stopped.is_set():
            return
        self.lease.lost = reason
        if self.on_lost is not None:
            self.on_lost(reason)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=self.lease.heartbeat_s + 30)


@contextlib.contextmanager
def hold(exp: Store, experiment_id: str, *, log: Tell = tell, stale_after_s: float | None = None,
         heartbeat_s: float | None = None, wait_s: float | None = None,
         on_lost: Callable[[str], None] | None = None) -> Iterator[Lease | None]:
    """Hold the experiment's lease for the block: acquire (LeaseHeld if taken, after waiting up to
    `wait_s` for it to be freed or go stale), heartbeat, release.

    The lease is lost when another driver holds it, or when renewing has failed for longer than
    the stale limit (another driver may then take it over): `lease.lost` gets the one-line reason
    and `on_lost(reason)` is called once from the heartbeat thread, to stop training at once.
    """
    if not supported(exp):
        log(f"warning: no experiment lease on {exp.uri} (only local paths and s3:// have atomic conditional "
            f"writes here): a second driver on this experiment would not be refused")
        yield None
        return
    lease = Lease(exp, experiment_id, stale_after_s=stale_after_s, heartbeat_s=heartbeat_s, log=log).acquire(wait_s)
    beat = _Heartbeat(lease, log, on_lost)
    beat.start()
    try:
        yield lease
    finally:
        beat.stop()
        try:
            if lease.lost is None:
                lease.release()
        except Exception as e:   # never hide the run's own outcome; the lease then goes stale
            log(f"warning: could not remove the lease {lease.uri} ({type(e).__name__}: {e}); "
                f"it goes stale after {lease.stale_after_s:.0f}s")
