"""Every raywalk error survives Ray's process boundaries intact: pickled (a worker's error to its driver, a
Tune trial's to the sweep), copied, and inside Ray's RayTaskError wrapper, it keeps its type, message and
fields. (A StorageUnwritable that could not be rebuilt there made Tune retry a trial into a full disk.)"""
from __future__ import annotations

import copy
import importlib
import pickle
from pathlib import Path

import pytest

import raywalk

_INFO = dict(holder="ab" * 16, host="node-1", pid=4242, started_at="2026-11-02T10:00:00Z",
             heartbeat_at="2026-11-02T10:05:00Z", heartbeat_unix=1.0e9, stale_after_s=60.0)


def _examples() -> dict[str, tuple]:
    """Representative arguments of the errors whose __init__ takes more than a message."""
    from raywalk.records.lease import LeaseInfo

    return {
        "raywalk.records.errors.StorageUnwritable": (
            "root/exp1/checkpoints/epoch_0002", "no space left", "4.1 KB free of 4.2 MB",
            "newest intact checkpoint root/exp1/checkpoints/epoch_0001 (epoch 1); rerun the same command"),
        "raywalk.records.lease.LeaseHeld": ("exp1", LeaseInfo(**_INFO), "root/exp1/lease.json"),
    }


def _raywalk_errors() -> list[type]:
    pkg = Path(raywalk.__file__).parent
    for path in sorted(pkg.rglob("*.py")):
        if path.stem != "__main__":   # `python -m raywalk.cli` runs the CLI
            rel = path.relative_to(pkg.parent).with_suffix("")
            importlib.import_module(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    found, todo = set(), [BaseException]
    while todo:
        for c in todo.pop().__subclasses__():
            todo.append(c)
            if c.__module__.split(".")[0] == "raywalk":
                found.add(c)
    return sorted(found, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def _own_init(cls: type) -> bool:
    return any("__init__" in vars(k) for k in cls.__mro__ if k.__module__.split(".")[0] == "raywalk")


ERRORS = _raywalk_errors()


def test_every_raywalk_error_is_found():
    names = {f"{c.__module__}.{c.__qualname__}" for c in ERRORS}
    assert {"raywalk.records.errors.StorageUnwritable", "raywalk.records.lease.LeaseHeld",
            "raywalk.records.lease.LeaseLost", "raywalk.config.ConfigError", "raywalk.service.stops.Stopped"} <= names
    custom = {f"{c.__module__}.{c.__qualname__}" for c in ERRORS if _own_init(c)}
    missing = custom - set(_examples())
    assert not missing, f"give representative arguments for {sorted(missing)} in _examples()"


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__qualname__)
def test_a_raywalk_error_keeps_its_type_message_and_fields_across_a_ray_boundary(cls):
    from raywalk.service.ray_env import quiet_defaults

    quiet_defaults()
    from ray import cloudpickle
    from ray.exceptions import RayTaskError

    name = f"{cls.__module__}.{cls.__qualname__}"
    e = cls(*_examples()[name]) if name in _examples() else cls(f"{cls.__name__}: something went wrong")
    fields = dict(vars(e))
    for back in (pickle.loads(pickle.dumps(e)), cloudpickle.loads(cloudpickle.dumps(e)), copy.deepcopy(e),
                 copy.copy(e)):
        assert type(back) is cls
        assert str(back) == str(e) and back.args == e.args
        assert vars(back) == fields
    # As a Tune trial's error reaches the sweep: inside Ray's wrapper, raised there as an instance of cls too
    wrapped = RayTaskError("trial", "Traceback ...", e, proctitle="ray::trial", pid=1, ip="127.0.0.1")
    assert type(wrapped.cause) is cls   # picklable, so not replaced by a RayError saying it is not
    back = cloudpickle.loads(cloudpickle.dumps(wrapped)).as_instanceof_cause()
    assert isinstance(back, cls) and type(back.cause) is cls
    assert str(back.cause) == str(e) and vars(back.cause) == fields
