"""Export to the model store: parity of onnxruntime against PyTorch, manifest, immutability."""

import hashlib
import json
import logging

import numpy as np
import onnx
import pytest
import torch

from app.manifest import Manifest, load_manifest
from app.sessions import create_session
from app.text import EOS, PAD, UNK, Vocabulary
from training.export import ExportError, _quantized, export_language_model, export_sentiment_model
from training.model import LanguageModel, SentimentClassifier

WORDS = "the company said it expects mr. is chairman a gorgeous , witty film dull and tedious 's movie".split()


@pytest.fixture(scope="module")
def lm_version(tmp_path_factory):
    torch.manual_seed(0)
    # Enough words that a second copy of the tied embedding would show in the file sizes.
    vocab = Vocabulary([EOS, UNK, *WORDS, *(f"w{i}" for i in range(2000))])
    model = LanguageModel(len(vocab), 12, 12, 2, 0.3, True, 0.3).eval()
    store = tmp_path_factory.mktemp("store")
    path = export_language_model(model, vocab, store, "tiny-lm", architecture={"layers": 2}, training={})
    return model, vocab, path


@pytest.fixture(scope="module")
def sentiment_version(tmp_path_factory):
    torch.manual_seed(0)
    vocab = Vocabulary([PAD, UNK, *WORDS])
    model = SentimentClassifier(len(vocab), 8, 6, 2, 0.3, True, 2, vocab.pad_id).eval()
    store = tmp_path_factory.mktemp("store")
    path = export_sentiment_model(model, vocab, ["negative", "positive"], store, "tiny-sentiment",
                                  architecture={"layers": 2}, training={})
    return model, vocab, path


def _tiny_classifier():
    torch.manual_seed(0)
    vocab = Vocabulary([PAD, UNK, *WORDS])
    return SentimentClassifier(len(vocab), 4, 4, 1, 0.0, False, 2, vocab.pad_id).eval(), vocab


@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (1, 6), (5, 1), (3, 13)])
def test_language_model_graphs_match_pytorch(lm_version, batch, seq):
    model, vocab, path = lm_version
    rng = np.random.default_rng(batch * 100 + seq)
    tokens = rng.integers(0, len(vocab), (batch, seq))
    h0 = rng.normal(0, 0.5, (2, batch, 12)).astype(np.float32)
    c0 = rng.normal(0, 0.5, (2, batch, 12)).astype(np.float32)
    with torch.no_grad():
        expected = [t.numpy() for t in model(torch.from_numpy(tokens), torch.from_numpy(h0), torch.from_numpy(c0))]
    full = create_session(path / "model.onnx").run(None, {"tokens": tokens, "h0": h0, "c0": c0})
    last = create_session(path / "last.onnx").run(None, {"tokens": tokens, "h0": h0, "c0": c0})
    for actual, wanted in zip(full, expected, strict=True):
        np.testing.assert_allclose(actual, wanted, atol=1e-5)
    np.testing.assert_allclose(last[0], expected[0][:, -1], atol=1e-5)
    np.testing.assert_allclose(last[1], expected[1], atol=1e-5)
    # Natural-log probabilities: each position's distribution sums to one.
    np.testing.assert_allclose(np.exp(full[0]).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (1, 9), (4, 7)])
def test_sentiment_graph_matches_pytorch_and_ignores_padding(sentiment_version, batch, seq):
    model, vocab, path = sentiment_version
    rng = np.random.default_rng(seq)
    lengths = rng.integers(1, seq + 1, batch)
    tokens = rng.integers(2, len(vocab), (batch, seq))
    tokens[np.arange(seq)[None] >= lengths[:, None]] = vocab.pad_id
    session = create_session(path / "model.onnx")
    (probs,) = session.run(None, {"tokens": tokens, "lengths": lengths})
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens), torch.from_numpy(lengths)).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    # Extra padding, or garbage past each row's length, changes no prediction.
    padded = np.concatenate([tokens, rng.integers(2, len(vocab), (batch, 5))], axis=1)
    (more,) = session.run(None, {"tokens": padded, "lengths": lengths})
    np.testing.assert_allclose(more, probs, atol=1e-6)
    # Each row alone gives the same answer as in the batch.
    for row in range(batch):
        alone = tokens[row : row + 1, : lengths[row]]
        (single,) = session.run(None, {"tokens": alone, "lengths": lengths[row : row + 1]})
        np.testing.assert_allclose(single[0], probs[row], atol=1e-5)


def test_manifest_checksums_match_the_files(lm_version, sentiment_version):
    for _, _, path in (lm_version, sentiment_version):
        manifest = json.loads((path / "manifest.json").read_text())
        on_disk = {p.name for p in path.iterdir() if p.name != "manifest.json"}
        assert set(manifest["files"]) == on_disk
        for name, entry in manifest["files"].items():
            data = (path / name).read_bytes()
            assert entry["sha256"] == hashlib.sha256(data).hexdigest()
            assert entry["bytes"] == len(data)


def test_manifest_describes_graphs_tokenizer_and_selftest(lm_version):
    _, vocab, path = lm_version
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["name"] == "tiny-lm" and manifest["version"] == 1 and manifest["task"] == "language-model"
    assert manifest["graphs"]["full"]["inputs"]["tokens"] == {"dtype": "int64", "shape": ["batch", "seq"]}
    assert manifest["graphs"]["full"]["outputs"]["log_probs"]["shape"] == ["batch", "seq", len(vocab)]
    assert manifest["graphs"]["last"]["file"] == "last.onnx"
    assert manifest["tokenizer"]["special_tokens"]["eos"] == {"token": EOS, "id": 0}
    assert manifest["tokenizer"]["vocab_size"] == len(vocab)
    assert max(manifest["parity"]["max_abs_diff"].values()) <= 1e-4
    # The self-test vectors reproduce on the written graph.
    session = create_session(path / "model.onnx")
    for case in manifest["selftest"]["cases"]:
        tokens = np.array(case["inputs"]["tokens"], dtype=np.int64)
        zeros = np.zeros((2, tokens.shape[0], 12), dtype=np.float32)
        run = session.run(None, {"tokens": tokens, "h0": zeros, "c0": zeros})
        outputs = dict(zip(["log_probs", "hn", "cn"], run, strict=True))
        for check in case["checks"]:
            assert outputs[check["output"]][tuple(check["index"])] == pytest.approx(check["value"], abs=1e-4)


def test_written_manifest_validates_and_round_trips(lm_version, sentiment_version):
    for (_, vocab, path), normaliser in ((lm_version, "ptb"), (sentiment_version, "sst")):
        manifest = load_manifest(path)
        assert manifest.to_json() == (path / "manifest.json").read_text()
        assert manifest.tokenizer.normaliser == normaliser and manifest.tokenizer.vocab_size == len(vocab)
    assert set(load_manifest(lm_version[2]).graphs) == {"full", "last", "full-int8", "last-int8"}
    assert set(load_manifest(sentiment_version[2]).graphs) == {"full"}  # all LSTM: no int8 at fixed scales
    assert load_manifest(sentiment_version[2]).labels == ["negative", "positive"]


def test_metrics_are_measured_on_the_staged_graphs_before_the_one_manifest_write(tmp_path):
    model, vocab = _tiny_classifier()
    seen = {}

    def evaluate(staged, manifest):
        seen["manifest_on_disk"] = (staged / "manifest.json").exists()
        seen["graph_on_disk"] = (staged / manifest.graphs["full"].file).exists()
        seen["manifest"] = manifest
        return {"valid": {"accuracy": 0.5}}

    path = export_sentiment_model(model, vocab, ["negative", "positive"], tmp_path, "tiny-sentiment",
                                  architecture={}, training={}, evaluate=evaluate)
    assert seen["manifest_on_disk"] is False and seen["graph_on_disk"] is True
    assert isinstance(seen["manifest"], Manifest) and seen["manifest"].metrics == {}
    assert load_manifest(path).metrics == {"valid": {"accuracy": 0.5}}


def test_export_prints_and_logs_nothing(tmp_path, capfd, caplog):
    model, vocab = _tiny_classifier()
    with caplog.at_level(logging.WARNING):
        export_sentiment_model(model, vocab, ["negative", "positive"], tmp_path, "tiny-sentiment",
                               architecture={}, training={})
    assert caplog.records == []
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize("name", ["Tiny-lm", "tiny_lm", "-tiny", "tiny--lm", "a" * 65])
def test_model_name_outside_the_contract_is_refused(tmp_path, name):
    model, vocab = _tiny_classifier()
    with pytest.raises(ExportError, match="model name"):
        export_sentiment_model(model, vocab, ["negative", "positive"], tmp_path, name, architecture={}, training={})
    assert not any(tmp_path.iterdir())


def test_tied_weights_are_stored_once(lm_version):
    model, vocab, path = lm_version
    embedding_bytes = len(vocab) * 12 * 4
    weights = (path / "weights.bin").stat().st_size
    graphs = (path / "model.onnx").stat().st_size + (path / "last.onnx").stat().st_size
    # Both graphs together hold one copy of every parameter plus a little structure; a second
    # copy of the embedding (the legacy exporter's transposed decoder) would add embedding_bytes.
    parameter_bytes = sum(p.numel() for p in model.parameters()) * 4
    assert weights + graphs < parameter_bytes + embedding_bytes * 0.5


def test_existing_version_is_never_overwritten_silently(lm_version):
    model, vocab, path = lm_version
    before = (path / "manifest.json").read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        export_language_model(model, vocab, path.parent.parent, "tiny-lm", version=1, architecture={}, training={})
    assert (path / "manifest.json").read_bytes() == before
    assert not list(path.parent.glob(".*.tmp"))


def test_int8_graphs_are_listed_and_close_to_the_float_graph(lm_version):
    _, vocab, path = lm_version
    manifest = load_manifest(path)
    assert manifest.graphs["full-int8"].precision == "int8"
    assert manifest.graphs["last-int8"].quantized_from == "last"
    assert manifest.graphs["last-int8"].activation_scales == "fixed"
    tokens = np.array([[0, 2, 3, 4, 5]], dtype=np.int64)
    zeros = np.zeros((2, 1, 12), dtype=np.float32)
    feeds = {"tokens": tokens, "h0": zeros, "c0": zeros}
    exact = create_session(path / "last.onnx").run(None, feeds)[0]
    quantized = create_session(path / "last.int8.onnx").run(None, feeds)[0]
    # Quantization moves the log-probabilities a little, never wildly.
    assert 0 < np.abs(exact - quantized).max() < 0.5


@pytest.mark.parametrize("graph", ["model.int8.onnx", "last.int8.onnx"])
def test_int8_graphs_answer_a_row_the_same_whatever_rows_share_its_call(lm_version, graph):
    """Fixed activation scales: a row alone and the same row among others get identical outputs."""
    _, vocab, path = lm_version
    session = create_session(path / graph)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, len(vocab), (6, 9), dtype=np.int64)
    states = rng.normal(0, 0.5, (2, 2, 6, 12)).astype(np.float32)
    together = session.run(None, {"tokens": tokens, "h0": states[0], "c0": states[1]})
    for row in range(6):
        alone = session.run(None, {"tokens": tokens[row : row + 1], "h0": states[0][:, row : row + 1],
                                   "c0": states[1][:, row : row + 1]})
        assert np.array_equal(alone[0][0], together[0][row])  # log-probabilities, bit for bit
    ops = {node.op_type for node in onnx.load(str(path / graph), load_external_data=False).graph.node}
    assert "QuantizeLinear" in ops and not ops & {"DynamicQuantizeLinear", "DynamicQuantizeLSTM"}


def test_int8_refuses_an_activation_whose_range_is_unknown(tmp_path):
    """Only an LSTM's output has a range known without calibration; anything else is an export error."""
    weights = onnx.numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "weights")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "weights"], ["y"])], "plain",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 3])], [weights])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(ExportError, match="'x' is not an LSTM's output"):
        _quantized(proto, tmp_path)


