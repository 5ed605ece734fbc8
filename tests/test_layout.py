"""Imports go one way: scripts import the library, no module imports a script, no cycle."""
import ast
from pathlib import Path

from conftest import ROOT

SCRIPTS = {"model_train", "eval", "recommend", "experiments", "bench", "scale", "sequence_epoch"}  # the files with a command line


def local_imports(path: Path, local: set[str]) -> set[str]:
    """The repository modules a file imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & local


def import_graph() -> dict[str, set[str]]:
    files = [*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    local = {f.stem for f in files}
    return {f.stem: local_imports(f, local) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path of module names, or [] when there is none."""
    done, path = set(), []

    def visit(module: str) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        path.append(module)
        for imported in sorted(graph[module]):
            if cycle := visit(imported):
                return cycle
        path.pop()
        done.add(module)
        return []
    for module in sorted(graph):
        if cycle := visit(module):
            return cycle
    return []


def test_no_module_imports_a_script():
    graph = import_graph()
    assert SCRIPTS <= set(graph)
    offenders = {module: sorted(imports & SCRIPTS) for module, imports in graph.items() if imports & SCRIPTS}
    assert not offenders


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) == []


def test_find_cycle_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_the_model_file_holds_no_device_or_compiler_branch():
    source = (ROOT / "movielens_transformer.py").read_text()
    assert "device.type" not in source and "is_compiling" not in source


def test_user_docs_speak_of_the_users_machine():
    """No path of the development machine (its ../shared folder) in what a user reads or runs."""
    docs = [*ROOT.glob("*.md"), *ROOT.glob("*/README.md"), *ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("*.py"),
            *(p for p in ROOT.glob("benchmarks/*") if p.is_file()), *ROOT.glob("benchmarks/time_to_quality/*.md"),
            *ROOT.glob("configs/*.yaml")]
    assert [p.name for p in docs if "../shared" in p.read_text(errors="replace")] == []


def test_no_function_outside_the_benchmarks_is_longer_than_60_lines():
    """Short functions that say what they do: a longer one is a sign that it does several things."""
    long = {}
    for path in ROOT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long[f"{path.name}:{node.name}"] = node.end_lineno - node.lineno + 1
    assert long == {}
