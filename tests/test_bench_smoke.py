"""``python -m bench`` end to end with tiny counts on the tiny store: every server starts, every
measurement is taken, and the JSON and the chart are written. The Python load client is used, so
wrk need not be installed."""

from __future__ import annotations

import json
import random

import numpy as np
import onnx
from conftest import LM_WORDS
from onnx import numpy_helper

from app.config import available_cpus
from app.sessions import create_session


def test_a_tiny_benchmark_run_measures_everything_and_saves_json_and_chart(tiny_store, tmp_path):
    from bench.__main__ import main

    results = main(["--store", str(tiny_store), "--seconds", "0.1", "--concurrency", "4",
                    "--prefix-lengths", "1", "20", "--prefix-repeats", "2", "--client", "python",
                    "--threads", "1", "--gemm-seconds", "0.01", "--out", str(tmp_path)])
    for server in ("service", "reference", "baseline"):
        for endpoint in ("/predict-next", "/score", "/sentiment"):
            measured = results[server][endpoint]["4"]
            assert measured["requests"] > 0 and measured["errors"] == 0, (server, endpoint)
            assert measured["client"] == "python"
            assert 0 < measured["cores"] < available_cpus() + 0.5, (server, endpoint)
    for endpoint in ("/predict-next", "/score"):
        assert results["service_int8"][endpoint]["4"]["requests"] > 0
    assert results["service_unbatched"]["/score"]["4"]["requests"] > 0
    assert results["batching"]["batched"]["requests"] > 0 and results["batching"]["unbatched"]["requests"] > 0
    assert set(results["prefix_cache"]) == {"1", "20"}
    assert results["floor"]["/score"]["batch32_sentences_per_s"] > 0
    assert 0 < results["memory"]["after_load"]["rss_mb"] < 1000
    assert set(results["memory"]["peak_rss_mb_by_concurrency"]) == set(results["service"]["/score"])

    gemm = results["machine"]["gemm"]
    vocab = len(LM_WORDS)
    for precision in ("float32", "int8"):
        shapes = [(r["m"], r["k"], r["n"]) for r in gemm[precision]["shapes"]]
        assert (256, 16, vocab) in shapes and (2048, 2048, 2048) in shapes  # the tiny model's decoder, and square
        assert gemm[precision]["peak_gflops_per_s"] == max(r["gflops_per_s"] for r in gemm[precision]["shapes"]) > 0
    # 2 layers x 2 x 4H x (16 + H) with H = 16, then the decoder, 2 x H x V; 8 texts of 20 words + <eos> on average.
    arithmetic = results["arithmetic"]["/score"]
    assert arithmetic["flops_per_request"] == 8 * 21 * (2 * 2 * 4 * 16 * 32 + 2 * 16 * vocab)
    rate = arithmetic["by_server"]["service"]["4"]
    assert rate["gflops_per_s"] == results["service"]["/score"]["4"]["requests_per_s"] * arithmetic[
        "flops_per_request"] / 1e9
    assert rate["fraction_of_peak"] == rate["gflops_per_s"] / gemm["float32"]["peak_gflops_per_s"]
    assert set(arithmetic["by_server"]) == {"service", "service_int8", "reference"}

    # The concurrency-1 target needs a concurrency-1 run. Besides the 4 always there: one ratio to the
    # reference per endpoint, cores for 2 endpoints, int8 against the reference, peak RSS, and the arithmetic rate.
    rows = {row["target"]: row for row in results["targets"]}
    assert len(results["targets"]) == 4 + 3 + 2 + 1 + 1 + 1
    assert any(target.startswith("/predict-next req/s at concurrency 4: >= 1x") for target in rows)  # 1.5x: at 32
    assert any(target.startswith("int8 /score req/s at concurrency 4: >= 2.5x") for target in rows)
    assert sum(" cores at concurrency 4" in target for target in rows) == 2
    (arithmetic_row,) = [row for row in results["targets"] if row["target"].startswith("/score arithmetic rate")]
    assert arithmetic_row["met"] is None
    (saved,) = tmp_path.glob("bench-*.json")
    assert json.loads(saved.read_text())["targets"] == results["targets"]
    assert saved.with_suffix(".png").stat().st_size > 1000


def test_score_requests_carry_8_sentences_of_whole_words(tiny_store):
    from bench.run import workloads

    mix = workloads(tiny_store)["/score"]
    body = json.loads(mix.body(random.Random(0)))
    assert list(body) == ["texts"] and len(body["texts"]) == 8
    for text in body["texts"]:
        assert 10 <= len(text.split()) <= 30 and set(text.split()) <= set(LM_WORDS)
    assert json.loads(workloads(tiny_store)["/predict-next"].body(random.Random(0)))["top_k"] == 5


def test_the_gemm_graphs_compute_the_product(tmp_path):
    from bench.gemm import matmul_graph, measure_peak

    rng = np.random.default_rng(0)
    for precision, a in (("float32", rng.standard_normal((3, 5), dtype=np.float32)),
                         ("int8", rng.integers(0, 256, (3, 5)).astype(np.uint8))):
        model = matmul_graph(3, 5, 7, precision)
        onnx.save(model, str(tmp_path / "m.onnx"))
        weight = numpy_helper.to_array(model.graph.initializer[0])
        (y,) = create_session(tmp_path / "m.onnx", 1).run(None, {"a": a})
        expected = a.astype(np.float64) @ weight.astype(np.float64)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-4)
    peak = measure_peak(1, ((8, 8, 8),), seconds=0.01)
    assert peak["int8"]["shapes"][0]["calls"] >= 1 and peak["float32"]["peak_gflops_per_s"] > 0


def test_the_workers_by_threads_run_measures_both_layouts(tiny_store, tmp_path):
    from bench.__main__ import main

    results = main(["--workers-threads", "--store", str(tiny_store), "--seconds", "0.1", "--concurrency", "2",
                    "--client", "python", "--out", str(tmp_path)])
    assert set(results["layouts"]) == {"1x2", "2x1"}
    for layout in results["layouts"].values():
        assert all(layout[endpoint]["2"]["requests"] > 0 for endpoint in ("/predict-next", "/score", "/sentiment"))
    assert len(list(tmp_path.glob("workers-threads-*.json"))) == 1
