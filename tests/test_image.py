"""The serving image, built from the Dockerfile and run: readiness, one answer per endpoint, the demo
page, non-root, the HEALTHCHECK, no torch, the app installed once, and a clean exit on SIGTERM.

`make image` runs this module; `make test` runs it too wherever docker or podman works (skipped, with
the reason, where neither does). The image is always built (the layer cache makes a rebuild take
seconds) so what is checked is the current working tree. The container runs the way deploy/ runs it
in Kubernetes: read-only root filesystem with a writable /tmp, no capabilities, no privilege escalation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import REPO

from app.config import Settings

DOCKERFILE = REPO / "Dockerfile"
TAG = os.environ.get("IMAGE", "lstm-serve")
# A summary of the last run (size, build and start-up times) for `make image` to print.
SUMMARY = REPO / "test-artifacts" / "image.json"
MAX_IMAGE_BYTES = 600_000_000
READY_TIMEOUT = 180.0
NETWORK_TROUBLE = ("Temporary failure in name resolution", "Network is unreachable", "No matching distribution",
                   "NewConnectionError", "pinging container registry", "no such host", "i/o timeout")


@dataclass
class Image:
    engine: str
    tag: str
    build_seconds: float

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.engine, *args], capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{self.engine} {' '.join(args)}: {result.stdout}{result.stderr}"
        return result

    def inspect(self, template: str) -> str:
        return self.run("image", "inspect", self.tag, "--format", template).stdout.strip()


@dataclass
class Container:
    image: Image
    id: str
    base_url: str
    ready_seconds: float

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return self.image.run("exec", self.id, *command, check=False)


def usable_engine() -> str:
    """The first of $CONTAINER_ENGINE, docker and podman that answers `info` (a docker client without
    a daemon does not)."""
    preferred = os.environ.get("CONTAINER_ENGINE")
    reasons = []
    for name in ([preferred] if preferred else ["docker", "podman"]):
        path = shutil.which(name)
        if path is None:
            reasons.append(f"{name}: not installed")
            continue
        try:
            info = subprocess.run([path, "info"], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            reasons.append(f"{name}: `info` timed out")
            continue
        if info.returncode == 0:
            return path
        reasons.append(f"{name}: {(info.stderr.strip().splitlines() or ['`info` failed'])[-1]}")
    pytest.skip("no usable container engine (" + "; ".join(reasons) + "); on a machine without a registry, "
                "../shared/tools/container-env.sh installs podman and a local python:3.11-slim")


def base_images() -> list[str]:
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", DOCKERFILE.read_text(), re.M | re.I)
    names = {alias for _, alias in stages if alias}
    return sorted({image for image, _ in stages if image not in names})


def summary(**figures: float | str) -> None:
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    known = json.loads(SUMMARY.read_text()) if SUMMARY.exists() else {}
    SUMMARY.write_text(json.dumps({**known, **figures}, indent=2) + "\n")


@pytest.fixture(scope="module")
def image() -> Image:
    engine = usable_engine()
    for base in base_images():
        if subprocess.run([engine, "image", "inspect", base], capture_output=True, timeout=60).returncode != 0:
            pulled = subprocess.run([engine, "pull", base], capture_output=True, text=True, timeout=600)
            if pulled.returncode != 0:
                pytest.skip(f"the base image {base} is not here and cannot be pulled: "
                            f"{(pulled.stderr.strip().splitlines() or ['?'])[-1]}")
    # podman's default OCI format has no HEALTHCHECK; docker's format keeps it.
    build = [engine, "build", "-t", TAG, *(["--format", "docker"] if Path(engine).name == "podman" else []), "."]
    started = time.monotonic()
    result = subprocess.run(build, cwd=REPO, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - started
    output = result.stdout + result.stderr
    if result.returncode != 0 and any(marker in output for marker in NETWORK_TROUBLE):
        pytest.skip(f"the build needs the package index, which is unreachable: {output.strip().splitlines()[-1]}")
    assert result.returncode == 0, output[-4000:]
    built = Image(engine, TAG, seconds)
    summary(engine=Path(engine).name, tag=TAG, build_seconds=round(seconds, 1),
            image_bytes=int(built.inspect("{{.Size}}")))
    return built


@pytest.fixture(scope="module")
def container(image: Image) -> Iterator[Container]:
    started = time.monotonic()
    container_id = image.run(
        "run", "--detach", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "--publish", f"127.0.0.1::{image_port(image)}", image.tag,
    ).stdout.strip().splitlines()[-1]
    try:
        address = image.run("port", container_id, f"{image_port(image)}/tcp").stdout.split()[0]
        base_url = f"http://{address}"
        deadline = started + READY_TIMEOUT
        with httpx.Client(base_url=base_url, timeout=5) as http:
            while True:
                try:
                    if http.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                state = image.run("inspect", container_id, "--format", "{{.State.Status}}").stdout.strip()
                logs = image.run("logs", container_id, check=False)
                assert state == "running", f"the container stopped ({state}): {logs.stdout}{logs.stderr}"
                assert time.monotonic() < deadline, f"not ready after {READY_TIMEOUT} s: {logs.stdout}{logs.stderr}"
                time.sleep(0.5)
        ready = time.monotonic() - started
        summary(ready_seconds=round(ready, 1))
        yield Container(image, container_id, base_url, ready)
    finally:
        image.run("rm", "--force", container_id, check=False)


def image_port(image: Image) -> int:
    env = json.loads(image.inspect("{{json .Config.Env}}"))
    return int(dict(item.split("=", 1) for item in env)["LSTM_SERVE_PORT"])


def shipped_models() -> list[str]:
    return sorted(path.name for path in (REPO / "model_store").iterdir() if path.is_dir())


def test_image_size_is_bounded(image: Image):
    size = int(image.inspect("{{.Size}}"))
    assert size < MAX_IMAGE_BYTES, f"{size / 1e6:.0f} MB"


def test_every_shipped_model_serves_and_every_endpoint_answers(container: Container):
    with httpx.Client(base_url=container.base_url, timeout=30) as http:
        ready = http.get("/health/ready").json()
        assert sorted(ref.split("@")[0] for ref in ready["serving"]) == shipped_models()
        assert ready["failed"] == [] and ready["missing"] == []
        assert http.get("/health/live").json() == {"status": "alive"}

        predicted = http.post("/predict-next", json={"text": "the company said it expects", "top_k": 3})
        assert predicted.status_code == 200, predicted.text
        assert len(predicted.json()["predictions"]) == 3

        scored = http.post("/score", json={"text": "the stock market fell sharply today"})
        assert scored.status_code == 200, scored.text
        assert scored.json()["results"][0]["perplexity"] > 1

        sentiment = http.post("/sentiment", json={"texts": ["a gorgeous , witty film", "dull and tedious"]})
        assert sentiment.status_code == 200, sentiment.text
        assert [r["label"] for r in sentiment.json()["results"]] == ["positive", "negative"]

        generated = http.post("/generate", json={"text": "the company said", "max_tokens": 5, "seed": 1})
        assert generated.status_code == 200, generated.text
        assert 1 <= len(generated.json()["samples"][0]["tokens"]) <= 5

        assert "# TYPE lstm_serve_http_requests_total counter" in http.get("/metrics").text
        assert http.get("/docs").status_code == 200


def test_demo_page_and_its_assets_are_in_the_image(container: Container):
    with httpx.Client(base_url=container.base_url, timeout=10) as http:
        page = http.get("/demo")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assets = re.findall(r'(?:src|href)="([^"]*demo/assets/[^"]+)"', page.text)
        assert assets, page.text[:500]
        for asset in assets:
            assert http.get(page.url.join(asset)).status_code == 200, asset


def test_runs_as_uid_10001_not_root(image: Image, container: Container):
    assert image.inspect("{{.Config.User}}").split(":")[0] == "10001"
    ids = container.exec("id", "-u")
    assert ids.stdout.strip() == "10001", ids.stderr


def test_healthcheck_is_in_the_image_and_passes(image: Image, container: Container):
    healthcheck = json.loads(image.inspect("{{json .Config.Healthcheck}}"))
    assert healthcheck["Test"] == ["CMD", "python", "-m", "app.probe"]
    if Path(image.engine).name == "podman":
        assert image.run("healthcheck", "run", container.id, check=False).returncode == 0
    probe = container.exec(*healthcheck["Test"][1:])
    assert probe.returncode == 0, probe.stdout + probe.stderr


def test_neither_torch_nor_the_training_code_is_in_the_image(container: Container):
    for module in ("torch", "training"):
        result = container.exec("python", "-c", f"import {module}")
        assert result.returncode != 0 and f"No module named '{module}'" in result.stderr, result.stderr


def test_the_app_is_installed_once_in_site_packages(container: Container):
    located = container.exec("python", "-c", "import app, sysconfig; print(app.__file__); "
                             "print(sysconfig.get_paths()['purelib'])")
    app_file, site_packages = located.stdout.split()
    assert app_file == f"{site_packages}/app/__init__.py"
    copies = container.exec("find", "/", "-xdev", "-name", "scheduler.py", "-path", "*app*")
    assert copies.stdout.split() == [f"{site_packages}/app/scheduler.py"], copies.stdout


def test_sigterm_exits_0_within_the_grace_period(image: Image, container: Container):
    """Last: it stops the module's container."""
    grace = Settings.model_fields["shutdown_grace_seconds"].default
    started = time.monotonic()
    image.run("kill", "--signal", "TERM", container.id)
    exit_code = image.run("wait", container.id, timeout=grace + 30).stdout.strip().splitlines()[-1]
    seconds = time.monotonic() - started
    summary(sigterm_exit_seconds=round(seconds, 1))
    logs = image.run("logs", container.id, check=False)
    assert exit_code == "0", logs.stdout + logs.stderr
    assert seconds < grace, seconds
