"""Bad input on the command line: one line naming the problem, exit 2, no traceback, nothing created."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raywalk.cli import main
from raywalk.records.errors import StorageError
from raywalk.records.storage import Store
from tests.conftest import QUICKSTART, ROOT


def one_line_error(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    return err


def tree(p: Path) -> list[str]:
    return sorted(str(x.relative_to(p)) for x in p.rglob("*"))


# ---- raywalk plot -------------------------------------------------------------

def test_plot_missing_file(tmp_path, capsys):
    one_line_error(capsys, ["plot", str(tmp_path / "nope.json")], "raywalk plot:", "nope.json", "no such file")
    assert tree(tmp_path) == []


@pytest.mark.parametrize("content,why", [
    (b"not json at all", "not valid JSON"), (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[1, 2]", "not a raywalk result.json"), (b'{"status": "passed"}', "not a raywalk result.json"),
])
def test_plot_not_a_result(tmp_path, capsys, content, why):
    f = tmp_path / "result.json"
    f.write_bytes(content)
    one_line_error(capsys, ["plot", str(f)], str(f), why)
    assert tree(tmp_path) == ["result.json"]   # no curves.png


def test_plot_directory_and_bad_out(tmp_path, capsys):
    one_line_error(capsys, ["plot", str(tmp_path)], "not a file")
    f = tmp_path / "result.json"
    f.write_text('{"curves": {}, "rows": []}')
    one_line_error(capsys, ["plot", str(f), "--out", str(tmp_path / "no" / "dir" / "x.png")], "does not exist")
    assert tree(tmp_path) == ["result.json"]


# ---- storage roots ----------------------------------------------------------------

def unwritable_root(tmp_path: Path) -> Path:
    """A directory this process cannot write in (root ignores permission bits: use sysfs there)."""
    if os.geteuid() == 0:
        return Path("/sys/raywalk-test-root")
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    return ro / "root"


@pytest.mark.parametrize("verb", ["train", "corpus", "tune"])
def test_storage_through_a_regular_file(tmp_path, capsys, verb):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    root = blocker / "sub" / "root"
    argv = {"tune": ["tune", str(ROOT / "configs" / "sweep_tiny.yaml"), "--storage", str(root)],
            "train": ["train", str(QUICKSTART), "--storage", str(root)],
            "corpus": ["corpus", str(QUICKSTART), "--out", str(root)]}[verb]
    one_line_error(capsys, argv, f"raywalk {verb}:", str(blocker), "is a file, not a directory")
    assert tree(tmp_path) == ["afile"] and blocker.read_text() == "x"


def test_a_bucket_below_one_or_one_that_cannot_fit_is_refused_before_anything(tmp_path, capsys, monkeypatch):
    sweep = str(ROOT / "configs" / "sweep_tiny.yaml")
    one_line_error(capsys, ["tune", sweep, "--bucket", "0", "--storage", str(tmp_path / "r")],
                   "--bucket: 0 is invalid: must be >= 1")
    seeds = tmp_path / "seeds.yaml"   # same-shape points: one bucket, which a tiny host cannot hold
    seeds.write_text(f"base: {ROOT / 'configs' / 'quickstart.yaml'}\ngrid: {{seed: [1, 2, 3]}}\n")
    from raywalk.service import dataset
    # each member's windows (0.6 MiB) fit half of it, so none trains alone; three members' steps do not
    monkeypatch.setattr(dataset, "free_memory", lambda device: 2 * 2**20)
    one_line_error(capsys, ["tune", str(seeds), "--storage", str(tmp_path / "r")],
                   "bucket: 3 members need about", "GiB budget (train.data_budget 0.5 of the host's free memory)")
    assert tree(tmp_path) == ["seeds.yaml"]


def test_storage_that_cannot_be_written(tmp_path, capsys):
    root = unwritable_root(tmp_path)
    one_line_error(capsys, ["train", str(QUICKSTART), "--storage", str(root)], "raywalk train:", str(root.parent))
    assert not root.exists()


def test_malformed_uris(capsys):
    for uri in ("s3://", "s3:///prefix", "s3://?endpoint_override=127.0.0.1:1"):
        one_line_error(capsys, ["train", str(QUICKSTART), "--storage", uri], "malformed", "no bucket")
    one_line_error(capsys, ["train", str(QUICKSTART), "--storage", "nosuchfs://b/x"], "cannot be opened")
    with pytest.raises(StorageError, match="no bucket"):
        Store.open("s3://")


def test_missing_bucket_on_s3(s3_server, capsys):
    uri = s3_server["uri"]("runs", bucket="no-such-bucket")
    one_line_error(capsys, ["train", str(QUICKSTART), "--storage", uri], "bucket 'no-such-bucket' does not exist")
    Store.open(s3_server["uri"]("runs")).check_writable()   # the real bucket passes
    assert "no-such-bucket" not in [b["Name"] for b in s3_server["client"].list_buckets()["Buckets"]]


def test_writable_roots_pass_and_stay_untouched(tmp_path):
    st = Store.open(str(tmp_path / "a" / "b"))
    st.check_writable()
    assert tree(tmp_path) == []   # the probe left nothing, and nothing was created


def test_the_installed_command_exits_2_without_traceback(tmp_path):
    """The real `python -m raywalk`, as a user runs it."""
    p = subprocess.run([sys.executable, "-m", "raywalk", "plot", str(tmp_path / "x.json")], capture_output=True,
                       text=True, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip() == f"raywalk plot: {tmp_path / 'x.json'}: no such file"
    p = subprocess.run([sys.executable, "-m", "raywalk", "train", str(QUICKSTART), "--storage", "s3://"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert tree(tmp_path) == []


# ---- one exit-code table for every verb ----------------------------------------------

def _stops():
    from raywalk.records.errors import StorageUnwritable
    from raywalk.records.lease import LeaseHeld, LeaseInfo, LeaseLost

    held = LeaseInfo("ab" * 16, "node-7", 42, "2026-12-01T10:00:00.000Z", "2026-12-01T10:00:00.000Z", 0.0, 60.0)
    return [(LeaseHeld("exp1", held, "root/exp1/lease.json"), 3), (StorageUnwritable("root/exp1", "no space left"), 4),
            (LeaseLost("lost the lease on experiment exp1"), 5), (StorageError("storage URI 's3://' is malformed"), 2)]


@pytest.mark.parametrize("verb", ["train", "tune", "corpus"])
def test_every_verb_tells_a_stop_in_one_line_with_the_tables_exit_code(monkeypatch, capsys, verb):
    import importlib

    mod = importlib.import_module(f"raywalk.cli.{verb}")
    for error, code in _stops():
        def run(args, error=error):
            raise error

        monkeypatch.setattr(mod, "run", run)
        assert main([verb, "x.yaml"]) == code
        assert capsys.readouterr().err.strip() == f"raywalk {verb}: {error}"
