"""Access control: API keys on the inference endpoints (from the environment or a file of SHA-256
digests), refused with 401 in the error envelope before the body is read; health open; the docs and
/metrics switches; the metrics token; the admin token kept apart."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import tiny_settings, wait_until_ready
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from app.auth import BearerKeys, read_key_hashes
from app.config import Settings
from app.main import create_app

KEYS = ("alpha-key-0123", "beta-key-4567")
METRICS_TOKEN = "metrics-token-89"
ADMIN_TOKEN = "admin-token-xyz"
REALM = 'Bearer realm="lstm-serve"'
INFERENCE = [
    ("/predict-next", {"text": "the company"}),
    ("/score", {"text": "the stock fell"}),
    ("/sentiment", {"text": "a witty film"}),
]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def keyed(tiny_store: Path):
    """Keys, a metrics token and an admin token, all set; models loaded."""
    settings = tiny_settings(tiny_store, rescan_seconds=0, api_keys=",".join(KEYS), metrics_token=METRICS_TOKEN,
                             admin_token=ADMIN_TOKEN)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        wait_until_ready(client)
        yield client


def assert_unauthorized(response, realm: str = REALM) -> None:
    assert response.status_code == 401
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == "unauthorized"
    assert body["error"]["details"] is None
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert response.headers["WWW-Authenticate"].startswith(realm)


def samples(client: TestClient, name: str, headers: dict[str, str] | None = None) -> dict[tuple, float]:
    text = client.get("/metrics", headers=headers).text
    return {tuple(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize(("path", "body"), INFERENCE)
def test_every_configured_key_opens_every_inference_endpoint(keyed, path, body, key):
    assert keyed.post(path, json=body, headers=bearer(key)).status_code == 200


@pytest.mark.parametrize(("path", "body"), INFERENCE)
@pytest.mark.parametrize("authorization", [
    None,                       # missing
    f"Basic {KEYS[0]}",         # another scheme
    "Bearer",                   # no token
    "Bearer    ",
    KEYS[0],                    # no scheme
    "Bearer wrong-key",
    f"Bearer {KEYS[0]}x",       # one of the keys with a byte more
    f"Bearer {KEYS[0][:-1]}",   # and with a byte less
    f"Bearer {ADMIN_TOKEN}",
    f"Bearer {METRICS_TOKEN}",
])
def test_missing_malformed_or_wrong_key_is_401_in_the_error_envelope(keyed, path, body, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    assert_unauthorized(keyed.post(path, json=body, headers=headers))


def test_a_wrong_key_is_named_invalid_token_and_a_missing_one_is_not(keyed):
    missing = keyed.post("/score", json={"text": "the"})
    wrong = keyed.post("/score", json={"text": "the"}, headers=bearer("nope"))
    assert missing.headers["WWW-Authenticate"] == REALM
    assert wrong.headers["WWW-Authenticate"] == f'{REALM}, error="invalid_token"'


def test_the_scheme_is_case_insensitive(keyed):
    response = keyed.post("/score", json={"text": "the"}, headers={"Authorization": f"bearer {KEYS[1]}"})
    assert response.status_code == 200


def test_the_key_is_checked_before_the_body_is_read_or_any_model_runs(tiny_store):
    settings = tiny_settings(tiny_store, rescan_seconds=0, api_keys=KEYS[0], max_body_bytes=1024)
    with TestClient(create_app(settings)) as client:
        wait_until_ready(client)
        model_calls = samples(client, "lstm_serve_inference_duration_seconds_count")  # self-test and warm-up
        not_json = client.post("/score", content=b"text=the", headers={"Content-Type": "text/plain"})
        broken = client.post("/score", content=b"{not json", headers={"Content-Type": "application/json"})
        too_large = client.post("/score", content=b"x" * 4096, headers={"Content-Type": "application/json"})
        for response in (not_json, broken, too_large):  # 415, 422 and 413 with a key
            assert_unauthorized(response)
        assert client.post("/score", content=b"x" * 4096, headers=bearer(KEYS[0])).status_code == 413
        requests = samples(client, "lstm_serve_http_requests_total")
        assert requests[(("endpoint", "/score"), ("method", "POST"), ("status", "401"))] == 3
        assert samples(client, "lstm_serve_inference_duration_seconds_count") == model_calls


def test_keys_from_the_environment(tiny_store, monkeypatch):
    monkeypatch.setenv("LSTM_SERVE_API_KEYS", f" {KEYS[0]} ,, {KEYS[1]} ")
    with TestClient(create_app(Settings(model_store=tiny_store, intra_op_threads=1, rescan_seconds=0))) as client:
        wait_until_ready(client)
        assert_unauthorized(client.post("/score", json={"text": "the"}))
        for key in KEYS:  # spaces around a key and empty entries are dropped
            assert client.post("/score", json={"text": "the"}, headers=bearer(key)).status_code == 200


def test_keys_from_a_file_of_sha256_digests(tiny_store, tmp_path, monkeypatch):
    hashes = tmp_path / "api-keys.sha256"
    hashes.write_text(f"# clients of the service\n\n{sha256_hex(KEYS[0])}  # billing\n"
                      f"   {sha256_hex(KEYS[1]).upper()}\n")
    monkeypatch.setenv("LSTM_SERVE_API_KEY_HASHES_FILE", str(hashes))
    with TestClient(create_app(Settings(model_store=tiny_store, intra_op_threads=1, rescan_seconds=0))) as client:
        wait_until_ready(client)
        for key in KEYS:
            assert client.post("/score", json={"text": "the"}, headers=bearer(key)).status_code == 200
        assert_unauthorized(client.post("/score", json={"text": "the"}, headers=bearer(sha256_hex(KEYS[0]))))
        assert_unauthorized(client.post("/score", json={"text": "the"}))


def test_keys_from_the_environment_and_a_file_add_up(tiny_store, tmp_path):
    hashes = tmp_path / "keys"
    hashes.write_text(sha256_hex(KEYS[1]) + "\n")
    settings = tiny_settings(tiny_store, rescan_seconds=0, api_keys=KEYS[0], api_key_hashes_file=hashes)
    with TestClient(create_app(settings)) as client:
        wait_until_ready(client)
        for key in KEYS:
            assert client.post("/score", json={"text": "the"}, headers=bearer(key)).status_code == 200


def test_a_malformed_hash_file_stops_the_service_naming_the_line(tiny_store, tmp_path):
    hashes = tmp_path / "keys"
    hashes.write_text(f"{sha256_hex(KEYS[0])}\n{KEYS[1]}\n")
    with pytest.raises(ValueError, match="line 2"):
        create_app(tiny_settings(tiny_store, api_key_hashes_file=hashes))
    with pytest.raises(FileNotFoundError):
        create_app(tiny_settings(tiny_store, api_key_hashes_file=tmp_path / "missing"))


def test_keys_that_are_set_but_empty_stop_the_service_rather_than_open_it(tiny_store):
    with pytest.raises(ValueError, match="no key"):
        create_app(tiny_settings(tiny_store, api_keys=" , "))


def test_an_empty_hash_file_refuses_every_key(tiny_store, tmp_path):
    hashes = tmp_path / "keys"
    hashes.write_text("# every key revoked\n")
    client = TestClient(create_app(tiny_settings(tiny_store, api_key_hashes_file=hashes)))
    assert_unauthorized(client.post("/score", json={"text": "the"}, headers=bearer(KEYS[0])))


def test_bearer_keys_accept_exactly_their_keys():
    keys = BearerKeys.of(KEYS)
    assert all(keys.accepts(key) for key in KEYS)
    assert not any(keys.accepts(key) for key in ("", KEYS[0] + " ", KEYS[0].upper(), "alpha"))
    assert not BearerKeys([]).accepts("")


def test_read_key_hashes_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"#{sha256_hex('commented out')}\n\n  {sha256_hex('a')} # a\n")
    assert read_key_hashes(path) == [hashlib.sha256(b"a").digest()]


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/models", "/docs", "/openapi.json"])
def test_health_models_and_docs_stay_open_with_keys(keyed, path):
    assert keyed.get(path).status_code == 200


def test_without_keys_inference_is_open(client):
    assert client.post("/score", json={"text": "the"}).status_code == 200


def test_openapi_documents_the_401_and_with_keys_the_bearer_scheme(keyed, client):
    schema = keyed.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["apiKey"][
            "description"]}
    for path, _ in INFERENCE:
        operation = schema["paths"][path]["post"]
        assert operation["security"] == [{"apiKey": []}]
        assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}
    assert schema["paths"]["/metrics"]["get"]["security"] == [{"metricsToken": []}]
    assert "security" not in schema["paths"]["/health/ready"]["get"]
    assert "security" not in schema["paths"]["/models"]["get"]
    open_schema = client.get("/openapi.json").json()
    assert "securitySchemes" not in open_schema["components"]
    assert "security" not in open_schema["paths"]["/score"]["post"]
    assert "401" in open_schema["paths"]["/score"]["post"]["responses"]


def test_metrics_token_guards_metrics_only(keyed):
    assert_unauthorized(keyed.get("/metrics"), 'Bearer realm="lstm-serve metrics"')
    assert_unauthorized(keyed.get("/metrics", headers=bearer(KEYS[0])), 'Bearer realm="lstm-serve metrics"')
    response = keyed.get("/metrics", headers=bearer(METRICS_TOKEN))
    assert response.status_code == 200 and "lstm_serve_http_requests_total" in response.text
    assert_unauthorized(keyed.post("/score", json={"text": "the"}, headers=bearer(METRICS_TOKEN)))


def test_the_admin_token_stays_separate_from_the_api_keys(keyed):
    assert keyed.get("/admin/models", headers=bearer(ADMIN_TOKEN)).status_code == 200
    refused = keyed.get("/admin/models", headers=bearer(KEYS[0]))
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith('Bearer realm="lstm-serve admin"')
    assert_unauthorized(keyed.post("/score", json={"text": "the"}, headers=bearer(ADMIN_TOKEN)))


def test_docs_can_be_switched_off(tiny_store):
    client = TestClient(create_app(tiny_settings(tiny_store, docs=False)))
    for path in ("/docs", "/redoc", "/openapi.json", "/docs-assets/swagger-ui-bundle.js"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"
    assert client.get("/health/live").status_code == 200


def test_metrics_can_be_switched_off(tiny_store):
    for settings in (tiny_settings(tiny_store, metrics=False),
                     tiny_settings(tiny_store, metrics=False, metrics_token=METRICS_TOKEN)):
        client = TestClient(create_app(settings))
        for headers in ({}, bearer(METRICS_TOKEN)):
            response = client.get("/metrics", headers=headers)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "not_found"
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]
