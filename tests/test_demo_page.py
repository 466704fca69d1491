"""The demo page's routes, without a browser: /demo is HTML under a strict Content-Security-Policy,
/ redirects to it, its two assets are served (nothing else under /demo/assets), it is public while API
keys are required, it is off with LSTM_SERVE_DEMO=false, and the serving install ships its files.
The page itself is driven in a real browser by tests/test_demo_browser.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO, tiny_settings
from starlette.testclient import TestClient

from app.config import Settings
from app.main import create_app

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PAGE_FILES = ("index.html", "demo.js", "demo.css")
ASSET_REFERENCE = re.compile(r"""<(?:script|link)\b[^>]*\b(?:src|href)="([^"]+)\"""")


def test_demo_page_is_html_under_a_strict_content_security_policy(client):
    response = client.get("/demo")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == CSP
    assert response.headers["cache-control"] == "no-cache"
    assert "<title>lstm-serve demo</title>" in response.text


def test_root_redirects_to_the_demo_page(client):
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"] == "/demo"


def test_demo_page_loads_only_its_own_script_and_stylesheet(client):
    html = client.get("/demo").text
    assert "http://" not in html and "https://" not in html
    # The policy forbids inline code and styles; the page must not need them.
    assert re.search(r"<script\b[^>]*>\s*[^<\s]", html) is None
    assert "<style" not in html and " style=" not in html
    assert re.search(r"\son[a-z]+=", html) is None  # no inline event handlers
    references = ASSET_REFERENCE.findall(html)
    assert set(references) == {"demo/assets/demo.js", "demo/assets/demo.css", "data:,"}
    script = client.get("/demo/assets/demo.js")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert script.text.startswith('"use strict";')
    stylesheet = client.get("/demo/assets/demo.css")
    assert stylesheet.status_code == 200
    assert stylesheet.headers["content-type"] == "text/css; charset=utf-8"


def test_nothing_else_is_served_under_the_assets_path(client):
    for path in ("/demo/assets/index.html", "/demo/assets/missing.js", "/demo/assets/..%2Fdemo.py"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_demo_script_never_parses_text_as_html():
    script = (REPO / "app" / "static" / "demo" / "demo.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink


def test_demo_routes_are_not_in_the_openapi_schema(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert not {"/", "/demo", "/demo/assets/{name}"} & set(paths)


def test_demo_page_stays_public_while_api_keys_are_required(tiny_store):
    app = create_app(tiny_settings(tiny_store, api_keys="demo-key"))
    with TestClient(app, raise_server_exceptions=False) as client:  # no need for the models to load
        assert client.get("/demo").status_code == 200
        assert client.get("/demo/assets/demo.js").status_code == 200
        assert client.post("/score", json={"text": "the"}).status_code == 401


def test_demo_can_be_turned_off(tiny_store, monkeypatch):
    monkeypatch.setenv("LSTM_SERVE_DEMO", "false")
    assert Settings().demo is False
    client = TestClient(create_app(tiny_settings(tiny_store, demo=False)), raise_server_exceptions=False)
    for path in ("/demo", "/", "/demo/assets/demo.js"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


def test_serving_install_ships_the_demo_page(tmp_path):
    """The wheel `pip install .` builds (make serve, the Dockerfile) holds the page's files."""
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    shutil.copytree(REPO / "app", source / "app", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
               "--wheel-dir", str(tmp_path / "wheel"), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"app/static/demo/{name}" for name in PAGE_FILES} <= names
