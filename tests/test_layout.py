"""The house plan's layout rules, checked on the source: no stage module imports another; data/ and tasks/
are pure (they never import the runtime or a stage, and data/ never imports the task built on it); and the
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


RUNTIME = ("rlhf_jax.run", "rlhf_jax.checkpoint", "rlhf_jax.distributed")
PURE = sorted(m for m in GRAPH if m.split(".")[:2] in (["rlhf_jax", "data"], ["rlhf_jax", "tasks"]))


def test_the_pure_packages_are_found():
    assert "rlhf_jax.data.tokenizer" in PURE and "rlhf_jax.tasks.builtin" in PURE


@pytest.mark.parametrize("module", PURE)
def test_data_and_tasks_never_import_the_runtime_or_a_stage(module):
    runtime = {m for m in GRAPH[module] if m in RUNTIME or m.split(".")[:2] == ["rlhf_jax", "stages"]}
    assert not runtime, (
        f"{module} imports {runtime}: data/ and tasks/ are pure; give the run-aware part to "
        f"rlhf_jax.run.Run or a stage helper"
    )


@pytest.mark.parametrize("module", [m for m in PURE if m.startswith("rlhf_jax.data")])
def test_data_never_imports_the_builtin_task(module):
    task = {m for m in GRAPH[module] if m.split(".")[:2] == ["rlhf_jax", "tasks"]}
    assert not task, f"{module} imports {task}: the built-in task is built on data/, not the other way round"


def test_the_import_graph_has_no_cycle():
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(GRAPH.get(m, ())):
            if n == "rlhf_jax" or n == m:
                continue
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n) :] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
