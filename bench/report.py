"""The benchmark's targets (from the issue), the printed summary, and the saved JSON and PNG chart."""

from __future__ import annotations

import json
import math
from pathlib import Path

RSS_LIMIT_MB = 300.0
PEAK_RSS_LIMIT_MB = 500.0
BUSY_CORES = 0.9  # of the available CPUs: the server must keep this share of them busy under load
INT8_OVER_REFERENCE = 2.5


def _ratio(rate: float, other: float) -> float:
    """``rate / other``; infinite where the other server finished no request in its run (a slow
    server at many connections in a short run)."""
    return rate / other if other else math.inf


def target_concurrency(concurrencies: list[str] | list[int]) -> str:
    """Where the issue's targets are judged: 32 connections, or the highest concurrency of a run without 32."""
    return "32" if "32" in map(str, concurrencies) else str(max(int(c) for c in concurrencies))


def targets(results: dict) -> list[dict]:
    """Each target of the issue with its measured ratio and whether it is met (``met`` None: a figure
    reported beside them, with no goal)."""
    rows = []
    prefix = results["prefix_cache"]
    shortest, longest = min(prefix, key=int), max(prefix, key=int)
    ratio = prefix[longest]["warm_p50_ms"] / prefix[shortest]["warm_p50_ms"]
    rows.append({"target": f"next word after a seen {longest}-token prefix: p50 within 1.5x of the "
                           f"{shortest}-token prefix", "measured": f"{ratio:.2f}x", "met": ratio <= 1.5})
    c1 = results["service"]["/predict-next"].get("1")
    if c1 is not None:
        floor = results["floor"]["/predict-next"]["p50_ms"]
        overhead = c1["p50_ms"] - floor
        rows.append({"target": "/predict-next p50 at concurrency 1 within the in-process floor + 1 ms",
                     "measured": f"{c1['p50_ms']:.2f} ms vs floor {floor:.2f} ms (+{overhead:.2f} ms)",
                     "met": overhead <= 1.0})
    top = target_concurrency(list(results["service"]["/score"]))
    batched = results["service"]["/score"][top]["requests_per_s"]
    unbatched = results["service_unbatched"]["/score"][top]["requests_per_s"]
    naive = results["baseline"]["/score"][top]["requests_per_s"]
    one_on, one_off = (results["batching"][k]["requests_per_s"] for k in ("batched", "unbatched"))
    rows.append({"target": f"/score req/s at concurrency {top}, one sentence per request: >= 2x batching off",
                 "measured": f"{one_on:.1f} vs {one_off:.1f}/s = {_ratio(one_on, one_off):.2f}x (8 sentences per "
                             f"request, batched within each request either way: {batched:.1f} vs {unbatched:.1f}/s = "
                             f"{_ratio(batched, unbatched):.2f}x)",
                 "met": one_on >= 2 * one_off})
    rows.append({"target": f"/score req/s at concurrency {top}: >= 5x the naive PyTorch baseline",
                 "measured": f"{batched:.1f} vs {naive:.1f}/s = {_ratio(batched, naive):.2f}x",
                 "met": batched >= 5 * naive})
    cpus = results["machine"]["cpus"]
    for endpoint in ("/predict-next", "/score"):
        cores = results["service"][endpoint][top]["cores"]
        rows.append({"target": f"{endpoint}: the service process uses >= {BUSY_CORES * cpus:.1f} of {cpus} cores at "
                               f"concurrency {top}",
                     "measured": f"{cores:.2f} cores", "met": cores >= BUSY_CORES * cpus})
    int8 = results.get("service_int8", {}).get("/score", {}).get(top)
    if int8 is not None:
        reference = results["reference"]["/score"][top]["requests_per_s"]
        ratio = _ratio(int8["requests_per_s"], reference)
        rows.append({"target": f"int8 /score req/s at concurrency {top}: >= {INT8_OVER_REFERENCE:g}x the float32 "
                               "plain FastAPI + onnxruntime reference",
                     "measured": f"{int8['requests_per_s']:.1f} vs {reference:.1f}/s = {ratio:.2f}x",
                     "met": ratio >= INT8_OVER_REFERENCE})
    for endpoint, by_concurrency in results.get("reference", {}).items():
        for concurrency, reference in by_concurrency.items():
            service = results["service"][endpoint][concurrency]
            ratio = _ratio(service["requests_per_s"], reference["requests_per_s"])
            goal = 1.5 if endpoint == "/predict-next" and concurrency == "32" else 1.0  # the issue: 1.5x at 32
            rows.append({"target": f"{endpoint} req/s at concurrency {concurrency}: >= {goal:g}x the plain "
                                   "FastAPI + onnxruntime reference",
                         "measured": f"{service['requests_per_s']:.1f} vs {reference['requests_per_s']:.1f}/s = "
                                     f"{ratio:.2f}x (p99 {service['p99_ms']:.0f} vs {reference['p99_ms']:.0f} ms)",
                         "met": ratio >= goal})
    rss = results["memory"]["after_load"]["rss_mb"]
    peak = results["memory"]["after_load_test"]["peak_rss_mb"]
    rows.append({"target": f"service RSS with the models loaded under {RSS_LIMIT_MB:.0f} MB",
                 "measured": f"{rss:.0f} MB after loading, peak {peak:.0f} MB under the whole load",
                 "met": rss < RSS_LIMIT_MB})
    peak_at = results["memory"]["peak_rss_mb_by_concurrency"][top]
    rows.append({"target": f"service peak RSS under load up to concurrency {top} under {PEAK_RSS_LIMIT_MB:.0f} MB",
                 "measured": f"{peak_at:.0f} MB (every endpoint at each concurrency up to {top})",
                 "met": peak_at < PEAK_RSS_LIMIT_MB})
    arithmetic = results["arithmetic"]["/score"]
    rates = arithmetic["by_server"]
    peak_gflops = results["machine"]["gemm"]["float32"]["peak_gflops_per_s"]
    rows.append({"target": f"/score arithmetic rate at concurrency {top}, share of the measured float32 GEMM peak "
                           f"({peak_gflops:.0f} GFLOP/s; no goal)",
                 "measured": ", ".join(f"{server} {rates[server][top]['gflops_per_s']:.1f} GFLOP/s = "
                                       f"{rates[server][top]['fraction_of_peak']:.1%}" for server in rates),
                 "met": None})
    return rows


def summary(results: dict) -> str:
    lines = []
    for precision, unit in (("float32", "GFLOP/s"), ("int8", "GOP/s")):
        gemm = results["machine"]["gemm"][precision]
        lines.append(f"{precision} GEMM peak: {gemm['peak_gflops_per_s']:.0f} {unit} ("
                     + ", ".join(f"{r['m']}x{r['k']}x{r['n']} {r['gflops_per_s']:.0f}" for r in gemm["shapes"]) + ")")
    lines.append("")
    lines.append(f"{'endpoint':<14} {'server':<18} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'cores':>6}")
    for server in ("service", "service_unbatched", "service_int8", "reference", "baseline"):
        for endpoint, by_concurrency in results.get(server, {}).items():
            for concurrency, r in by_concurrency.items():
                lines.append(f"{endpoint:<14} {server:<18} {concurrency:>4} {r['requests_per_s']:>9.1f} "
                             f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['cores']:>6.2f}")
    for endpoint, r in results["floor"].items():
        lines.append(f"{endpoint:<14} {'in-process floor':<18} {1:>4} {r['requests_per_s']:>9.1f} "
                     f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")
    lines.append(f"/score in-process floor, 32 sentences per call: "
                 f"{results['floor']['/score']['batch32_sentences_per_s']:.0f} sentences/s")
    lines.append("")
    arithmetic = results["arithmetic"]["/score"]
    lines.append(f"/score arithmetic: {arithmetic['positions_per_request']:.0f} positions x "
                 f"{arithmetic['flops_per_position'] / 1e6:.1f} MFLOP = {arithmetic['flops_per_request'] / 1e9:.2f} "
                 "GFLOP per request")
    for server, by_concurrency in arithmetic["by_server"].items():
        for concurrency, r in by_concurrency.items():
            lines.append(f"  {server:<18} {concurrency:>4} {r['gflops_per_s']:>8.1f} GFLOP/s = "
                         f"{r['fraction_of_peak']:>6.1%} of the float32 peak")
    lines.append("")
    lines.append(f"{'prefix tokens':<14} {'warm p50 ms':>12} {'cold p50 ms':>12}")
    for length, r in results["prefix_cache"].items():
        lines.append(f"{length:<14} {r['warm_p50_ms']:>12.2f} {r['cold_p50_ms']:>12.2f}")
    lines.append("")
    for row in results["targets"]:
        verdict = "info" if row["met"] is None else "met" if row["met"] else "MISSED"
        lines.append(f"[{verdict:>6}] {row['target']}: {row['measured']}")
    return "\n".join(lines)


def save(results: dict, out: Path) -> tuple[Path, Path]:
    """``bench-<time>.json`` and ``bench-<time>.png`` under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    stem = "bench-" + results["started"].replace(":", "").replace("+0000", "Z")
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    json_path.write_text(json.dumps(results, indent=2) + "\n")

    endpoints = list(results["service"])
    figure, axes = plt.subplots(1, len(endpoints) + 1, figsize=(5 * (len(endpoints) + 1), 4.5))
    for throughput, endpoint in zip(axes, endpoints, strict=False):
        # A colour per server, the same in every panel (int8 has no /sentiment line).
        for colour, (server, style) in enumerate((("service", "o-"), ("service_int8", "D-."), ("reference", "s--"),
                                                   ("baseline", "^:"))):
            if not results.get(server, {}).get(endpoint):
                continue
            measured = results[server][endpoint]
            connections = sorted(measured, key=int)
            label = {"reference": "plain FastAPI + onnxruntime", "baseline": "naive PyTorch"}.get(server, server)
            throughput.plot([int(c) for c in connections], [measured[c]["requests_per_s"] for c in connections],
                            style, color=f"C{colour}", label=label)
        throughput.set_xscale("log", base=2)
        throughput.set_xlabel("connections")
        throughput.set_ylabel("requests/s")
        throughput.set_ylim(bottom=0)
        throughput.set_title(f"{endpoint} throughput")
        throughput.legend(fontsize=8)
    prefix = axes[-1]
    width = 0.4
    lengths = list(results["prefix_cache"])
    for offset, kind in enumerate(("warm", "cold")):
        prefix.bar([i + offset * width for i in range(len(lengths))],
                   [results["prefix_cache"][n][f"{kind}_p50_ms"] for n in lengths], width, label=f"cache {kind}")
    prefix.set_xticks([i + width / 2 for i in range(len(lengths))], [f"{n} tokens" for n in lengths])
    prefix.set_ylabel("p50 latency, ms")
    prefix.set_title("/predict-next after a prefix")
    prefix.legend()
    figure.tight_layout()
    figure.savefig(png_path, dpi=100)
    plt.close(figure)
    return json_path, png_path
