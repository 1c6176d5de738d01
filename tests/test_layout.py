"""The package layout: every module imports on its own, imports point one way, a module past ~400 lines is a warning,
no library function takes more than 8 parameters, and only the pipeline among the stages calls the report."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "superweight"
# Layers, lowest first: a module may import from its own layer or a lower one (cli -> stages/report ->
# measure -> io/core). stages and report share a layer; the report never reads a stage's code, only its
# record (pipeline, the one stage that ends in a report, calls write_report). api (the notebook API, api.py and
# its siblings api_tools.py and api_runs.py) sits beside cli, and the cli goes through it for io and stages; the package's __init__ re-exports it lazily (PEP 562), so
# `import superweight` loads neither. settings
# (the settings models' base) and progress (the progress protocol) are used at every layer.
# engine (the repair engine) serves the stages from their layer; its settings (engine.config) sit with io, because
# the record, config.json and checkpoints persist them.
# schema (the persisted schemas) sits beside io (test_the_schemas_sit_low narrows what it may import).
LAYERS = {"errors": 0, "display": 0, "settings": 0, "progress": 0, "": 0, "core": 1, "io": 2, "schema": 2,
          "known": 2, "measure": 3, "stages": 4, "engine": 4, "report": 4, "cli": 5, "api": 5, "api_tools": 5,
          "api_runs": 5}
MODULE_LAYERS = {"superweight.engine.config": 2}
MAX_LINES = 400
MAX_PARAMETERS = 8


def modules() -> list[str]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts[-1] != "__main__":
            out.append(".".join(parts))
    return out


def layer(module: str) -> int:
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def imports(module: str) -> set[str]:
    """Every superweight module `module` imports, at any depth (function-level imports included)."""
    path = SRC.parent / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("superweight"):
            for alias in node.names:  # `from superweight.io import corpora` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in ALL else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("superweight")}
    return found - {module}


ALL = modules()


def test_every_module_imports_alone_in_a_fresh_process():
    # One interpreter loads the third-party libraries once, then forks a child per module: each child starts
    # with no superweight module loaded, so an import cycle or a missing import shows as that module's failure.
    script = textwrap.dedent("""
        import os, sys, traceback
        import torch, transformers, typer, rich, pydantic, safetensors  # shared, loaded once
        failed = []
        for name in sys.argv[1:]:
            pid = os.fork()
            if pid == 0:
                try:
                    __import__(name)
                except BaseException:
                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if status:
                failed.append(name)
        print("FAILED:", " ".join(failed))
        sys.exit(1 if failed else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script, *ALL], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(ALL) > 30


@pytest.mark.parametrize("module", ALL)
def test_imports_point_one_way(module):
    upward = sorted(m for m in imports(module) if layer(m) > layer(module))
    assert not upward, f"{module} imports a higher layer: {upward}"
    if module.startswith("superweight.report"):
        assert not any(m.startswith(("superweight.stages", "superweight.engine")) and m != "superweight.engine.config"
                       for m in imports(module))


@pytest.mark.parametrize("module", [m for m in ALL if m.startswith("superweight.cli")])
def test_the_cli_calls_the_library(module):
    # A command parses its options into settings and calls one superweight.api function: the run directory, its
    # lock, the resume rules, default paths, --bos and loading all live below the CLI, never in a command.
    below = sorted(m for m in imports(module) if m.split(".")[1:2] in (["io"], ["stages"]))
    assert not below, f"{module} imports {below}: go through superweight.api"


def test_the_schemas_sit_low():
    # Persisted schemas import core types, settings, the engine's settings (the records hold them) and strict JSON
    # reading, nothing that computes or runs: a file's shape does not depend on how it was made.
    allowed = ("superweight.schema", "superweight.core", "superweight.errors", "superweight.display",
               "superweight.settings", "superweight.engine.config", "superweight.io.files")
    for module in (m for m in ALL if m.startswith("superweight.schema")):
        wrong = sorted(m for m in imports(module) if not m.startswith(allowed))
        assert not wrong, f"{module} imports {wrong}"


def test_no_import_cycles():
    graph = {m: {i for i in imports(m) if i in ALL} for m in ALL}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_a_long_module_is_a_warning_not_a_reason_to_split():
    # A module is split by meaning, never by length alone: a long one is named in the warnings summary, so the
    # next reader can look at whether it holds two ideas, and nothing fails.
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    for name, n in sorted(long.items()):
        warnings.warn(f"{name} has {n} lines (over {MAX_LINES}): does it hold one idea?", stacklevel=1)
    assert all(n > MAX_LINES for n in long.values())


def test_python_m_superweight_cli_runs():
    result = subprocess.run([sys.executable, "-m", "superweight.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "repair" in result.stdout, result.stderr


def test_readme_module_map_matches_the_tree():
    readme = (SRC.parents[1] / "README.md").read_text(encoding="utf-8")
    layout = readme.split("\n## Layout\n")[1].split("\n## ")[0]  # its table: | `folder/` | `module.py` ... |
    rows = {line.split("|")[1].strip().strip("`"): line for line in layout.splitlines()
            if line.startswith(("| `", "| (top)"))}
    listed, found = set(), set()
    for folder, line in rows.items():
        prefix = "" if folder == "(top)" else folder
        listed |= {prefix + name for name in re.findall(r"`(\w+\.py)`", line.split("|", 2)[2])}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if path.name not in ("__init__.py", "__main__.py"):
            found.add(rel)
    assert listed == found


def parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Named parameters: positional-only, positional and keyword-only; a method's self/cls is not counted, nor
    are *args and **kwargs (the API's **overrides are validated into a settings model, named there)."""
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return len(names) - (1 if names[:1] in (["self"], ["cls"]) else 0)


def test_no_library_function_takes_more_than_eight_parameters():
    # The CLI's typer commands declare one parameter per option; everything below them takes settings objects.
    wide = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith("cli/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and parameters(node) > MAX_PARAMETERS:
                wide[f"{rel}:{node.name}"] = parameters(node)
    assert not wide, wide


def test_only_the_pipeline_among_the_stages_imports_the_report():
    callers = sorted(m for m in ALL if m.startswith("superweight.stages")
                     and any(i == "superweight.report" or i.startswith("superweight.report.") for i in imports(m)))
    assert callers == ["superweight.stages.pipeline"], callers
