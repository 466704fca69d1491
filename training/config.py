"""Typed training configurations and the named presets."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

LR_SCHEDULES = ("constant", "cosine")
DISTILL_STAGES = ("teacher", "transfer")  # the stages that distill-sentiment --stop-after can end a run after


@dataclass(frozen=True)
class LMConfig:
    """A word-level language model and its training schedule. Defaults are Zaremba's `small`.

    Learning rates mean what they mean in Zaremba et al. (2014): the loss is summed over the
    BPTT window and averaged over the batch before the gradient step."""

    embedding_size: int = 200
    hidden_size: int = 200
    layers: int = 2
    dropout: float = 0.0
    tied: bool = False
    init_range: float = 0.1
    batch_size: int = 20
    bptt: int = 20
    epochs: int = 13
    lr: float = 1.0
    lr_decay: float = 0.5
    decay_after: int = 4  # epochs at the full learning rate before decay starts
    max_grad_norm: float = 5.0
    seed: int = 1234


@dataclass(frozen=True)
class SentimentConfig:
    """A sentence classifier and its training schedule (Adam, early stopping on dev accuracy)."""

    embedding_size: int = 300
    hidden_size: int = 168
    layers: int = 1
    bidirectional: bool = True
    dropout: float = 0.5
    batch_size: int = 64
    epochs: int = 12
    lr: float = 2e-3
    # constant, or cosine: a half cosine from lr down to 0 at the end of the last epoch, stepped every batch
    lr_schedule: str = field(default="constant", metadata={"choices": LR_SCHEDULES})
    weight_decay: float = 0.0
    max_grad_norm: float = 5.0
    min_count: int = 1
    pretrained: str = ""  # "minilm": start the embeddings from pretrained word vectors (training/embeddings.py)
    embedding_scale: float = 1.0  # the pretrained unit vectors are multiplied by this
    freeze_embeddings: bool = False  # keep the (pretrained) embeddings fixed while training
    evals_per_epoch: int = 1  # dev evaluations (and chances to keep the best model) per epoch
    seed: int = 1234


@dataclass(frozen=True)
class DistillConfig:
    """Distillation (`training.distill`): the teacher's fine-tuning and the transfer set; the student's
    own settings are a `SentimentConfig`."""

    teacher_epochs: int = 2
    teacher_lr: float = 3e-5
    teacher_batch_size: int = 32
    teacher_max_tokens: int = 64
    teachers: int = 1  # teachers fine-tuned (seeds seed, seed + 1, ...) whose logits are averaged
    augment: int = 4  # variants per training sentence
    mask_probability: float = 0.1  # each word of a variant becomes <unk> with this probability
    ngram_probability: float = 0.25  # a variant is a random n-gram of its sentence (n from 1 to 5) this often


LM_PRESETS: dict[str, LMConfig] = {
    # Zaremba, Sutskever & Vinyals (2014), "Recurrent Neural Network Regularization", Table 1.
    "small": LMConfig(),
    "medium": LMConfig(
        embedding_size=650, hidden_size=650, dropout=0.5, init_range=0.05, bptt=35,
        epochs=39, lr_decay=1 / 1.2, decay_after=6,
    ),
    "large": LMConfig(
        embedding_size=1500, hidden_size=1500, dropout=0.65, init_range=0.04, bptt=35,
        epochs=55, lr_decay=1 / 1.15, decay_after=14, max_grad_norm=10.0,
    ),
    # Tied 400-unit model with a compressed schedule (4 epochs at lr 1, then halving), sized to
    # train inside one working session on a 2-core CPU (8-10 minutes an epoch there). The shipped model.
    "cpu": LMConfig(
        embedding_size=400, hidden_size=400, dropout=0.35, tied=True, init_range=0.05,
        batch_size=32, bptt=35, epochs=8, lr_decay=0.5, decay_after=4,
    ),
}

SENTIMENT_PRESETS: dict[str, SentimentConfig] = {"default": SentimentConfig()}


def with_overrides(config, overrides: dict):
    """A copy of a dataclass config with the non-None overrides applied."""
    names = {f.name for f in fields(config)}
    return replace(config, **{k: v for k, v in overrides.items() if k in names and v is not None})


__all__ = [
    "DISTILL_STAGES", "LR_SCHEDULES", "LMConfig", "SentimentConfig", "DistillConfig", "LM_PRESETS", "SENTIMENT_PRESETS",
    "with_overrides",
]
