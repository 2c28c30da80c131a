"""The package's layout rules, read from its sources (nothing is imported here):

* no import cycle between the modules of ``stn_kernels`` (every import statement counts, also those
  inside functions);
* no module imports a ``_private`` name, or from a ``_private`` module, outside its own folder;
* ops are registered only under ``stn_kernels/ops/`` (``custom_op(``, ``Library(``, ``register_fake``);
* no file over 700 lines, except the files of one kernel family (``backends/triton/<op>.py``).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stn_kernels"
MAX_LINES = 700
KERNEL_FAMILIES = PACKAGE / "backends" / "triton"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


SOURCES = _sources()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name a ``from ... import`` refers to."""
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(module: str, path: Path):
    """(imported module inside stn_kernels, imported name or None) for every import statement."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "stn_kernels":
                    yield alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node)
            if base.split(".")[0] != "stn_kernels":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import submodule` imports the submodule; `from mod import name` a name of mod
                yield (sub, None) if sub in SOURCES else (base, alias.name)


def _graph() -> dict:
    return {m: {target for target, _ in _imports(m, p) if target in SOURCES and target != m}
            for m, p in SOURCES.items()}


def _cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_sources_are_found():
    assert {"stn_kernels", "stn_kernels.ops", "stn_kernels.backends.registry", "stn_kernels.functional",
            "stn_kernels.modules", "stn_kernels.bench"} <= set(SOURCES)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle_inside_the_package():
    graph = _graph()
    assert sum(len(v) for v in graph.values()) > 50, "the import graph looks empty: is the parser broken?"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def _private_parts(name: str) -> list:
    return [part for part in name.split(".") if part.startswith("_") and not part.startswith("__")]


def test_no_private_name_imported_from_outside_its_folder():
    bad = []
    for module, path in SOURCES.items():
        folder = path.parent
        for target, name in _imports(module, path):
            if target not in SOURCES or SOURCES[target].parent == folder:
                continue
            private = _private_parts(target) + ([name] if name and _private_parts(name) else [])
            if private:
                bad.append(f"{module} imports {target}{'.' + name if name else ''} ({', '.join(private)})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("marker", ["custom_op(", "Library(", "register_fake", "register_autograd"])
def test_ops_are_registered_only_under_ops(marker):
    found = sorted(str(p.relative_to(PACKAGE)) for p in SOURCES.values() if marker in p.read_text())
    assert found and all(f.startswith("ops/") for f in found), found


def test_no_file_over_the_line_limit_unless_one_kernel_family():
    long = {str(p.relative_to(PACKAGE)): n for p in SOURCES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES and p.parent != KERNEL_FAMILIES}
    assert not long, long


def test_one_op_one_row():
    """Each op has its op file, its Triton kernels and its tests under the same name, and a row in the table."""
    from_table = ast.parse((PACKAGE / "backends" / "registry.py").read_text())
    table = next(n for n in ast.walk(from_table) if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") ==
                 "TABLE")
    ops = [k.value for k in table.value.keys]
    assert len(ops) == 7
    tests = PACKAGE.parent / "tests"
    for op in ops:
        assert (PACKAGE / "ops" / f"{op}.py").exists(), op
        assert (KERNEL_FAMILIES / f"{op}.py").exists(), op
        assert (tests / f"test_triton_{op}.py").exists(), op
        assert (tests / f"test_{op}.py").exists(), op


def test_every_public_forward_has_a_docstring():
    """``help(layer.forward)`` says what the call takes: every public class's own ``forward`` has a docstring (the
    benchmark's stand-ins of the published layers aside)."""
    bare = []
    for module, path in SOURCES.items():
        if module.startswith("stn_kernels.bench"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                for item in node.body:
                    if (isinstance(item, ast.FunctionDef) and item.name == "forward"
                            and ast.get_docstring(item) is None and "ctx" not in [a.arg for a in item.args.args]):
                        bare.append(f"{module}.{node.name}.forward")
    assert not bare, bare
