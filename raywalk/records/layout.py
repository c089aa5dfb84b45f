"""Every name raywalk gives a file under a storage root, and the rules that go with them.

The README's "Where things go" draws the tree they make; a test checks it against NAMES.

Standard library only: `raywalk ls` and the driver read these names without torch.
"""
from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timezone

# ---- names ----------------------------------------------------------------------------
RESULT = "result.json"
LEASE = "lease.json"
LEASE_LOCK = "lease.lock"
MANIFEST = "manifest.json"    # the file written last in a corpus, a checkpoint and an export
STATE = "state.pt"            # a checkpoint's state
RUN_DIR = "checkpoints"       # ROOT/<experiment_id>/checkpoints: Ray's run directory (RunConfig.name)
CORPORA = "corpora"
CORPUS_GRAPH = "graph.parquet"   # corpora/<corpus_id>/graph.parquet: the graph's edges
SWEEPS = "sweeps"
SUMMARY = "summary.json"
SUMMARY_CSV = "summary.csv"
TRIALS = "trials"
ATTEMPTS = "attempts"
NOTICES = "notices"
RESUMES = "resumes"
SWEEP_FILE = "sweep.json"     # ROOT/<experiment_id>/sweep.json: the sweep point's grid (trackers read it)
TB_DIR = "tensorboard"        # ROOT/<experiment_id>/tensorboard: TensorBoard event files (trackers.py)
MLRUNS = "mlruns"             # ROOT/mlruns: MLflow's file store when MLFLOW_TRACKING_URI is unset
TUNE_DIR = "tune"             # ROOT/sweeps/<sweep_id>/tune: Ray Tune's run directory (RunConfig.name)
BUCKETS = "buckets"           # ROOT/buckets/<bucket_id>: a bucket's own Ray run (its members' records are theirs)
BUCKET_RUN = "train"          # ROOT/buckets/<bucket_id>/train: that run's directory (RunConfig.name; no checkpoints)
NAMES = (RESULT, LEASE, LEASE_LOCK, MANIFEST, STATE, RUN_DIR, CORPORA, CORPUS_GRAPH, SWEEPS, SUMMARY, SUMMARY_CSV,
         TRIALS, ATTEMPTS, NOTICES, RESUMES, SWEEP_FILE, TB_DIR, MLRUNS, TUNE_DIR, BUCKETS, BUCKET_RUN)   # README's tree
NOT_EXPERIMENTS = frozenset({CORPORA, SWEEPS, MLRUNS, BUCKETS})
RETIRED = ".old-"             # <experiment_id>.old-<stamp>: moved aside by --fresh
INVALID = ".invalid-"         # corpora/<corpus_id>.invalid-<stamp>: a corpus that failed verification
BUILDING = ".building-"       # corpora/.building-<corpus_id>: a local corpus being built


def attempt_marker(driver_token: str) -> str:
    return f"{ATTEMPTS}/{driver_token}/{uuid.uuid4().hex}"


def notice_name(driver_token: str, attempt: int) -> str:
    return f"{NOTICES}/{driver_token}/{attempt:04d}-{uuid.uuid4().hex[:8]}.json"


def notice_of(name: str, attempt: int) -> bool:
    """Whether a file under notices/<driver>/ was written by worker-group start `attempt`."""
    return name.startswith(f"{attempt:04d}-")


def resume_name(at: str) -> str:
    return f"{RESUMES}/{at.replace(':', '')}-{uuid.uuid4().hex[:8]}.json"


_TB_REACH = re.compile(r"\.raywalk-e(\d+)-s(\d+)$")


def tb_suffix(epochs: int, steps: int) -> str:
    """The suffix of a TensorBoard event file holding the curves up to `epochs` epochs and `steps` steps."""
    return f".raywalk-e{epochs:04d}-s{steps:09d}"


def tb_reach(name: str) -> tuple[int, int] | None:
    """(epochs, steps) a TensorBoard event file's name says it reaches; None for another file."""
    m = _TB_REACH.search(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def corpus_shard(split: str, index: int) -> str:
    """corpora/<corpus_id>/<split>/part-NNNNN.parquet: a corpus shard of walks."""
    return f"{split}/part-{index:05d}.parquet"


def trial_record(experiment_id: str) -> str:
    return f"{TRIALS}/{experiment_id}.json"


def is_experiment(name: str) -> bool:
    """Whether a name directly under ROOT may be an experiment (not corpora/sweeps, hidden or retired)."""
    return name not in NOT_EXPERIMENTS and not name.startswith(".") and RETIRED not in name


def aside(name: str, kind: str = RETIRED) -> str:
    """The name a directory is moved aside to, never over an earlier one (UTC, to the millisecond: a corpus
    rebuilt and found unusable again within one second is moved aside twice)."""
    t = time.time()
    return f"{name}{kind}{utc_stamp(t)[:-1]}.{int(t * 1000) % 1000:03d}Z"


# ---- temporary files: one naming rule --------------------------------------------------
# A temp file is `.raywalk-tmp-<hex>.<name>.part`: a leading dot (hidden from globs, from Ray
# Data / pyarrow dataset discovery, from `raywalk ls`), a suffix no reader tests for (.json,
# .parquet, .pt), and Store.listdir never returns it. Whatever a killed or full-disk write
# leaves behind is therefore invisible, and swept by the next writer that holds the lease.
TMP_PREFIX = ".raywalk-tmp-"
TMP_SUFFIX = ".part"
_TMP_RE = re.compile(r"^\.raywalk-tmp-[0-9a-f]{32}\..*\.part$")


def tmp_name(name: str) -> str:
    """The temp name for a file (or directory) that will be renamed to `name` in the same directory."""
    return f"{TMP_PREFIX}{uuid.uuid4().hex}.{name}{TMP_SUFFIX}"


def is_temp(name: str) -> bool:
    return bool(_TMP_RE.match(name.rsplit("/", 1)[-1]))


# ---- timestamps -------------------------------------------------------------------------
# One form for every time raywalk writes: ISO-8601 UTC to the millisecond with a "Z"
# ("2026-12-01T10:12:17.250Z"); in a file name, ISO's basic form ("20261201T101217Z").
# Files written before hold other ISO forms ("+00:00", to the second): parse_utc reads them all.

def utc_iso(t: float | None = None) -> str:
    d = datetime.now(timezone.utc) if t is None else datetime.fromtimestamp(t, timezone.utc)
    return d.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_stamp(t: float | None = None) -> str:
    """The same instant for a file name, to the second: no colons."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def parse_utc(s: object) -> float | None:
    """Seconds since the epoch of any ISO-8601 form (no zone: UTC); None for anything else."""
    try:
        t = datetime.fromisoformat(s)   # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()
