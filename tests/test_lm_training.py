"""The language model's training mechanics on tiny corpora built here."""

import math

import pytest
import torch

from app.text import EOS, UNK, Vocabulary
from training.config import LMConfig
from training.data import batchify, bptt_windows, encode_lm_corpus
from training.lm import build_model, evaluate_stream, learning_rate, train_epoch, train_step

SENTENCES = [["the", "cat", "sat"], ["a", "dog", "ran", "far"], ["the", "dog", "sat"]]


@pytest.fixture
def vocab():
    return Vocabulary.build(SENTENCES, specials=(EOS, UNK))


def test_corpus_stream_closes_every_line_with_eos(vocab):
    stream = encode_lm_corpus(SENTENCES, vocab)
    assert stream.numel() == sum(len(s) + 1 for s in SENTENCES)
    assert vocab.decode(stream.tolist()) == ["the", "cat", "sat", EOS, "a", "dog", "ran", "far", EOS,
                                             "the", "dog", "sat", EOS]


def test_bptt_windows_shift_targets_by_one_and_cover_each_row():
    stream = torch.arange(23)
    batched = batchify(stream, 2)  # 11 steps per row; token 22 is dropped
    assert batched.shape == (2, 11)
    assert batched[1, 0] == 11  # row 1 continues where row 0's slice of the stream ends
    windows = list(bptt_windows(batched, 4))
    assert [w[0].shape for w in windows] == [(2, 4), (2, 4), (2, 2)]
    for inputs, targets in windows:
        assert torch.equal(targets, inputs + 1)
    covered = torch.cat([inputs for inputs, _ in windows], dim=1)
    assert torch.equal(covered, batched[:, :-1])


def test_state_carried_across_windows_equals_one_long_window(vocab):
    torch.manual_seed(0)
    # A wide initialisation makes the untrained state carry real information.
    model = build_model(LMConfig(embedding_size=8, hidden_size=8, init_range=0.5), len(vocab)).eval()
    data = batchify(encode_lm_corpus(SENTENCES * 4, vocab), 2)
    windowed = evaluate_stream(model, data, bptt=3)
    whole = evaluate_stream(model, data, bptt=data.size(1))
    assert windowed == pytest.approx(whole, rel=1e-5)
    # Without the carried state the figure changes: the test above could fail.
    with torch.no_grad():
        loss = 0.0
        for inputs, targets in bptt_windows(data, 3):
            logits, _, _ = model.logits(inputs, *model.initial_state(2))
            loss += torch.nn.functional.cross_entropy(logits.reshape(-1, len(vocab)), targets.reshape(-1),
                                                      reduction="sum").item()
    assert loss / (data.size(1) - 1) / 2 != pytest.approx(whole, rel=1e-3)


def _gradient_norm(model):
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))


def test_clipping_bounds_the_gradient_norm(vocab):
    torch.manual_seed(0)
    data = batchify(encode_lm_corpus(SENTENCES * 4, vocab), 2)
    inputs, targets = next(bptt_windows(data, 5))
    norms = {}
    for max_norm in (1e9, 0.05):
        config = LMConfig(embedding_size=8, hidden_size=8, init_range=0.5, max_grad_norm=max_norm)
        torch.manual_seed(0)
        model = build_model(config, len(vocab))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keeps the gradients inspectable
        train_step(model, inputs, targets, model.initial_state(2), config, optimizer)
        norms[max_norm] = _gradient_norm(model)
    assert norms[1e9] > 0.05 * 10  # unclipped, the gradient is far above the bound
    assert norms[0.05] == pytest.approx(0.05, rel=1e-4)


def test_tiny_model_overfits_a_tiny_corpus(vocab):
    config = LMConfig(embedding_size=32, hidden_size=32, dropout=0.0, batch_size=2, bptt=5, lr=1.0, init_range=0.3)
    torch.manual_seed(0)
    model = build_model(config, len(vocab))
    data = batchify(encode_lm_corpus(SENTENCES * 8, vocab), config.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    first = train_epoch(model, data, config, optimizer)
    for _ in range(20):
        last = train_epoch(model, data, config, optimizer)
    # The corpus repeats every 13 tokens, so a model that learned it predicts almost every
    # token: from over 2 nats (no better than unigram) to under 0.1.
    assert first > 2.0
    assert last < 0.1


def test_learning_rate_schedule_decays_after_the_plateau():
    config = LMConfig(lr=1.0, lr_decay=0.5, decay_after=4)
    assert [learning_rate(config, e) for e in (1, 4, 5, 6)] == [1.0, 1.0, 0.5, 0.25]


def test_tied_weights_share_one_matrix(vocab):
    model = build_model(LMConfig(embedding_size=8, hidden_size=8, tied=True), len(vocab))
    assert model.decoder.weight.data_ptr() == model.embedding.weight.data_ptr()
    with pytest.raises(ValueError, match="tied"):
        build_model(LMConfig(embedding_size=8, hidden_size=6, tied=True), len(vocab))
