"""The import structure of the serving code: layers only look down, no cycles, web frameworks only at the edge.

The rules are data (``LAYERS`` and the allow-lists below), read from the source with ``ast`` (every import counts,
also one inside a function), so a module added by someone else fails here until it is placed in ``LAYERS``. The
README's "Development" section describes the same layers.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "medgemma"

# Bottom to top. A module may import modules of its own layer or of a layer below, never above; cycles are refused
# separately, also within a layer (like import-linter's "layers" contract). Names are relative to `medgemma`
# ("engine" also covers a package `medgemma/engine/` and everything in it, unless a submodule has its own entry);
# "service" is service.py. A new module goes into the lowest layer whose modules it does not need to import.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("Gemma 3's chat format (for checkpoints without one, and the demo builder)", ("chat_template",)),
    ("demo builder: random-weight checkpoints and adapters (tests, benchmarks, the `demo` model option)", (
        "demo_sizes", "demo", "demo_lora",
    )),
    ("foundation: the internal request/result types, the errors, process malloc thresholds", (
        "__init__", "errors", "protocol", "malloc",
    )),
    ("settings", ("config",)),
    ("answers: constrained decoding, thinking traces, boxes (no web framework)", (
        "reasoning", "boxes", "structured", "answer",
    )),
    ("request schemas, images and image sources (no web framework)", (
        "schemas", "pixels", "dicom_tags", "dicom", "imaging", "volume", "wsi", "dicomweb", "sources",
    )),
    ("requests: API request -> GenerationRequest", ("inputs", "openai_api", "google_api")),
    ("LoRA adapters: files, per-token layers, the adapter set (no web framework)", (
        "lora_files", "lora_layers", "lora",
    )),
    ("model: loading, the engine, lifecycle, discovery, metrics (no web framework)", (
        "loader", "engine", "lifecycle", "discovery", "telemetry",
    )),
    ("core: what each route answers, independent of transport", ("core",)),
    ("edge: HTTP and BentoML (the only layer that may import them)", (
        "middleware", "routes", "transport", "bentoml_compat", "playground", "client",
    )),
    ("service.py: BentoML transport only", ("service",)),
]  # fmt: skip
EDGE = "edge"  # the layer whose name starts with this, and every layer above it, may import web frameworks
WEB_FRAMEWORKS = ("bentoml", "_bentoml_sdk", "_bentoml_impl", "fastapi", "starlette")
# Must stay below the edge, whatever else moves: the engine (a module or a package, engine_*) and the image modules.
NEVER_WEB = (
    "engine", "engine.*", "engine_*",
    "imaging", "dicom", "pixels", "dicom_tags", "volume", "wsi", "dicomweb", "sources",
)  # fmt: skip

# Known exceptions, each with why it exists; an entry that no longer matches anything fails the run, so the list
# only shrinks.
ALLOWED_CYCLE_EDGES: dict[tuple[str, str], str] = {}
# Serving code never imports the demo builder, except here. "lazy" entries must stay inside a function, so the
# builder is only imported when a demo model is asked for.
ALLOWED_DEMO_IMPORTS: dict[str, tuple[str, str]] = {
    "config": ("lazy", "the route name of a `demo` model spec (MEDGEMMA_MODEL=demo...)"),
    "loader": ("lazy", "builds the demo checkpoint for MEDGEMMA_MODEL=demo... and recognises demo checkpoints"),
}
DEV_ONLY = ("devtools", "tests", "bench", "scripts")  # never imported by serving code

MAX_LINES = 550  # "about 500"
ALLOWED_LONG_FILES: dict[str, str] = {
    "scripts/gpu_check.py": "a standalone script for the GPU machine",
}


# --- reading the source ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    target: str  # absolute module name, e.g. "medgemma.imaging" or "torch"
    lazy: bool  # inside a function: runs only when the function does
    line: int


def module_files() -> dict[str, Path]:
    """Every module of the serving code: `medgemma.*` (packages included) and `service`."""
    files = {"service": ROOT / "service.py"}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)
        files[name] = path
    return files


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.module, self.is_package, self.known = module, is_package, known
        self.depth = 0
        self.found: list[Import] = []

    def _function(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, target: str, node: ast.AST) -> None:
        self.found.append(Import(target, self.depth > 0, node.lineno))  # type: ignore[attr-defined]

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.module if self.is_package else self.module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            self._add(candidate if candidate in self.known else base, node)


def imports_of(files: dict[str, Path]) -> dict[str, list[Import]]:
    known = set(files)
    out = {}
    for name, path in files.items():
        collector = _Collector(name, path.name == "__init__.py", known)
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        out[name] = collector.found
    return out


# --- the rules, as functions of a module -> imports map (so they can be tested on made-up graphs too) -------------


def short(module: str) -> str:
    """`medgemma.engine.cache` -> `engine.cache`; `medgemma` -> `__init__`; `service` stays."""
    if module == PACKAGE:
        return "__init__"
    return module.removeprefix(PACKAGE + ".")


def layer_of(module: str, layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> int | None:
    """Index into ``layers`` of the most specific entry naming ``module`` or a package above it."""
    name = short(module)
    while True:
        for i, (_, members) in enumerate(layers):
            if name in members:
                return i
        if "." not in name:
            return None
        name = name.rpartition(".")[0]


def unknown_modules(modules: Iterable[str], layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> list[str]:
    return sorted(m for m in modules if layer_of(m, layers) is None)


def upward_imports(graph: dict[str, list[Import]], layers: list[tuple[str, tuple[str, ...]]] = LAYERS) -> list[str]:
    problems = []
    for module, imports in graph.items():
        mine = layer_of(module, layers)
        for imp in imports:
            if imp.target not in graph or imp.target == module:
                continue
            theirs = layer_of(imp.target, layers)
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(
                    f"{module} (layer '{layers[mine][0]}') imports {imp.target} (layer '{layers[theirs][0]}', "
                    f"above it) at line {imp.line}"
                )
    return problems


def cycles(graph: dict[str, list[Import]], allowed: Iterable[tuple[str, str]] = ()) -> list[list[str]]:
    """Strongly connected components with more than one module (or a module importing itself), by Tarjan."""
    skip = {(f"{PACKAGE}.{a}", f"{PACKAGE}.{b}") for a, b in allowed}
    edges = {
        m: sorted({i.target for i in imps if i.target in graph and (m, i.target) not in skip})
        for m, imps in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def matches(module: str, patterns: Iterable[str]) -> bool:
    name = short(module)
    for p in patterns:
        if p.endswith(".*") and name.startswith(p[:-1]):
            return True
        if p.endswith("*") and not p.endswith(".*") and name.startswith(p[:-1]):
            return True
        if name == p:
            return True
    return False


def top_level(target: str) -> str:
    return target.partition(".")[0]


# --- the real code ---------------------------------------------------------------------------------------------------

FILES = module_files()
GRAPH = imports_of(FILES)
EDGE_INDEX = next(i for i, (name, _) in enumerate(LAYERS) if name.startswith(EDGE))


def test_every_module_has_a_layer():
    missing = unknown_modules(GRAPH)
    assert not missing, (
        f"{missing} not in LAYERS of {Path(__file__).relative_to(ROOT)}: add each to the layer it belongs to "
        "(the lowest layer whose modules it does not import; see README, Development)"
    )


def test_layer_table_names_only_existing_modules():
    names = {short(m) for m in GRAPH}
    packages = {n.rpartition(".")[0] for n in names if "." in n}
    stale = [m for _, members in LAYERS for m in members if m not in names and m not in packages]
    assert not stale, f"LAYERS names modules that do not exist (renamed or removed?): {stale}"


def test_no_module_imports_a_layer_above_it():
    problems = upward_imports(GRAPH)
    assert not problems, "imports that look up:\n" + "\n".join(problems)


def test_no_import_cycles():
    found = cycles(GRAPH, ALLOWED_CYCLE_EDGES)
    assert not found, f"import cycles in {PACKAGE}/: {found}"


def test_web_frameworks_only_at_the_edge():
    problems = [
        f"{module} imports {imp.target} (line {imp.line})"
        for module, imports in GRAPH.items()
        if (layer_of(module) or 0) < EDGE_INDEX
        for imp in imports
        if top_level(imp.target) in WEB_FRAMEWORKS
    ]
    assert not problems, "below the edge layer, nothing imports bentoml, fastapi or starlette:\n" + "\n".join(problems)


def test_engine_and_image_modules_stay_below_the_edge():
    pinned = [m for m in GRAPH if matches(m, NEVER_WEB)]
    assert any(short(m).startswith("engine") for m in pinned), "no engine module found: update NEVER_WEB"
    above = [m for m in pinned if (layer_of(m) or 0) >= EDGE_INDEX]
    assert not above, f"{above} must stay in a layer below '{LAYERS[EDGE_INDEX][0]}'"


def test_serving_code_never_imports_the_demo_builder():
    problems = []
    for module, imports in GRAPH.items():
        if short(module) == "demo":
            continue
        for imp in imports:
            if imp.target != f"{PACKAGE}.demo":
                continue
            allowed = ALLOWED_DEMO_IMPORTS.get(short(module))
            if allowed is None:
                problems.append(f"{module} imports {PACKAGE}.demo (line {imp.line})")
            elif allowed[0] == "lazy" and not imp.lazy:
                problems.append(f"{module} imports {PACKAGE}.demo at module level (line {imp.line}); keep it lazy")
    assert not problems, "\n".join(problems)


def test_serving_code_never_imports_dev_tools():
    problems = [
        f"{module} imports {imp.target} (line {imp.line})"
        for module, imports in GRAPH.items()
        for imp in imports
        if top_level(imp.target) in DEV_ONLY
    ]
    assert not problems, "\n".join(problems)


def test_allow_lists_only_hold_live_exceptions():
    stale = []
    for a, b in ALLOWED_CYCLE_EDGES:
        src, dst = f"{PACKAGE}.{a}", f"{PACKAGE}.{b}"
        edge = any(i.target == dst for i in GRAPH.get(src, []))
        others = {k for k in ALLOWED_CYCLE_EDGES if k != (a, b)}
        if not edge or not cycles(GRAPH, others):
            stale.append(f"ALLOWED_CYCLE_EDGES {a} -> {b}: no longer part of a cycle; remove it")
    for module in ALLOWED_DEMO_IMPORTS:
        if not any(i.target == f"{PACKAGE}.demo" for i in GRAPH.get(f"{PACKAGE}.{module}", [])):
            stale.append(f"ALLOWED_DEMO_IMPORTS {module}: no longer imports the demo builder; remove it")
    for path in ALLOWED_LONG_FILES:
        if not (ROOT / path).exists() or _lines(ROOT / path) <= MAX_LINES:
            stale.append(f"ALLOWED_LONG_FILES {path}: gone or short now; remove it")
    assert not stale, "\n".join(stale)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def _source_files() -> Iterator[Path]:
    for pattern in ("service.py", f"{PACKAGE}/**/*.py", "devtools/**/*.py", "scripts/*.py"):
        yield from ROOT.glob(pattern)


def test_files_outside_tests_and_bench_stay_small():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _source_files()
        if (n := _lines(p)) > MAX_LINES and str(p.relative_to(ROOT)) not in ALLOWED_LONG_FILES
    }
    assert not long, f"over {MAX_LINES} lines (split by concern): {long}"


# --- the checks themselves catch what they are for -------------------------------------------------------------------


def _graph(edges: dict[str, list[str]]) -> dict[str, list[Import]]:
    return {f"{PACKAGE}.{m}": [Import(f"{PACKAGE}.{t}", False, 1) for t in ts] for m, ts in edges.items()}


TOY_LAYERS = [("low", ("a", "pkg")), ("high", ("b", "c"))]


def test_checks_find_cycles_upward_imports_and_unknown_modules():
    toy = _graph({"a": ["b"], "b": ["c"], "c": ["b"], "pkg.x": ["a"], "d": []})
    assert cycles(toy) == [[f"{PACKAGE}.b", f"{PACKAGE}.c"]]
    assert cycles(toy, [("c", "b")]) == []
    assert cycles(_graph({"a": ["a"]})) == [[f"{PACKAGE}.a"]]
    assert [p.split(" ")[0] for p in upward_imports(toy, TOY_LAYERS)] == [f"{PACKAGE}.a"]
    assert unknown_modules(toy, TOY_LAYERS) == [f"{PACKAGE}.d"]  # pkg.x is covered by its package's entry
    assert layer_of(f"{PACKAGE}.pkg.x", TOY_LAYERS) == 0


@pytest.mark.parametrize(
    ("source", "module", "expected"),
    [
        ("from medgemma import imaging", "medgemma.inputs", [("medgemma.imaging", False)]),
        ("from medgemma.errors import BadRequest", "medgemma.inputs", [("medgemma.errors", False)]),
        ("def f():\n    import bentoml\n", "medgemma.x", [("bentoml", True)]),
        ("from . import errors", "medgemma.inputs", [("medgemma.errors", False)]),
        ("from .cache import Pages", "medgemma.engine.core", [("medgemma.engine.cache", False)]),
        ("from ..errors import E", "medgemma.engine.core", [("medgemma.errors", False)]),
    ],
)
def test_imports_are_resolved_to_modules(source, module, expected):
    known = {"medgemma.imaging", "medgemma.errors", "medgemma.inputs", "medgemma.engine.cache", "medgemma.engine.core"}
    collector = _Collector(module, False, known)
    collector.visit(ast.parse(source))
    assert [(i.target, i.lazy) for i in collector.found] == expected
