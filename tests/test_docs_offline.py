"""/docs and /redoc work without internet: every URL the pages load is served by the service."""

from __future__ import annotations

import re

import pytest

# src="...", href="...", spec-url="..." attributes and Swagger UI's `url: '...'` option
URL_ATTRIBUTE = re.compile(r"""(?:src|href|spec-url)\s*=\s*["']([^"']+)["']|\burl\s*:\s*["']([^"']+)["']""")


def referenced_urls(html: str) -> set[str]:
    return {next(group for group in match.groups() if group) for match in URL_ATTRIBUTE.finditer(html)}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_page_loads_only_assets_the_service_serves(client, page):
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    assert "http://" not in html and "https://" not in html
    urls = referenced_urls(html)
    assert "/openapi.json" in urls
    assert any(url.endswith(".js") for url in urls)
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 0


def test_swagger_ui_assets_have_the_right_types(client):
    assert client.get("/docs-assets/swagger-ui-bundle.js").headers["content-type"].startswith(
        ("application/javascript", "text/javascript")
    )
    assert client.get("/docs-assets/swagger-ui.css").headers["content-type"].startswith("text/css")
    assert client.get("/docs-assets/redoc.standalone.js").status_code == 200


def test_every_operation_documents_an_example(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            ok = operation["responses"]["200"]["content"]
            media = next(iter(ok.values()))
            ref = media.get("schema", {}).get("$ref", "")
            example = media.get("example") or schemas.get(ref.rsplit("/", 1)[-1], {}).get("examples")
            assert example, f"{method.upper()} {path} has no response example"
            if "requestBody" in operation:
                ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert schemas[ref.rsplit("/", 1)[-1]].get("examples"), f"{method.upper()} {path} request"


def test_limits_are_published_in_the_schema(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    texts = schemas["ScoreRequest"]["properties"]["texts"]
    assert texts["maxItems"] == 64 and texts["items"]["maxLength"] == 2000
    assert "256 tokens" in texts["description"]
    assert schemas["PredictNextRequest"]["properties"]["top_k"]["maximum"] == 100
