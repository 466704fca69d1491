"""Export to the model store: ONNX graphs (legacy TorchScript exporter, dynamic batch and
sequence axes), a parity check of onnxruntime against PyTorch, and manifest.json.

A version directory is written under a temporary name and renamed into place only when every
check has passed, so a failed export never leaves a half-written version behind."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import platform
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from app.text import EOS, PAD, UNK, Vocabulary
from training.config import LMConfig
from training.data import DataError, pad_batch
from training.evaluate import lm_perplexity, onnx_session, sentiment_accuracy
from training.lm import build_model
from training.model import LanguageModel, SentimentClassifier
from training.sentiment import model_from_checkpoint

OPSET = 17
MODEL_NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
PARITY_TOLERANCE = 1e-4
WEIGHTS_FILE = "weights.bin"
# Tensors at least this large go to the shared weights file; small ones stay inline.
EXTERNAL_MIN_BYTES = 1024


class ExportError(Exception):
    """The export failed a check (parity, existing version); nothing was written."""


class LastPositionLM(nn.Module):
    """The language model returning only the final position's distribution, so next-word
    prediction does not pay for a softmax at positions it throws away."""

    def __init__(self, model: LanguageModel):
        super().__init__()
        self.model = model

    def forward(self, tokens, h0, c0):
        out, hn, cn = self.model.encode(tokens, h0, c0)
        logits = self.model.decoder(out[:, -1])
        return torch.log_softmax(logits, dim=-1), hn, cn


_LM_INPUTS = {"tokens": ["batch", "seq"], "h0": ["layers", "batch", "hidden"], "c0": ["layers", "batch", "hidden"]}
LM_GRAPHS = {
    "full": {
        "inputs": _LM_INPUTS,
        "outputs": {"log_probs": ["batch", "seq", "vocab"], "hn": ["layers", "batch", "hidden"],
                    "cn": ["layers", "batch", "hidden"]},
    },
    "last": {
        "inputs": _LM_INPUTS,
        "outputs": {"log_probs": ["batch", "vocab"], "hn": ["layers", "batch", "hidden"],
                    "cn": ["layers", "batch", "hidden"]},
    },
}
SENTIMENT_GRAPHS = {
    "full": {
        "inputs": {"tokens": ["batch", "seq"], "lengths": ["batch"]},
        "outputs": {"probs": ["batch", "classes"]},
    },
}
GRAPH_FILES = {"full": "model.onnx", "last": "last.onnx", "full-int8": "model.int8.onnx",
               "last-int8": "last.int8.onnx"}
# Dynamic int8 quantization (weights int8 ahead of time, activations per call) of the matrix
# products and LSTMs; the embedding lookup stays float32 and is shared with the float graphs.
INT8_OP_TYPES = ["LSTM", "MatMul", "Gemm"]


def _quantized(proto: onnx.ModelProto, scratch: Path) -> onnx.ModelProto:
    """The int8 twin of a float graph (onnxruntime's dynamic quantization)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = scratch / "float.onnx", scratch / "int8.onnx"
    onnx.save_model(proto, str(source))
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OP_TYPES)
    quantized = onnx.load(str(target))
    source.unlink()
    target.unlink()
    return quantized


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def next_version(store: Path, name: str) -> int:
    versions = [int(p.name) for p in (store / name).glob("*") if p.name.isdigit()]
    return max(versions, default=0) + 1


def _dynamic_axes(signature: dict) -> dict:
    axes = {}
    for group in ("inputs", "outputs"):
        for tensor, dims in signature[group].items():
            axes[tensor] = {i: d for i, d in enumerate(dims) if d in ("batch", "seq")}
    return axes


def _to_onnx(module: nn.Module, example: tuple, signature: dict) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The exporter warns about LSTM batch sizes; h0/c0 are graph inputs, which is the fix it asks for.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(), example, buffer, input_names=list(signature["inputs"]),
            output_names=list(signature["outputs"]), dynamic_axes=_dynamic_axes(signature),
            opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )
    return onnx.load_from_string(buffer.getvalue())


def _untie_transposed_copies(graph: onnx.GraphProto) -> None:
    """Constant folding stores a tied decoder matrix again, transposed. Replace each such copy
    with a Transpose of the original so the weight is stored once."""
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    kept: list[str] = []
    for name, array in arrays.items():
        original = next(
            (k for k in kept if array.ndim == 2 and arrays[k].shape == array.shape[::-1]
             and array.shape[0] != array.shape[1] and np.array_equal(arrays[k].T, array)),
            None,
        )
        if original is None:
            kept.append(name)
            continue
        graph.initializer.remove(next(t for t in graph.initializer if t.name == name))
        graph.node.insert(0, onnx.helper.make_node("Transpose", [original], [name], perm=[1, 0]))


def _write_graphs(graphs: dict[str, onnx.ModelProto], out_dir: Path) -> None:
    """Write every graph with its large tensors in one shared weights file, each distinct
    tensor stored once (the graphs of one model share their weights)."""
    offsets: dict[str, tuple[int, int]] = {}
    with (out_dir / WEIGHTS_FILE).open("wb") as weights:
        for graph_name, proto in graphs.items():
            for tensor in proto.graph.initializer:
                raw = tensor.raw_data or onnx.numpy_helper.to_array(tensor).tobytes()
                if len(raw) < EXTERNAL_MIN_BYTES:
                    continue
                key = hashlib.sha256(raw).hexdigest()
                if key not in offsets:
                    position = weights.tell()
                    padding = -position % 64
                    weights.write(b"\0" * padding)
                    offsets[key] = (position + padding, len(raw))
                    weights.write(raw)
                offset, length = offsets[key]
                tensor.ClearField("raw_data")
                for field in ("float_data", "int64_data", "int32_data", "double_data"):
                    tensor.ClearField(field)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v
            onnx.save_model(proto, str(out_dir / GRAPH_FILES[graph_name]))


def _check_parity(
    reference: Callable[..., tuple], session: ort.InferenceSession, cases: list[dict[str, np.ndarray]]
) -> float:
    """Largest absolute difference between PyTorch and onnxruntime over the cases."""
    worst = 0.0
    for feeds in cases:
        with torch.no_grad():
            expected = reference(*(torch.from_numpy(v) for v in feeds.values()))
        expected = expected if isinstance(expected, tuple) else (expected,)
        actual = session.run(None, feeds)
        for e, a in zip(expected, actual, strict=True):
            if e.shape != a.shape:
                raise ExportError(f"onnxruntime output shape {a.shape} != PyTorch {tuple(e.shape)}")
            worst = max(worst, float(np.abs(e.numpy() - a).max()))
    return worst


def _lm_cases(model: LanguageModel, vocab_size: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    cases = []
    for batch, seq in ((1, 1), (1, 9), (3, 1), (4, 17), (2, 40)):
        shape = (model.layers, batch, model.hidden_size)
        cases.append({
            "tokens": rng.integers(0, vocab_size, (batch, seq), dtype=np.int64),
            "h0": rng.normal(0, 0.3, shape).astype(np.float32),
            "c0": rng.normal(0, 0.3, shape).astype(np.float32),
        })
    return cases


def _sentiment_cases(vocab_size: int, pad_id: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    cases = []
    for batch, seq in ((1, 1), (1, 12), (3, 7), (5, 30)):
        lengths = rng.integers(1, seq + 1, batch, dtype=np.int64)
        lengths[0] = seq
        tokens = rng.integers(0, vocab_size, (batch, seq), dtype=np.int64)
        tokens[np.arange(seq)[None, :] >= lengths[:, None]] = pad_id
        cases.append({"tokens": tokens, "lengths": lengths})
    return cases


def _selftest_checks(outputs: dict[str, np.ndarray], top: int) -> list[dict]:
    """Sparse expected values: for each output, its `top` largest entries along the last axis
    at every leading index (enough to catch a wrong or corrupted graph, small enough for JSON)."""
    checks = []
    for name, array in outputs.items():
        flat = array.reshape(-1, array.shape[-1])
        for row, values in enumerate(flat):
            leading = list(np.unravel_index(row, array.shape[:-1])) if array.ndim > 1 else []
            for column in np.argsort(-values)[:top]:
                checks.append({"output": name, "index": [int(i) for i in leading] + [int(column)],
                               "value": round(float(values[column]), 6)})
    return checks


def _file_table(out_dir: Path) -> dict:
    return {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != "manifest.json"
    }


def _graph_table(signatures: dict, dims: dict, names: list[str]) -> dict:
    """The manifest's ``graphs``: file, precision and resolved signature of each written graph.
    An int8 graph has its float twin's signature."""
    table = {}
    for graph_name in names:
        float_name = graph_name.removesuffix("-int8")
        signature = signatures[float_name]
        resolved = {
            group: {
                tensor: {"dtype": "int64" if tensor in ("tokens", "lengths") else "float32",
                         "shape": [dims.get(d, d) for d in shape]}
                for tensor, shape in signature[group].items()
            }
            for group in ("inputs", "outputs")
        }
        precision = {"precision": "int8", "quantized_from": float_name} if graph_name != float_name else {
            "precision": "float32"}
        table[graph_name] = {"file": GRAPH_FILES[graph_name], **precision, **resolved}
    return table


def _prepare_dir(store: Path, name: str, version: int | None, force: bool) -> tuple[Path, Path, int]:
    if not MODEL_NAME.fullmatch(name):
        raise ExportError(f"model name {name!r} must be lower-case letters, digits and '-'")
    if version is not None and version < 1:
        raise ExportError(f"version must be a positive integer, got {version}")
    version = version or next_version(store, name)
    final = store / name / str(version)
    if final.exists() and not force:
        raise ExportError(f"{final} already exists; model versions are immutable (pass --force to replace it)")
    staging = store / name / f".{version}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return final, staging, version


def _finish(staging: Path, final: Path, manifest: dict, evaluate: Callable[[Path], dict] | None) -> Path:
    """Write the manifest, measure the metrics on the staged graphs, and move the version into place."""
    manifest["files"] = _file_table(staging)
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if evaluate:
        manifest["metrics"] = evaluate(staging)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


def _base_manifest(name: str, version: int, task: str, description: str, training: dict) -> dict:
    return {
        "name": name, "version": version, "task": task,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "description": description,
        "training": {**training, "libraries": {"python": platform.python_version(), "torch": torch.__version__,
                                               "onnx": onnx.__version__, "onnxruntime": ort.__version__}},
    }


def export_language_model(
    model: LanguageModel,
    vocab: Vocabulary,
    store: Path,
    name: str,
    *,
    version: int | None = None,
    normaliser: str = "ptb",
    description: str = "",
    architecture: dict,
    training: dict,
    evaluate: Callable[[Path], dict] | None = None,
    force: bool = False,
) -> Path:
    """Write ``store/name/version/`` with the full and last-position graphs; returns its path.
    ``evaluate`` (given the staged version directory) measures the metrics on the exported graph."""
    final, staging, version = _prepare_dir(store, name, version, force)
    try:
        model = model.eval()
        rng = np.random.default_rng(0)
        cases = _lm_cases(model, len(vocab), rng)
        example = tuple(torch.from_numpy(v) for v in cases[3].values())
        graphs = {
            "full": _to_onnx(model, example, LM_GRAPHS["full"]),
            "last": _to_onnx(LastPositionLM(model), example, LM_GRAPHS["last"]),
        }
        # Quantize before untying: the int8 decoder needs the transposed matrix as a constant.
        graphs.update({f"{graph}-int8": _quantized(proto, staging) for graph, proto in list(graphs.items())})
        for graph in ("full", "last"):
            _untie_transposed_copies(graphs[graph].graph)
        _write_graphs(graphs, staging)
        parity = {
            "full": _check_parity(model, onnx_session(staging / "model.onnx"), cases),
            "last": _check_parity(LastPositionLM(model), onnx_session(staging / "last.onnx"), cases),
        }
        _require_parity(parity)
        vocab.save(staging / "vocab.txt")

        sentences = [["the", "company", "said", "it", "expects"], ["mr.", "<unk>", "is", "chairman"]]
        selftest_cases = []
        session = onnx_session(staging / "model.onnx")
        for sentence in sentences:
            tokens = np.array([[vocab.eos_id, *vocab.encode(sentence)]], dtype=np.int64)
            zeros = np.zeros((model.layers, 1, model.hidden_size), dtype=np.float32)
            feeds = {"tokens": tokens, "h0": zeros, "c0": zeros}
            log_probs, hn, cn = session.run(None, feeds)
            selftest_cases.append({
                "graph": "full",
                "inputs": {"tokens": tokens.tolist()},
                "checks": _selftest_checks({"log_probs": log_probs, "hn": hn}, top=3),
            })

        dims = {"layers": model.layers, "hidden": model.hidden_size, "vocab": len(vocab)}
        manifest = _base_manifest(name, version, "language-model", description, training)
        manifest.update({
            "graphs": _graph_table(LM_GRAPHS, dims, list(graphs)),
            "tokenizer": _tokenizer(normaliser, vocab),
            "architecture": architecture,
            "conventions": {"log": "natural", "context_start": EOS},
            "metrics": {},
            "parity": {"max_abs_diff": parity, "tolerance": PARITY_TOLERANCE},
            "selftest": {"tolerance": 1e-4, "cases": selftest_cases},
        })
        return _finish(staging, final, manifest, evaluate)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_sentiment_model(
    model: SentimentClassifier,
    vocab: Vocabulary,
    labels: list[str],
    store: Path,
    name: str,
    *,
    version: int | None = None,
    normaliser: str = "sst",
    description: str = "",
    architecture: dict,
    training: dict,
    evaluate: Callable[[Path], dict] | None = None,
    force: bool = False,
) -> Path:
    """Write ``store/name/version/`` with the classifier graph; returns its path."""
    if vocab.pad_id is None:
        raise ValueError(f"a sentiment vocabulary needs {PAD}")
    final, staging, version = _prepare_dir(store, name, version, force)
    try:
        model = model.eval()
        rng = np.random.default_rng(0)
        cases = _sentiment_cases(len(vocab), vocab.pad_id, rng)
        example = tuple(torch.from_numpy(v) for v in cases[2].values())
        graphs = {"full": _to_onnx(model, example, SENTIMENT_GRAPHS["full"])}
        graphs["full-int8"] = _quantized(graphs["full"], staging)
        _write_graphs(graphs, staging)
        session = onnx_session(staging / "model.onnx")
        parity = {"full": _check_parity(model, session, cases)}
        _require_parity(parity)
        vocab.save(staging / "vocab.txt")

        sentences = [["a", "gorgeous", ",", "witty", "film"], ["dull", "and", "tedious"], ["it", "'s", "a", "movie"]]
        tokens, lengths = (t.numpy() for t in pad_batch([vocab.encode(s) for s in sentences], vocab.pad_id))
        (probs,) = session.run(None, {"tokens": tokens, "lengths": lengths})
        selftest = [{
            "graph": "full",
            "inputs": {"tokens": tokens.tolist(), "lengths": lengths.tolist()},
            "checks": _selftest_checks({"probs": probs}, top=len(labels)),
        }]
        manifest = _base_manifest(name, version, "sentiment", description, training)
        manifest.update({
            "graphs": _graph_table(SENTIMENT_GRAPHS, {"classes": len(labels)}, list(graphs)),
            "tokenizer": _tokenizer(normaliser, vocab),
            "labels": labels,
            "architecture": architecture,
            "metrics": {},
            "parity": {"max_abs_diff": parity, "tolerance": PARITY_TOLERANCE},
            "selftest": {"tolerance": 1e-4, "cases": selftest},
        })
        return _finish(staging, final, manifest, evaluate)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _require_parity(parity: dict[str, float]) -> None:
    for graph, diff in parity.items():
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(f"{graph} graph: onnxruntime differs from PyTorch by {diff:.2e} "
                              f"(tolerance {PARITY_TOLERANCE:.0e})")


def _tokenizer(normaliser: str, vocab: Vocabulary) -> dict:
    specials = {
        key: {"token": token, "id": vocab.id(token)} if token in vocab else None
        for key, token in (("unk", UNK), ("eos", EOS), ("pad", PAD))
    }
    return {"normaliser": normaliser, "vocab_file": "vocab.txt", "vocab_size": len(vocab), "special_tokens": specials}


def export_run(args, export_command: str) -> Path:
    """The ``export`` command: a run directory's best checkpoint into the model store, with
    the figures measured on the exported graph. ``args`` carries the CLI options."""
    checkpoint_path = args.run_dir / "best.pt"
    if not checkpoint_path.exists():
        raise DataError(f"no best.pt in {args.run_dir}: train a model there first")
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    vocab = Vocabulary(checkpoint["vocab"])
    config = checkpoint["config"]
    metrics_file = args.run_dir / "metrics.json"
    run_metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    training = {
        "data": args.data,
        "command": checkpoint.get("command", ""),
        "export_command": export_command,
        "seed": config["seed"],
        # Epochs trained (the last evaluated point; fractional where dev was evaluated mid-epoch).
        "epochs": run_metrics["history"][-1]["epoch"] if run_metrics.get("history") else checkpoint.get("epoch"),
        "note": args.note,
        "best_epoch": checkpoint["epoch"],
        "train_seconds": run_metrics.get("train_seconds", checkpoint.get("train_seconds")),
        "config": config,
        "history": run_metrics.get("history", []),
    }
    sentiment = "num_classes" in checkpoint
    measure = sentiment_accuracy if sentiment else lm_perplexity
    splits = {"valid": args.valid, "test": args.test}

    def evaluate(staged: Path) -> dict:
        metrics = {split: measure(staged, path) for split, path in splits.items() if path is not None}
        if args.valid is not None:
            # The int8 graph's change, on validation data only.
            metrics["valid_int8"] = measure(staged, args.valid, graph="full-int8")
        return metrics

    common = dict(version=args.version, description=args.description, training=training, evaluate=evaluate,
                  force=args.force)
    if sentiment:
        model, vocab = model_from_checkpoint(checkpoint)
        architecture = {key: config[key] for key in ("layers", "hidden_size", "embedding_size", "dropout",
                                                    "bidirectional")}
        architecture.update(tied=False, pooling="max+mean over valid positions", classes=checkpoint["num_classes"])
        return export_sentiment_model(model, vocab, checkpoint["labels"], args.store, args.name,
                                      architecture=architecture, **common)

    lm_config = LMConfig(**config)
    model = build_model(lm_config, len(vocab))
    model.load_state_dict(checkpoint["model"])
    architecture = {"layers": lm_config.layers, "hidden_size": lm_config.hidden_size,
                    "embedding_size": lm_config.embedding_size, "tied": lm_config.tied,
                    "dropout": lm_config.dropout, "bidirectional": False}
    return export_language_model(model, vocab, args.store, args.name, architecture=architecture, **common)
