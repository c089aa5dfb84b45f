"""The package's layout rules, found from the tree rather than from a hand-kept list."""
from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import raywalk.science

PKG = Path(raywalk.__file__).parent
SCIENCE_MAY_IMPORT = ("raywalk.science", "raywalk.config")


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included), relative ones resolved."""
    pkg = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def science_modules() -> list[Path]:
    found = [PKG / "science" / f"{m.name}.py" for m in pkgutil.iter_modules(raywalk.science.__path__)]
    assert len(found) >= 9, found   # graph, walks, compliance, model, generate, gate, schedule, batches, loop
    return found


def test_the_science_imports_neither_ray_nor_storage_nor_the_service():
    for path in science_modules():
        for m in imports(path):
            top = m.split(".")[0]
            assert top not in ("ray", "pyarrow"), f"{path.name} imports {m}"
            if top == "raywalk":
                assert m.startswith(SCIENCE_MAY_IMPORT), f"{path.name} imports {m}"


def test_importing_the_whole_science_loads_no_ray():
    names = ", ".join(f"raywalk.science.{p.stem}" for p in science_modules())
    code = (f"import sys, {names}\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pyarrow') "
            "or m.startswith(('raywalk.records', 'raywalk.service')))\n"
            "print(bad); sys.exit(1 if bad else 0)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_records_import_neither_ray_nor_the_service_nor_the_cli():
    found = sorted((PKG / "records").glob("*.py"))
    assert len(found) >= 10, found   # layout, uris, errors, storage, manifest, corpus, checkpoints, result, lease, ...
    for path in found:
        for m in imports(path):
            assert m.split(".")[0] != "ray" and not m.startswith(("raywalk.service", "raywalk.cli")), \
                f"{path.name} imports {m}"


PRIVATE_HOME = PKG / "service" / "ray_private.py"


def _private_ray(name: str) -> bool:
    """A private Ray module or logger name: ray._…, any …._internal… segment, ray.experimental.internal_kv."""
    parts = name.split(".")
    return parts[0] == "ray" and (any(p.startswith("_") for p in parts[1:]) or
                                  name.startswith("ray.experimental.internal_kv"))


def test_private_ray_apis_live_in_ray_private_only():
    assert _private_ray("ray._private.state") and _private_ray("ray.train.v2._internal.util")
    assert _private_ray("ray.experimental.internal_kv") and not _private_ray("ray.train.torch")
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PRIVATE_HOME:
            continue
        names = set(imports(path))
        names |= {n.value for n in ast.walk(ast.parse(path.read_text()))      # logger names
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and " " not in n.value}
        bad += [f"{path.relative_to(PKG)}: {m}" for m in sorted(names) if _private_ray(m)]
    assert not bad, "private Ray APIs outside service/ray_private.py:\n" + "\n".join(bad)
