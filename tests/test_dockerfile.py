"""The serving image's Dockerfile: lint-clean, and built the way the README installs the service.
(Docker itself cannot run on these machines, so the file is checked, not built.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    return str(found) if found.exists() else shutil.which("hadolint") or pytest.skip("hadolint is not installed")


def test_hadolint_finds_nothing():
    result = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_slim_python_and_runs_as_non_root():
    steps = instructions()
    assert steps[0] == ("FROM", "python:3.11-slim")
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_install_step_is_the_makefiles_serving_install():
    makefile = (REPO / "Makefile").read_text()
    serve_install = re.search(r"^install:.*\n\t\$\(SERVE_BIN\)/(pip install [^\n]*)$", makefile, re.M)
    assert serve_install, "Makefile has no serving install step"
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    assert any(run.startswith(serve_install.group(1)) for run in runs), (serve_install.group(1), runs)


def test_only_serving_files_are_copied():
    sources = {source for keyword, args in instructions() if keyword == "COPY" for source in args.split()[:-1]}
    assert sources == {"pyproject.toml", "README.md", "app/", "model_store/"}


def test_healthcheck_and_cmd_are_exec_form():
    steps = dict((k, v) for k, v in instructions() if k in ("HEALTHCHECK", "CMD"))
    probe = json.loads(steps["HEALTHCHECK"].split("CMD", 1)[1])
    assert probe == ["python", "-m", "app.probe"]
    assert json.loads(steps["CMD"]) == ["python", "-m", "app"]
    env = " ".join(args for keyword, args in instructions() if keyword == "ENV")
    assert "LSTM_SERVE_HOST=0.0.0.0" in env


def test_dockerignore_keeps_the_build_context_to_serving_files():
    entries = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    assert entries[0] == "**"  # everything is left out unless listed below
    assert {"!app/", "!model_store/", "!pyproject.toml", "!README.md"} <= set(entries)
