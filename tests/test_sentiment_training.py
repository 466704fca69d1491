"""The classifier: SST tree phrases, padding invariance, a tiny end-to-end training run."""

import sys

import pytest
import torch

from training.checkpoint import load_checkpoint
from training.config import SentimentConfig
from training.data import DataError, pad_batch, read_labelled, read_tree_phrases
from training.model import SentimentClassifier, reverse_padded
from training.sentiment import accuracy, model_from_checkpoint, train_sentiment

TREES = [
    "(3 (2 The) (4 (3 gorgeous) (2 film)))",
    "(1 (2 A) (1 (0 dull) (2 -LRB-mess-RRB-)))",
    "(2 (2 It) (2 exists))",
]


def test_tree_phrases_give_every_labelled_node_once(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(TREES) + "\n")
    phrases = {" ".join(p.tokens): p.label for p in read_tree_phrases(path, num_classes=5)}
    assert phrases["the gorgeous film"] == 3
    assert phrases["gorgeous"] == 3 and phrases["dull"] == 0 and phrases["it exists"] == 2
    assert phrases["a dull -lrb-mess-rrb-"] == 1
    binary = {" ".join(p.tokens): p.label for p in read_tree_phrases(path, num_classes=2)}
    assert "it exists" not in binary and "the" not in binary  # neutral phrases are dropped
    assert binary["the gorgeous film"] == 1 and binary["dull"] == 0


@pytest.mark.parametrize("line", ["(3 (2 The) (4 film)", "(3 (2 The)))", "just words"])
def test_malformed_tree_is_a_data_error_with_its_line(tmp_path, line):
    path = tmp_path / "train.txt"
    path.write_text(TREES[0] + "\n" + line + "\n")
    with pytest.raises(DataError, match=r"train.txt:2: not an SST tree"):
        read_tree_phrases(path, 2)


def test_reverse_padded_reverses_only_the_real_tokens():
    x = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]]).unsqueeze(-1)
    reversed_ = reverse_padded(x, torch.tensor([3, 2]))
    assert reversed_.squeeze(-1).tolist() == [[3, 2, 1, 0], [5, 4, 0, 0]]
    assert torch.equal(reverse_padded(reversed_, torch.tensor([3, 2])), x)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_padding_never_changes_a_prediction(bidirectional):
    torch.manual_seed(0)
    model = SentimentClassifier(30, 8, 6, 2, 0.5, bidirectional, 2, pad_id=0).eval()
    sentences = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    tokens, lengths = pad_batch(sentences, pad_id=0)
    batched = model(tokens, lengths)
    for row, sentence in enumerate(sentences):
        alone = model(torch.tensor([sentence]), torch.tensor([len(sentence)]))
        torch.testing.assert_close(alone[0], batched[row])
    longer = torch.cat([tokens, torch.randint(1, 30, (3, 4))], dim=1)
    torch.testing.assert_close(model(longer, lengths), batched)


def test_tiny_classifier_learns_and_keeps_the_best_dev_model(tmp_path):
    positive = ["a gorgeous film", "witty and gorgeous", "a witty film", "gorgeous"]
    negative = ["a dull film", "dull and tedious", "a tedious film", "dull"]
    lines = [f"1 {s}" for s in positive] + [f"0 {s}" for s in negative]
    (tmp_path / "train").write_text("\n".join(lines * 4) + "\n")
    (tmp_path / "dev").write_text("1 gorgeous and witty\n0 tedious and dull\n1 witty\n0 tedious\n")
    config = SentimentConfig(embedding_size=8, hidden_size=8, epochs=15, batch_size=4, lr=0.02, dropout=0.0)
    metrics = train_sentiment(config, tmp_path / "train", tmp_path / "dev", tmp_path / "run")
    assert metrics["best_dev_accuracy"] == 1.0
    assert metrics["history"][0]["train_loss"] > metrics["history"][-1]["train_loss"] * 3
    checkpoint = load_checkpoint(tmp_path / "run" / "best.pt", "sentiment")
    assert checkpoint["epoch"] == metrics["best_epoch"]
    assert checkpoint["task"] == "sentiment" and checkpoint["normaliser"] == "sst"
    # best.pt holds the best dev model, not the last one.
    model, vocab = model_from_checkpoint(checkpoint)
    assert accuracy(model, read_labelled(tmp_path / "dev", 2), vocab) == 1.0
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    with pytest.raises(FileExistsError):
        train_sentiment(config, tmp_path / "train", tmp_path / "dev", tmp_path / "run")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1 fine\n7 bad label\n", r":2: expected '<label 0-1> <sentence>'"),
        ("positive great film\n", r":1: expected"),
        ("1\n", r":1: expected"),
    ],
)
def test_malformed_labelled_file_names_the_line(tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_labelled(path, 2)


def test_pretrained_vectors_without_the_encoder_package_is_a_clear_error(monkeypatch):
    from training.embeddings import minilm_word_vectors

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # as if not installed
    with pytest.raises(DataError, match=r"pip install -e '\.\[pretrained\]'"):
        minilm_word_vectors(["good", "bad"])
