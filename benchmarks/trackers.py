"""What run.trackers cost rank 0: open, first epoch (imports), one anchor-sized epoch.

Run: PYTHONPATH=. python benchmarks/trackers.py

Ray-free: the sinks of raywalk/service/trackers.py on a local root in a temp directory, fed curves as
the training loop does. An anchor epoch is 9,375 optimizer steps; the writes are
synchronous on rank 0, so their time is added to the epoch's.
"""
import tempfile
import time
from types import SimpleNamespace

from raywalk.service import trackers
from raywalk.config import Config
from raywalk.records.storage import Store

STEPS = 9375


def curves(epochs: int, spe: int) -> SimpleNamespace:
    return SimpleNamespace(train_loss=[2.0 + 1e-6 * i for i in range(epochs * spe)],
                           edge_compliance=[0.99] * epochs, rule_compliance=[0.8] * epochs)


with tempfile.TemporaryDirectory() as root:
    for names in (["tensorboard"], ["mlflow"]):
        cfg = Config.from_dict({"run": {"storage": root, "trackers": names}})
        t0 = time.perf_counter()
        t = trackers.open_trackers(cfg, Store.open(root), f"bench-{names[0]}", curves(0, STEPS))
        t1 = time.perf_counter()
        t.epoch_end(curves(1, 10))            # the first write imports the writer
        t2 = time.perf_counter()
        t.sinks[0].update({k: list(v) for k, v in vars(curves(2, STEPS)).items()})
        t3 = time.perf_counter()
        print(f"{names[0]:>11}: open {t1 - t0:5.2f} s   first epoch {t2 - t1:5.2f} s   "
              f"anchor epoch ({STEPS} steps) {t3 - t2:5.2f} s = {1e6 * (t3 - t2) / STEPS:.0f} us/step")
