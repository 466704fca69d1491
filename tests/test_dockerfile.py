"""The serving image's Dockerfile: lint-clean, and built the way the README installs the service.
Checked here without a container engine; tests/test_image.py builds and runs it where there is one."""

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
    assert {args.split()[0] for keyword, args in steps if keyword == "FROM"} == {"python:3.11-slim"}
    users = [args for keyword, args in steps if keyword == "USER"]
    assert users and users[-1].split(":")[0] == "10001"  # deploy/ runs it as 10001 (runAsUser)


def test_install_steps_are_the_makefiles_serving_install():
    """The locked dependencies with their hashes, then the app itself without dependencies."""
    makefile = (REPO / "Makefile").read_text()
    serve_install = re.search(r"^install:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert serve_install, "Makefile has no serving install step"
    lock_step, app_step = [line.strip().removeprefix("$(SERVE_BIN)/") for line in serve_install.group(1).splitlines()]
    assert lock_step == "pip install --quiet --require-hashes -r requirements/serve.lock"
    assert app_step == "pip install --quiet --no-deps ."
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    assert lock_step in runs, runs
    assert any(run.startswith("pip install --quiet") and "--no-deps" in run and run.endswith(" .") for run in runs)


def test_only_serving_files_are_copied():
    copies = [args.split() for keyword, args in instructions() if keyword == "COPY"]
    from_context = {source for words in copies if not words[0].startswith("--from=") for source in words[:-1]}
    assert from_context == {"pyproject.toml", "README.md", "requirements/serve.lock", "app/", "model_store/"}
    from_stages = [words for words in copies if words[0].startswith("--from=")]
    assert from_stages == [["--from=app", "/install/", "/usr/local/"]]  # the installed app, and nothing else


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
    assert {"!app/", "!model_store/", "!pyproject.toml", "!README.md", "!requirements/serve.lock"} <= set(entries)
