"""Training of the sentence classifier: length-bucketed padded batches, Adam, gradient-norm
clipping, model selection on dev accuracy, test accuracy reported once for the chosen model.

Under torchrun (`training.distributed`) every rank draws the same sequence of batches and trains on
its own contiguous block of each, weighted so that DistributedDataParallel's average of the ranks'
gradients is the one-process gradient of the whole batch: ``batch_size`` is the global batch."""

from __future__ import annotations

import dataclasses
import math
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from app.text import PAD, UNK, Vocabulary
from training.checkpoint import cpu_state_dict, load_checkpoint, require_normaliser, save_checkpoint
from training.config import LR_SCHEDULES, SentimentConfig
from training.data import DataError, LabelledText, pad_batch, read_labelled, read_tree_phrases
from training.distributed import CPU, SINGLE_PROCESS, Worker
from training.model import SentimentClassifier
from training.report import plot_curves, write_metrics

LABELS = {2: ["negative", "positive"], 5: ["very negative", "negative", "neutral", "positive", "very positive"]}


def build_model(config: SentimentConfig, vocab: Vocabulary, num_classes: int) -> SentimentClassifier:
    return SentimentClassifier(
        len(vocab), config.embedding_size, config.hidden_size, config.layers, config.dropout,
        config.bidirectional, num_classes, vocab.pad_id,
    )


def learning_rate_schedule(optimizer: torch.optim.Optimizer, config: SentimentConfig,
                           steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The scheduler to step after every batch: ``config.lr`` throughout ("constant"), or a half cosine
    from it down to 0 at the last batch of ``config.epochs`` ("cosine")."""
    if config.lr_schedule not in LR_SCHEDULES:
        raise DataError(f"unknown learning-rate schedule {config.lr_schedule!r}; known: {', '.join(LR_SCHEDULES)}")
    total = max(1, steps_per_epoch * config.epochs)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def batches(examples: list[LabelledText], vocab: Vocabulary, batch_size: int, shuffle: bool, rng: random.Random):
    """(tokens, lengths, labels) batches of similar lengths, so little compute goes to padding."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].tokens), rng.random() if shuffle else i))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(chunks)
    for chunk in chunks:
        tokens, lengths = pad_batch([vocab.encode(examples[i].tokens) for i in chunk], vocab.pad_id)
        yield tokens, lengths, torch.tensor([examples[i].label for i in chunk])


def own_share(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], worker: Worker
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """This rank's contiguous block of a (tokens, lengths, labels) batch and the weight that turns
    the block's summed loss into its part of the batch mean: N / batch size, as DDP divides the sum
    of the N ranks' gradients by N. A rank whose block of a short last batch is empty takes the
    batch's first example with weight 0: it still has to join the gradient all-reduce."""
    size = batch[2].numel()
    rows, weight = worker.rows(size), worker.world_size / size
    if rows.start == rows.stop:
        rows, weight = slice(0, 1), 0.0
    tokens, lengths, labels = (t[rows].to(worker.device) for t in batch)
    return tokens, lengths, labels, weight


class _Logits(nn.Module):
    """The classifier's logits() as forward(): DistributedDataParallel synchronises what runs through
    forward(), and the classifier's own forward() is the exported softmax."""

    def __init__(self, classifier: SentimentClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.classifier.logits(tokens, lengths)


@torch.no_grad()
def accuracy(model: SentimentClassifier, examples: list[LabelledText], vocab: Vocabulary,
             worker: Worker = SINGLE_PROCESS) -> float:
    """The fraction classified right; under torchrun each rank scores its own block of the examples
    and every rank gets the fraction over all of them."""
    model.eval()
    device = next(model.parameters()).device
    own = examples[worker.rows(len(examples))]
    correct = 0
    for tokens, lengths, labels in batches(own, vocab, 256, False, random.Random(0)):
        correct += int((model.logits(tokens.to(device), lengths.to(device)).argmax(-1) == labels.to(device)).sum())
    correct, total = worker.total(correct, len(own))
    return correct / total


def train_sentiment(
    config: SentimentConfig,
    train_path: Path,
    dev_path: Path,
    run_dir: Path,
    num_classes: int = 2,
    trees_path: Path | None = None,
    command: str = "",
    normaliser: str = "sst",
    worker: Worker = SINGLE_PROCESS,
    amp: bool = False,
) -> dict:
    """Train into ``run_dir`` (best.pt by dev accuracy, metrics.json, curves.png). ``normaliser``
    (an `app.text.NORMALISERS` id) is recorded in best.pt for the export: it maps raw text to the
    corpus's conventions at serving time.

    ``worker`` is this process's place under torchrun (`training.distributed`): every rank reads the
    data and gets the same all-reduced accuracies; rank 0 alone prints and writes ``run_dir``.
    ``amp`` trains in CUDA float16 mixed precision."""
    require_normaliser(normaliser)
    if (run_dir / "best.pt").exists():
        raise FileExistsError(f"{run_dir} already holds a trained model; choose another --run-dir")
    if config.batch_size % worker.world_size:
        raise DataError(f"batch size {config.batch_size} is the global batch, cut into equal blocks for the "
                        f"{worker.world_size} processes: use a multiple of {worker.world_size}")
    sentences = read_labelled(train_path, num_classes)
    dev = read_labelled(dev_path, num_classes)
    train = read_tree_phrases(trees_path, num_classes) if trees_path else sentences
    # Every rank has looked at the run directory before rank 0 writes into it.
    worker.barrier()
    if worker.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)  # the batch order: the same draws on every rank
    vocab = Vocabulary.build((e.tokens for e in train), specials=(PAD, UNK), min_count=config.min_count)
    if worker.is_main:
        vocab.save(run_dir / "vocab.txt")
    model = build_model(config, vocab, num_classes)
    if config.pretrained:
        _load_pretrained(model, vocab, config, worker.device)
    model.embedding.weight.requires_grad_(not config.freeze_embeddings)
    model.to(worker.device)
    optimizer = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=config.lr,
                                 weight_decay=config.weight_decay)
    worker.log(f"vocabulary {len(vocab)}, {len(train)} training examples"
               f"{' (phrases)' if trees_path else ''}, {len(dev)} dev sentences, "
               f"{sum(p.numel() for p in model.parameters())} parameters, {worker.describe()}")
    trained = worker.synchronise(_Logits(model))
    scaler = torch.amp.GradScaler(worker.device.type, enabled=amp)

    history: list[dict] = []
    best = -math.inf
    started = time.perf_counter()
    steps = math.ceil(len(train) / config.batch_size)
    schedule = learning_rate_schedule(optimizer, config, steps)
    eval_every = max(1, math.ceil(steps / config.evals_per_epoch))
    for epoch in range(1, config.epochs + 1):
        worker.seed(config.seed, epoch)
        trained.train()
        epoch_start = time.perf_counter()
        total_loss, seen = 0.0, 0
        progress = tqdm(batches(train, vocab, config.batch_size, True, rng), total=steps,
                        desc=f"epoch {epoch}/{config.epochs}", unit="batch", mininterval=5, dynamic_ncols=True,
                        disable=not worker.is_main)
        for step, batch in enumerate(progress, start=1):
            tokens, lengths, labels, weight = own_share(batch, worker)
            with torch.autocast(worker.device.type, torch.float16, enabled=amp):
                summed = F.cross_entropy(trained(tokens, lengths), labels, reduction="sum")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(summed * weight).backward()
            scaler.unscale_(optimizer)  # clip the true gradient, not the float16 loss scale's multiple
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            if weight:
                total_loss += summed.item()
                seen += labels.numel()
            progress.set_postfix(refresh=False, loss=f"{total_loss / max(seen, 1):.3f}",
                                 ex_s=f"{seen * worker.world_size / (time.perf_counter() - epoch_start):.0f}")
            if step % eval_every and step != steps:
                continue
            all_loss, all_seen = worker.total(total_loss, seen)
            dev_accuracy = accuracy(model, dev, vocab, worker)
            train_accuracy = accuracy(model, sentences, vocab, worker)
            trained.train()
            point = round(epoch - 1 + step / steps, 2)
            history.append({"epoch": point, "train_loss": all_loss / all_seen, "train_accuracy": train_accuracy,
                            "dev_accuracy": dev_accuracy, "seconds": round(time.perf_counter() - epoch_start, 1)})
            # Every rank holds the same all-reduced accuracies, so every rank makes this choice alike.
            improved = dev_accuracy > best
            best = max(best, dev_accuracy)
            if not worker.is_main:
                continue
            tqdm.write(f"epoch {point:6.2f} | loss {all_loss / all_seen:.4f} | train acc {train_accuracy:.4f} | "
                       f"dev acc {dev_accuracy:.4f}{' (best)' if improved else ''}")
            if improved:
                save_checkpoint({
                    "task": "sentiment", "normaliser": normaliser,
                    "config": dataclasses.asdict(config), "vocab": vocab.tokens, "model": cpu_state_dict(model),
                    "num_classes": num_classes, "labels": LABELS[num_classes], "epoch": point,
                    "dev_accuracy": dev_accuracy, "command": command, "train_file": (trees_path or train_path).name,
                }, run_dir / "best.pt")
        metrics = {
            "task": "sentiment", "config": dataclasses.asdict(config), "history": history,
            "best_epoch": max(history, key=lambda h: h["dev_accuracy"])["epoch"], "best_dev_accuracy": best,
            "train_seconds": round(time.perf_counter() - started, 1), "command": command,
            "processes": worker.world_size, "device": worker.device.type,
            "torch": torch.__version__, "python": platform.python_version(),
        }
        if worker.is_main:
            write_metrics(run_dir, metrics)
            plot_curves(run_dir / "curves.png", history, ["train_accuracy", "dev_accuracy"], "accuracy", "sentiment")
    if worker.is_main:
        checkpoint = load_checkpoint(run_dir / "best.pt", "sentiment")
        checkpoint["train_seconds"] = metrics["train_seconds"]
        save_checkpoint(checkpoint, run_dir / "best.pt")
    return metrics


def _load_pretrained(model: SentimentClassifier, vocab: Vocabulary, config: SentimentConfig,
                     device: torch.device = CPU) -> None:
    if config.pretrained != "minilm":
        raise DataError(f"unknown pretrained vectors {config.pretrained!r}; known: minilm")
    from training.embeddings import minilm_word_vectors

    vectors = minilm_word_vectors(vocab.tokens, device=str(device))
    if vectors.size(1) != config.embedding_size:
        raise DataError(f"minilm vectors have {vectors.size(1)} dimensions; pass --embedding-size {vectors.size(1)}")
    with torch.no_grad():
        model.embedding.weight.copy_(vectors * config.embedding_scale)
        model.embedding.weight[vocab.pad_id].zero_()


def model_from_checkpoint(checkpoint: dict) -> tuple[SentimentClassifier, Vocabulary]:
    """The classifier (in eval mode) and vocabulary saved in a checkpoint."""
    vocab = Vocabulary(checkpoint["vocab"])
    model = build_model(SentimentConfig(**checkpoint["config"]), vocab, checkpoint["num_classes"])
    model.load_state_dict(checkpoint["model"])
    return model.eval(), vocab

