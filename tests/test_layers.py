"""The package's layout and import rules (docs/design.md, "Layout"), read from the source
with ``ast`` so they stay true.

- The root holds the public front (api, cli, errors, types) and the core loop (engine,
  verify, sampling, metrics); everything else lives in a package, and every root entry is
  on one side, decode-time code or a tool built on top of it (:data:`RUNTIME_ROOTS` /
  :data:`TOOL_ROOTS`): a new module takes the side of the package it is in, and a new root
  entry fails these tests until it is placed.
- Runtime code (what runs while decoding) never imports tool code.
- The engine knows policies and drafters only through their protocols.
- Policies, drafters and predictors talk through :mod:`adaspec.types`, not through each other.
- No import loop anywhere: imports inside functions count, and so does every package
  ``__init__`` an import runs or a module reads names from (``from . import name``); imports
  under ``if TYPE_CHECKING:`` never run and do not. (A module imported by a computed name,
  ``importlib.import_module(f"...{x}")``, is out of sight of any such check.)
- No function over 80 lines.
- One place each: the model options (frontend.options), the thread count (runtime.set_threads).
- No process-wide side effects on import (environment, threads, transformers' logging).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOT_MODULES = ("api", "cli", "errors", "types", "engine", "verify", "sampling", "metrics")
RUNTIME_ROOTS = ("api", "engine", "verify", "types", "sampling", "errors", "metrics", "checkpoints",
                 "runtime", "drafters", "policies", "predictors")
TOOL_ROOTS = ("cli", "frontend", "bench", "train", "serve", "integrations")
MAX_FUNCTION_LINES = 80


class Scan:
    """The modules of the package under ``root`` (``root/NAME/**.py``), their syntax trees,
    the adaspec modules each one's imports name, and the import graph: module -> every
    module or package ``__init__`` its imports execute."""

    def __init__(self, root: Path, name: str = "adaspec") -> None:
        self.root, self.name = root, name
        self.files = {self._module(p): p for p in sorted((root / name).rglob("*.py"))}
        self.trees = {m: ast.parse(p.read_text(encoding="utf-8")) for m, p in self.files.items()}
        self.imports = {m: self._imported(m) for m in self.files}
        self.graph = {m: {r for n in names for r in self._runs(m, n)} for m, names in self.imports.items()}

    def _module(self, path: Path) -> str:
        parts = list(path.relative_to(self.root).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def _imported(self, mod: str) -> set[str]:
        """The modules ``mod`` imports: ``import a.b`` names a.b; ``from a import x`` names the
        module a.x when there is one, else a itself (x is read from a's namespace)."""
        pkg = mod if self.files[mod].name == "__init__.py" else mod.rpartition(".")[0]
        found: set[str] = set()
        for node in _import_nodes(self.trees[mod]):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
                continue
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in self.files else base for a in node.names)
        out = set()
        for name in found:
            while name and name not in self.files:  # "pkg.mod.attr" -> the module pkg.mod
                name = name.rpartition(".")[0]
            if name and name != mod:
                out.add(name)
        return out

    @staticmethod
    def _runs(mod: str, name: str) -> set[str]:
        """What importing ``name`` from ``mod`` executes or reads: ``name`` itself (a package
        ``mod`` is part of too, when ``mod`` reads names from its ``__init__``) and each package
        ``__init__`` on the way that is not already running (``mod``'s own packages are)."""
        parts, own = name.split("."), mod.split(".")
        chain = {".".join(parts[:i]) for i in range(1, len(parts))}
        return (chain - {".".join(own[:i]) for i in range(1, len(own) + 1)}) | {name}

    def cycles(self) -> list[list[str]]:
        """Every import loop: the strongly connected components of more than one module."""
        return _components(self.graph)

    def long_functions(self, limit: int = MAX_FUNCTION_LINES) -> list[str]:
        return sorted(f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
                      for m, tree in self.trees.items() for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > limit)

    def root_entries(self) -> set[str]:
        return {m.split(".")[1] for m in self.files if "." in m}

    def loose_modules(self) -> set[str]:
        return {m.split(".")[1] for m, p in self.files.items()
                if m.count(".") == 1 and p.name != "__init__.py"}


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node`` at any depth (inside functions too), except the
    body of ``if TYPE_CHECKING:``, which never runs."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif _is_type_checking(child):
            for stmt in child.orelse:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp: list[str] = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


SCAN = Scan(ROOT)
IMPORTS = SCAN.imports
RUNTIME = tuple(f"adaspec.{r}" for r in RUNTIME_ROOTS)
OFFLINE = tuple(f"adaspec.{r}" for r in TOOL_ROOTS)


def _under(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _edges(src: tuple[str, ...], dst: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} -> {n}" for m, names in IMPORTS.items() if _under(m, src)
                  for n in names if _under(n, dst) and not _under(n, src))


def test_the_scan_sees_the_package() -> None:
    assert "adaspec.engine" in IMPORTS and "adaspec.policies.base" in IMPORTS["adaspec.engine"]
    # an import inside a function, and the package __init__ an import of a submodule runs
    assert "adaspec.runtime.compiled" in IMPORTS["adaspec.runtime"]
    assert {"adaspec.checkpoints", "adaspec.checkpoints.loader"} <= SCAN.graph["adaspec.drafters.registry"]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_the_loop_check_sees_lazy_imports_and_package_inits(tmp_path: Path) -> None:
    """The loop ``kv.py`` hid on the main of session 6: ``runtime/__init__`` imports ``kv`` at
    the top; ``kv`` imports ``runtime.attention`` inside a function, which runs
    ``runtime/__init__``. A module reading a name from its own package's ``__init__`` while
    that ``__init__`` imports it (``cache/k.py``) is a loop too. A type-only import is no loop;
    a module importing its own package's sibling does not rerun the ``__init__`` it is part of."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/kv.py": "def probe():\n    from .runtime.attention import Probe\n",
        "pkg/runtime/__init__.py": "from ..kv import probe\n",
        "pkg/runtime/attention.py": "from . import kernels\nclass Probe: ...\n",
        "pkg/runtime/kernels.py": "from .attention import Probe\n",
        "pkg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .hinted import X\n",
        "pkg/hinted.py": "from .typed import TYPE_CHECKING\n",
        "pkg/cache/__init__.py": "WHERE = 1\ndef warm():\n    from .k import K\n",
        "pkg/cache/k.py": "def where():\n    from . import WHERE\nclass K: ...\n",
        "pkg/cache/leaf.py": "from . import k\n",
    })
    scan = Scan(tmp_path, "pkg")
    assert scan.graph["pkg.kv"] == {"pkg.runtime", "pkg.runtime.attention"}
    assert scan.graph["pkg.cache.leaf"] == {"pkg.cache.k"}
    assert scan.cycles() == [["pkg.cache", "pkg.cache.k"], ["pkg.kv", "pkg.runtime"],
                             ["pkg.runtime.attention", "pkg.runtime.kernels"]]


def test_no_import_loop_anywhere() -> None:
    assert SCAN.cycles() == []


def test_no_function_over_80_lines() -> None:
    assert SCAN.long_functions() == []


def test_root_holds_only_the_front_and_the_core_loop() -> None:
    assert sorted(SCAN.loose_modules()) == sorted(ROOT_MODULES)


def test_every_root_entry_is_runtime_or_tool() -> None:
    """A new root module or package must be placed on one side (and only one)."""
    assert not set(RUNTIME_ROOTS) & set(TOOL_ROOTS)
    assert sorted(SCAN.root_entries()) == sorted(RUNTIME_ROOTS + TOOL_ROOTS)


def test_runtime_never_imports_offline_code() -> None:
    assert _edges(RUNTIME, OFFLINE) == []


@pytest.mark.parametrize(("src", "dst"), [
    (("adaspec.policies",), ("adaspec.drafters", "adaspec.api", "adaspec.engine")),
    (("adaspec.drafters",), ("adaspec.policies", "adaspec.api", "adaspec.engine")),
    (("adaspec.predictors",), ("adaspec.policies", "adaspec.drafters", "adaspec.api", "adaspec.engine")),
    (("adaspec.verify", "adaspec.types", "adaspec.sampling"),
     ("adaspec.policies", "adaspec.drafters", "adaspec.predictors", "adaspec.engine", "adaspec.api",
      "adaspec.runtime")),
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
    """Coarser than the module loops: the runtime's root entries (a package counts as one)
    form no loop either, so each part can be read knowing only those below it."""
    part = {m: m.split(".")[1] for m in SCAN.files if _under(m, RUNTIME)}
    graph = {p: set() for p in part.values()}
    for m, names in SCAN.graph.items():
        if m in part:
            graph[part[m]].update(part[n] for n in names if n in part and part[n] != part[m])
    assert _components(graph) == []


def _calls(attr: str) -> list[tuple[str, ast.Call]]:
    """(module, call) for every call of ``something.attr(...)`` in the package."""
    return [(mod, node) for mod, tree in SCAN.trees.items() for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr]


def test_model_options_are_declared_once():
    """--target / --draft / --dtype / --device / --threads / --runtime come from
    frontend.options.add_model_args in every command (a command may pick a subset or a default)."""
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
