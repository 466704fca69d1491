"""Training checkpoints as plain data (tensors, numbers, strings, lists and dicts), so that every
load uses ``torch.load(weights_only=True)`` and reading a checkpoint never runs pickled code.

Every checkpoint says what it holds: ``task`` ("language-model" or "sentiment"), ``normaliser``
(the `app.text.NORMALISERS` id for raw text of its corpus), ``config`` (the training config as a
dict), ``vocab`` (tokens in id order) and ``model`` (the state dict); the training loops add
their own keys (`training.lm`, `training.sentiment`)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import get_args

import torch

from app.manifest import Task
from app.text import NORMALISERS
from training.data import DataError

TASKS: tuple[Task, ...] = get_args(Task)


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write ``checkpoint`` to ``path`` through a temporary file, so an interrupted save leaves
    the previous checkpoint intact."""
    partial = path.with_suffix(".tmp")
    torch.save(checkpoint, partial)
    partial.replace(path)


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every tensor on the CPU, so a checkpoint written on a GPU loads and
    exports anywhere; a tensor the module shares under two names (tied weights) stays one tensor."""
    state: dict[str, torch.Tensor] = {}
    copies: dict[tuple, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key not in copies:
            copies[key] = tensor.detach().cpu()
        state[name] = copies[key]
    return state


def load_checkpoint(path: Path, task: Task | None = None) -> dict:
    """The checkpoint at ``path``, checked to be plain data that names its task (``task``, when
    given) and normaliser; a DataError naming the file otherwise."""
    if not path.is_file():
        raise DataError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(f"{path} holds objects other than tensors and plain data, so it is not loaded "
                        "(torch.load weights_only=True refuses it)") from None
    except Exception as e:  # a damaged file fails inside torch.load with many exception types
        raise DataError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(checkpoint, dict):
        raise DataError(f"{path} is not a training checkpoint (it holds a {type(checkpoint).__name__}, not a dict)")
    missing = [key for key in ("task", "normaliser") if key not in checkpoint]
    if missing:
        raise DataError(f"{path} has no {' or '.join(repr(k) for k in missing)} key: checkpoints name their task "
                        f"({' or '.join(TASKS)}) and normaliser ({', '.join(NORMALISERS)})")
    if checkpoint["task"] not in TASKS:
        raise DataError(f"{path} has task {checkpoint['task']!r}; expected {' or '.join(TASKS)}")
    if task is not None and checkpoint["task"] != task:
        raise DataError(f"{path} is a {checkpoint['task']} checkpoint, not a {task} one")
    if checkpoint["normaliser"] not in NORMALISERS:
        raise DataError(f"{path} has normaliser {checkpoint['normaliser']!r}; known: {', '.join(NORMALISERS)}")
    return checkpoint


def require_normaliser(name: str) -> None:
    """A DataError unless ``name`` is an `app.text.NORMALISERS` id."""
    if name not in NORMALISERS:
        raise DataError(f"unknown normaliser {name!r}; known: {', '.join(NORMALISERS)}")
