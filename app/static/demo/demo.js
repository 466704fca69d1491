"use strict";

/*
 * lstm-serve demo page. Each panel calls one endpoint of this service (relative URLs, so the page
 * works under any root path) and renders the answer with createElement and textContent only: model
 * output and user text are never parsed as HTML.
 */

const TYPE_AHEAD_DEBOUNCE_MS = 150;
const TYPE_AHEAD_TOP_K = 8;
// Surprisal (-log p, nats) thresholds of the scorer's colour classes s0 (below 2) ... s4 (8 and up).
const SURPRISAL_STEPS = [2, 4, 6, 8];
const FINISH_REASONS = {
  eos: "end of sentence",
  stop: "stop word reached",
  length: "max tokens reached",
};
// What to do about an error, where the service's message does not say.
const ERROR_HINTS = {
  unauthorized: "Enter an API key under “Models and access”.",
  model_not_found: "Pick another model under “Models and access”.",
  model_unavailable: "Pick another model under “Models and access”.",
  overloaded: "The service is busy; try again in a moment.",
  not_ready: "The models are still loading; try again in a moment.",
};

const byId = (id) => document.getElementById(id);

// ---------------------------------------------------------------- talking to the service

class ApiError extends Error {
  constructor(status, code, message, details = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

function apiKeyHeaders() {
  const key = byId("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** fetch() that turns a network failure or a non-2xx answer into an ApiError (AbortError passes through). */
async function request(path, init = {}) {
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network_error", "could not reach the service; check that it is running");
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

/** POSTs `body`: an object, or JSON already written. */
function post(path, body, signal) {
  return request(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json", ...apiKeyHeaders() },
    body: typeof body === "string" ? body : JSON.stringify(body),
    signal,
  });
}

async function postJSON(path, body, signal) {
  return (await post(path, body, signal)).json();
}

async function errorFrom(response) {
  let envelope = null;
  try {
    envelope = (await response.json()).error;
  } catch {
    // not JSON: described by its status below
  }
  return envelope && typeof envelope.message === "string"
    ? new ApiError(response.status, envelope.code, envelope.message, envelope.details)
    : new ApiError(response.status, "http_error", `the service answered HTTP ${response.status}`);
}

/** The body with the model picked in `selectId`, if one is picked (else the service's default). */
function withModel(body, selectId) {
  const model = byId(selectId).value;
  return model ? { ...body, model } : body;
}

// ---------------------------------------------------------------- errors in plain words

function describe(error) {
  if (!(error instanceof ApiError)) return `The page failed: ${error.message}`;
  let text = capitalise(error.message);
  const first = error.details && Array.isArray(error.details.errors) ? error.details.errors[0] : null;
  if (first && typeof first.msg === "string") {
    const where = (first.loc || []).filter((part) => part !== "body").join(" → ");
    text += `: ${where ? `${where}: ` : ""}${first.msg}`;
  }
  const status = error.status ? `, HTTP ${error.status}` : "";
  const hint = ERROR_HINTS[error.code];
  return `${text} (${error.code}${status}).${hint ? ` ${hint}` : ""}`;
}

function showError(panel, error) {
  panel.querySelector(".error").textContent = describe(error);
}

function clearError(panel) {
  panel.querySelector(".error").textContent = "";
}

/** Runs `work` with the panel's submit button disabled; shows what it throws in the panel. */
async function whileBusy(panel, work) {
  const button = panel.querySelector("button[type=submit]");
  button.disabled = true;
  clearError(panel);
  try {
    await work();
  } catch (error) {
    showError(panel, error);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- building the page

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function bar(probability) {
  const track = element("span", "bar");
  track.setAttribute("aria-hidden", "true");
  const fill = element("span", "bar-fill");
  fill.style.width = `${Math.min(100, Math.max(0, probability * 100))}%`;
  track.append(fill);
  return track;
}

function capitalise(text) {
  return text ? text[0].toUpperCase() + text.slice(1) : text;
}

function percent(probability) {
  const value = probability * 100;
  if (value > 0 && value < 0.01) return "<0.01%";
  return `${value.toFixed(value < 10 ? 2 : 1)}%`;
}

function submitOnCtrlEnter(textarea) {
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      textarea.form.requestSubmit();
    }
  });
}

// ---------------------------------------------------------------- models and access

async function loadModels() {
  const panel = byId("models");
  try {
    const response = await request("models", { headers: { Accept: "application/json" } });
    const { models } = await response.json();
    fillModelSelect(byId("lm-model"), models.filter((model) => model.task === "language-model"));
    fillModelSelect(byId("sentiment-model"), models.filter((model) => model.task === "sentiment"));
  } catch (error) {
    showError(panel, error);
  }
}

/** Options: each model's name (its default version) and each of its versions as name@version. */
function fillModelSelect(select, models) {
  const options = [];
  const info = new Map();
  for (const model of models) {
    const group = element("optgroup");
    group.label = model.name;
    const byDefault = model.versions.find((v) => v.version === model.default_version);
    const name = element("option", "", `${model.name} (default${byDefault ? `: v${byDefault.version}` : ""})`);
    name.value = model.name;
    name.disabled = model.default_version === null;
    group.append(name);
    info.set(model.name, byDefault);
    for (const version of model.versions) {
      const serving = version.state === "serving";
      const option = element("option", "", `${model.name} v${version.version}${serving ? "" : ` (${version.state})`}`);
      option.value = `${model.name}@${version.version}`;
      option.disabled = !serving;
      group.append(option);
      info.set(option.value, version);
    }
    options.push(group);
  }
  if (options.length === 0) return; // keep "Service default"
  select.replaceChildren(...options);
  const first = select.querySelector("option:not(:disabled)");
  if (first) select.value = first.value;
  const describeSelected = () => {
    byId(select.getAttribute("aria-describedby")).textContent = versionSummary(info.get(select.value));
  };
  select.addEventListener("change", describeSelected);
  describeSelected();
}

function versionSummary(version) {
  if (!version) return "";
  const parts = [];
  if (version.description) parts.push(version.description);
  const test = version.metrics && version.metrics.test;
  if (test && typeof test.perplexity === "number") parts.push(`test perplexity ${test.perplexity.toFixed(2)}`);
  if (test && typeof test.accuracy === "number") parts.push(`test accuracy ${percent(test.accuracy)}`);
  return parts.join(" · ");
}

// ---------------------------------------------------------------- type ahead

function setupTypeAhead() {
  const panel = byId("type-ahead");
  const input = byId("type-ahead-text");
  const list = byId("type-ahead-suggestions");
  let timer = 0;
  let sequence = 0;
  let controller = null;
  let words = [];
  let completion = null;

  /** Forgets the pending and in-flight requests: their answers will not be shown. */
  function cancel() {
    clearTimeout(timer);
    if (controller) controller.abort();
    sequence += 1;
  }

  async function refresh() {
    cancel();
    controller = new AbortController();
    const mine = sequence;
    const body = withModel({ text: input.value, top_k: TYPE_AHEAD_TOP_K, complete_last_word: true }, "lm-model");
    const started = performance.now();
    try {
      const answer = await postJSON("predict-next", body, controller.signal);
      if (mine !== sequence) return; // a newer request was sent meanwhile
      clearError(panel);
      render(answer, performance.now() - started);
    } catch (error) {
      if (error.name === "AbortError" || mine !== sequence) return;
      hide();
      showError(panel, error);
    }
  }

  function render(answer, milliseconds) {
    words = answer.predictions.map((prediction) => prediction.word);
    completion = answer.completion || null;
    list.replaceChildren(...answer.predictions.map(suggestion));
    byId("type-ahead-meta").textContent = summary(answer, milliseconds);
    byId("type-ahead-status").textContent = words.length
      ? `${words.length} suggestions; first: ${words[0]}.`
      : "No suggestions.";
  }

  function summary(answer, milliseconds) {
    const parts = [];
    if (answer.completion) {
      const { prefix, matches, coverage } = answer.completion;
      parts.push(matches === 0
        ? `No word in the vocabulary starts with “${prefix}”`
        : `Completing “${prefix}”: ${matches} word${matches === 1 ? "" : "s"} start${matches === 1 ? "s" : ""} `
          + `with it, together ${percent(coverage)} of the next-word probability`);
    } else {
      parts.push(input.value.trim() ? "Next word" : "First word of a sentence");
    }
    if (answer.unknown.length) parts.push(`not in the vocabulary: ${answer.unknown.join(", ")}`);
    parts.push(`${Math.round(milliseconds)} ms round trip`);
    return parts.join(" · ");
  }

  function suggestion(prediction, index) {
    const button = element("button", index === 0 ? "suggestion first" : "suggestion");
    button.type = "button";
    button.append(element("span", "word", prediction.word), bar(prediction.probability),
      element("span", "percent", percent(prediction.probability)));
    button.title = `log p = ${prediction.log_prob.toFixed(3)}`;
    button.addEventListener("click", () => accept(prediction.word));
    const item = element("li");
    item.append(button);
    return item;
  }

  function hide() {
    words = [];
    list.replaceChildren();
    byId("type-ahead-meta").textContent = "";
    byId("type-ahead-status").textContent = "";
  }

  /** Replaces the word being typed (mid-word) or appends the word, adds a space, asks again. */
  function accept(word) {
    const text = input.value;
    const partial = /\S+$/.exec(text);
    let keep = text;
    if (partial) {
      const prefix = completion ? completion.prefix.toLowerCase() : "";
      const typed = partial[0];
      // Replace only the part the service completed ("(mar" keeps its bracket), else the whole word.
      const cut = prefix && typed.toLowerCase().endsWith(prefix) ? prefix.length : typed.length;
      keep = text.slice(0, text.length - cut);
    }
    input.value = `${keep}${word} `;
    input.focus();
    input.setSelectionRange(input.value.length, input.value.length);
    refresh();
  }

  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(refresh, TYPE_AHEAD_DEBOUNCE_MS);
  });
  input.addEventListener("keydown", (event) => {
    const plain = !event.shiftKey && !event.altKey && !event.ctrlKey && !event.metaKey;
    if (event.key === "Tab" && plain && words.length > 0) {
      event.preventDefault();
      accept(words[0]);
    } else if (event.key === "Escape" && words.length > 0) {
      event.preventDefault();
      cancel();
      hide();
    }
  });
  byId("lm-model").addEventListener("change", refresh);
  byId("api-key").addEventListener("change", refresh);
  refresh();
}

// ---------------------------------------------------------------- sentence scorer

function surprisalClass(logProb) {
  const surprisal = -logProb;
  const step = SURPRISAL_STEPS.findIndex((limit) => surprisal < limit);
  return `s${step === -1 ? SURPRISAL_STEPS.length : step}`;
}

function setupScorer() {
  const panel = byId("scorer");
  const form = byId("scorer-form");
  submitOnCtrlEnter(byId("scorer-text"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    whileBusy(panel, async () => {
      const answer = await postJSON("score", withModel({ text: byId("scorer-text").value }, "lm-model"));
      renderScore(answer.results[0]);
    });
  });
}

function renderScore(result) {
  const summary = byId("scorer-summary");
  summary.replaceChildren(
    element("strong", "", `Perplexity ${result.perplexity.toFixed(1)}`),
    document.createTextNode(
      ` · total log-prob ${result.total_log_prob.toFixed(2)} over ${result.token_count} tokens`),
  );
  byId("scorer-tokens").replaceChildren(...result.token_log_probs.map(({ token, log_prob: logProb }) => {
    const item = element("li", `token ${surprisalClass(logProb)}`, token);
    item.title = `log p = ${logProb.toFixed(3)} (surprisal ${(-logProb).toFixed(2)} nats)`;
    item.append(element("span", "visually-hidden", `, log-probability ${logProb.toFixed(2)}`));
    return item;
  }));
  byId("scorer-unknown").textContent = result.unknown.length
    ? `Not in the vocabulary (scored as <unk>): ${result.unknown.join(", ")}`
    : "";
}

// ---------------------------------------------------------------- n-best rescoring

function setupNBest() {
  const panel = byId("nbest");
  const form = byId("nbest-form");
  submitOnCtrlEnter(byId("nbest-text"));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    whileBusy(panel, async () => {
      const lines = byId("nbest-text").value.split("\n").map((line) => line.trim()).filter(Boolean);
      if (lines.length === 0) throw new ApiError(0, "empty_input", "enter at least one hypothesis");
      const answer = await postJSON("score", withModel({ texts: lines, rank: true }, "lm-model"));
      renderRanking(lines, answer);
    });
  });
}

function renderRanking(lines, answer) {
  const ranking = answer.ranking
    || answer.results.map((r) => r.index).sort((a, b) => answer.results[b].total_log_prob
      - answer.results[a].total_log_prob);
  byId("nbest-ranking").replaceChildren(...ranking.map((index, place) => {
    const result = answer.results[index];
    const item = element("li", place === 0 ? "best" : "");
    const hypothesis = element("span", "hypothesis", lines[index]);
    if (place === 0) hypothesis.append(element("span", "badge", "best"));
    item.append(hypothesis, element("span", "numbers",
      `log-prob ${result.total_log_prob.toFixed(2)} · perplexity ${result.perplexity.toFixed(1)}`));
    return item;
  }));
}

// ---------------------------------------------------------------- sentiment

function setupSentiment() {
  const panel = byId("sentiment");
  byId("sentiment-form").addEventListener("submit", (event) => {
    event.preventDefault();
    whileBusy(panel, async () => {
      const answer = await postJSON("sentiment", withModel({ text: byId("sentiment-text").value },
        "sentiment-model"));
      renderSentiment(answer.labels, answer.results[0]);
    });
  });
}

function renderSentiment(labels, result) {
  const verdict = byId("sentiment-verdict");
  verdict.replaceChildren(element("span", "label", capitalise(result.label)),
    document.createTextNode(` (${percent(result.probabilities[result.label])})`));
  byId("sentiment-bars").replaceChildren(...labels.map((label) => {
    const probability = result.probabilities[label];
    const item = element("li", label === result.label ? "chosen" : "");
    item.append(element("span", "name", label), bar(probability), element("span", "percent", percent(probability)));
    return item;
  }));
}

// ---------------------------------------------------------------- generation (server-sent events)

/** Yields {event, data} for each event of a text/event-stream body (fetch + ReadableStream). */
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const message = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (message) yield message;
    }
  }
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event, data: data.join("\n") } : null;
}

function setupGenerate() {
  const panel = byId("generate");
  const start = byId("generate-start");
  const stop = byId("generate-stop");
  const temperature = byId("generate-temperature");
  let controller = null;

  const showTemperature = () => {
    byId("generate-temperature-value").textContent = Number(temperature.value).toFixed(2);
  };
  temperature.addEventListener("input", showTemperature);
  showTemperature();

  stop.addEventListener("click", () => {
    if (controller) controller.abort();
  });

  byId("generate-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    controller = new AbortController();
    start.disabled = true;
    stop.disabled = false;
    clearError(panel);
    const output = byId("generate-result");
    output.setAttribute("aria-busy", "true");
    try {
      await generate(generateRequest(), controller.signal);
    } catch (error) {
      if (error.name === "AbortError") byId("generate-meta").textContent = "Stopped.";
      else showError(panel, error);
    } finally {
      output.setAttribute("aria-busy", "false");
      start.disabled = false;
      stop.disabled = true;
      controller = null;
    }
  });
}

/** The request as JSON (seeds are below 2^53, so a JavaScript number holds any of them exactly). */
function generateRequest() {
  const body = {
    text: byId("generate-prompt").value,
    temperature: Number(byId("generate-temperature").value),
    stream: true,
  };
  const maxTokens = byId("generate-max-tokens").value.trim();
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  const seed = byId("generate-seed").value.trim();
  if (seed !== "") body.seed = Number(seed); // not a whole number in range: the service says why
  return JSON.stringify(withModel(body, "lm-model"));
}

async function generate(body, signal) {
  const output = byId("generate-output");
  const meta = byId("generate-meta");
  output.replaceChildren(element("span", "prompt", JSON.parse(body).text));
  meta.textContent = "Generating…";
  const started = performance.now();
  const response = await post("generate", body, signal);
  if (!(response.headers.get("content-type") || "").startsWith("text/event-stream")) {
    const answer = await response.json(); // a service that answered in one piece
    answer.samples[0].tokens.forEach((token, i) => appendToken(token, answer.samples[0].log_probs[i]));
    meta.textContent = finishedSummary(answer, performance.now() - started);
    return;
  }
  for await (const message of serverSentEvents(response.body)) {
    const data = JSON.parse(message.data);
    if (message.event === "token" && data.index === 0) {
      appendToken(data.token, data.log_prob);
    } else if (message.event === "done") {
      meta.textContent = finishedSummary(data, performance.now() - started);
      return;
    } else if (message.event === "error") {
      const { code, message: text, details } = data.error;
      throw new ApiError(0, code, text, details);
    }
  }
  throw new ApiError(0, "stream_ended", "the stream ended before the generation finished");
}

function appendToken(token, logProb) {
  // Special tokens such as <eos> are shown, dimmed; the text is never parsed as HTML.
  const span = element("span", /^<.+>$/.test(token) ? "special" : "", ` ${token}`);
  if (typeof logProb === "number") span.title = `log p = ${logProb.toFixed(3)}`;
  byId("generate-output").append(span);
}

function finishedSummary(answer, milliseconds) {
  const sample = answer.samples[0];
  const reason = FINISH_REASONS[sample.finish_reason] || sample.finish_reason;
  return `Done: ${sample.tokens.length} tokens (${reason}) · seed ${answer.seed} · ${Math.round(milliseconds)} ms`;
}

// ---------------------------------------------------------------- start

setupTypeAhead();
setupScorer();
setupNBest();
setupSentiment();
setupGenerate();
loadModels();
