"""The README and docs/ stay true: short, every link and file tree pointing at what exists, every
command in the README run (the install and test commands are .ci/run's; each `python app.py`
line is parsed by app.py; the curl and Python examples run against a tiny server)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import app
from tests.browser.app_server import AppServer

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)
TREE_ENTRY = re.compile(r"^( *)((?:[\w.-]+/?(?:, )?)+)(?: {2,}.*)?$")


def code_blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall(text) if lang == language]


def test_the_readme_is_short():
    assert len(README.splitlines()) <= 220


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_every_relative_link_points_at_a_file(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if "://" not in target and not target.startswith("mailto:"):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def tree_paths(block: str) -> list[str]:
    """The paths a file tree in the docs names (two spaces of indent per level; comments after
    two or more spaces; continuation lines of a comment are not entries)."""
    parents: list[str] = []
    paths = []
    for line in block.splitlines():
        match = TREE_ENTRY.match(line)
        if not match or len(match.group(1)) % 2 or len(match.group(1)) // 2 > len(parents):
            continue
        depth = len(match.group(1)) // 2
        del parents[depth:]
        names = [name for name in match.group(2).split(", ") if name]
        paths += ["/".join(parents + [name.rstrip("/")]) for name in names]
        if len(names) == 1 and names[0].endswith("/"):
            parents.append(names[0].rstrip("/"))
    return paths


def test_the_architecture_tree_names_files_that_exist():
    trees = [block for block in code_blocks((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"), "")
             if block.startswith("app.py")]
    assert trees, "docs/architecture.md lost its file tree"
    paths = tree_paths(trees[0])
    assert len(paths) > 40
    missing = [path for path in paths if not (ROOT / path).exists()]
    assert not missing, f"docs/architecture.md names files that do not exist: {missing}"
    modules = [str(path.relative_to(ROOT)) for package in ("model_runtime", "webdemo", "benchmarks")
               for path in sorted((ROOT / package).rglob("*.py")) if path.name != "__init__.py"]
    unnamed = [module for module in modules if module not in paths]
    assert not unnamed, f"docs/architecture.md's tree leaves out {unnamed}"


def test_the_readme_commands_are_ci_s_and_app_py_takes_every_example(monkeypatch):
    ci = (ROOT / ".ci" / "run").read_text()
    bash = "\n".join(code_blocks(README, "bash"))
    commands = [line.split("  #")[0].strip() for line in bash.splitlines() if line.strip()]
    install, test = commands[0], commands[1]
    assert install.replace("pip install", "pip install -q") in ci and test in ci.splitlines()
    for name in [name for name in os.environ if name.startswith("CHATGLM_")]:
        monkeypatch.delenv(name)
    examples = [shlex.split(command) for command in commands if command.startswith("python app.py")]
    assert len(examples) >= 4
    for argv in examples:
        app.parse_args(argv[2:])  # a bad flag or value would exit with status 2


@pytest.fixture(scope="module")
def tiny_server():
    server = AppServer()
    yield server
    server.stop()


def test_the_readme_api_examples_run(tiny_server):
    default = "http://127.0.0.1:7860"
    (curl,) = [block for block in code_blocks(README, "bash") if block.startswith("curl")]
    result = subprocess.run(["bash", "-c", curl.replace(default, tiny_server.url.rstrip("/"))], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and '"finish_reason"' in result.stdout, result.stdout + result.stderr
    (python,) = code_blocks(README, "python")
    printed = subprocess.run([sys.executable, "-c", python.replace(default, tiny_server.url.rstrip("/"))],
                             capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0 and printed.stdout.strip(), printed.stderr
