"""``python -m bench``: measure this machine's matrix-multiplication peak, start the service on
loopback, load it with wrk (or the Python client), compare it with the plain reference, the naive
PyTorch baseline and the in-process floor, and save JSON + PNG under ``bench/results/``.

    python -m bench                              # model_store/, 10 s per measurement
    python -m bench --store /path/to/store --seconds 5 --client python
    python -m bench --faults                     # overload: /score at 256 clients (bench/faults.py)
    python -m bench --nbest                      # n-best rescoring with and without prefix sharing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from app.config import available_cpus
from bench.faults import run_overload, table
from bench.nbest import run_nbest
from bench.nbest import table as nbest_table
from bench.report import save, summary, targets
from bench.run import Options, run_benchmark, run_workers_threads, workers_threads_table

RESULTS = Path(__file__).resolve().parent / "results"
SERVING_PYTHON = Path(__file__).resolve().parent.parent / ".venv-serve" / "bin" / "python"


def parse(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("model_store"), help="model store (default: model_store)")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each load measurement")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="client connections")
    parser.add_argument("--prefix-lengths", type=int, nargs="+", default=[1, 50, 200],
                        help="prefix lengths (tokens) for the cache warm/cold latency")
    parser.add_argument("--prefix-repeats", type=int, default=50, help="timed requests per prefix length and state")
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto",
                        help="load generator (auto: wrk where installed)")
    parser.add_argument("--threads", type=int, default=available_cpus(),
                        help="onnxruntime / torch intra-op threads (default: available CPUs)")
    parser.add_argument("--gemm-seconds", type=float, default=0.5,
                        help="duration of each shape and precision of the matrix-multiplication peak")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and PNG go")
    parser.add_argument("--faults", action="store_true",
                        help="instead of the speed benchmark, the overload run of bench/faults.py (prints a table)")
    parser.add_argument("--nbest", action="store_true",
                        help="instead of the speed benchmark, n-best rescoring with and without prefix sharing "
                        "(bench/nbest.py, in process)")
    parser.add_argument("--workers-threads", action="store_true",
                        help="instead of the speed benchmark, the service as 1 worker x 2 onnxruntime threads and as "
                        "2 workers x 1 thread at each --concurrency (prints a table)")
    parser.add_argument("--nbest-lists", type=int, default=50, help="n-best lists of the --nbest run")
    parser.add_argument("--valid", type=Path, default=Path("../shared/data/ptb/ptb.valid.txt"),
                        help="sentences the --nbest lists are made from (default: PTB validation)")
    parser.add_argument("--overload-clients", type=int, default=256, help="clients of the --faults overload run")
    parser.add_argument("--service-python", default=str(SERVING_PYTHON) if SERVING_PYTHON.exists() else sys.executable,
                        help="interpreter that runs the service (default: the serving install made by `make serve`, "
                        ".venv-serve, where it exists, so RSS is the deployed figure; else this interpreter)")
    args = parser.parse_args(argv)
    options = Options(args.store.resolve(), args.seconds, tuple(args.concurrency), tuple(args.prefix_lengths),
                      args.prefix_repeats, args.client, args.threads, args.service_python, args.gemm_seconds)
    return options, args


def main(argv: list[str] | None = None) -> dict:
    options, args = parse(argv)
    out = args.out
    if args.faults:
        results = run_overload(options.store, options.seconds, args.overload_clients, options.service_python,
                               options.threads)
        return _report(results, out / f"faults-{results['started']}.json", table(results))
    if args.nbest:
        if not args.valid.is_file():
            raise SystemExit(f"error: {args.valid} not found; give --valid FILE (one sentence per line)")
        results = run_nbest(options.store, args.valid, args.nbest_lists, options.threads)
        return _report(results, out / f"nbest-{time.strftime('%Y%m%dT%H%M%S')}.json", nbest_table(results))
    if args.workers_threads:
        results = run_workers_threads(options)
        return _report(results, out / f"workers-threads-{results['started']}.json", workers_threads_table(results))
    results = run_benchmark(options)
    results["targets"] = targets(results)
    json_path, png_path = save(results, out)
    print(summary(results))
    print(f"\nsaved {json_path} and {png_path}")
    return results


def _report(results: dict, path: Path, text: str) -> dict:
    """Save ``results`` as JSON at ``path`` and print ``text`` (a table of them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    print(f"\nsaved {path}")
    return results


if __name__ == "__main__":
    main()
