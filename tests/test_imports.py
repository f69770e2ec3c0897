"""The import graph of dgrun's modules: no cycles, and nothing at run time imports the converters.

Read from the source with `ast` (imports inside functions count too), so a lazy import cannot hide a cycle.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The installed layout (pyproject.toml): each top-level folder is a subpackage of dgrun.
FOLDERS = {"dgrun": ROOT / "dgrun", "dgrun.backends": ROOT / "backends", "dgrun.convert": ROOT / "convert",
           "dgrun.models": ROOT / "models", "dgrun.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for f in folder.rglob("*.py"):
            parts = f.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name.removesuffix(".__init__")] = f
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in mods and t != name}
        edges[name] = deps
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    edges = graph()
    assert "dgrun.formats.gguf" in edges["dgrun.checkpoint"]
    assert "dgrun.checks" in edges["dgrun.models.diffusion_gemma"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(graph()) == []


def closure(edges, roots, skip=()):
    seen, todo = set(), list(roots)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += [] if m.startswith(skip) else sorted(edges[m])
    return seen


def test_runtime_does_not_import_convert():
    """Loading and generating (everything `dgrun.load`, the backends and the chat loop reach) never imports
    dgrun.convert."""
    edges = graph()
    runtime = closure(edges, ["dgrun", "dgrun.api", "dgrun.chat", "dgrun.info", "dgrun.backends.mlx",
                              "dgrun.backends.torch.model"])
    assert {"dgrun.checkpoint", "dgrun.formats.gguf", "dgrun.formats.mlx", "dgrun.tokenizer",
            "dgrun.backends.mlx_weights", "dgrun.backends.torch.ops_cpu"} <= runtime
    assert sorted(m for m in runtime if m.startswith("dgrun.convert")) == []
