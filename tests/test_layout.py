"""The house plan's layout rules, checked on the source: no stage module imports another, and the
package's import graph (function-local imports included) has no cycle."""

import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rlhf_jax")


def modules() -> dict[str, str]:
    """{dotted module name: path} of every module of the package."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


def imports(path: str, known: set[str]) -> set[str]:
    """The package modules `path` imports anywhere in it (`from rlhf_jax.x import y` counts rlhf_jax.x.y
    when that is a module, else rlhf_jax.x)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhf_jax"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or ({node.module} & known)
    return found


GRAPH = {m: imports(p, set(modules())) for m, p in modules().items()}


@pytest.mark.parametrize("stage", sorted(m for m in GRAPH if m.startswith("rlhf_jax.stages.")))
def test_no_stage_imports_another_stage(stage):
    others = {m for m in GRAPH[stage] if m.startswith("rlhf_jax.stages.")}
    assert not others, f"{stage} imports {others}: move what they share out of stages/"


def test_the_import_graph_has_no_cycle():
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(GRAPH.get(m, ())):
            if n == "rlhf_jax" or n == m:
                continue
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
