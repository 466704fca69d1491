"""Training of the sentence classifier: length-bucketed padded batches, Adam, gradient-norm
clipping, model selection on dev accuracy, test accuracy reported once for the chosen model."""

from __future__ import annotations

import dataclasses
import math
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from app.text import PAD, UNK, Vocabulary
from training.checkpoint import load_checkpoint, require_normaliser, save_checkpoint
from training.config import SentimentConfig
from training.data import DataError, LabelledText, pad_batch, read_labelled, read_tree_phrases
from training.model import SentimentClassifier
from training.report import plot_curves, write_metrics

LABELS = {2: ["negative", "positive"], 5: ["very negative", "negative", "neutral", "positive", "very positive"]}


def build_model(config: SentimentConfig, vocab: Vocabulary, num_classes: int) -> SentimentClassifier:
    return SentimentClassifier(
        len(vocab), config.embedding_size, config.hidden_size, config.layers, config.dropout,
        config.bidirectional, num_classes, vocab.pad_id,
    )


def batches(examples: list[LabelledText], vocab: Vocabulary, batch_size: int, shuffle: bool, rng: random.Random):
    """(tokens, lengths, labels) batches of similar lengths, so little compute goes to padding."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].tokens), rng.random() if shuffle else i))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(chunks)
    for chunk in chunks:
        tokens, lengths = pad_batch([vocab.encode(examples[i].tokens) for i in chunk], vocab.pad_id)
        yield tokens, lengths, torch.tensor([examples[i].label for i in chunk])


@torch.no_grad()
def accuracy(model: SentimentClassifier, examples: list[LabelledText], vocab: Vocabulary) -> float:
    model.eval()
    correct = 0
    for tokens, lengths, labels in batches(examples, vocab, 256, False, random.Random(0)):
        correct += int((model.logits(tokens, lengths).argmax(-1) == labels).sum())
    return correct / len(examples)


def train_sentiment(
    config: SentimentConfig,
    train_path: Path,
    dev_path: Path,
    run_dir: Path,
    num_classes: int = 2,
    trees_path: Path | None = None,
    command: str = "",
    normaliser: str = "sst",
) -> dict:
    """Train into ``run_dir`` (best.pt by dev accuracy, metrics.json, curves.png). ``normaliser``
    (an `app.text.NORMALISERS` id) is recorded in best.pt for the export: it maps raw text to the
    corpus's conventions at serving time."""
    require_normaliser(normaliser)
    if (run_dir / "best.pt").exists():
        raise FileExistsError(f"{run_dir} already holds a trained model; choose another --run-dir")
    sentences = read_labelled(train_path, num_classes)
    dev = read_labelled(dev_path, num_classes)
    train = read_tree_phrases(trees_path, num_classes) if trees_path else sentences
    run_dir.mkdir(parents=True, exist_ok=True)

    random.seed(config.seed)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    vocab = Vocabulary.build((e.tokens for e in train), specials=(PAD, UNK), min_count=config.min_count)
    vocab.save(run_dir / "vocab.txt")
    model = build_model(config, vocab, num_classes)
    if config.pretrained:
        _load_pretrained(model, vocab, config)
    model.embedding.weight.requires_grad_(not config.freeze_embeddings)
    optimizer = torch.optim.Adam((p for p in model.parameters() if p.requires_grad), lr=config.lr,
                                 weight_decay=config.weight_decay)
    print(f"vocabulary {len(vocab)}, {len(train)} training examples"
          f"{' (phrases)' if trees_path else ''}, {len(dev)} dev sentences, "
          f"{sum(p.numel() for p in model.parameters())} parameters")

    history: list[dict] = []
    best = -math.inf
    started = time.perf_counter()
    steps = math.ceil(len(train) / config.batch_size)
    eval_every = max(1, math.ceil(steps / config.evals_per_epoch))
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        total_loss, seen = 0.0, 0
        progress = tqdm(batches(train, vocab, config.batch_size, True, rng), total=steps,
                        desc=f"epoch {epoch}/{config.epochs}", unit="batch", mininterval=5, dynamic_ncols=True)
        for step, (tokens, lengths, labels) in enumerate(progress, start=1):
            loss = F.cross_entropy(model.logits(tokens, lengths), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            total_loss += loss.item() * labels.numel()
            seen += labels.numel()
            progress.set_postfix(refresh=False, loss=f"{total_loss / seen:.3f}",
                                 ex_s=f"{seen / (time.perf_counter() - epoch_start):.0f}")
            if step % eval_every and step != steps:
                continue
            dev_accuracy = accuracy(model, dev, vocab)
            train_accuracy = accuracy(model, sentences, vocab)
            model.train()
            point = round(epoch - 1 + step / steps, 2)
            history.append({"epoch": point, "train_loss": total_loss / seen, "train_accuracy": train_accuracy,
                            "dev_accuracy": dev_accuracy, "seconds": round(time.perf_counter() - epoch_start, 1)})
            improved = dev_accuracy > best
            tqdm.write(f"epoch {point:6.2f} | loss {total_loss / seen:.4f} | train acc {train_accuracy:.4f} | "
                       f"dev acc {dev_accuracy:.4f}{' (best)' if improved else ''}")
            if improved:
                best = dev_accuracy
                save_checkpoint({
                    "task": "sentiment", "normaliser": normaliser,
                    "config": dataclasses.asdict(config), "vocab": vocab.tokens, "model": model.state_dict(),
                    "num_classes": num_classes, "labels": LABELS[num_classes], "epoch": point,
                    "dev_accuracy": dev_accuracy, "command": command, "train_file": (trees_path or train_path).name,
                }, run_dir / "best.pt")
        metrics = {
            "task": "sentiment", "config": dataclasses.asdict(config), "history": history,
            "best_epoch": max(history, key=lambda h: h["dev_accuracy"])["epoch"], "best_dev_accuracy": best,
            "train_seconds": round(time.perf_counter() - started, 1), "command": command,
            "torch": torch.__version__, "python": platform.python_version(),
        }
        write_metrics(run_dir, metrics)
        plot_curves(run_dir / "curves.png", history, ["train_accuracy", "dev_accuracy"], "accuracy", "sentiment")
    checkpoint = load_checkpoint(run_dir / "best.pt", "sentiment")
    checkpoint["train_seconds"] = metrics["train_seconds"]
    save_checkpoint(checkpoint, run_dir / "best.pt")
    return metrics


def _load_pretrained(model: SentimentClassifier, vocab: Vocabulary, config: SentimentConfig) -> None:
    if config.pretrained != "minilm":
        raise DataError(f"unknown pretrained vectors {config.pretrained!r}; known: minilm")
    from training.embeddings import minilm_word_vectors

    vectors = minilm_word_vectors(vocab.tokens)
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

