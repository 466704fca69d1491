"""``python -m bench`` end to end with tiny counts on the tiny store: every server starts, every
measurement is taken, and the JSON and the chart are written. The Python load client is used, so
wrk need not be installed."""

from __future__ import annotations

import json


def test_a_tiny_benchmark_run_measures_everything_and_saves_json_and_chart(tiny_store, tmp_path):
    from bench.__main__ import main

    results = main(["--store", str(tiny_store), "--seconds", "0.1", "--concurrency", "4",
                    "--prefix-lengths", "1", "20", "--prefix-repeats", "2", "--client", "python",
                    "--threads", "1", "--out", str(tmp_path)])
    for server in ("service", "reference", "baseline"):
        for endpoint in ("/predict-next", "/score", "/sentiment"):
            measured = results[server][endpoint]["4"]
            assert measured["requests"] > 0 and measured["errors"] == 0, (server, endpoint)
            assert measured["client"] == "python"
    assert results["service_unbatched"]["/score"]["4"]["requests"] > 0
    assert set(results["prefix_cache"]) == {"1", "20"}
    assert results["floor"]["/score"]["batch32_sentences_per_s"] > 0
    assert 0 < results["memory"]["after_load"]["rss_mb"] < 1000
    # The concurrency-1 target needs a concurrency-1 run; one ratio to the reference per endpoint.
    assert len(results["targets"]) == 4 + 3
    assert any(row["target"].startswith("/predict-next req/s at concurrency 4: >= 1.5x") for row in results["targets"])
    (saved,) = tmp_path.glob("bench-*.json")
    assert json.loads(saved.read_text())["targets"] == results["targets"]
    assert saved.with_suffix(".png").stat().st_size > 1000


def test_the_workers_by_threads_run_measures_both_layouts(tiny_store, tmp_path):
    from bench.__main__ import main

    results = main(["--workers-threads", "--store", str(tiny_store), "--seconds", "0.1", "--concurrency", "2",
                    "--client", "python", "--out", str(tmp_path)])
    assert set(results["layouts"]) == {"1x2", "2x1"}
    for layout in results["layouts"].values():
        assert all(layout[endpoint]["2"]["requests"] > 0 for endpoint in ("/predict-next", "/score", "/sentiment"))
    assert len(list(tmp_path.glob("workers-threads-*.json"))) == 1
