"""The package's import rules (DESIGN §3), read from the source with ``ast`` so they stay true.

- Runtime code (what runs while decoding) never imports offline or tool code.
- The engine knows policies and drafters only through their protocols.
- Policies, drafters and predictors talk through :mod:`adaspec.types`, not through each other.
- No import loop between the runtime's parts.
- One place each: the model options (cli_args), the thread count (runtime.set_threads).
- No process-wide side effects on import (environment, threads, transformers' logging).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Decode-time code. Everything else (adaspec.train, adaspec.bench and its datasets, the CLIs,
# the server, integrations) is a tool built on top of it.
RUNTIME = ("adaspec.api", "adaspec.engine", "adaspec.verify", "adaspec.types", "adaspec.sampling",
           "adaspec.errors", "adaspec.metrics", "adaspec.checkpoints", "adaspec.runtime", "adaspec.drafters",
           "adaspec.policies", "adaspec.predictors")
OFFLINE = ("adaspec.train", "adaspec.bench", "adaspec.cli", "adaspec.frontend", "adaspec.serve",
           "adaspec.integrations")
# Parts of the runtime as nodes of the loop check (a module or a package, by prefix).
PARTS = {"adaspec.runtime": "runtime", "adaspec.checkpoints": "models"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> adaspec modules it imports (top-level and inside functions alike)."""
    out: dict[str, set[str]] = {}
    for path in sorted((ROOT / "adaspec").rglob("*.py")):
        mod = _module_name(path)
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    name = ".".join(base + ([node.module] if node.module else []))
                    # "from . import x" / "from .pkg import mod": the names may be modules
                    found.update(f"{name}.{a.name}" for a in node.names)
                else:
                    name = node.module or ""
                found.add(name)
        out[mod] = {n for n in found if n == "adaspec" or n.startswith("adaspec.")}
    return out


IMPORTS = _imports()


def _under(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _edges(src: tuple[str, ...], dst: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} -> {n}" for m, names in IMPORTS.items() if _under(m, src)
                  for n in names if _under(n, dst) and not _under(n, src))


def _part(mod: str) -> str:
    for prefix, part in PARTS.items():
        if _under(mod, (prefix,)):
            return part
    return mod.split(".")[1] if "." in mod else mod


def test_the_scan_sees_the_package() -> None:
    assert "adaspec.engine" in IMPORTS and "adaspec.policies.base" in IMPORTS["adaspec.engine"]


def test_runtime_never_imports_offline_code() -> None:
    assert _edges(RUNTIME, OFFLINE) == []


@pytest.mark.parametrize(("src", "dst"), [
    (("adaspec.policies",), ("adaspec.drafters", "adaspec.api", "adaspec.engine")),
    (("adaspec.drafters",), ("adaspec.policies", "adaspec.api", "adaspec.engine")),
    (("adaspec.predictors",), ("adaspec.policies", "adaspec.drafters", "adaspec.api", "adaspec.engine")),
    (("adaspec.verify", "adaspec.types", "adaspec.sampling"),
     ("adaspec.policies", "adaspec.drafters", "adaspec.predictors", "adaspec.engine", "adaspec.api",
      "adaspec.runtime", "adaspec.runtime.eager")),
])
def test_parts_talk_through_types(src: tuple[str, ...], dst: tuple[str, ...]) -> None:
    assert _edges(src, dst) == []


def test_engine_knows_only_protocols() -> None:
    """No concrete policy or drafter in the loop (the oracle's reference run is a policy hook)."""
    allowed = ("adaspec.policies.base", "adaspec.drafters.base")
    bad = sorted(n for n in IMPORTS["adaspec.engine"]
                 if _under(n, ("adaspec.policies", "adaspec.drafters")) and not _under(n, allowed))
    assert bad == []


def test_no_import_loop_between_runtime_parts() -> None:
    graph: dict[str, set[str]] = {}
    for mod, names in IMPORTS.items():
        if _under(mod, RUNTIME):
            graph.setdefault(_part(mod), set()).update(
                _part(n) for n in names if _under(n, RUNTIME) and _part(n) != _part(mod))
    loops, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                loops.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack
                             else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert loops == []


def _calls(attr: str) -> list[tuple[str, ast.Call]]:
    """(module, call) for every call of ``something.attr(...)`` in the package."""
    out = []
    for path in sorted((ROOT / "adaspec").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
                out.append((_module_name(path), node))
    return out


def test_model_options_are_declared_once():
    """--target / --draft / --dtype / --device / --threads / --runtime come from
    cli_args.add_model_args in every command (a command may pick a subset or a default)."""
    from adaspec.frontend.options import MODEL_OPTIONS

    names = {f"--{o}" for o in MODEL_OPTIONS}
    own = sorted((mod, call.args[0].value) for mod, call in _calls("add_argument")
                 if call.args and isinstance(call.args[0], ast.Constant) and call.args[0].value in names
                 and mod != "adaspec.frontend.options")
    # bench.verify_cost's --runtime is a comma list of runtimes to compare, and draft_cost's
    # --draft a repeatable list: other options under the same names
    assert own == [("adaspec.bench.draft_cost", "--draft"), ("adaspec.bench.verify_cost", "--runtime")]


def test_thread_counts_are_set_in_one_place():
    assert sorted({mod for mod, _ in _calls("set_num_threads")}) == ["adaspec.runtime"]


_IMPORT_ALL = """
import importlib, json, os, pkgutil, sys

seen = []


class Spy:  # records the environment numba is first imported under
    def find_spec(self, name, path=None, target=None):
        if name == "numba":
            seen.append(os.environ.get("NUMBA_DISABLE_INTEL_SVML"))


sys.meta_path.insert(0, Spy())
import torch, transformers

env, threads, verbosity = dict(os.environ), torch.get_num_threads(), transformers.logging.get_verbosity()
import adaspec

for m in pkgutil.walk_packages(adaspec.__path__, "adaspec."):
    importlib.import_module(m.name)
kernels = sys.modules["adaspec.runtime.kernels"]
print(json.dumps({"modules": len(sys.modules), "cache": kernels.linear.stats.cache_path,
                  "env": sorted(set(os.environ.items()) ^ set(env.items())), "numba_env": seen,
                  "threads": [threads, torch.get_num_threads()],
                  "verbosity": [verbosity, transformers.logging.get_verbosity()]}))
"""


def test_importing_the_package_changes_nothing_process_wide(tmp_path):
    """Every module of the package, the numba kernels included, imports in a fresh process
    without changing os.environ, torch's thread count or transformers' logging; numba itself
    is imported with SVML off (batch invariance), set for that import only, and caches the
    kernels under $ADASPEC_CACHE/numba."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_DISABLE_INTEL_SVML", "NUMBA_CACHE_DIR")}
    out = subprocess.run([sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True, check=True,
                         env={**env, "PYTHONPATH": str(ROOT), "ADASPEC_CACHE": str(tmp_path)}, timeout=600)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["env"] == []
    assert Path(res["cache"]).parent == tmp_path / "numba"
    assert res["numba_env"] == ["1"]
    assert res["threads"][0] == res["threads"][1] and res["verbosity"][0] == res["verbosity"][1]
