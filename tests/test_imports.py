"""The import graph of selectune/ has no cycle: every `import` and `from ... import` of a selectune module,
at the top of a file or inside a function (a lazy import hides a cycle, it does not remove it), read with
ast over the package's files. Loading a delta imports no method."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "selectune"


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `package` (a package by its __init__.py)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in the file). `from a.b import c` is an edge to
    the module a.b.c when c is one, else to a.b; relative imports are resolved against the importer."""
    modules = module_files(package)
    root = package.name

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target == root or target.startswith(root + "."):
                    found = known(target)
                    if found is not None and found != module:
                        graph[module].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_of_selectune_has_no_cycle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and "selectune.delta.forms" in graph["selectune.delta.taskdelta"]
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(
        " / ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found)


def test_the_graph_sees_a_cycle_through_a_lazy_import(tmp_path):
    """The check can fail: a cycle closed by an import inside a function, and one through a relative import."""
    pkg = tmp_path / "selectune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from selectune import b\n")
    (pkg / "b.py").write_text("def f():\n    from selectune.a import x\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from . import d\n")
    (pkg / "sub" / "d.py").write_text("import selectune.sub.c\n")
    (pkg / "e.py").write_text("import selectune.a\n")
    assert cycles(import_graph(pkg)) == [["selectune.a", "selectune.b"], ["selectune.sub.c", "selectune.sub.d"]]


def test_loading_and_merging_a_delta_imports_no_method(tmp_path):
    """The form registry fills from selectune.delta alone: a broken method module cannot break export or
    eval of another method's delta."""
    code = (
        "import sys, torch\n"
        "from selectune.delta.taskdelta import TaskDelta\n"
        "d = TaskDelta({'w::ia3_scale': torch.ones(3), 'w::ia3_axis': torch.tensor(0, dtype=torch.int32),"
        " 'v::indices': torch.tensor([1], dtype=torch.int32), 'v::values': torch.ones(1)},"
        " {'config': {}, 'base_hash': 'x', 'method': 'ia3'})\n"
        f"d.save(r'{tmp_path / 'd.safetensors'}', compact='float16')\n"
        f"back = TaskDelta.load(r'{tmp_path / 'd.safetensors'}')\n"
        "m = torch.nn.Module(); m.w = torch.nn.Parameter(torch.ones(3, 2)); m.v = torch.nn.Parameter(torch.ones(4))\n"
        "back.merge_into(m)\n"
        "print(sorted(n for n in sys.modules if n.startswith('selectune.methods')))\n")
    result = subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
