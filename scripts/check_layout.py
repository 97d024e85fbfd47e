"""Checks the package layout of `pipeline/` and `omnizip/` from the code's own imports: import
cycles (strongly connected modules; imports under `if TYPE_CHECKING:` aside, imports inside
functions included), imports that point up the layers, modules over the size limit, and modules
directly in `pipeline/`. Prints a report; exits 1 when a rule is broken.

    python scripts/check_layout.py [--json]
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "omnizip")
MAX_LINES = 450
MAX_TOP_MODULES = 6
#: layers of pipeline/, lowest first: a module imports its own package or lower layers only.
LAYERS: dict[str, int] = {
    "pipeline.redact": 0, "pipeline.errors": 1, "pipeline.metrics": 1,
    "pipeline.sources": 2, "pipeline.store": 2, "pipeline.core": 3, "pipeline.viz": 4,
    "pipeline.engine": 5, "pipeline.api": 6, "pipeline.cli": 7,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports at run time (TYPE_CHECKING blocks aside)."""
    me = module_name(path)
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    if (m := resolve(a.name)) is not None:
                        found.add(m)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for a in child.names:  # `from pkg import module` names a module
                    m = resolve(f"{child.module}.{a.name}") or resolve(child.module)
                    if m is not None:
                        found.add(m)
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(me)
    return {m for m in found if not me.startswith(m + ".") or m not in PACKAGES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def layer(module: str) -> tuple[str, int] | None:
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return prefix, rank
    return None


def report() -> dict:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    modules = {module_name(p) for p in files}
    # a package's __init__ is its own module; `from pipeline.x import y` resolves to pipeline.x.y if that exists
    graph = {module_name(p): imports_of(p, modules) for p in files}
    upward = []
    for src, dsts in graph.items():
        ls = layer(src)
        for dst in dsts:
            ld = layer(dst)
            if src.startswith("pipeline") and dst.startswith("pipeline"):
                if ld is None or ls is None:
                    continue
                if ld[0] != ls[0] and ld[1] >= ls[1]:
                    upward.append(f"{src} -> {dst}")
            elif src.startswith("omnizip") and dst.startswith("pipeline"):
                upward.append(f"{src} -> {dst}")
    lines = {module_name(p): len(p.read_text().splitlines()) for p in files}
    top = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    unplaced = sorted(m for m in modules if m.startswith("pipeline.") and layer(m) is None)
    return {
        "modules": len(modules),
        "imports": sum(len(v) for v in graph.values()),
        "cycles": cycles(graph),
        "upward_imports": sorted(upward),
        "over_limit": {m: n for m, n in sorted(lines.items()) if n > MAX_LINES},
        "top_level_modules": top,
        "unplaced_modules": unplaced,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    r = report()
    broken = bool(r["cycles"] or r["upward_imports"] or r["over_limit"] or r["unplaced_modules"]
                  or len(r["top_level_modules"]) > MAX_TOP_MODULES)
    if ap.parse_args().json:
        print(json.dumps(r, indent=1))
    else:
        print(f"{r['modules']} modules, {r['imports']} imports between them")
        print(f"cycles: {len(r['cycles'])}")
        for c in r["cycles"]:
            print("  " + " <-> ".join(c))
        print(f"imports up the layers: {len(r['upward_imports'])}")
        for u in r["upward_imports"]:
            print("  " + u)
        print(f"modules over {MAX_LINES} lines: {len(r['over_limit'])}")
        for m, n in r["over_limit"].items():
            print(f"  {m}: {n}")
        print(f"modules directly in pipeline/: {len(r['top_level_modules'])} (at most {MAX_TOP_MODULES}): "
              + ", ".join(r["top_level_modules"]))
        if r["unplaced_modules"]:
            print("modules in no layer: " + ", ".join(r["unplaced_modules"]))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
