"""Training and evaluation of the word-level language model: truncated BPTT with the state
carried across windows, gradient-norm clipping, SGD with a step-decay schedule, validation
perplexity after every epoch, best-checkpoint keeping and resume."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from app.text import EOS, UNK, Vocabulary
from training.checkpoint import load_checkpoint, require_normaliser, save_checkpoint
from training.config import LMConfig
from training.data import DataError, batchify, bptt_windows, encode_lm_corpus, read_lm_corpus
from training.model import LanguageModel
from training.report import plot_curves, write_metrics

EVAL_BATCH_SIZE = 10
ARCHITECTURE_FIELDS = ("layers", "hidden_size", "embedding_size", "tied")
SCHEDULE_FIELDS = frozenset({"epochs", "lr", "lr_decay", "decay_after", "max_grad_norm"})
DEFAULT_NORMALISER = "ptb"


def build_model(config: LMConfig, vocab_size: int) -> LanguageModel:
    return LanguageModel(
        vocab_size,
        config.embedding_size,
        config.hidden_size,
        config.layers,
        config.dropout,
        config.tied,
        config.init_range,
    )


def model_from_checkpoint(checkpoint: dict) -> tuple[LanguageModel, Vocabulary]:
    """The language model (in eval mode) and vocabulary saved in a checkpoint."""
    vocab = Vocabulary(checkpoint["vocab"])
    model = build_model(LMConfig(**checkpoint["config"]), len(vocab))
    model.load_state_dict(checkpoint["model"])
    return model.eval(), vocab


def learning_rate(config: LMConfig, epoch: int) -> float:
    """Zaremba's schedule: full rate for ``decay_after`` epochs, then times ``lr_decay`` per epoch."""
    return config.lr * config.lr_decay ** max(0, epoch - config.decay_after)


def train_step(
    model: LanguageModel,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    config: LMConfig,
    optimizer: torch.optim.Optimizer,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One truncated-BPTT update on a window; returns the mean token loss and the final state
    (detached: its value carries into the next window, its history does not)."""
    logits, h, c = model.logits(inputs, *(s.detach() for s in state))
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    # Sum over the window, mean over the batch: the scaling Zaremba's learning rates assume.
    (loss * inputs.size(1)).backward()
    # Exploding gradients (Pascanu et al. 2013): rescale the whole gradient to a bounded norm.
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    return loss.detach(), (h.detach(), c.detach())


def train_epoch(
    model: LanguageModel,
    data: torch.Tensor,
    config: LMConfig,
    optimizer: torch.optim.Optimizer,
    description: str = "train",
) -> float:
    """One pass over batched data [batch, steps]; returns the mean token cross-entropy (nats)."""
    model.train()
    state = model.initial_state(data.size(0))
    total_loss, total_tokens = 0.0, 0
    windows = (data.size(1) - 1 + config.bptt - 1) // config.bptt
    progress = tqdm(bptt_windows(data, config.bptt), total=windows, desc=description, unit="win",
                    mininterval=5, dynamic_ncols=True)
    started = time.perf_counter()
    for inputs, targets in progress:
        loss, state = train_step(model, inputs, targets, state, config, optimizer)
        total_loss += loss.item() * targets.numel()
        total_tokens += targets.numel()
        mean = total_loss / total_tokens
        progress.set_postfix(refresh=False, loss=f"{mean:.3f}", ppl=f"{math.exp(mean):.1f}",
                             tok_s=f"{total_tokens / (time.perf_counter() - started):.0f}")
    return total_loss / total_tokens


@torch.no_grad()
def evaluate_stream(model: LanguageModel, data: torch.Tensor, bptt: int) -> float:
    """Mean token cross-entropy (nats) over batched data, state carried across windows."""
    model.eval()
    state = model.initial_state(data.size(0))
    total_loss, total_tokens = 0.0, 0
    for inputs, targets in bptt_windows(data, bptt):
        logits, h, c = model.logits(inputs, *state)
        state = (h, c)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
        total_loss += loss.item()
        total_tokens += targets.numel()
    return total_loss / total_tokens


def train_language_model(
    config: LMConfig,
    train_path: Path,
    valid_path: Path,
    run_dir: Path,
    resume: bool = False,
    max_minutes: float | None = None,
    command: str = "",
    overrides: dict | None = None,
    normaliser: str | None = None,
    init_from: Path | None = None,
) -> dict:
    """Train into ``run_dir`` (checkpoint.pt after every epoch, best.pt at the best validation
    perplexity, metrics.json, curves.png). Returns the metrics.

    ``normaliser`` (an `app.text.NORMALISERS` id, default ptb) is recorded in the checkpoints for
    the export: it maps raw text to the corpus's conventions at serving time.

    On resume the run keeps its checkpoint's configuration and normaliser; ``overrides`` (the options
    given explicitly) may change only the schedule (`SCHEDULE_FIELDS`), for example to extend a run.

    ``init_from`` (a model-store version directory) starts a new run from that version's weights,
    vocabulary and normaliser instead of a random initialisation (`training.warmstart`); the
    architecture comes from the version, the schedule from ``config``."""
    if normaliser is not None:
        require_normaliser(normaliser)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / "checkpoint.pt"
    train_sentences = read_lm_corpus(train_path)
    valid_sentences = read_lm_corpus(valid_path)

    if resume:
        if not checkpoint_path.exists():
            raise DataError(f"nothing to resume: {checkpoint_path} does not exist")
        checkpoint = load_checkpoint(checkpoint_path, "language-model")
        saved = LMConfig(**checkpoint["config"])
        if normaliser not in (None, checkpoint["normaliser"]):
            raise DataError(f"cannot change normaliser when resuming (the run uses {checkpoint['normaliser']})")
        changed = {k: v for k, v in (overrides or {}).items() if getattr(saved, k) != v}
        fixed = sorted(set(changed) - SCHEDULE_FIELDS)
        if fixed:
            allowed = ", ".join(sorted(SCHEDULE_FIELDS))
            raise DataError(f"cannot change {', '.join(fixed)} when resuming; only {allowed}")
        config = dataclasses.replace(saved, **changed)
        normaliser = checkpoint["normaliser"]
        if changed:
            print(f"resuming with a new schedule: {changed}")
        command = f"{checkpoint['command']} && {command}"
        vocab = Vocabulary(checkpoint["vocab"])
    else:
        if checkpoint_path.exists():
            raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it")
        checkpoint = None
        if init_from is not None:
            initial, config, vocab, normaliser = _initial_weights(init_from, config, overrides or {}, normaliser)
            command = f"{command}  # weights from {init_from.as_posix()}"
        else:
            normaliser = normaliser or DEFAULT_NORMALISER
            # The PTB files already map rare words to <unk>; other corpora keep every word.
            vocab = Vocabulary.build(train_sentences, specials=(EOS, UNK))

    torch.manual_seed(config.seed)
    model = build_model(config, len(vocab))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    history: list[dict] = []
    best_valid = math.inf
    start_epoch = 1
    elapsed_before = 0.0
    if init_from is not None and checkpoint is None:
        model.load_state_dict(initial)
        initial_valid = evaluate_stream(model, batchify(encode_lm_corpus(valid_sentences, vocab), EVAL_BATCH_SIZE),
                                        config.bptt)
        print(f"starting from {init_from.as_posix()}: valid ppl {math.exp(initial_valid):.2f}", flush=True)
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng"])
        history = checkpoint["history"]
        best_valid = checkpoint["best_valid_loss"]
        start_epoch = checkpoint["epoch"] + 1
        elapsed_before = checkpoint["train_seconds"]
        print(f"resuming {run_dir} after epoch {checkpoint['epoch']}")

    vocab.save(run_dir / "vocab.txt")
    train_data = batchify(encode_lm_corpus(train_sentences, vocab), config.batch_size)
    valid_data = batchify(encode_lm_corpus(valid_sentences, vocab), EVAL_BATCH_SIZE)
    print(f"vocabulary {len(vocab)}, train {train_data.numel()} tokens, valid {valid_data.numel()} tokens, "
          f"{sum(p.numel() for p in model.parameters())} parameters, torch threads {torch.get_num_threads()}")

    session_start = time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        lr = learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_start = time.perf_counter()
        train_loss = train_epoch(model, train_data, config, optimizer, f"epoch {epoch}/{config.epochs}")
        valid_loss = evaluate_stream(model, valid_data, config.bptt)
        seconds = time.perf_counter() - epoch_start
        history.append({
            "epoch": epoch, "lr": lr, "train_ppl": math.exp(train_loss), "valid_ppl": math.exp(valid_loss),
            "seconds": round(seconds, 1),
        })
        improved = valid_loss < best_valid
        print(f"epoch {epoch:3d} | lr {lr:.4f} | train ppl {math.exp(train_loss):8.2f} | "
              f"valid ppl {math.exp(valid_loss):8.2f}{' (best)' if improved else ''} | {seconds:.0f}s", flush=True)
        state = {
            "task": "language-model", "normaliser": normaliser,
            "config": dataclasses.asdict(config), "vocab": vocab.tokens, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "history": history,
            "epoch": epoch, "best_valid_loss": min(best_valid, valid_loss),
            "train_seconds": elapsed_before + time.perf_counter() - session_start, "command": command,
        }
        if improved:
            best_valid = valid_loss
            save_checkpoint(state, run_dir / "best.pt")
        save_checkpoint(state, checkpoint_path)
        write_run_report(run_dir, config, history, state["train_seconds"], command, train_path, valid_path)
        if max_minutes is not None and (time.perf_counter() - session_start) / 60 > max_minutes:
            print(f"stopping after epoch {epoch}: --max-minutes {max_minutes} reached; continue with --resume")
            break
    return json.loads((run_dir / "metrics.json").read_text())


def _initial_weights(
    version_dir: Path, config: LMConfig, overrides: dict, normaliser: str | None
) -> tuple[dict, LMConfig, Vocabulary, str]:
    """The weights, config (architecture from the version), vocabulary and normaliser for a run
    started from a model-store version; a DataError if the options contradict the version."""
    from training.warmstart import architecture_conflicts, language_model_weights

    state, architecture, vocab, version_normaliser = language_model_weights(version_dir)
    conflicts = architecture_conflicts(overrides, architecture)
    if conflicts:
        raise DataError(f"--init-from {version_dir.as_posix()} fixes the architecture; drop "
                        + ", ".join(conflicts))
    if normaliser not in (None, version_normaliser):
        raise DataError(f"{version_dir.as_posix()} uses normaliser {version_normaliser}, not {normaliser}")
    config = dataclasses.replace(config, **{k: architecture[k] for k in ARCHITECTURE_FIELDS})
    return state, config, vocab, version_normaliser


def write_run_report(run_dir: Path, config: LMConfig, history: list[dict], train_seconds: float,
                     command: str, train_path: Path, valid_path: Path) -> None:
    best = min(history, key=lambda h: h["valid_ppl"])
    write_metrics(run_dir, {
        "task": "language-model", "config": dataclasses.asdict(config), "history": history,
        "best_epoch": best["epoch"], "best_valid_ppl": best["valid_ppl"], "train_seconds": round(train_seconds, 1),
        "command": command, "train_file": train_path.name, "valid_file": valid_path.name,
        "torch": torch.__version__, "python": platform.python_version(),
    })
    plot_curves(run_dir / "curves.png", history, ["train_ppl", "valid_ppl"], "perplexity", "language model")
