"""The serving install stays light: no torch in its dependencies, and app/ never imports torch or
the training code (DESIGN.md: the model store is the only thing passed from training to serving)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from conftest import REPO
from packaging.requirements import Requirement

HEAVY = {"torch", "torchvision", "torchaudio", "triton", "onnx", "matplotlib"}
NETWORK_TROUBLE = ("Could not find a version", "No matching distribution", "NewConnectionError",
                   "Temporary failure in name resolution", "Network is unreachable", "timed out")


def core_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def test_serving_install_resolves_without_torch(tmp_path):
    """What `pip install .` (the Makefile's and the Dockerfile's serving install) would install,
    resolved from the package index into an empty environment."""
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(tmp_path / "report.json"), str(REPO)]
    try:
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("pip could not resolve the serving install within 120 s (package index unreachable?)")
    if result.returncode != 0 and any(marker in result.stderr for marker in NETWORK_TROUBLE):
        pytest.skip(f"no package index reachable: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    installed = {canonical(item["metadata"]["name"]) for item in report["install"]}
    assert {"fastapi", "onnxruntime", "uvicorn", "fastapi-offline"} <= installed
    assert not installed & HEAVY
    assert not any(name.startswith("nvidia-") for name in installed)


def test_core_dependencies_and_what_they_pull_here_exclude_torch():
    """The same question answered offline from the installed distributions' metadata."""
    seen: set[str] = set()
    pending = [(r, frozenset(r.extras)) for r in core_requirements()]
    while pending:
        requirement, extras = pending.pop()
        name = canonical(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            child = Requirement(line)
            environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
            if child.marker is None or any(child.marker.evaluate(env) for env in environments):
                pending.append((child, frozenset(child.extras)))
    assert {"fastapi", "onnxruntime", "nltk"} <= seen
    assert not seen & HEAVY, seen & HEAVY


def test_app_source_never_imports_torch_or_training():
    for path in sorted((REPO / "app").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in {"torch", "training"}, f"{path.relative_to(REPO)} imports {module}"


def test_serving_a_store_loads_neither_torch_nor_training(tiny_store: Path):
    """Import every app module, build the app and load the tiny models in a fresh interpreter."""
    script = f"""
import pkgutil, importlib, sys
from pathlib import Path
import app
for module in pkgutil.walk_packages(app.__path__, "app."):
    importlib.import_module(module.name)
from app.config import Settings
from app.main import create_app
settings = Settings(model_store=Path({str(tiny_store)!r}), intra_op_threads=1)
registry = create_app(settings).state.registry
registry.load_all()
assert registry.ready
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "training"))
print(loaded)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
