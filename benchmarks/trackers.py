"""What run.trackers cost rank 0's training thread: open, first epoch (imports), one anchor-sized epoch.

Run: PYTHONPATH=. python benchmarks/trackers.py

Ray-free: the sinks of raywalk/service/trackers.py on a local root in a temp directory, fed curves as
the training loop does. An anchor epoch is 9,375 optimizer steps. Per tracker it prints
  * the write itself (the sink's update: what the training thread paid while the writes were synchronous),
  * what `Trackers.epoch_end` costs the training thread now (a copy of the curves handed to the writer
    thread), after epoch 1 and after epoch 50 (the anchor's max_epochs: the longest curves to copy),
  * how long the writer thread then takes to drain (flush), off the training thread.
"""
import tempfile
import time
from types import SimpleNamespace

from raywalk.service import trackers
from raywalk.config import Config
from raywalk.records.storage import Store

STEPS = 9375
EPOCHS = 50


def curves(epochs: int, spe: int) -> SimpleNamespace:
    return SimpleNamespace(train_loss=[2.0 + 1e-6 * i for i in range(epochs * spe)],
                           edge_compliance=[0.99] * epochs, rule_compliance=[0.8] * epochs)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


with tempfile.TemporaryDirectory() as root:
    for names in (["tensorboard"], ["mlflow"]):
        cfg = Config.from_dict({"run": {"storage": root, "trackers": names}})
        t0 = time.perf_counter()
        t = trackers.open_trackers(cfg, Store.open(root), f"bench-{names[0]}", curves(0, STEPS))
        opened = time.perf_counter() - t0
        first = timed(lambda: (t.epoch_end(curves(1, 10)), t.flush()))    # the first write imports the writer
        sync = timed(lambda: t.sinks[0].update({k: list(v) for k, v in vars(curves(2, STEPS)).items()}))
        c3, c50 = curves(3, STEPS), curves(EPOCHS, STEPS)
        queued = timed(lambda: t.epoch_end(c3))
        drained = timed(t.flush)
        queued_last = timed(lambda: t.epoch_end(c50))
        drained_last = timed(t.flush)
        t.close()
        print(f"{names[0]:>11}: open {opened:5.2f} s   first epoch {first:5.2f} s   anchor epoch ({STEPS} steps): "
              f"write {sync:5.2f} s = {1e6 * sync / STEPS:.0f} us/step (synchronous: before);  training thread now "
              f"{1e3 * queued:6.1f} ms (epoch {EPOCHS}: {1e3 * queued_last:6.1f} ms), writer thread drains in "
              f"{drained:5.2f} s ({drained_last:5.2f} s for epochs 4-{EPOCHS})")
