"""The demo page in a real headless browser: Chromium driven by playwright, against ``python -m app``
serving the shipped models. Every panel answers; errors (a text over the limit, a service that wants
a key, a network failure) are shown in plain words; the page fits a phone; and no request leaves the
service's origin and no console error or page error occurs in any test. Screenshots go to
``test-artifacts/demo/`` (not committed)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import REPO

from bench.servers import running

INSTALL = "apt-get install -y chromium && pip install playwright"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason=f"the playwright package is missing ({INSTALL})")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} ({INSTALL})", allow_module_level=True)
expect = sync_api.expect

STORE = REPO / "model_store"
ARTIFACTS = REPO / "test-artifacts" / "demo"
WAIT_MS = 15_000
API_KEY = "demo-browser-test-key"
DESKTOP = {"width": 1200, "height": 900}
PHONE = {"width": 375, "height": 812}
SUGGESTION_WORDS = "#type-ahead-suggestions .word"

# Test instrumentation, injected by the browser (not subject to the page's CSP): the /generate
# stream reaches the page one event every 150 ms, so a test can press Stop while it runs.
SLOW_GENERATE_STREAM = """
const realFetch = window.fetch;
window.fetch = async (...args) => {
  const response = await realFetch(...args);
  if (!String(args[0]).endsWith("generate") || !response.body) return response;
  const decoder = new TextDecoder(), encoder = new TextEncoder();
  const slow = new TransformStream({
    async transform(chunk, controller) {
      for (const piece of decoder.decode(chunk, {stream: true}).split(/(?<=\\n\\n)/)) {
        await new Promise((resolve) => setTimeout(resolve, 150));
        controller.enqueue(encoder.encode(piece));
      }
    },
  });
  return new Response(response.body.pipeThrough(slow), {status: response.status, headers: response.headers});
};
"""


@pytest.fixture(scope="module")
def service() -> Iterator[str]:
    with running("app", STORE, {"LSTM_SERVE_INTRA_OP_THREADS": "1"}, timeout=300) as server:
        yield server.base_url


@pytest.fixture(scope="module")
def keyed_service() -> Iterator[str]:
    env = {"LSTM_SERVE_INTRA_OP_THREADS": "1", "LSTM_SERVE_API_KEYS": API_KEY}
    with running("app", STORE, env, timeout=300) as server:
        yield server.base_url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


class DemoPage:
    """One page of the demo, with every request URL, console error and page error it produced."""

    def __init__(self, page, base_url: str):
        self.page = page
        self.base_url = base_url
        self.requests: list = []
        self.problems: list[str] = []
        self.expected_console_errors: list[str] = []
        page.on("request", lambda request: self.requests.append(request))
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))

    def _console(self, message) -> None:
        if message.type == "error" and not any(re.search(p, message.text) for p in self.expected_console_errors):
            self.problems.append(f"console error: {message.text}")

    def expect_failed_requests(self, *statuses: int) -> None:
        """The browser logs each non-2xx answer to the console; these ones are the test's point."""
        self.expected_console_errors += [rf"Failed to load resource: the server responded with a status of {s}\b"
                                         for s in statuses]

    def open(self) -> None:
        self.page.goto(f"{self.base_url}/demo")
        # Loaded: the language-model picker has been filled from GET /models.
        expect(self.page.locator("#lm-model option[value='ptb-lm']")).to_have_count(1, timeout=WAIT_MS)

    def words(self) -> list[str]:
        return self.page.locator(SUGGESTION_WORDS).all_text_contents()

    def wait_for_words(self, predicate: str) -> list[str]:
        """Waits until the suggestions are non-empty and ``words.every(word => predicate)`` holds."""
        self.page.wait_for_function(
            f"() => {{ const words = [...document.querySelectorAll('{SUGGESTION_WORDS}')].map(e => e.textContent);"
            f" return words.length > 0 && words.every(word => {predicate}); }}", timeout=WAIT_MS)
        return self.words()

    def posted(self, path: str) -> list[dict]:
        """Bodies of the page's POSTs to ``path``, in order."""
        return [r.post_data_json for r in self.requests if r.method == "POST" and r.url == f"{self.base_url}{path}"]

    def assert_clean(self) -> None:
        assert self.problems == []
        assert self.requests, "the page made no request"
        for request in self.requests:
            assert request.url.startswith(f"{self.base_url}/"), request.url


@contextmanager
def demo_page(browser, base_url: str, name: str, viewport: dict | None = None,
              init_script: str | None = None) -> Iterator[DemoPage]:
    context = browser.new_context(viewport=viewport or DESKTOP)
    if init_script:
        context.add_init_script(init_script)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    demo = DemoPage(page, base_url)
    try:
        yield demo
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    finally:
        context.close()
    demo.assert_clean()


@pytest.fixture
def demo(browser, service, request) -> Iterator[DemoPage]:
    with demo_page(browser, service, request.node.name) as page:
        page.open()
        yield page


def api(base_url: str, path: str, body: dict, **headers: str) -> dict:
    response = httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_page_loads_accessible_and_fills_the_model_pickers(demo, service):
    page = demo.page
    models = httpx.get(f"{service}/models", timeout=10).json()["models"]
    for select, task in (("#lm-model", "language-model"), ("#sentiment-model", "sentiment")):
        expected = []
        for model in (m for m in models if m["task"] == task):
            expected += [model["name"]] + [f"{model['name']}@{v['version']}" for v in model["versions"]]
        assert page.locator(f"{select} option").evaluate_all("options => options.map(o => o.value)") == expected
        assert page.locator(select).input_value() == expected[0]
    expect(page.locator("#lm-model-info")).to_contain_text("test perplexity")

    # Every control has a label, every panel a heading, an alert area and a live result region.
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(control => control.labels.length === 0).map(control => control.id)""")
    assert unlabelled == []
    for panel in page.locator("main section").all():
        assert panel.locator("h2").count() == 1
        assert panel.locator("[role=alert]").count() == 1
        assert panel.locator("[aria-live=polite]").count() >= 1

    # Keyboard focus is visible: from the key field, Tab reaches the type-ahead text.
    page.focus("#api-key")
    page.keyboard.press("Tab")
    focused = page.evaluate("() => [document.activeElement.id, getComputedStyle(document.activeElement).outlineStyle,"
                            " parseFloat(getComputedStyle(document.activeElement).outlineWidth)]")
    assert focused[0] == "type-ahead-text" and focused[1] != "none" and focused[2] >= 2


def test_typing_mid_word_shows_completions_of_that_word(demo):
    page = demo.page
    page.locator("#type-ahead-text").press_sequentially("the stock mar", delay=30)
    words = demo.wait_for_words("word.startsWith('mar')")
    assert "market" in words
    meta = page.locator("#type-ahead-meta")
    expect(meta).to_contain_text("Completing “mar”")
    assert re.search(r"\d+ ms round trip", meta.text_content())
    assert demo.posted("/predict-next")[-1] == {"text": "the stock mar", "top_k": 8, "complete_last_word": True,
                                                "model": "ptb-lm"}
    # The bar's width is the word's probability, which is also written out.
    first = page.locator("#type-ahead-suggestions li").first
    width = first.locator(".bar-fill").evaluate("fill => fill.getBoundingClientRect().width")
    track = first.locator(".bar").evaluate("bar => bar.getBoundingClientRect().width")
    shown = float(first.locator(".percent").text_content().rstrip("%")) / 100
    assert width / track == pytest.approx(shown, abs=0.01)


def test_after_a_space_suggestions_are_next_words(demo, service):
    page = demo.page
    page.locator("#type-ahead-text").press_sequentially("the company said it ", delay=30)
    expected = api(service, "/predict-next", {"text": "the company said it ", "top_k": 8, "complete_last_word": True})
    assert expected["completion"] is None
    words = [p["word"] for p in expected["predictions"]]
    page.wait_for_function(f"words => JSON.stringify([...document.querySelectorAll('{SUGGESTION_WORDS}')]"
                           ".map(e => e.textContent)) === JSON.stringify(words)", arg=words, timeout=WAIT_MS)
    expect(page.locator("#type-ahead-meta")).to_contain_text("Next word")


def test_tab_accepts_the_first_suggestion_and_clicking_accepts_any(demo):
    page = demo.page
    text = page.locator("#type-ahead-text")
    text.press_sequentially("the stock mar", delay=30)
    first = demo.wait_for_words("word.startsWith('mar')")[0]
    text.press("Tab")
    assert text.input_value() == f"the stock {first} "
    assert page.evaluate("() => document.activeElement.id") == "type-ahead-text"
    expect(page.locator("#type-ahead-meta")).to_contain_text("Next word", timeout=WAIT_MS)
    # After a space the service was asked for next words, with the accepted word in the context.
    page.wait_for_function(f"() => document.querySelector('{SUGGESTION_WORDS}') !== null")
    second = page.locator("#type-ahead-suggestions button").nth(1)
    word = second.locator(".word").text_content()
    second.click()
    assert text.input_value() == f"the stock {first} {word} "

    # Esc hides the suggestions; Tab then moves on instead of accepting.
    demo.wait_for_words("true")
    text.press("Escape")
    expect(page.locator(SUGGESTION_WORDS)).to_have_count(0)
    text.press("Tab")
    assert text.input_value() == f"the stock {first} {word} "
    assert page.evaluate("() => document.activeElement.id") != "type-ahead-text"


def test_scoring_a_sentence_colours_each_token_by_surprisal(demo, service):
    page = demo.page
    sentence = "The stock market fell sharply today."
    page.fill("#scorer-text", sentence)
    page.click("#scorer button[type=submit]")
    tokens = page.locator("#scorer-tokens li")
    expected = api(service, "/score", {"text": sentence})["results"][0]
    expect(tokens).to_have_count(len(expected["token_log_probs"]))
    expect(page.locator("#scorer-summary")).to_contain_text(f"Perplexity {expected['perplexity']:.1f}")
    for token, scored in zip(tokens.all(), expected["token_log_probs"], strict=True):
        surprisal = -scored["log_prob"]
        level = sum(surprisal >= limit for limit in (2, 4, 6, 8))
        assert token.evaluate("li => li.firstChild.textContent") == scored["token"]
        assert token.get_attribute("class") == f"token s{level}"
        assert f"log p = {scored['log_prob']:.3f}" in token.get_attribute("title")
        assert f"log-probability {scored['log_prob']:.2f}" in token.locator(".visually-hidden").text_content()
    assert expected["token_log_probs"][-1]["token"] == "<eos>"
    # Five colours, one per surprisal band, as the legend says.
    colours = {page.locator(f".legend .s{level}").evaluate("s => getComputedStyle(s).backgroundColor")
               for level in range(5)}
    assert len(colours) == 5


def test_n_best_hypotheses_are_ranked_best_first_and_shown_as_text(demo, service):
    page = demo.page
    lines = ["the stuck rose five per cent", "<b>the</b> stock rows five percent", "the stock rose five percent"]
    page.fill("#nbest-text", "\n".join(lines) + "\n\n")
    page.click("#nbest button[type=submit]")
    items = page.locator("#nbest-ranking li")
    expect(items).to_have_count(3)
    expected = api(service, "/score", {"texts": lines, "rank": True})
    assert demo.posted("/score")[-1] == {"texts": lines, "rank": True, "model": "ptb-lm"}
    shown = items.locator(".hypothesis").evaluate_all("spans => spans.map(s => s.firstChild.textContent)")
    assert shown == [lines[i] for i in expected["ranking"]]
    assert shown[0] == "the stock rose five percent"
    expect(items.first).to_have_class("best")
    expect(items.first.locator(".badge")).to_have_text("best")
    best = expected["results"][expected["ranking"][0]]
    expect(items.first.locator(".numbers")).to_have_text(
        f"log-prob {best['total_log_prob']:.2f} · perplexity {best['perplexity']:.1f}")
    assert page.locator("#nbest-ranking b").count() == 0  # the user's text was not parsed as HTML


def test_sentiment_shows_the_label_and_a_bar_per_label(demo, service):
    page = demo.page
    text = "Dull, tedious and far too long."
    page.fill("#sentiment-text", text)
    page.click("#sentiment button[type=submit]")
    expected = api(service, "/sentiment", {"text": text})
    result = expected["results"][0]
    assert result["label"] == "negative"
    expect(page.locator("#sentiment-verdict")).to_contain_text("Negative")
    bars = page.locator("#sentiment-bars li")
    expect(bars).to_have_count(len(expected["labels"]))
    assert bars.locator(".name").all_text_contents() == expected["labels"]
    expect(page.locator("#sentiment-bars li.chosen .name")).to_have_text("negative")
    assert demo.posted("/sentiment")[-1] == {"text": text, "model": "sst2-sentiment"}


def test_generation_streams_tokens_and_finishes(demo, service):
    page = demo.page
    page.fill("#generate-prompt", "the company said")
    page.fill("#generate-max-tokens", "12")
    page.fill("#generate-seed", "7")
    page.locator("#generate-temperature").fill("0.8")
    expect(page.locator("#generate-temperature-value")).to_have_text("0.80")
    with page.expect_response(f"{service}/generate") as answer:
        page.click("#generate-start")
    assert answer.value.headers["content-type"].startswith("text/event-stream")
    expect(page.locator("#generate-meta")).to_contain_text("Done:", timeout=WAIT_MS)
    body = {"text": "the company said", "temperature": 0.8, "stream": True, "max_tokens": 12, "seed": 7,
            "model": "ptb-lm"}
    assert demo.posted("/generate")[-1] == body
    # The same request unstreamed writes the same tokens (same seed).
    sample = api(service, "/generate", {**body, "stream": False})["samples"][0]
    shown = page.locator("#generate-output span:not(.prompt)").all_text_contents()
    assert [token.strip() for token in shown] == sample["tokens"]
    expect(page.locator("#generate-output .prompt")).to_have_text("the company said")
    expect(page.locator("#generate-meta")).to_contain_text(f"{len(sample['tokens'])} tokens")
    expect(page.locator("#generate-meta")).to_contain_text("seed 7")
    expect(page.locator("#generate-stop")).to_be_disabled()


def test_the_largest_seed_is_sent_and_shown_exactly(demo):
    """The service's seeds stop at 2^53 - 1, the largest integer a JavaScript number holds exactly."""
    page = demo.page
    seed = 2**53 - 1
    page.fill("#generate-max-tokens", "3")
    page.fill("#generate-seed", str(seed))
    page.click("#generate-start")
    expect(page.locator("#generate-meta")).to_contain_text(f"seed {seed} ·", timeout=WAIT_MS)
    assert demo.posted("/generate")[-1]["seed"] == seed


def test_stop_aborts_a_streaming_generation(browser, service, request):
    with demo_page(browser, service, request.node.name, init_script=SLOW_GENERATE_STREAM) as demo:
        page = demo.page
        demo.open()
        page.fill("#generate-max-tokens", "200")
        page.click("#generate-start")
        expect(page.locator("#generate-output span:not(.prompt)").first).to_be_attached()
        # Tokens arrive one by one: the first is shown while the generation still runs.
        expect(page.locator("#generate-meta")).to_have_text("Generating…")
        page.click("#generate-stop")
        expect(page.locator("#generate-meta")).to_have_text("Stopped.")
        assert page.locator("#generate-output span:not(.prompt)").count() < 200
        expect(page.locator("#generate-start")).to_be_enabled()
        expect(page.locator("#generate [role=alert]")).to_have_text("")


def test_api_errors_are_shown_in_plain_words(demo):
    page = demo.page
    demo.expect_failed_requests(422)
    page.fill("#scorer-text", "word " * 500)  # 2500 characters: over the 2000-character limit
    page.click("#scorer button[type=submit]")
    alert = page.locator("#scorer [role=alert]")
    expect(alert).to_contain_text("at most 2000 characters")
    expect(alert).to_contain_text("validation_error, HTTP 422")

    demo.expected_console_errors.append(r"net::ERR_FAILED")
    page.route("**/sentiment", lambda route: route.abort())
    page.click("#sentiment button[type=submit]")
    expect(page.locator("#sentiment [role=alert]")).to_contain_text("Could not reach the service")

    # A good request clears the panel's error.
    page.fill("#scorer-text", "the stock fell")
    page.click("#scorer button[type=submit]")
    expect(alert).to_have_text("")
    expect(page.locator("#scorer-summary")).to_contain_text("Perplexity")


def test_a_service_that_requires_keys_asks_for_one_and_accepts_it(browser, keyed_service, request):
    with demo_page(browser, keyed_service, request.node.name) as demo:
        page = demo.page
        demo.expect_failed_requests(401)
        demo.open()  # GET /models stays open, so the pickers fill without a key
        expect(page.locator("#type-ahead [role=alert]")).to_contain_text("unauthorized")
        page.click("#scorer button[type=submit]")
        alert = page.locator("#scorer [role=alert]")
        expect(alert).to_contain_text("Send a key as 'Authorization: Bearer <key>' (unauthorized, HTTP 401)")
        expect(alert).to_contain_text("Enter an API key")

        page.fill("#api-key", API_KEY)
        page.click("#scorer button[type=submit]")
        expect(page.locator("#scorer-summary")).to_contain_text("Perplexity")
        expect(alert).to_have_text("")
        scored = [r for r in demo.requests if r.url == f"{keyed_service}/score"]
        assert scored[-1].headers["authorization"] == f"Bearer {API_KEY}"
        # Changing the key refreshed the type-ahead panel, which now answers.
        expect(page.locator("#type-ahead [role=alert]")).to_have_text("")
        assert demo.wait_for_words("true")


def fill_every_panel(demo: DemoPage) -> None:
    """Real answers in every panel, as in the README's screenshot."""
    page = demo.page
    page.locator("#type-ahead-text").press_sequentially("The stock mar", delay=30)
    demo.wait_for_words("word.startsWith('mar')")
    for panel in ("scorer", "nbest", "sentiment"):
        page.click(f"#{panel} button[type=submit]")
    page.locator("#generate-temperature").fill("0.8")
    page.fill("#generate-seed", "6")
    page.click("#generate-start")
    expect(page.locator("#generate-meta")).to_contain_text("Done:", timeout=WAIT_MS)
    expect(page.locator("#scorer-summary")).to_contain_text("Perplexity")
    expect(page.locator("#nbest-ranking li")).to_have_count(3)
    expect(page.locator("#sentiment-verdict")).to_contain_text("Positive")


def test_every_panel_answers_on_a_laptop_screen(demo):
    fill_every_panel(demo)
    for panel in demo.page.locator("main section").all():
        expect(panel.locator("[role=alert]")).to_have_text("")


def test_page_fits_a_phone_screen(browser, service, request):
    with demo_page(browser, service, request.node.name, viewport=PHONE) as demo:
        demo.open()
        fill_every_panel(demo)
        widths = demo.page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert widths == [PHONE["width"], PHONE["width"]]  # no sideways scrolling
        for panel in demo.page.locator("main section").all():
            box = panel.bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]


def test_keys_typed_into_the_page_are_not_stored(browser, service, request):
    with demo_page(browser, service, request.node.name) as demo:
        demo.open()
        demo.page.fill("#api-key", "a-key-the-page-must-not-keep")
        storage = demo.page.evaluate("() => JSON.stringify([localStorage, sessionStorage, document.cookie])")
        assert "a-key" not in storage
        assert json.loads(storage) == [{}, {}, ""]
