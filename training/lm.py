"""Training and evaluation of the word-level language model: truncated BPTT with the state
carried across windows, gradient-norm clipping, SGD with a step-decay schedule, validation
perplexity after every epoch, best-checkpoint keeping and resume.

Under torchrun (`training.distributed`) each of N ranks trains on its own contiguous block of B/N of
the B rows that `batchify` cuts the token stream into, carrying its LSTM state through them as one
process does through all B; DistributedDataParallel averages the ranks' gradients, which equals the
one-process gradient of the whole batch, so ``batch_size`` is the global batch and the learning
rate keeps its meaning."""

from __future__ import annotations

import dataclasses
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from app.text import EOS, UNK, Vocabulary
from training.checkpoint import cpu_state_dict, load_checkpoint, require_normaliser, save_checkpoint
from training.config import LMConfig
from training.data import DataError, batchify, bptt_windows, encode_lm_corpus, read_lm_corpus
from training.distributed import SINGLE_PROCESS, Worker, unwrap
from training.model import LanguageModel
from training.report import plot_curves, write_metrics

EVAL_BATCH_SIZE = 10
SCHEDULE_FIELDS = frozenset({"epochs", "lr", "lr_decay", "decay_after", "max_grad_norm"})
DEFAULT_NORMALISER = "ptb"
_NO_SCALING = torch.amp.GradScaler("cpu", enabled=False)  # full precision: every call passes through


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
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """One truncated-BPTT update on a window; returns the mean token loss and the final state
    (detached: its value carries into the next window, its history does not).

    ``model`` is the LanguageModel or its DistributedDataParallel wrapper, which synchronises only
    what runs through forward(): hence log-probabilities and NLL, which is cross-entropy. An enabled
    ``scaler`` runs the window in float16 autocast (CUDA mixed precision)."""
    scaler = scaler or _NO_SCALING
    with torch.autocast(inputs.device.type, torch.float16, enabled=scaler.is_enabled()):
        log_probs, h, c = model(inputs, *(s.detach() for s in state))
        loss = F.nll_loss(log_probs.reshape(-1, log_probs.size(-1)), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    # Sum over the window, mean over the batch: the scaling Zaremba's learning rates assume. Under
    # torchrun the mean is over this rank's B/N rows and DDP averages the N gradients: with equal
    # blocks that is the mean over all B rows, the one-process gradient.
    scaler.scale(loss * inputs.size(1)).backward()
    scaler.unscale_(optimizer)  # clip the true gradient, not the float16 loss scale's multiple
    # Exploding gradients (Pascanu et al. 2013): rescale the whole gradient to a bounded norm.
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), (h.detach(), c.detach())


def train_epoch(
    model: LanguageModel,
    data: torch.Tensor,
    config: LMConfig,
    optimizer: torch.optim.Optimizer,
    description: str = "train",
    scaler: torch.amp.GradScaler | None = None,
    worker: Worker = SINGLE_PROCESS,
) -> float:
    """One pass over batched data [batch, steps] (under torchrun: this rank's rows); returns the mean
    token cross-entropy (nats) over the rows of all ranks. The progress bar shows rank 0's rows."""
    model.train()
    state = unwrap(model).initial_state(data.size(0))
    total_loss, total_tokens = 0.0, 0
    windows = (data.size(1) - 1 + config.bptt - 1) // config.bptt
    progress = tqdm(bptt_windows(data, config.bptt), total=windows, desc=description, unit="win",
                    mininterval=5, dynamic_ncols=True, disable=not worker.is_main)
    started = time.perf_counter()
    for inputs, targets in progress:
        loss, state = train_step(model, inputs, targets, state, config, optimizer, scaler)
        total_loss += loss.item() * targets.numel()
        total_tokens += targets.numel()
        mean = total_loss / total_tokens
        progress.set_postfix(refresh=False, loss=f"{mean:.3f}", ppl=f"{math.exp(mean):.1f}",
                             tok_s=f"{total_tokens * worker.world_size / (time.perf_counter() - started):.0f}")
    total_loss, total_tokens = worker.total(total_loss, total_tokens)
    return total_loss / total_tokens


@torch.no_grad()
def evaluate_stream(model: LanguageModel, data: torch.Tensor, bptt: int, worker: Worker = SINGLE_PROCESS) -> float:
    """Mean token cross-entropy (nats) over batched data, state carried across windows. Under
    torchrun every rank passes its own rows (possibly none) and gets the mean over all of them."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    if data.size(0):
        state = model.initial_state(data.size(0))
        for inputs, targets in bptt_windows(data, bptt):
            logits, h, c = model.logits(inputs, *state)
            state = (h, c)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
            total_loss += loss.item()
            total_tokens += targets.numel()
    total_loss, total_tokens = worker.total(total_loss, total_tokens)
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
    worker: Worker = SINGLE_PROCESS,
    amp: bool = False,
) -> dict:
    """Train into ``run_dir`` (checkpoint.pt after every epoch, best.pt at the best validation
    perplexity, metrics.json, curves.png). Returns the metrics.

    ``normaliser`` (an `app.text.NORMALISERS` id, default ptb) is recorded in the checkpoints for
    the export: it maps raw text to the corpus's conventions at serving time.

    On resume the run keeps its checkpoint's configuration and normaliser; ``overrides`` (the options
    given explicitly) may change only the schedule (`SCHEDULE_FIELDS`), for example to extend a run.

    ``init_from`` (a model-store version directory) starts a new run from that version's weights,
    vocabulary and normaliser instead of a random initialisation (`training.warmstart`); the
    architecture comes from the version, the schedule from ``config``.

    ``worker`` is this process's place under torchrun (`training.distributed`): every rank reads the
    data and any checkpoint, trains on its own block of rows, and gets the same all-reduced losses;
    rank 0 alone prints and writes ``run_dir``. ``amp`` trains in CUDA float16 mixed precision."""
    if normaliser is not None:
        require_normaliser(normaliser)
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
            worker.log(f"resuming with a new schedule: {changed}")
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
    if config.batch_size % worker.world_size:
        raise DataError(f"batch size {config.batch_size} is the global batch, cut into equal blocks of rows for "
                        f"the {worker.world_size} processes: use a multiple of {worker.world_size}")
    # Every rank has looked at the run directory before rank 0 writes into it.
    worker.barrier()
    if worker.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    model = build_model(config, len(vocab)).to(worker.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    history: list[dict] = []
    best_valid = math.inf
    start_epoch = 1
    elapsed_before = 0.0
    valid_data = batchify(encode_lm_corpus(valid_sentences, vocab), EVAL_BATCH_SIZE)
    own_valid_rows = valid_data[worker.rows(EVAL_BATCH_SIZE)].to(worker.device)
    if init_from is not None and checkpoint is None:
        model.load_state_dict(initial)
        initial_valid = evaluate_stream(model, own_valid_rows, config.bptt, worker)
        worker.log(f"starting from {init_from.as_posix()}: valid ppl {math.exp(initial_valid):.2f}")
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        history = checkpoint["history"]
        best_valid = checkpoint["best_valid_loss"]
        start_epoch = checkpoint["epoch"] + 1
        elapsed_before = checkpoint["train_seconds"]
        worker.log(f"resuming {run_dir} after epoch {checkpoint['epoch']}")

    if worker.is_main:
        vocab.save(run_dir / "vocab.txt")
    train_data = batchify(encode_lm_corpus(train_sentences, vocab), config.batch_size)
    own_train_rows = train_data[worker.rows(config.batch_size)].to(worker.device)
    rows_each = config.batch_size // worker.world_size
    share = f", {rows_each} of the {config.batch_size} rows each" if worker.distributed else ""
    worker.log(f"vocabulary {len(vocab)}, train {train_data.numel()} tokens, valid {valid_data.numel()} tokens, "
               f"{sum(p.numel() for p in model.parameters())} parameters, torch threads {torch.get_num_threads()}, "
               f"{worker.describe()}{share}")
    trained = worker.synchronise(model)
    scaler = torch.amp.GradScaler(worker.device.type, enabled=amp)

    session_start = time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        worker.seed(config.seed, epoch)
        lr = learning_rate(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        epoch_start = time.perf_counter()
        train_loss = train_epoch(trained, own_train_rows, config, optimizer, f"epoch {epoch}/{config.epochs}",
                                 scaler, worker)
        # The same all-reduced figure on every rank, so every rank makes the same model selection.
        valid_loss = evaluate_stream(model, own_valid_rows, config.bptt, worker)
        seconds = time.perf_counter() - epoch_start
        history.append({
            "epoch": epoch, "lr": lr, "train_ppl": math.exp(train_loss), "valid_ppl": math.exp(valid_loss),
            "seconds": round(seconds, 1),
        })
        improved = valid_loss < best_valid
        best_valid = min(best_valid, valid_loss)
        worker.log(f"epoch {epoch:3d} | lr {lr:.4f} | train ppl {math.exp(train_loss):8.2f} | "
                   f"valid ppl {math.exp(valid_loss):8.2f}{' (best)' if improved else ''} | {seconds:.0f}s")
        train_seconds = elapsed_before + time.perf_counter() - session_start
        if worker.is_main:
            state = {
                "task": "language-model", "normaliser": normaliser,
                "config": dataclasses.asdict(config), "vocab": vocab.tokens, "model": cpu_state_dict(model),
                "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "history": history,
                "epoch": epoch, "best_valid_loss": best_valid, "train_seconds": train_seconds, "command": command,
            }
            if improved:
                save_checkpoint(state, run_dir / "best.pt")
            save_checkpoint(state, checkpoint_path)
            write_run_report(run_dir, run_report(config, history, train_seconds, command, train_path, valid_path,
                                                 worker))
        if worker.main_decides(max_minutes is not None and (time.perf_counter() - session_start) / 60 > max_minutes):
            worker.log(f"stopping after epoch {epoch}: --max-minutes {max_minutes} reached; continue with --resume")
            break
    train_seconds = elapsed_before + time.perf_counter() - session_start
    return run_report(config, history, train_seconds, command, train_path, valid_path, worker)


def _initial_weights(
    version_dir: Path, config: LMConfig, overrides: dict, normaliser: str | None
) -> tuple[dict, LMConfig, Vocabulary, str]:
    """The weights, config (architecture from the version), vocabulary and normaliser for a run
    started from a model-store version; a DataError if the options contradict the version."""
    from training.warmstart import ARCHITECTURE_FIELDS, architecture_conflicts, language_model_weights

    state, architecture, vocab, version_normaliser = language_model_weights(version_dir)
    conflicts = architecture_conflicts(overrides, architecture)
    if conflicts:
        raise DataError(f"--init-from {version_dir.as_posix()} fixes the architecture; drop "
                        + ", ".join(conflicts))
    if normaliser not in (None, version_normaliser):
        raise DataError(f"{version_dir.as_posix()} uses normaliser {version_normaliser}, not {normaliser}")
    config = dataclasses.replace(config, **{k: architecture[k] for k in ARCHITECTURE_FIELDS})
    return state, config, vocab, version_normaliser


def run_report(config: LMConfig, history: list[dict], train_seconds: float, command: str, train_path: Path,
               valid_path: Path, worker: Worker) -> dict:
    """The run's metrics.json: configuration, per-epoch history, the best epoch, provenance."""
    best = min(history, key=lambda h: h["valid_ppl"])
    return {
        "task": "language-model", "config": dataclasses.asdict(config), "history": history,
        "best_epoch": best["epoch"], "best_valid_ppl": best["valid_ppl"], "train_seconds": round(train_seconds, 1),
        "command": command, "train_file": train_path.name, "valid_file": valid_path.name,
        "processes": worker.world_size, "device": worker.device.type,
        "torch": torch.__version__, "python": platform.python_version(),
    }


def write_run_report(run_dir: Path, metrics: dict) -> None:
    write_metrics(run_dir, metrics)
    plot_curves(run_dir / "curves.png", metrics["history"], ["train_ppl", "valid_ppl"], "perplexity",
                "language model")
