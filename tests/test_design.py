"""Design rules that keep the package readable, checked on the source: no import cycle, every config key
documented where it is defined (and listed by `sidetune train --help-config`), capabilities read only through the
Method protocol."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from conftest import ROOT, run_cli

from sidetune.config import SECTIONS
from sidetune.methods import METHODS
from sidetune.methods.base import Method
from sidetune.tasks import TASKS

PACKAGE = ROOT / "sidetune"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """sidetune modules that `path` imports, at module level or inside functions (a cycle through a late import is
    still a cycle: it only moves the failure to run time)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):  # never runs
            continue
        for n in ast.walk(node):
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("sidetune"):
                out.add(n.module)
                out |= {f"{n.module}.{a.name}" for a in n.names}
            elif isinstance(n, ast.Import):
                out |= {a.name for a in n.names if a.name.startswith("sidetune")}
    return out


def test_the_package_has_no_import_cycle():
    # The root package is the public facade (`sidetune.load` imports the trainer when called): not a node.
    graph = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path[path.index(d):], m, d])}")
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def _config_classes():
    yield from SECTIONS.items()
    for name, method in METHODS.items():
        yield f"method({name})", method.Config


def test_every_config_key_is_documented_and_listed_by_help_config():
    listed = run_cli("train", "--help-config")
    assert listed.returncode == 0, listed.stderr
    for section, cls in _config_classes():
        for f in dataclasses.fields(cls):
            assert len(f.metadata.get("help", "")) > 5, f"{section}.{f.name} has no help text"
            key = f"{section.split('(')[0]}.{f.name}:"
            assert key in listed.stdout, f"--help-config does not list {key}"


def test_capabilities_are_read_through_the_protocol_only():
    hooks = [n for n in vars(Method) if not n.startswith("_") and n not in ("apply", "name", "Config", "cfg")]
    assert {"param_groups", "backbone_trains", "plan_options", "merge", "calibration_batches"} <= set(hooks)
    probe = re.compile(r"(getattr|hasattr)\([^)]*[\"'](" + "|".join(hooks) + r"|sidetune_role)[\"']")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in PACKAGE.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if probe.search(line)]
    assert not offenders, offenders


def test_every_method_subclasses_the_protocol_and_declares_its_tasks():
    for name, cls in METHODS.items():
        assert Method in cls.__mro__ and cls.name == name
        assert cls.tasks and cls.tasks <= set(TASKS)
