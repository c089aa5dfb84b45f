"""records/layout.py: the names and rules of what a run leaves on disk (no Ray, no storage I/O)."""
from __future__ import annotations

import re
import time

from raywalk.records import layout
from raywalk.records.lease import lease_live


def test_temp_names_are_hidden_and_never_taken_for_the_file():
    t = layout.tmp_name("result.json")
    assert t.startswith(".raywalk-tmp-") and t.endswith(".result.json.part") and layout.is_temp(t)
    assert layout.is_temp(f"a/b/{t}") and not layout.is_temp("result.json") and not layout.is_temp(".x.part")
    assert layout.tmp_name("x") != layout.tmp_name("x")


def test_lease_liveness_rule():
    now = time.time()
    assert lease_live(now - 59.9, 60.0, now) and not lease_live(now - 60.0, 60.0, now)


def test_one_timestamp_form_and_every_earlier_one_parses_back():
    t = 1796119937.25   # 2026-12-01T10:12:17.250 UTC
    assert layout.utc_iso(t) == "2026-12-01T10:12:17.250Z" and layout.utc_stamp(t) == "20261201T101217Z"
    earlier = ["2026-12-01T10:12:17+00:00", "2026-12-01T10:12:17.250+00:00", "2026-12-01T10:12:17Z"]  # files before
    assert [layout.parse_utc(s) for s in [layout.utc_iso(t), *earlier]] == [t, int(t), t, int(t)]
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


def _readme_paths() -> list[str]:
    """The paths the README's "Where things go" tree draws, under ROOT, from its indentation (comments dropped)."""
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = text.split("## Where things go", 1)[1].split("```", 2)[1]
    stack: list[tuple[int, str]] = []
    paths = []
    for line in block.splitlines():
        name = line.split("#", 1)[0].rstrip().rstrip("/")
        if not name.strip():
            continue
        depth = len(name) - len(name.lstrip())
        stack = [(d, n) for d, n in stack if d < depth] + [(depth, name.strip())]
        paths.append("/".join(n for _, n in stack[1:]))   # stack[0] is ROOT itself
    return [p for p in paths if p]


def _as_drawn(path: str) -> str:
    """A name a layout rule made, in the README's notation: <stamp>, <hex>, NNNN for numbers."""
    path = re.sub(r"\d{8}T\d{6}(\.\d{3})?Z", "<stamp>", path)
    path = re.sub(r"(?<![0-9a-f])[0-9a-f]{8,}(?![0-9a-f])", "<hex>", path)
    return re.sub(r"\d{4,}", lambda m: "N" * len(m.group()), path)


def test_the_readme_tree_draws_every_name_on_disk_and_only_those():
    from raywalk.records.checkpoints import dir_name

    paths = _readme_paths()
    parts = {part for p in paths for part in p.split("/")}
    assert [n for n in layout.NAMES if n not in parts] == []             # every name on disk is drawn
    splits = {layout.corpus_shard(s, 0).split("/")[0] for s in ("train", "eval")}
    literal = {p for p in parts if "<" not in p and "NNNN" not in p}
    assert literal - set(layout.NAMES) - splits == set()                # and no other
    made = ["corpora/<corpus_id>/" + layout.corpus_shard("train", 7), f"<experiment_id>/{layout.RUN_DIR}/{dir_name(7)}",
            "<experiment_id>/" + layout.attempt_marker("<driver>"),
            "<experiment_id>/" + layout.notice_name("<driver>", 7),
            "<experiment_id>/" + layout.resume_name("<at>"), layout.aside("<experiment_id>"),
            f"sweeps/<sweep_id>/{layout.trial_record('<experiment_id>')}"]
    assert [_as_drawn(m) for m in made if _as_drawn(m) not in paths] == []   # the rules' names, where drawn
