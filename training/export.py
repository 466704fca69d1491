"""Export to the model store: ONNX graphs (legacy TorchScript exporter, dynamic batch and
sequence axes), a parity check of onnxruntime against PyTorch, and manifest.json (an
`app.manifest.Manifest`).

A version directory is written under a temporary name and renamed into place only when every
check has passed and its manifest validates, so a failed export never leaves a half-written
version behind."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import platform
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from app.manifest import (
    FULL,
    GRAPH_FILES,
    INTEGER_TENSORS,
    LAST,
    MANIFEST_FILE,
    PARITY_TOLERANCE,
    SELFTEST_TOLERANCE,
    SIGNATURES,
    FileEntry,
    GraphSpec,
    Manifest,
    ManifestError,
    Precision,
    SelfTest,
    SelfTestCase,
    SelfTestCheck,
    SpecialToken,
    Task,
    TensorSpec,
    TokenizerSpec,
    base_graph,
    graph_name,
    is_model_name,
    parse_manifest,
)
from app.sessions import create_session
from app.text import EOS, PAD, UNK, Vocabulary
from training import lm, sentiment
from training.checkpoint import load_checkpoint
from training.data import DataError, pad_batch
from training.evaluate import evaluate_version, read_version
from training.model import LanguageModel, LastPositionLM, SentimentClassifier

OPSET = 17
VOCAB_FILE = "vocab.txt"
WEIGHTS_FILE = "weights.bin"
# Tensors at least this large go to the shared weights file; small ones stay inline.
EXTERNAL_MIN_BYTES = 1024
INT8: Precision = "int8"
# int8 graphs (language models): the decoder's matrix product -- about half of a position's arithmetic
# -- in int8, its weights quantized per output word ahead of time and its input at a fixed scale; the
# LSTMs stay float32.
#
# Why a fixed scale: onnxruntime's dynamic quantization computes the activations' scale per call from
# all the values in it, so a row's answer moved with the rows that shared its call (up to 0.095 in
# log-probability on ptb-lm v3), and a client asking twice could get two answers. The decoder's input is
# an LSTM's output h = o * tanh(c), inside (-1, 1) whatever the text, so its scale needs no calibration
# data and clips nothing. onnxruntime has no LSTM kernel with fixed activation scales (its int8 LSTM,
# DynamicQuantizeLSTM, computes them per call, over the batch and per step), so the LSTMs stay float32,
# and so does the sentiment classifier, which is all LSTM: it gets no int8 graph.
INT8_OP_TYPES = ["MatMul"]
# The range of an LSTM's output and its uint8 quantization: scale 2/255, zero point 128.
LSTM_OUTPUT_RANGE = (-1.0, 1.0)
# Nodes whose output holds only values of their first input (moved or selected, never changed), as
# between an LSTM and the decoder (Gather: the last position of the last-position graph).
_VALUE_PRESERVING_OPS = {"Transpose", "Squeeze", "Unsqueeze", "Reshape", "Identity", "Gather", "Slice"}

# Measures the staged version: (staged directory, its manifest so far) -> the manifest's metrics.
Evaluate = Callable[[Path, Manifest], dict]


class ExportError(Exception):
    """The export failed a check (parity, existing version); nothing was written."""


def _not_preprocessing_advice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Please consider to run pre-processing before quantization")


def _quantized(proto: onnx.ModelProto, scratch: Path) -> onnx.ModelProto:
    """The int8 twin of a language model's float graph: onnxruntime's quantization of the decoder
    (weights per output column), then each activation quantized at the fixed scale of an LSTM's output
    instead of one computed per call (see ``INT8_OP_TYPES``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source, target = scratch / "float.onnx", scratch / "int8.onnx"
    onnx.save_model(proto, str(source))
    # quantize_dynamic logs (on the root logger, once per graph) the advice to run onnxruntime's
    # pre-processing (shape inference and graph optimisation) first. On these graphs that changes
    # nothing that matters: the same nodes are quantized and the int8 outputs are identical; it only
    # turns Constant nodes into initializers. So that one message is dropped; any other is kept.
    root = logging.getLogger()
    root.addFilter(_not_preprocessing_advice)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=INT8_OP_TYPES)
    finally:
        root.removeFilter(_not_preprocessing_advice)
    quantized = onnx.load(str(target))
    source.unlink()
    target.unlink()
    _fix_activation_scales(quantized.graph)
    return quantized


def _fix_activation_scales(graph: onnx.GraphProto) -> None:
    """Replace each DynamicQuantizeLinear (scale and zero point from the call's values) with a
    QuantizeLinear at the fixed scale of an LSTM's output; an ExportError if one quantizes anything
    else, whose range is not known."""
    producers = {output: node for node in graph.node for output in node.output}
    low, high = LSTM_OUTPUT_RANGE
    scale = (high - low) / 255
    zero_point = round(-low / scale)
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "DynamicQuantizeLinear":
            continue
        tensor = node.input[0]
        source = producers.get(tensor)
        while source is not None and source.op_type in _VALUE_PRESERVING_OPS:
            tensor = source.input[0]
            source = producers.get(tensor)
        # An LSTM's outputs Y and Y_h are hidden states; Y_c (the cell) is unbounded.
        if source is None or source.op_type != "LSTM" or tensor not in source.output[:2]:
            raise ExportError(f"int8: {node.input[0]!r} is not an LSTM's output sequence, so its range is "
                              "unknown and it cannot be quantized at a fixed scale")
        quantized, scale_name, zero_point_name = node.output
        graph.initializer.extend([
            onnx.numpy_helper.from_array(np.array(scale, dtype=np.float32), scale_name),
            onnx.numpy_helper.from_array(np.array(zero_point, dtype=np.uint8), zero_point_name),
        ])
        graph.node.remove(node)
        graph.node.insert(index, onnx.helper.make_node("QuantizeLinear", [node.input[0], scale_name, zero_point_name],
                                                       [quantized], name=node.name))


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
        for name, proto in graphs.items():
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
            onnx.save_model(proto, str(out_dir / GRAPH_FILES[name]))


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


def _require_parity(parity: dict[str, float]) -> None:
    for graph, diff in parity.items():
        if not diff <= PARITY_TOLERANCE:
            raise ExportError(f"{graph} graph: onnxruntime differs from PyTorch by {diff:.2e} "
                              f"(tolerance {PARITY_TOLERANCE:.0e})")


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


def _selftest_checks(outputs: dict[str, np.ndarray], top: int) -> list[SelfTestCheck]:
    """Sparse expected values: for each output, its `top` largest entries along the last axis
    at every leading index (enough to catch a wrong or corrupted graph, small enough for JSON)."""
    checks = []
    for name, array in outputs.items():
        flat = array.reshape(-1, array.shape[-1])
        for row, values in enumerate(flat):
            leading = list(np.unravel_index(row, array.shape[:-1])) if array.ndim > 1 else []
            for column in np.argsort(-values)[:top]:
                checks.append(SelfTestCheck(output=name, index=[int(i) for i in leading] + [int(column)],
                                            value=round(float(values[column]), 6)))
    return checks


def _file_table(out_dir: Path) -> dict[str, FileEntry]:
    return {
        p.name: FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size)
        for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != MANIFEST_FILE
    }


def _graph_table(task: Task, dims: dict[str, int], names: list[str]) -> dict[str, GraphSpec]:
    """The manifest's ``graphs``: file, precision and resolved signature of each written graph.
    An int8 graph has its float twin's signature."""
    table = {}
    for name in names:
        base = base_graph(name)
        signature = SIGNATURES[task][base]
        tensors = {
            group: {
                tensor: TensorSpec(dtype="int64" if tensor in INTEGER_TENSORS else "float32",
                                   shape=[dims.get(d, d) for d in shape])
                for tensor, shape in signature[group].items()
            }
            for group in ("inputs", "outputs")
        }
        quantized = name != base
        table[name] = GraphSpec(file=GRAPH_FILES[name], precision=INT8 if quantized else "float32",
                                quantized_from=base if quantized else None,
                                activation_scales="fixed" if quantized else None, **tensors)
    return table


def _tokenizer(normaliser: str, vocab: Vocabulary) -> TokenizerSpec:
    specials = {
        key: SpecialToken(token=token, id=vocab.id(token)) if token in vocab else None
        for key, token in (("unk", UNK), ("eos", EOS), ("pad", PAD))
    }
    return TokenizerSpec(normaliser=normaliser, vocab_file=VOCAB_FILE, vocab_size=len(vocab),
                         special_tokens=specials)


def _training(training: dict) -> dict:
    """The manifest's ``training``, with the versions of the libraries that exported it."""
    return {**training, "libraries": {"python": platform.python_version(), "torch": torch.__version__,
                                      "onnx": onnx.__version__, "onnxruntime": ort.__version__}}


def _created() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _prepare_dir(store: Path, name: str, version: int | None, force: bool) -> tuple[Path, Path, int]:
    if not is_model_name(name):
        raise ExportError(f"model name {name!r} must be lower-case letters and digits, words joined by single "
                          "'-', at most 64 characters")
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


def _finish(staging: Path, final: Path, manifest: Manifest, evaluate: Evaluate | None) -> Path:
    """Measure the metrics on the staged graphs, validate the manifest, write it once, and move
    the version into place."""
    if evaluate:
        manifest = manifest.model_copy(update={"metrics": evaluate(staging, manifest)})
    try:
        # Validated as it will be read back, so what is written is what the service accepts.
        manifest = parse_manifest(json.loads(manifest.to_json()))
    except ManifestError as e:
        raise ExportError(str(e)) from None
    manifest.write(staging)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


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
    evaluate: Evaluate | None = None,
    force: bool = False,
) -> Path:
    """Write ``store/name/version/`` with the full and last-position graphs and their int8 twins;
    returns its path. ``evaluate`` measures the metrics on the staged version."""
    final, staging, version = _prepare_dir(store, name, version, force)
    try:
        model = model.eval()
        rng = np.random.default_rng(0)
        cases = _lm_cases(model, len(vocab), rng)
        example = tuple(torch.from_numpy(v) for v in cases[3].values())
        signatures = SIGNATURES["language-model"]
        graphs = {
            FULL: _to_onnx(model, example, signatures[FULL]),
            LAST: _to_onnx(LastPositionLM(model), example, signatures[LAST]),
        }
        # Quantize before untying: the int8 decoder needs the transposed matrix as a constant.
        graphs.update({graph_name(graph, INT8): _quantized(proto, staging) for graph, proto in list(graphs.items())})
        for graph in (FULL, LAST):
            _untie_transposed_copies(graphs[graph].graph)
        _write_graphs(graphs, staging)
        session = create_session(staging / GRAPH_FILES[FULL])
        parity = {
            FULL: _check_parity(model, session, cases),
            LAST: _check_parity(LastPositionLM(model), create_session(staging / GRAPH_FILES[LAST]), cases),
        }
        _require_parity(parity)
        vocab.save(staging / VOCAB_FILE)

        sentences = [["the", "company", "said", "it", "expects"], ["mr.", "<unk>", "is", "chairman"]]
        selftest_cases = []
        for sentence in sentences:
            tokens = np.array([[vocab.eos_id, *vocab.encode(sentence)]], dtype=np.int64)
            zeros = np.zeros((model.layers, 1, model.hidden_size), dtype=np.float32)
            log_probs, hn, _ = session.run(None, {"tokens": tokens, "h0": zeros, "c0": zeros})
            selftest_cases.append(SelfTestCase(graph=FULL, inputs={"tokens": tokens.tolist()},
                                               checks=_selftest_checks({"log_probs": log_probs, "hn": hn}, top=3)))

        manifest = Manifest(
            name=name, version=version, task="language-model", created=_created(), description=description,
            files=_file_table(staging),
            graphs=_graph_table("language-model",
                                {"layers": model.layers, "hidden": model.hidden_size, "vocab": len(vocab)},
                                list(graphs)),
            tokenizer=_tokenizer(normaliser, vocab), architecture=architecture, training=_training(training),
            conventions={"log": "natural", "context_start": EOS},
            parity={"max_abs_diff": parity, "tolerance": PARITY_TOLERANCE},
            selftest=SelfTest(tolerance=SELFTEST_TOLERANCE, cases=selftest_cases),
        )
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
    evaluate: Evaluate | None = None,
    force: bool = False,
) -> Path:
    """Write ``store/name/version/`` with the classifier graph (no int8 twin: see ``INT8_OP_TYPES``);
    returns its path.
    ``evaluate`` measures the metrics on the staged version."""
    if vocab.pad_id is None:
        raise ValueError(f"a sentiment vocabulary needs {PAD}")
    final, staging, version = _prepare_dir(store, name, version, force)
    try:
        model = model.eval()
        rng = np.random.default_rng(0)
        cases = _sentiment_cases(len(vocab), vocab.pad_id, rng)
        example = tuple(torch.from_numpy(v) for v in cases[2].values())
        graphs = {FULL: _to_onnx(model, example, SIGNATURES["sentiment"][FULL])}
        _write_graphs(graphs, staging)
        session = create_session(staging / GRAPH_FILES[FULL])
        parity = {FULL: _check_parity(model, session, cases)}
        _require_parity(parity)
        vocab.save(staging / VOCAB_FILE)

        sentences = [["a", "gorgeous", ",", "witty", "film"], ["dull", "and", "tedious"], ["it", "'s", "a", "movie"]]
        tokens, lengths = (t.numpy() for t in pad_batch([vocab.encode(s) for s in sentences], vocab.pad_id))
        (probs,) = session.run(None, {"tokens": tokens, "lengths": lengths})
        selftest_case = SelfTestCase(graph=FULL, inputs={"tokens": tokens.tolist(), "lengths": lengths.tolist()},
                                     checks=_selftest_checks({"probs": probs}, top=len(labels)))

        manifest = Manifest(
            name=name, version=version, task="sentiment", created=_created(), description=description,
            files=_file_table(staging),
            graphs=_graph_table("sentiment", {"classes": len(labels)}, list(graphs)),
            tokenizer=_tokenizer(normaliser, vocab), labels=labels, architecture=architecture,
            training=_training(training),
            parity={"max_abs_diff": parity, "tolerance": PARITY_TOLERANCE},
            selftest=SelfTest(tolerance=SELFTEST_TOLERANCE, cases=[selftest_case]),
        )
        return _finish(staging, final, manifest, evaluate)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_run(
    run_dir: Path,
    store: Path,
    name: str,
    *,
    version: int | None = None,
    valid: Path | None = None,
    test: Path | None = None,
    description: str = "",
    data: str = "",
    note: str = "",
    force: bool = False,
    command: str = "",
) -> Path:
    """The ``export`` command: ``run_dir/best.pt`` into ``store/name/version`` (the next free
    version unless given), with perplexity or accuracy on ``valid`` and ``test`` measured on the
    exported graph (and on the int8 graph for ``valid``). ``command`` is recorded as the export
    command in the manifest."""
    checkpoint_path = run_dir / "best.pt"
    if not checkpoint_path.exists():
        raise DataError(f"no best.pt in {run_dir}: train a model there first")
    checkpoint = load_checkpoint(checkpoint_path)
    config = checkpoint["config"]
    metrics_file = run_dir / "metrics.json"
    run_metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    training = {
        "data": data,
        "command": checkpoint.get("command", ""),
        "export_command": command,
        "seed": config["seed"],
        # Epochs trained (the last evaluated point; fractional where dev was evaluated mid-epoch).
        "epochs": run_metrics["history"][-1]["epoch"] if run_metrics.get("history") else checkpoint.get("epoch"),
        "note": note,
        "best_epoch": checkpoint["epoch"],
        "train_seconds": run_metrics.get("train_seconds", checkpoint.get("train_seconds")),
        "config": config,
        "history": run_metrics.get("history", []),
    }
    # A distilled student's teacher (dev accuracy, fine-tuning history) and transfer set, as its run reported them.
    training.update({key: run_metrics[key] for key in ("teacher", "transfer_set") if run_metrics.get(key)})

    common = dict(version=version, normaliser=checkpoint["normaliser"], description=description,
                  training=training, evaluate=_evaluator(valid, test), force=force)
    if checkpoint["task"] == "sentiment":
        model, vocab = sentiment.model_from_checkpoint(checkpoint)
        architecture = {key: config[key] for key in ("layers", "hidden_size", "embedding_size", "dropout",
                                                    "bidirectional")}
        architecture.update(tied=False, pooling="max+mean over valid positions", classes=checkpoint["num_classes"])
        return export_sentiment_model(model, vocab, checkpoint["labels"], store, name,
                                      architecture=architecture, **common)

    model, vocab = lm.model_from_checkpoint(checkpoint)
    architecture = {key: config[key] for key in ("layers", "hidden_size", "embedding_size", "tied", "dropout")}
    architecture["bidirectional"] = False
    return export_language_model(model, vocab, store, name, architecture=architecture, **common)


def _evaluator(valid: Path | None, test: Path | None) -> Evaluate:
    """The metrics of an export: perplexity or accuracy on ``valid`` and ``test`` measured on the exported
    graph, and the int8 graph's on ``valid`` with its agreement with the float graph."""

    def evaluate(staged: Path, manifest: Manifest) -> dict:
        splits = {"valid": valid, "test": test}
        metrics = {split: evaluate_version(staged, path, manifest=manifest)
                   for split, path in splits.items() if path is not None}
        int8 = graph_name(FULL, INT8)
        if valid is not None and int8 in manifest.graphs:
            # The int8 graph's change, on validation data only.
            metrics["valid_int8"] = evaluate_version(staged, valid, int8, manifest=manifest, compare_to=FULL)
        return metrics

    return evaluate


def export_from_version(
    version_dir: Path,
    store: Path,
    name: str,
    *,
    version: int | None = None,
    valid: Path | None = None,
    test: Path | None = None,
    description: str = "",
    data: str = "",
    note: str = "",
    force: bool = False,
    command: str = "",
) -> Path:
    """The ``export --from-version`` command: a language-model version's weights (read back from its
    ``full`` graph, `training.warmstart`) exported again into ``store/name/version`` by this exporter, so
    a shipped model gets what the exporter has learnt since (int8 graphs at fixed scales) without
    retraining. The source's training record is kept, ``data``, ``description`` and ``note`` replacing
    its own where given; the metrics are measured again on the new graphs."""
    from training.warmstart import language_model_weights

    source = read_version(version_dir)
    state, architecture, vocab, normaliser = language_model_weights(version_dir)
    record = source.training
    model = LanguageModel(len(vocab), architecture["embedding_size"], architecture["hidden_size"],
                          architecture["layers"], dropout=0.0, tied=architecture["tied"], init_range=0.0)
    # (every weight is then loaded)
    model.load_state_dict(state)
    training = {key: value for key, value in record.items() if key != "libraries"}
    reexport = f"Weights exported again from {source.name} v{source.version} (export --from-version)."
    training.update(export_command=command, note=" ".join(filter(None, [note or record.get("note", ""), reexport])))
    if data:
        training["data"] = data
    architecture = {**source.architecture, **architecture}
    return export_language_model(model, vocab, store, name, version=version, normaliser=normaliser,
                                 description=description or source.description, architecture=architecture,
                                 training=training, evaluate=_evaluator(valid, test), force=force)
