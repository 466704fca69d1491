"""Bad input: every mistake a client can make gets a 4xx in the one error envelope, with a stable
code, no stack trace, and none of the client's text echoed back."""

from __future__ import annotations

import json

import pytest

from app.config import Settings

DEFAULTS = Settings(intra_op_threads=1)
MARK = "CLIENT-TEXT-MARK"  # appears in the bad requests' texts; must never come back
JSON = {"content-type": "application/json"}


def body(value) -> bytes:
    return json.dumps(value).encode()


# (case id, path, raw body, headers, expected status, expected code)
BAD_INPUTS = [
    ("empty body", "/score", b"", JSON, 422, "validation_error"),
    ("empty object", "/score", b"{}", JSON, 422, "validation_error"),
    ("JSON array instead of object", "/score", body([MARK]), JSON, 422, "validation_error"),
    ("number where a string belongs", "/score", body({"text": 12345}), JSON, 422, "validation_error"),
    ("string where a number belongs", "/predict-next", body({"text": MARK, "top_k": "5"}), JSON, 422,
     "validation_error"),
    ("boolean where a number belongs", "/predict-next", body({"text": MARK, "top_k": True}), JSON, 422,
     "validation_error"),
    ("top_k above 100", "/predict-next", body({"text": MARK, "top_k": 101}), JSON, 422, "validation_error"),
    ("top_k of 0", "/predict-next", body({"text": MARK, "top_k": 0}), JSON, 422, "validation_error"),
    ("null text", "/sentiment", body({"text": None}), JSON, 422, "validation_error"),
    ("both text and texts", "/score", body({"text": MARK, "texts": [MARK]}), JSON, 422, "validation_error"),
    ("empty texts list", "/sentiment", body({"texts": []}), JSON, 422, "validation_error"),
    ("unknown field", "/score", body({"text": MARK, "temperature": 1}), JSON, 422, "validation_error"),
    ("huge text", "/score", body({"text": MARK + "x" * DEFAULTS.max_text_chars}), JSON, 422, "validation_error"),
    ("too many texts", "/sentiment", body({"texts": [MARK] * (DEFAULTS.max_texts + 1)}), JSON, 422,
     "validation_error"),
    ("too many tokens", "/score", body({"text": f"{MARK} " + "the " * DEFAULTS.max_text_tokens}), JSON, 422,
     "too_many_tokens"),
    ("text with no tokens", "/sentiment", body({"text": "   "}), JSON, 422, "empty_text"),
    ("malformed model name", "/score", body({"text": MARK, "model": "../../etc"}), JSON, 422, "validation_error"),
    ("unknown model", "/score", body({"text": MARK, "model": "no-such-model"}), JSON, 404, "model_not_found"),
    ("unknown version", "/score", body({"text": MARK, "model": "tiny-lm@9"}), JSON, 404, "model_not_found"),
    ("model of the wrong task", "/sentiment", body({"text": MARK, "model": "tiny-lm"}), JSON, 422, "wrong_task"),
    ("malformed JSON", "/score", b'{"text": "' + MARK.encode(), JSON, 422, "invalid_json"),
    ("invalid UTF-8", "/score", b'{"text": "' + MARK.encode() + b'\xff\xfe"}', JSON, 422, "invalid_json"),
    ("non-JSON content type", "/score", MARK.encode(), {"content-type": "text/plain"}, 415,
     "unsupported_media_type"),
    ("form content type", "/sentiment", b"text=" + MARK.encode(),
     {"content-type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    ("no content type", "/score", body({"text": MARK}), {}, 415, "unsupported_media_type"),
    ("body over the limit", "/score", body({"text": MARK + "x" * DEFAULTS.max_body_bytes}), JSON, 413,
     "body_too_large"),
]


def assert_envelope(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code
    assert MARK not in response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    return error


@pytest.mark.parametrize(
    ("path", "content", "headers", "status", "code"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_gets_its_status_and_code(client, path, content, headers, status, code):
    response = client.post(path, content=content, headers=headers)
    assert_envelope(response, status, code)


def test_chunked_body_over_the_limit_is_413(client):
    def chunks():
        for _ in range(DEFAULTS.max_body_bytes // 65536 + 2):
            yield b"x" * 65536

    response = client.post("/score", content=chunks(), headers=JSON)
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert_envelope(response, 413, "body_too_large")


def test_validation_errors_name_the_field_and_limit_without_the_value(client):
    response = client.post("/score", json={"text": MARK * 1000})
    error = assert_envelope(response, 422, "validation_error")
    (detail,) = error["details"]["errors"]
    assert detail["loc"] == ["body", "text"]
    assert detail["type"] == "string_too_long"
    assert detail["ctx"] == {"max_length": DEFAULTS.max_text_chars}
    assert "input" not in detail


def test_unknown_model_lists_the_models_that_serve(client):
    response = client.post("/predict-next", json={"model": "nope"})
    error = assert_envelope(response, 404, "model_not_found")
    assert error["details"] == {"available": ["tiny-lm@1"]}


def test_unknown_model_in_models_endpoint_is_404(client):
    assert_envelope(client.get("/models/nope"), 404, "model_not_found")


def test_unknown_path_is_404_in_the_envelope(client):
    assert_envelope(client.get("/nowhere"), 404, "not_found")


def test_wrong_method_is_405_with_allow_header(client):
    response = client.get("/score")
    assert_envelope(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


def test_many_bad_items_give_a_bounded_answer(client):
    response = client.post("/sentiment", json={"texts": [1] * DEFAULTS.max_texts})
    error = assert_envelope(response, 422, "validation_error")
    assert error["details"]["total"] == DEFAULTS.max_texts
    assert len(error["details"]["errors"]) == 20


def test_deeply_nested_json_is_invalid_json_not_a_bare_400(client):
    nested = '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = client.post("/score", content=nested, headers={"content-type": "application/json"})
    assert_envelope(response, 422, "invalid_json")
