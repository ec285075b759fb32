"""The layout's promises, checked on the code itself: every module imports on its own, the
module-level imports of model_runtime and webdemo form no cycle, webdemo sees only
model_runtime.protocol, and the protocol needs no torch.

The graph is read from the source (ast), so an import hidden inside a function is not an edge:
that is why a cycle cannot be dodged that way and still pass the "imports alone" half.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model_runtime", "webdemo")
IMPORT_TIMEOUT_S = 120
OPTIONAL_PACKAGES = {"spaces"}  # only on Hugging Face ZeroGPU: imported where it is used


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of PACKAGES (a package is its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = module_files()


def _load_time_statements(body: list[ast.stmt]):
    """Statements that run when the module is imported: not function bodies; class bodies, ifs,
    trys and withs at module level do run."""
    for statement in body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield statement
        for field in ("body", "orelse", "finalbody"):
            nested = getattr(statement, field, None)
            if isinstance(nested, list):
                yield from _load_time_statements(nested)
        for handler in getattr(statement, "handlers", ()):
            yield from _load_time_statements(handler.body)


def imported_modules(name: str, path: Path) -> set[str]:
    """The modules `name` imports when it is imported, with the packages each import runs on the
    way (importing a.b.c runs a and a.b first)."""
    is_package = path.name == "__init__.py"
    targets = set()
    for statement in _load_time_statements(ast.parse(path.read_text(encoding="utf-8")).body):
        if isinstance(statement, ast.Import):
            targets.update(alias.name for alias in statement.names)
        elif isinstance(statement, ast.ImportFrom):
            if statement.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - statement.level + 1]
                source = ".".join(base + ([statement.module] if statement.module else []))
            else:
                source = statement.module
            targets.add(source)
            targets.update(f"{source}.{alias.name}" for alias in statement.names
                           if f"{source}.{alias.name}" in MODULES)
    parents = {".".join(target.split(".")[:i]) for target in targets for i in range(1, target.count(".") + 1)}
    own_parents = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {module for module in targets | parents | own_parents if module in MODULES and module != name}


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]):
    """One cycle as a list of modules, or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == "open":
                return path[path.index(successor):] + [successor]
            if successor not in state:
                cycle = visit(successor)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_covers_the_layout():
    """A guard on the test itself: the walk finds the subpackages and the edges between them."""
    assert {"model_runtime.protocol", "model_runtime.serving.engine", "model_runtime.models.base",
            "webdemo.ui"} <= set(MODULES)
    assert "model_runtime.serving.decode_batch" in GRAPH["model_runtime.serving.engine"]
    assert "model_runtime.chat" in GRAPH["model_runtime.chat.stream"]  # its own package runs first


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_module_level_imports_have_no_cycle():
    assert find_cycle(GRAPH) is None


def test_no_imports_inside_functions():
    """Imports inside functions would hide edges from the graph (and cycles with them); only
    optional packages, absent on most machines, may be imported where they are used."""
    hidden = []
    for name, path in MODULES.items():
        for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(function):
                    if isinstance(node, ast.Import):
                        modules = [alias.name for alias in node.names]
                    elif isinstance(node, ast.ImportFrom):
                        modules = ["." * node.level + (node.module or "")]
                    else:
                        continue
                    hidden += [f"{name}.{function.name}: {module}" for module in modules
                               if module.split(".")[0] not in OPTIONAL_PACKAGES]
    assert not hidden


def test_webdemo_sees_only_the_protocol():
    for name, imports in GRAPH.items():
        if name.startswith("webdemo"):
            runtime = {module for module in imports if module.startswith("model_runtime")}
            assert runtime <= {"model_runtime", "model_runtime.protocol"}, name


def test_the_protocol_imports_no_torch():
    names = set()
    for statement in _load_time_statements(ast.parse(MODULES["model_runtime.protocol"].read_text()).body):
        if isinstance(statement, ast.Import):
            names.update(alias.name for alias in statement.names)
        elif isinstance(statement, ast.ImportFrom):
            names.add(statement.module or "")
    assert not {name for name in names if name.split(".")[0] in ("torch", "transformers", "gradio")}
    done = subprocess.run([sys.executable, "-c", "import sys, model_runtime.protocol; "
                           "sys.exit(sorted({'torch', 'transformers', 'gradio'} & set(sys.modules)) or 0)"],
                          cwd=ROOT, capture_output=True, text=True, timeout=IMPORT_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr


# One interpreter imports the third-party packages our modules import at their top (the slow part:
# about 2 s for torch, 4.5 s for gradio), then forks a child per module of ours, which imports
# that module into a process holding none of our modules: "alone" as far as our code goes, at a
# fraction of a fresh interpreter's cost. Where there is no fork, each module gets a fresh one.
FORKING_IMPORTER = """
import json, os, select, sys, time, traceback
import gradio, torch  # noqa: F401 - preloaded for the children
assert not [name for name in sys.modules if name.split(".")[0] in ("model_runtime", "webdemo")]
names, timeout, running, results = sys.argv[2:], float(sys.argv[1]), {}, {}
while names or running:
    while names and len(running) < max(2, os.cpu_count() or 2):
        name = names.pop()
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(reader)
            try:
                __import__(name)
                code, text = 0, ""
            except BaseException:
                code, text = 1, traceback.format_exc()[-2000:]
            os.write(writer, text.encode())
            os._exit(code)
        os.close(writer)
        running[pid] = (name, reader, time.monotonic())
    for pid, (name, reader, started) in list(running.items()):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            text = os.read(reader, 4096).decode(errors="replace")
            results[name] = (os.waitstatus_to_exitcode(status), text)
        elif time.monotonic() - started > timeout:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            results[name] = (1, f"no import within {timeout} s")
        else:
            continue
        os.close(reader)
        del running[pid]
    time.sleep(0.01)
print(json.dumps(results))
"""


def _imports_alone(names: list[str]) -> dict[str, tuple[int, str]]:
    """Module name -> (exit code, the end of its traceback) of importing it alone."""
    if hasattr(os, "fork"):
        done = subprocess.run([sys.executable, "-c", FORKING_IMPORTER, str(IMPORT_TIMEOUT_S), *names], cwd=ROOT,
                              capture_output=True, text=True, timeout=IMPORT_TIMEOUT_S * 4)
        assert done.returncode == 0, done.stderr[-3000:]
        return {name: tuple(result) for name, result in json.loads(done.stdout).items()}
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        fresh = pool.map(lambda name: subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT,
                                                     capture_output=True, text=True, timeout=IMPORT_TIMEOUT_S), names)
        return {name: (done.returncode, done.stderr[-2000:]) for name, done in zip(names, fresh)}


def test_every_module_imports_alone():
    """Each module imported into a process holding none of ours, so no module leans on another
    having been imported (each has its own time limit, so this cannot hang)."""
    results = _imports_alone(sorted(MODULES))
    assert set(results) == set(MODULES)
    failures = [(name, error) for name, (code, error) in sorted(results.items()) if code]
    assert not failures, "\n\n".join(f"{name}:\n{error}" for name, error in failures)
