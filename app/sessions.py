"""The one place onnxruntime sessions are created: by the service, the exporter's parity check,
evaluation, the benchmark and the tests, so every figure comes from identically configured
sessions."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def create_session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session over ``path`` (external weights load from beside it, memory-mapped)
    using at most ``threads`` intra-op threads (0: onnxruntime's choice, one per core)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle threads sleep instead of spinning: the CPUs are shared with uvicorn's own work.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Without the arena, memory for a large batch goes back once the call returns; with it, each
    # session keeps its peak (measured: 130 MB -> 500 MB RSS after a few big /score batches) for
    # no measurable speed-up on these graphs.
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
