"""Stream result.json's curves to TensorBoard and MLflow while training (`run.trackers`).

Exactly the three curves result.json holds, under the same names: `train_loss` at every
optimizer step (step 1, 2, ...), `edge_compliance` and `rule_compliance` at every epoch
(step = epoch, 1-based); no other metric, so a tracker shows what result.json holds.

Rank 0 calls `open_trackers` after restoring its checkpoint, `Trackers.epoch_end(curves)`
after each epoch's checkpoint and result.json, and `close()` at the end; the writes run on a
background thread (Trackers), so the epoch does not wait for them. `epoch_end` takes
the whole curves, not one epoch's: each tracker knows how far it has logged and writes only
what lies beyond, so a resume or rerun continues where it stopped (nothing twice) and a
kill between the checkpoint and the tracker write is made good at the next epoch.

- tensorboard: one event file per epoch end under ROOT/<experiment_id>/tensorboard/ (written
  aside, then stored whole, so an object store works and a kill never leaves a torn file); the
  file name records how far it reaches (`.raywalk-e0003-s000000900`).
- mlflow: MLFLOW_TRACKING_URI, else a file store at ROOT/mlruns (local roots only). One run per
  experiment, found again by its tag `raywalk.experiment_id`; the run's tags
  `raywalk.logged_steps` / `raywalk.logged_epochs` (written in the same batch as the metrics)
  say how far it reaches. The config goes in as params (dotted keys); a sweep trial also gets
  `raywalk.sweep_id` and its grid point, from ROOT/<experiment_id>/sweep.json if the sweep wrote one.

Neither library is imported unless named; `check` refuses a missing one before Ray starts.
"""
from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any

from raywalk.config import ConfigError
from raywalk.records.layout import MLRUNS, SWEEP_FILE, TB_DIR, tb_reach, tb_suffix

if TYPE_CHECKING:
    from raywalk.records.storage import Store

PACKAGES = {"tensorboard": ("tensorboard", "pip install 'raywalk[tensorboard]'"),   # one per config.TRACKERS
            "mlflow": ("mlflow", "pip install 'raywalk[mlflow]'")}
CURVES = ("train_loss", "edge_compliance", "rule_compliance")


class TrackerError(ConfigError):
    """A tracker that cannot be used as configured; the message says how to fix it."""


def check(names: tuple[str, ...] | list[str], storage: str) -> None:
    """TrackerError unless every named tracker's library is importable and has somewhere to write.

    Looks the packages up without importing them (cheap; before Ray starts)."""
    from raywalk.records.uris import is_remote

    for name in names:
        module, install = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(f"run.trackers: {name!r} needs the {module} package, which is not installed: "
                               f"{install}")
    if "mlflow" in names and is_remote(storage) and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise TrackerError(f"run.trackers: 'mlflow' with run.storage={storage!r} needs MLFLOW_TRACKING_URI "
                           f"(MLflow's file store cannot live in an object store); set it on the driver and "
                           f"in the workers' runtime env")


def mlflow_uri(root: "Store") -> str:
    """Where MLflow goes: MLFLOW_TRACKING_URI, else the file store ROOT/mlruns."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"file://{root.path(MLRUNS)}"


class Trackers:
    """The sinks, written by one background thread so that rank 0's training never waits on them.

    `epoch_end` hands over a copy of the curves and returns; the thread brings every sink up to the
    newest copy (an older one still waiting is skipped: each sink logs all it lacks). One writer, in
    order, and each sink's own record of how far it reaches, keep every point logged once; a kill with
    a copy still waiting loses nothing the next start does not log. `close` waits for the writes. A
    sink's error is raised on the training thread at the next `epoch_end` or `close`.
    """

    def __init__(self, sinks: list):
        self.sinks = sinks
        self._cv = threading.Condition()
        self._pending: dict[str, list] | None = None
        self._busy = self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, name="raywalk-trackers", daemon=True)
        self._thread.start()

    def epoch_end(self, curves: Any) -> None:
        """Queue every point of curves (train_loss per step, compliance per epoch) not yet logged."""
        c = {k: list(getattr(curves, k)) for k in CURVES}
        with self._cv:
            self._raise()
            self._pending = c
            self._cv.notify_all()

    def flush(self) -> None:
        """Wait until every queued point is written."""
        with self._cv:
            self._cv.wait_for(lambda: (self._pending is None and not self._busy) or self._error is not None)
            self._raise()

    def close(self) -> None:
        self.flush()
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        for s in self.sinks:
            s.close()

    def _raise(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def _write(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending is not None or self._closing)
                if self._pending is None:
                    return
                c, self._pending, self._busy = self._pending, None, True
            try:
                for s in self.sinks:
                    s.update(c)
            except BaseException as e:   # told on the training thread (epoch_end, close)
                with self._cv:
                    self._error = e
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()


def open_trackers(cfg: Any, root: "Store", experiment_id: str, curves: Any) -> Trackers | None:
    """Rank 0's trackers for this experiment (None when run.trackers is empty); curves: as restored."""
    names = tuple(cfg.run.trackers)
    if not names:
        return None
    check(names, cfg.run.storage)
    sinks = []
    if "tensorboard" in names:
        sinks.append(TensorBoardSink(root.sub(experiment_id, TB_DIR)))
    if "mlflow" in names:
        sinks.append(MlflowSink(root, experiment_id, cfg, fresh=not curves.train_loss))
    return Trackers(sinks)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class TensorBoardSink:
    def __init__(self, store: "Store"):
        self.store = store
        self.epochs = self.steps = 0
        for name in store.listdir():
            reach = tb_reach(name)
            if reach:
                self.epochs, self.steps = max((self.epochs, self.steps), reach)

    def update(self, c: dict[str, list]) -> None:
        losses, epochs = c["train_loss"], len(c["edge_compliance"])
        if epochs <= self.epochs and len(losses) <= self.steps:
            return
        from torch.utils.tensorboard import SummaryWriter

        with tempfile.TemporaryDirectory() as tmp:
            w = SummaryWriter(tmp, filename_suffix=tb_suffix(epochs, len(losses)))
            for i in range(self.steps, len(losses)):
                w.add_scalar("train_loss", losses[i], i + 1)
            for e in range(self.epochs, epochs):
                w.add_scalar("edge_compliance", c["edge_compliance"][e], e + 1)
                w.add_scalar("rule_compliance", c["rule_compliance"][e], e + 1)
            w.close()
            for name in os.listdir(tmp):
                with open(os.path.join(tmp, name), "rb") as f:
                    self.store.write_bytes(name, f.read())
        self.epochs, self.steps = epochs, len(losses)

    def close(self) -> None:
        pass


class MlflowSink:
    BATCH = 1000   # MLflow's limit of metrics per log_batch

    def __init__(self, root: "Store", experiment_id: str, cfg: Any, fresh: bool):
        uri = mlflow_uri(root)
        if uri.startswith("file:"):   # MLflow 3 keeps its file store only on request
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow import MlflowClient

        self.client = c = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "raywalk"
        exp = c.get_experiment_by_name(name)
        xid = exp.experiment_id if exp else c.create_experiment(name)
        found = c.search_runs([xid], filter_string=f"tags.`raywalk.experiment_id` = '{experiment_id}'",
                              max_results=1)
        if found and fresh and int(found[0].data.tags.get("raywalk.logged_steps", 0)):
            # a run started over (--fresh moved the old one aside): the old MLflow run is kept, renamed
            c.set_tag(found[0].info.run_id, "raywalk.experiment_id", f"{experiment_id} (superseded)")
            c.set_terminated(found[0].info.run_id, status="KILLED")
            found = []
        if found:
            run = found[0]
            self.run_id = run.info.run_id
            self.steps = int(run.data.tags.get("raywalk.logged_steps", 0))
            self.epochs = int(run.data.tags.get("raywalk.logged_epochs", 0))
            if run.info.status != "RUNNING":
                c.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"raywalk.experiment_id": experiment_id, "mlflow.runName": experiment_id}
            sweep = root.sub(experiment_id)
            if sweep.is_file(SWEEP_FILE):
                s = sweep.read_json(SWEEP_FILE)
                tags["raywalk.sweep_id"] = s["sweep_id"]
                tags.update({f"raywalk.grid.{k}": str(v) for k, v in s.get("grid", {}).items()})
            run = c.create_run(xid, run_name=experiment_id, tags=tags)
            self.run_id, self.steps, self.epochs = run.info.run_id, 0, 0
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in _flat(cfg.to_dict()).items()]
            for i in range(0, len(params), 100):   # MLflow's limit of params per batch
                c.log_batch(self.run_id, params=params[i:i + 100])

    def update(self, c: dict[str, list]) -> None:
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        losses, epochs = c["train_loss"], len(c["edge_compliance"])
        # each batch carries the tag saying how far the run now reaches: a kill between batches
        # leaves the tags true, so the next start neither skips nor repeats a point
        for i in range(self.steps, len(losses), self.BATCH):
            j = min(i + self.BATCH, len(losses))
            self.client.log_batch(self.run_id, metrics=[Metric("train_loss", float(losses[k]), now, k + 1)
                                                        for k in range(i, j)],
                                  tags=[RunTag("raywalk.logged_steps", str(j))])
            self.steps = j
        if epochs > self.epochs:
            ms = [Metric(k, float(c[k][e]), now, e + 1) for e in range(self.epochs, epochs)
                  for k in ("edge_compliance", "rule_compliance")]
            self.client.log_batch(self.run_id, metrics=ms, tags=[RunTag("raywalk.logged_epochs", str(epochs))])
            self.epochs = epochs

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")
