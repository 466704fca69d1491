"""What this machine's matrix multiplication can do: onnxruntime's float32 ``MatMul`` and int8
``MatMulInteger`` (uint8 activations x int8 weights -> int32, as in the service's int8 graphs) timed
on a few shapes, each a one-node graph run in a session made like the service's
(``app.sessions.create_session``). The best rate is the machine's measured peak, the ceiling that
the service's arithmetic rate is set against (``python -m bench``)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from app.sessions import create_session

SQUARE = (2048, 2048, 2048)
_TYPES = {"float32": (TensorProto.FLOAT, np.float32, np.float32),
          "int8": (TensorProto.UINT8, np.uint8, np.int8)}


def shapes_for(hidden_size: int, vocab_size: int) -> tuple[tuple[int, int, int], ...]:
    """(M, K, N) of the language model's products: the decoder ([M, H] x [H, V]) at 256 and 1024
    positions per call, one LSTM step's recurrent product for 32 rows ([32, H] x [H, 4H]), and a
    large square product, where the libraries come closest to the hardware."""
    return ((256, hidden_size, vocab_size), (1024, hidden_size, vocab_size), (32, hidden_size, 4 * hidden_size),
            SQUARE)


def matmul_graph(m: int, k: int, n: int, precision: str) -> onnx.ModelProto:
    """``y = a @ w``: ``a`` [m, k] an input, ``w`` [k, n] a constant (so onnxruntime pre-packs it,
    as it does the models' weights). int8: ``MatMulInteger`` of uint8 ``a`` and int8 ``w``, int32 ``y``."""
    elem, _, weight_type = _TYPES[precision]
    rng = np.random.default_rng(0)
    if precision == "float32":
        weight = rng.standard_normal((k, n), dtype=np.float32)
        node = helper.make_node("MatMul", ["a", "w"], ["y"])
        out = TensorProto.FLOAT
    else:
        weight = rng.integers(-127, 128, (k, n)).astype(weight_type)
        node = helper.make_node("MatMulInteger", ["a", "w"], ["y"])
        out = TensorProto.INT32
    graph = helper.make_graph([node], "matmul", [helper.make_tensor_value_info("a", elem, [m, k])],
                              [helper.make_tensor_value_info("y", out, [m, n])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _rate(path: Path, m: int, k: int, n: int, precision: str, threads: int, seconds: float) -> tuple[float, int]:
    """Multiply-adds x 2 per second (one untimed call first), and the calls timed."""
    session = create_session(path, threads)
    _, input_type, _ = _TYPES[precision]
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((m, k), dtype=np.float32) if precision == "float32"
         else rng.integers(0, 256, (m, k)).astype(input_type))
    # Input and output bound once: the calls time the product, not allocating its 10-40 MB result
    # (the sessions run without a memory arena, so every unbound output would be fresh pages).
    binding = session.io_binding()
    binding.bind_cpu_input("a", a)
    binding.bind_ortvalue_output("y", ort.OrtValue.ortvalue_from_numpy(
        np.empty((m, n), np.float32 if precision == "float32" else np.int32)))
    session.run_with_iobinding(binding)
    calls = 0
    started = time.perf_counter()
    while calls == 0 or time.perf_counter() - started < seconds:
        session.run_with_iobinding(binding)
        calls += 1
    return calls / (time.perf_counter() - started), calls


def measure_peak(threads: int, shapes: tuple[tuple[int, int, int], ...], seconds: float = 0.5) -> dict:
    """Each precision's rate (``gflops_per_s``: 2 x M x K x N per call, for int8 operations rather
    than floating-point ones) on each of ``shapes``, each repeated for about ``seconds``, and its
    best as ``peak_gflops_per_s``."""
    results: dict = {"threads": threads, "seconds_per_shape": seconds}
    with tempfile.TemporaryDirectory() as directory:
        for precision in _TYPES:
            rows = []
            for m, k, n in shapes:
                path = Path(directory) / f"{precision}-{m}x{k}x{n}.onnx"
                onnx.save(matmul_graph(m, k, n, precision), str(path))
                calls_per_s, calls = _rate(path, m, k, n, precision, threads, seconds)
                rows.append({"m": m, "k": k, "n": n, "calls": calls, "gflops_per_s": 2 * m * k * n * calls_per_s / 1e9})
            results[precision] = {"shapes": rows, "peak_gflops_per_s": max(r["gflops_per_s"] for r in rows)}
    return results
