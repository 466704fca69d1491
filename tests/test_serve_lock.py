"""The lock files: `requirements/serve.lock` (the serving install of `make serve` and the image, every
file hashed) and `requirements/dev.lock` (the versions `make install-dev` is constrained to). Both are
written by `make lock`. The serving install from the lock is checked on every Python that
`requires-python` admits and this machine has: a fresh venv, the lock, the app, a live request each."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from conftest import REPO
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

SERVE_LOCK = REPO / "requirements" / "serve.lock"
DEV_LOCK = REPO / "requirements" / "dev.lock"
HEAVY = {"torch", "torchvision", "torchaudio", "triton", "onnx", "matplotlib"}
NETWORK_TROUBLE = ("Could not find a version", "No matching distribution", "NewConnectionError",
                   "Temporary failure in name resolution", "Network is unreachable", "timed out",
                   "Failed to fetch", "dns error", "error sending request")
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def pins(lock: Path) -> list[tuple[Requirement, list[str]]]:
    """Each requirement of a lock file with its hashes (continuation lines joined, comments dropped)."""
    text = re.sub(r"\s*\\\n\s*", " ", lock.read_text())
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        requirement, *hashes = line.split(" --hash=")
        entries.append((Requirement(requirement), hashes))
    return entries


def pinned_version(requirement: Requirement) -> Version:
    (specifier,) = requirement.specifier
    assert specifier.operator == "==", requirement
    return Version(specifier.version)


def python_versions() -> list[str]:
    """The minor versions `requires-python` admits, from 3.8 to 3.20."""
    allowed = SpecifierSet(PROJECT["requires-python"])
    return [f"3.{minor}" for minor in range(8, 21) if f"3.{minor}.0" in allowed]


def find_python(version: str) -> str | None:
    """`python3.X` on the PATH, else under pyenv's versions (whose shims only answer for the selected
    version); only an interpreter that runs and says it is that version counts."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [shutil.which(f"python{version}"),
                  *sorted(map(str, root.glob(f"versions/{version}.*/bin/python{version}")), reverse=True)]
    for candidate in filter(None, candidates):
        try:
            said = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if said.returncode == 0 and said.stdout.strip() == version:
            return candidate
    return None


def test_serve_lock_hashes_every_file_and_holds_no_torch():
    entries = pins(SERVE_LOCK)
    names = {requirement.name.lower() for requirement, _ in entries}
    assert not names & HEAVY, names & HEAVY
    assert not any(name.startswith("nvidia-") for name in names)
    for requirement, hashes in entries:
        pinned_version(requirement)
        assert hashes and all(h.startswith("sha256:") for h in hashes), requirement


@pytest.mark.parametrize("python", python_versions())
def test_serve_lock_satisfies_pyproject_on(python):
    """Each dependency of pyproject.toml is pinned, for this Python, at a version it allows."""
    environment = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "platform_python_implementation":
                   "CPython", "implementation_name": "cpython", "os_name": "posix"}
    locked: dict[str, Version] = {}
    for requirement, _ in pins(SERVE_LOCK):
        if requirement.marker is None or requirement.marker.evaluate(environment):
            assert requirement.name.lower() not in locked, f"{requirement.name} pinned twice for {python}"
            locked[requirement.name.lower()] = pinned_version(requirement)
    for line in PROJECT["dependencies"]:
        wanted = Requirement(line)
        assert wanted.name.lower() in locked, f"{wanted.name} is not in {SERVE_LOCK.name}: run `make lock`"
        assert locked[wanted.name.lower()] in wanted.specifier, (wanted, locked[wanted.name.lower()])


def test_dev_lock_agrees_with_the_serve_lock_and_pins_torch_as_pyproject_does():
    serve = {(r.name.lower(), str(r.marker or "")): pinned_version(r) for r, _ in pins(SERVE_LOCK)}
    dev = {(r.name.lower(), str(r.marker or "")): pinned_version(r) for r, _ in pins(DEV_LOCK)}
    assert {key: version for key, version in dev.items() if key in serve} == serve
    (torch_pin,) = [Requirement(r) for r in PROJECT["optional-dependencies"]["train"] if r.startswith("torch")]
    assert dev[("torch", "")] == pinned_version(torch_pin)


@pytest.fixture(scope="module")
def app_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app built once as a wheel, for every interpreter (it is pure Python)."""
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out),
                             str(REPO)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and any(marker in result.stderr for marker in NETWORK_TROUBLE):
        pytest.skip(f"no package index reachable for the build backend: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    (wheel,) = out.glob("*.whl")
    return wheel


def uv() -> str:
    found = Path(sys.executable).with_name("uv")
    return str(found) if found.exists() else shutil.which("uv") or pytest.skip("uv is not installed (dev extra)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("python", python_versions())
def test_serving_install_from_the_lock_serves_on(python, app_wheel: Path, tiny_store: Path, tmp_path: Path):
    """`make serve`'s install steps in a fresh venv of this Python, then `python -m app` answers."""
    interpreter = find_python(python)
    if interpreter is None:
        pytest.skip(f"no Python {python} here (looked for python{python} on the PATH and under pyenv)")
    venv = tmp_path / "venv"
    python_in_venv = str(venv / "bin" / "python")
    # `make serve`'s two steps on this lock, run by uv for speed (about 2 s instead of 40 s with pip); pip runs
    # them in `make serve` and in the image build.
    steps = (["venv", "--quiet", "--python", interpreter, str(venv)],
             ["pip", "install", "--quiet", "--python", python_in_venv, "--require-hashes", "-r", str(SERVE_LOCK)],
             ["pip", "install", "--quiet", "--python", python_in_venv, "--no-deps", str(app_wheel)])
    for step in steps:
        result = subprocess.run([uv(), *step], capture_output=True, text=True, timeout=600)
        if result.returncode != 0 and any(marker in result.stderr for marker in NETWORK_TROUBLE):
            pytest.skip(f"no package index reachable: {result.stderr.strip().splitlines()[-1]}")
        assert result.returncode == 0, result.stderr
    no_torch = subprocess.run([python_in_venv, "-c", "import torch"], capture_output=True, timeout=60)
    assert no_torch.returncode != 0

    port = free_port()
    env = {**os.environ, "LSTM_SERVE_MODEL_STORE": str(tiny_store), "LSTM_SERVE_PORT": str(port),
           "LSTM_SERVE_HOST": "127.0.0.1", "LSTM_SERVE_INTRA_OP_THREADS": "1", "LSTM_SERVE_LOG_LEVEL": "warning"}
    # Run from an empty directory, so that the installed app is imported, not the checkout's.
    server = subprocess.Popen([python_in_venv, "-m", "app"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                try:
                    if http.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "not ready within 120 s"
                time.sleep(0.1)
            assert http.post("/predict-next", json={"text": "the company", "top_k": 2}).status_code == 200
            assert http.post("/score", json={"text": "the stock fell"}).status_code == 200
            assert http.post("/sentiment", json={"text": "a witty film"}).status_code == 200
            assert http.get("/demo").status_code == 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once drained
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
