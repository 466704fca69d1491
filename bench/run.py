"""One benchmark run: the machine's matrix-multiplication peak (``bench.gemm``), the service (float32
with batching on, then off, and int8), the plain FastAPI + onnxruntime reference (``bench.reference``),
the naive PyTorch baseline and the in-process onnxruntime floor over the same store and request mix,
the CPU cores each server used, /score's arithmetic rate, the prefix-cache experiment and the
service's memory; the figures set against the issue's targets."""

from __future__ import annotations

import dataclasses
import datetime as dt
import platform
import random
import re
import statistics
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import numpy as np

from app.config import available_cpus
from app.manifest import Manifest, load_manifest
from app.prefix_trie import plan_scoring
from app.registry import ModelRegistry
from app.runtime import Segment, Step
from app.scheduler import run_in_length_buckets
from app.store import discover
from app.text import Vocabulary
from bench.gemm import measure_peak, shapes_for
from bench.load import Workload, drive, time_requests
from bench.reference import default_model
from bench.report import target_concurrency
from bench.servers import Server, running

ENDPOINTS = ("/predict-next", "/score", "/sentiment")
# Words the normalisers leave as they are and JSON and Lua strings need no escaping for.
PLAIN_WORD = re.compile(r"[a-z][a-z0-9]*")
MAX_WORDS = 2000
SCORE_TEXTS_PER_REQUEST = 8  # issue 11 measures 8-sentence /score bodies


@dataclass(frozen=True)
class Options:
    store: Path
    seconds: float  # per load measurement
    concurrency: tuple[int, ...]
    prefix_lengths: tuple[int, ...]
    prefix_repeats: int
    client: str  # "auto" (wrk where installed), "wrk" or "python"
    threads: int  # onnxruntime intra-op threads for the service, torch threads for the baseline
    service_python: str  # interpreter that runs the service: the serving install where there is one
    gemm_seconds: float = 0.5  # per shape and precision of the matrix-multiplication peak


def _words(store: Path, task: str) -> tuple[str, ...]:
    for version in discover(store):
        manifest = load_manifest(version.path)
        if manifest.task == task:
            vocab = Vocabulary.load(version.path / manifest.tokenizer.vocab_file)
            return tuple([t for t in vocab.tokens if PLAIN_WORD.fullmatch(t)][:MAX_WORDS])
    raise ValueError(f"{store} holds no {task} model")


def workloads(store: Path) -> dict[str, Workload]:
    """The request mix per endpoint, random texts: a prefix of 5-20 words per /predict-next request,
    8 sentences of 10-30 words per /score request, a review of 5-25 words per /sentiment request."""
    lm, sentiment = _words(store, "language-model"), _words(store, "sentiment")
    return {
        "/predict-next": Workload("/predict-next", '{"text": %s, "top_k": 5}', lm, 5, 20),
        "/score": Workload("/score", '{"texts": [%s]}', lm, 10, 30, SCORE_TEXTS_PER_REQUEST),
        "/sentiment": Workload("/sentiment", '{"text": %s}', sentiment, 5, 25),
    }


def _latency_summary(latencies_ms: list[float], seconds: float) -> dict:
    p50, p99 = np.percentile(latencies_ms, [50, 99]).tolist()
    return {"requests": len(latencies_ms), "requests_per_s": len(latencies_ms) / seconds, "p50_ms": p50,
            "p99_ms": p99}


def in_process_floor(options: Options, mixes: dict[str, Workload]) -> dict[str, dict]:
    """The runtime's row primitives called directly (no HTTP, no event loop, no inference thread,
    no cache), one request after another, each answered by one onnxruntime call (a /score request's
    sentences by one per length bucket): the least time the same work can take."""
    registry = ModelRegistry(options.store, options.threads, max_tokens=256)
    registry.load_all()
    lm, classifier = registry.language_model(None), registry.sentiment_model(None)

    def predict_next(texts: list[str]) -> None:
        (text,) = texts
        context = lm.tokenise(text)
        (state,) = lm.run_steps("float32", [Step(lm.context_ids(context), None)])
        lm.top_words(context, state.log_probs, 5, False)

    def score(texts: list[str]) -> None:
        encoded, targets = lm.score_targets(texts, True)
        plan = plan_scoring(targets, lm.eos_id, share=False)
        segments = [Segment(s.tokens, None, s.reads) for s in plan.segments]
        done = run_in_length_buckets(partial(lm.score_segments, "float32"), segments)
        scored = plan.assemble([result.values for result in done], targets)
        for row in zip(encoded, targets, scored, strict=True):
            lm.sentence_score(*row)

    def classify(texts: list[str]) -> None:
        (encoded,) = classifier.encode(texts)
        classifier.classification(encoded, classifier.classify_rows("float32", [encoded.ids])[0])

    work = {"/predict-next": predict_next, "/score": score, "/sentiment": classify}
    rng = random.Random(0)
    floor = {}
    for endpoint, run in work.items():
        latencies = []
        started = time.perf_counter()
        while time.perf_counter() - started < options.seconds or len(latencies) < 3:
            texts = mixes[endpoint].request_texts(rng)
            began = time.perf_counter()
            run(texts)
            latencies.append((time.perf_counter() - began) * 1000)
        floor[endpoint] = _latency_summary(latencies, time.perf_counter() - started)
    # /score with 32 sentences per call: what batching can reach at best.
    rounds = 0
    started = time.perf_counter()
    while time.perf_counter() - started < options.seconds or rounds < 1:
        score([mixes["/score"].text(rng) for _ in range(32)])
        rounds += 1
    floor["/score"]["batch32_sentences_per_s"] = 32 * rounds / (time.perf_counter() - started)
    return floor


def prefix_latencies(base_url: str, options: Options, words: tuple[str, ...]) -> dict[str, dict]:
    """/predict-next latency after prefixes of each length, each a fresh random word sequence:
    cold (never seen) and warm (the prefix minus its last word sent just before, untimed)."""
    rng = random.Random(1)
    results: dict[str, dict] = {}
    for length in options.prefix_lengths:
        prefixes = [[rng.choice(words) for _ in range(length)] for _ in range(2 * options.prefix_repeats)]
        bodies = [f'{{"text": "{" ".join(p)}", "top_k": 5}}'.encode() for p in prefixes]
        before = [f'{{"text": "{" ".join(p[:-1])}", "top_k": 5}}'.encode() for p in prefixes]
        warm = time_requests(base_url, "/predict-next", bodies[::2], before[::2])
        cold = time_requests(base_url, "/predict-next", bodies[1::2], [None] * len(bodies[1::2]))
        results[str(length)] = {"warm_p50_ms": statistics.median(warm), "cold_p50_ms": statistics.median(cold),
                                "warm_p99_ms": float(np.percentile(warm, 99)),
                                "cold_p99_ms": float(np.percentile(cold, 99))}
    return results


def _load(server: Server, options: Options, workload: Workload, concurrency: int) -> dict:
    """One load run's figures, with ``cores``: the server's CPU seconds per second of the run."""
    cpu_before, started = server.cpu_seconds(), time.perf_counter()
    result = drive(server.base_url, workload, concurrency, options.seconds, options.client)
    cores = (server.cpu_seconds() - cpu_before) / (time.perf_counter() - started)
    return {**result.as_dict(), "cores": cores}


def _check_precision(server: Server, expected: str) -> None:
    """Fail unless the service answers /score at ``expected`` precision: the runs' labels must hold
    whatever the service's default is."""
    answered = httpx.post(f"{server.base_url}/score", json={"text": "the"}, timeout=30).json()["precision"]
    if answered != expected:
        raise RuntimeError(f"with LSTM_SERVE_DEFAULT_PRECISION={expected} the service answered at {answered} "
                           "precision")


def score_arithmetic(manifest: Manifest, workload: Workload) -> dict:
    """Floating-point operations (a multiply-add counts 2) of one /score request of ``workload``
    on the language model of ``manifest``: per position, each LSTM layer's gate products
    (2 x 4H x (input + H)) and the decoder (2 x H x V); per text, its words + 1 positions (``<eos>``
    is read first, and the closing ``<eos>`` scored; the workload's words are one token each) at the
    mean of the workload's lengths. Nonlinearities and the softmax are left out (well under 1%)."""
    layers, hidden, embedding = (int(manifest.architecture[k]) for k in ("layers", "hidden_size", "embedding_size"))
    lstm = sum(2 * 4 * hidden * ((embedding if layer == 0 else hidden) + hidden) for layer in range(layers))
    per_position = lstm + 2 * hidden * manifest.tokenizer.vocab_size
    positions = workload.texts_per_request * ((workload.min_words + workload.max_words) / 2 + 1)
    return {"flops_per_position": per_position, "positions_per_request": positions,
            "flops_per_request": per_position * positions}


def arithmetic_rates(results: dict, arithmetic: dict) -> dict[str, dict]:
    """Each server's /score rate in GFLOP/s (requests/s x FLOPs per request) at each concurrency, and
    its fraction of the measured float32 peak."""
    peak = results["machine"]["gemm"]["float32"]["peak_gflops_per_s"]
    rates: dict[str, dict] = {}
    for server in ("service", "service_int8", "reference"):
        for concurrency, measured in results[server].get("/score", {}).items():
            gflops = measured["requests_per_s"] * arithmetic["flops_per_request"] / 1e9
            rates.setdefault(server, {})[concurrency] = {"gflops_per_s": gflops, "fraction_of_peak": gflops / peak}
    return rates


def run_benchmark(options: Options) -> dict:
    """Every measurement, as a JSON-ready dict (see ``bench.report`` for the targets)."""
    mixes = workloads(options.store)
    _, lm_manifest = default_model(options.store, "language-model")
    env = {"LSTM_SERVE_INTRA_OP_THREADS": str(options.threads), "LSTM_SERVE_MAX_TEXT_CHARS": "8000",
           "BENCH_THREADS": str(options.threads)}
    # Batching on against off is also measured with one sentence per /score request where the targets are
    # judged: the 8-sentence requests are batched within themselves either way.
    one_sentence = dataclasses.replace(mixes["/score"], texts_per_request=1)
    top = int(target_concurrency(list(options.concurrency)))
    # Every service run names its precision: the service's default may change.
    float32_env, int8_env = ({**env, "LSTM_SERVE_DEFAULT_PRECISION": p} for p in ("float32", "int8"))
    # Measured first, with nothing else running.
    gemm = measure_peak(options.threads, shapes_for(int(lm_manifest.architecture["hidden_size"]),
                                                    lm_manifest.tokenizer.vocab_size), options.gemm_seconds)
    results: dict = {
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": available_cpus(), "platform": platform.platform(), "python": platform.python_version(),
                    "gemm": gemm},
        "options": {"store": str(options.store), "seconds": options.seconds, "concurrency": list(options.concurrency),
                    "threads": options.threads, "client": options.client,
                    "service_python": options.service_python},
        "service": {}, "service_unbatched": {}, "service_int8": {}, "reference": {}, "baseline": {},
    }
    with running("app", options.store, float32_env, python=options.service_python) as server:
        results["memory"] = {"after_load": server.rss_mb()}
        _check_precision(server, "float32")
        # Concurrency outer, so the peak RSS is known up to each concurrency (it only grows).
        results["memory"]["peak_rss_mb_by_concurrency"] = {}
        for c in sorted(options.concurrency):
            for endpoint in ENDPOINTS:
                results["service"].setdefault(endpoint, {})[str(c)] = _load(server, options, mixes[endpoint], c)
            results["memory"]["peak_rss_mb_by_concurrency"][str(c)] = server.rss_mb()["peak_rss_mb"]
        results["prefix_cache"] = prefix_latencies(server.base_url, options, mixes["/predict-next"].words)
        results["memory"]["after_load_test"] = server.rss_mb()
        results["batching"] = {"batched": _load(server, options, one_sentence, top)}
    with running("app", options.store, {**float32_env, "LSTM_SERVE_BATCHING": "false"},
                 python=options.service_python) as server:
        _check_precision(server, "float32")
        results["service_unbatched"]["/score"] = {str(c): _load(server, options, mixes["/score"], c)
                                                  for c in options.concurrency}
        results["batching"]["unbatched"] = _load(server, options, one_sentence, top)
    if any(graph.precision == "int8" for graph in lm_manifest.graphs.values()):
        with running("app", options.store, int8_env, python=options.service_python) as server:
            _check_precision(server, "int8")
            for endpoint in ("/predict-next", "/score"):
                results["service_int8"][endpoint] = {str(c): _load(server, options, mixes[endpoint], c)
                                                     for c in options.concurrency}
            results["memory"]["int8_after_load_test"] = server.rss_mb()
    with running("bench.reference", options.store, env, python=options.service_python) as server:
        for endpoint in ENDPOINTS:
            results["reference"][endpoint] = {str(c): _load(server, options, mixes[endpoint], c)
                                              for c in options.concurrency}
        results["memory"]["reference_after_load_test"] = server.rss_mb()
    with running("bench.baseline", options.store, env) as server:
        for endpoint in ENDPOINTS:
            results["baseline"][endpoint] = {str(c): _load(server, options, mixes[endpoint], c)
                                             for c in options.concurrency}
        results["memory"]["baseline_after_load_test"] = server.rss_mb()
    results["floor"] = in_process_floor(options, mixes)
    arithmetic = score_arithmetic(lm_manifest, mixes["/score"])
    results["arithmetic"] = {"/score": {**arithmetic, "by_server": arithmetic_rates(results, arithmetic)}}
    return results


LAYOUTS = ((1, 2), (2, 1))  # worker processes x onnxruntime threads per worker, on two cores


def run_workers_threads(options: Options) -> dict:
    """The service as 1 worker x 2 onnxruntime threads and as 2 workers x 1 thread, every endpoint at each
    of ``options.concurrency``: which layout wins where."""
    mixes = workloads(options.store)
    results: dict = {"started": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H%M%SZ"), "seconds": options.seconds,
                     "client": options.client, "layouts": {}}
    for workers, threads in LAYOUTS:
        env = {"LSTM_SERVE_WORKERS": str(workers), "LSTM_SERVE_INTRA_OP_THREADS": str(threads),
               "LSTM_SERVE_DEFAULT_PRECISION": "float32"}
        with running("app", options.store, env, python=options.service_python) as server:
            results["layouts"][f"{workers}x{threads}"] = {
                endpoint: {str(c): _load(server, options, mixes[endpoint], c) for c in options.concurrency}
                for endpoint in ENDPOINTS}
    return results


def workers_threads_table(results: dict) -> str:
    layouts = list(results["layouts"])
    lines = ["| endpoint | connections | " + " | ".join(f"{layout} req/s (p99 ms)" for layout in layouts)
             + f" | {layouts[-1]} / {layouts[0]} |", "|---|---:|" + "---:|" * (len(layouts) + 1)]
    first = results["layouts"][layouts[0]]
    for endpoint, by_concurrency in first.items():
        for concurrency in by_concurrency:
            cells = [results["layouts"][layout][endpoint][concurrency] for layout in layouts]
            ratio = cells[-1]["requests_per_s"] / cells[0]["requests_per_s"]
            lines.append(f"| `{endpoint}` | {concurrency} | "
                         + " | ".join(f"{c['requests_per_s']:.0f} ({c['p99_ms']:.0f})" for c in cells)
                         + f" | {ratio:.2f}x |")
    return "\n".join(lines)
