"""The sentiment classifier distilled from a fine-tuned transformer (Tang et al. 2019, "Distilling
Task-Specific Knowledge from BERT into Simple Neural Networks").

Three stages, each kept in the run directory and skipped when a later ``distill-sentiment`` finds
it there, so an interrupted run resumes at the stage it stopped in:

1. **teacher** (``teacher/``): all-MiniLM-L6-v2 (the ``[pretrained]`` extra), mean-pooled, with a
   linear head, fine-tuned on the labelled SST phrases and selected on dev accuracy; with
   ``teachers`` > 1, as many fine-tuned from seeds in a row (``teacher-2/``, ...), their logits averaged;
2. **transfer set** (``transfer.pt``): the training phrases plus ``augment`` variants of every
   training sentence (words masked to ``<unk>``, n-grams sampled), each with the teacher's logits,
   and the teacher's report; once it is there, the teachers' weights are not needed again;
3. **student** (``best.pt``): the biLSTM of ``train-sentiment`` regressing the teacher's logits (mean
   squared error, as in the paper), selected on dev accuracy; ``best.pt`` has the train-sentiment
   checkpoint format, so ``python -m training export`` ships it unchanged.

The teacher is a training-time tool only: the service runs the student on onnxruntime. Tang et al.
also replace words by others of the same part of speech; no tagger is available offline here, so
this augmentation masks and samples n-grams only."""

from __future__ import annotations

import dataclasses
import math
import platform
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from app.text import PAD, UNK, Vocabulary
from training.checkpoint import cpu_state_dict, require_normaliser, save_checkpoint
from training.config import DISTILL_STAGES, DistillConfig, SentimentConfig
from training.data import DataError, LabelledText, pad_batch, read_labelled, read_tree_phrases
from training.distributed import CPU
from training.report import plot_curves, write_metrics
from training.sentiment import LABELS, _load_pretrained, build_model

TeacherLogits = Callable[[Sequence[Sequence[str]]], torch.Tensor]
"""Token lists in, float32 logits [len, classes] out."""


def averaged(teachers: Sequence[TeacherLogits]) -> TeacherLogits:
    """An ensemble: the mean of ``teachers``' logits (one teacher is itself)."""
    if len(teachers) == 1:
        return teachers[0]
    return lambda texts: torch.stack([teacher(texts) for teacher in teachers]).mean(0)


def augmented(sentences: Sequence[Sequence[str]], config: DistillConfig, rng: random.Random) -> list[list[str]]:
    """``config.augment`` variants of each sentence: with ``ngram_probability`` a random n-gram of it
    (1 <= n <= 5), then each word masked to ``<unk>`` with ``mask_probability``."""
    variants = []
    for sentence in sentences:
        for _ in range(config.augment):
            words = list(sentence)
            if len(words) > 1 and rng.random() < config.ngram_probability:
                n = rng.randint(1, min(5, len(words)))
                start = rng.randrange(len(words) - n + 1)
                words = words[start : start + n]
            variants.append([UNK if rng.random() < config.mask_probability else w for w in words])
    return variants


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the logits, summed over classes, averaged over examples (Tang et al.)."""
    return F.mse_loss(student_logits, teacher_logits, reduction="sum") / student_logits.size(0)


def train_student(
    config: SentimentConfig,
    texts: list[list[str]],
    targets: torch.Tensor,
    dev: list[LabelledText],
    vocab: Vocabulary,
    num_classes: int,
    on_best: Callable[[nn.Module, dict], None] | None = None,
    device: torch.device = CPU,
    deadline: float | None = None,
) -> tuple[nn.Module, list[dict]]:
    """The classifier trained on ``device`` to regress ``targets`` (teacher logits [len(texts), classes])
    on ``texts``, evaluated on ``dev`` ``config.evals_per_epoch`` times an epoch; ``on_best(model, point)``
    is called whenever dev accuracy improves. With a ``deadline`` (a `time.perf_counter` value) training
    stops at the first evaluation past it. Returns the model as trained last and the history."""
    from training.sentiment import accuracy, learning_rate_schedule

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    model = build_model(config, vocab, num_classes)
    if config.pretrained:
        _load_pretrained(model, vocab, config, device)
    model.embedding.weight.requires_grad_(not config.freeze_embeddings)
    model.to(device)
    targets = targets.to(device)
    optimizer = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=config.lr,
                                 weight_decay=config.weight_decay)
    encoded = [vocab.encode(text) for text in texts]  # once, not every epoch
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    chunks = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    schedule = learning_rate_schedule(optimizer, config, len(chunks))
    eval_every = max(1, math.ceil(len(chunks) / config.evals_per_epoch))
    history: list[dict] = []
    best = -math.inf
    for epoch in range(1, config.epochs + 1):
        rng.shuffle(chunks)
        model.train()
        started, total, seen = time.perf_counter(), 0.0, 0
        progress = tqdm(chunks, desc=f"student epoch {epoch}/{config.epochs}", unit="batch", mininterval=5,
                        dynamic_ncols=True)
        for step, chunk in enumerate(progress, start=1):
            tokens, lengths = pad_batch([encoded[i] for i in chunk], vocab.pad_id)
            loss = distillation_loss(model.logits(tokens.to(device), lengths.to(device)), targets[chunk])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            schedule.step()
            total += loss.item() * len(chunk)
            seen += len(chunk)
            progress.set_postfix(refresh=False, mse=f"{total / seen:.4f}")
            if step % eval_every and step != len(chunks):
                continue
            dev_accuracy = accuracy(model, dev, vocab)
            model.train()
            point = {"epoch": round(epoch - 1 + step / len(chunks), 2), "train_mse": total / seen,
                     "dev_accuracy": dev_accuracy, "seconds": round(time.perf_counter() - started, 1)}
            history.append(point)
            improved = dev_accuracy > best
            best = max(best, dev_accuracy)
            tqdm.write(f"student {point['epoch']:6.2f} | mse {total / seen:.4f} | dev acc {dev_accuracy:.4f}"
                       f"{' (best)' if improved else ''}")
            if improved and on_best is not None:
                on_best(model, point)
            if deadline is not None and time.perf_counter() > deadline:
                tqdm.write(f"student: stopping at epoch {point['epoch']}: the run's time is up (--max-minutes)")
                return model, history
    return model, history


def distill_sentiment(
    student: SentimentConfig,
    config: DistillConfig,
    train_path: Path,
    dev_path: Path,
    trees_path: Path,
    run_dir: Path,
    command: str = "",
    normaliser: str = "sst",
    teacher: TeacherLogits | None = None,
    device: torch.device = CPU,
    max_minutes: float | None = None,
    stop_after: str | None = None,
) -> dict:
    """Run (or resume) the three stages into ``run_dir`` for SST-2 on ``device``; returns the metrics.
    ``teacher`` replaces the fine-tuned transformer (tests give a function of the tokens). With ``max_minutes``
    the student stops at its first dev evaluation past that wall time since the run started. ``stop_after``
    ("teacher" or "transfer", `DISTILL_STAGES`) ends the run once that stage is in ``run_dir``: teachers fine-tuned
    by separate runs side by side, say, then gathered into one run directory as its teacher/, teacher-2/, ...
    (a teacher's seed is the run's ``seed`` plus its place), and students of several settings trained
    side by side from copies of one transfer set."""
    require_normaliser(normaliser)
    if stop_after is not None and stop_after not in DISTILL_STAGES:
        raise DataError(f"unknown stage {stop_after!r}; a run can stop after {', '.join(DISTILL_STAGES)}")
    if (run_dir / "best.pt").exists():
        raise FileExistsError(f"{run_dir} already holds a distilled model; choose another --run-dir")
    num_classes = 2
    sentences = read_labelled(train_path, num_classes)
    dev = read_labelled(dev_path, num_classes)
    phrases = read_tree_phrases(trees_path, num_classes)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    transfer_path = run_dir / "transfer.pt"
    if transfer_path.exists():
        # The teachers' work is done: their logits and report are in the transfer set, their weights unneeded.
        transfer = torch.load(transfer_path, weights_only=True)
        teacher_report = transfer.get("teacher", {})
        print(f"transfer set from {transfer_path}: {len(transfer['texts'])} texts")
        if stop_after == "teacher":
            return {"stopped_after": stop_after, "teacher": teacher_report}
    else:
        teacher_report: dict = {}
        if teacher is None:
            from training.teacher import fine_tuned_teachers

            teacher, teacher_report = fine_tuned_teachers(phrases, dev, config, run_dir, student.seed, device=device)
        if stop_after == "teacher":
            print(f"stopping after the teacher stage (--stop-after): {run_dir}")
            return {"stopped_after": stop_after, "teacher": teacher_report}
        rng = random.Random(student.seed)
        texts = [e.tokens for e in phrases] + augmented([e.tokens for e in sentences], config, rng)
        print(f"labelling the transfer set with the teacher: {len(phrases)} phrases + "
              f"{len(texts) - len(phrases)} augmented sentences")
        transfer = {"texts": texts, "logits": teacher(texts).float(), "teacher": teacher_report}
        save_checkpoint(transfer, transfer_path)
    texts, targets = transfer["texts"], transfer["logits"]
    agreement = _agreement(targets[: len(phrases)], phrases)
    print(f"teacher agrees with {agreement:.2%} of the training phrases' labels")
    transfer_report = {"phrases": len(phrases), "augmented": len(texts) - len(phrases),
                       "teacher_agreement_with_phrase_labels": agreement}
    if stop_after == "transfer":
        print(f"stopping after the transfer set (--stop-after): {transfer_path}")
        return {"stopped_after": stop_after, "teacher": teacher_report, "transfer_set": transfer_report}

    vocab = Vocabulary.build(texts, specials=(PAD, UNK), min_count=student.min_count)
    vocab.save(run_dir / "vocab.txt")

    def keep(model: nn.Module, point: dict) -> None:
        save_checkpoint({
            "task": "sentiment", "normaliser": normaliser, "config": dataclasses.asdict(student),
            "vocab": vocab.tokens, "model": cpu_state_dict(model), "num_classes": num_classes,
            "labels": LABELS[num_classes], "epoch": point["epoch"], "dev_accuracy": point["dev_accuracy"],
            "command": command, "train_file": f"{trees_path.name} (distilled)",
        }, run_dir / "best.pt")

    _, history = train_student(student, texts, targets, dev, vocab, num_classes, keep, device,
                               None if max_minutes is None else started + 60 * max_minutes)
    best = max(history, key=lambda h: h["dev_accuracy"])
    metrics = {
        "task": "sentiment", "method": "distillation (Tang et al. 2019)", "config": dataclasses.asdict(student),
        "distillation": dataclasses.asdict(config), "teacher": teacher_report, "transfer_set": transfer_report,
        "history": history, "best_epoch": best["epoch"], "best_dev_accuracy": best["dev_accuracy"],
        "train_seconds": round(time.perf_counter() - started, 1), "command": command,
        "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
    }
    write_metrics(run_dir, metrics)
    plot_curves(run_dir / "curves.png", history, ["dev_accuracy"], "accuracy", "distilled sentiment")
    checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
    checkpoint["train_seconds"] = metrics["train_seconds"]
    save_checkpoint(checkpoint, run_dir / "best.pt")
    return metrics


def _agreement(logits: torch.Tensor, examples: Sequence[LabelledText]) -> float:
    labels = torch.tensor([e.label for e in examples])
    return float((logits.argmax(-1) == labels).float().mean()) if len(examples) else math.nan

