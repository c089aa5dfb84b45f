"""records/layout.py: the names and rules of what a run leaves on disk (no Ray, no storage I/O)."""
from __future__ import annotations

import time

from raywalk.records import layout


def test_temp_names_are_hidden_and_never_taken_for_the_file():
    t = layout.tmp_name("result.json")
    assert t.startswith(".raywalk-tmp-") and t.endswith(".result.json.part") and layout.is_temp(t)
    assert layout.is_temp(f"a/b/{t}") and not layout.is_temp("result.json") and not layout.is_temp(".x.part")
    assert layout.tmp_name("x") != layout.tmp_name("x")


def test_lease_liveness_rule():
    now = time.time()
    assert layout.lease_live(now - 59.9, 60.0, now) and not layout.lease_live(now - 60.0, 60.0, now)


def test_timestamps_keep_each_files_form_and_all_parse_back():
    t = 1796119937.25   # 2026-12-01T10:12:17.250 UTC
    forms = {"2026-12-01T10:12:17+00:00": layout.utc_iso(t),
             "2026-12-01T10:12:17.250+00:00": layout.utc_iso(t, ms=True),
             "2026-12-01T10:12:17Z": layout.utc_iso(t, z=True)}
    assert all(want == got for want, got in forms.items()), forms
    assert [layout.parse_utc(s) for s in forms] == [int(t), t, int(t)]
    assert layout.parse_utc("2026-12-01T10:12:17") == int(t)             # no zone: UTC
    assert layout.parse_utc(None) is None and layout.parse_utc("yesterday") is None


def test_what_under_a_root_is_an_experiment():
    assert layout.is_experiment("n16_K2-abc") and not layout.is_experiment("corpora")
    assert not layout.is_experiment("sweeps") and not layout.is_experiment(".hidden")
    assert not layout.is_experiment(layout.aside("exp1")) and layout.aside("exp1").startswith("exp1.old-2")
    assert layout.notice_of(layout.notice_name("d", 3).rsplit("/", 1)[1], 3)
    assert layout.resume_name("2026-12-01T09:32:17.250+00:00").startswith("resumes/2026-12-01T093217.250+0000-")


def test_layout_needs_only_the_standard_library():
    import subprocess
    import sys

    code = ("import sys, raywalk.records.layout\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow', 'torch', 'numpy'))\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
