"""Corpora: reading and checking data files, BPTT batching for the language model, padded
batches for the classifier."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from app.text import EOS, Vocabulary


class DataError(Exception):
    """A data file is missing, empty or malformed. The CLI prints it and exits with code 2."""


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 text file, without line endings; a clear DataError otherwise."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise DataError(f"{path} looks like a binary file (it contains NUL bytes), not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 (byte {e.start})") from None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise DataError(f"data file is empty: {path}")
    return lines


def read_lm_corpus(path: str | Path) -> list[list[str]]:
    """One sentence per non-blank line, whitespace tokens (the PTB/WikiText layout). The
    ``<eos>`` that closes each sentence is added by `encode_lm_corpus`."""
    return [line.split() for line in read_lines(path) if line.strip()]


def encode_lm_corpus(sentences: Sequence[Sequence[str]], vocab: Vocabulary) -> torch.Tensor:
    """One long stream of ids with ``<eos>`` after every sentence (int64 [tokens])."""
    if vocab.eos_id is None:
        raise ValueError(f"a language-model vocabulary needs {EOS}")
    ids: list[int] = []
    for sentence in sentences:
        ids.extend(vocab.encode(sentence))
        ids.append(vocab.eos_id)
    return torch.tensor(ids, dtype=torch.long)


def batchify(stream: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut the stream into ``batch_size`` contiguous rows (int64 [batch, steps]); the tail
    that does not fill a row is dropped. Row b continues row b of the previous window, which
    is what lets the hidden state carry across batches."""
    steps = stream.numel() // batch_size
    if steps < 2:
        raise DataError(f"corpus of {stream.numel()} tokens is too small for batch size {batch_size}")
    return stream[: steps * batch_size].view(batch_size, steps)


def bptt_windows(batched: torch.Tensor, bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive (inputs, targets) windows of at most ``bptt`` steps; targets are the inputs
    shifted one step ahead."""
    for start in range(0, batched.size(1) - 1, bptt):
        length = min(bptt, batched.size(1) - 1 - start)
        yield batched[:, start : start + length], batched[:, start + 1 : start + 1 + length]


@dataclass
class LabelledText:
    tokens: list[str]
    label: int


def read_labelled(path: str | Path, num_classes: int) -> list[LabelledText]:
    """The ``stsa.*`` layout: ``<label> <tokenized sentence>`` per line, labels 0..num_classes-1."""
    examples = []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        label, _, sentence = line.partition(" ")
        if not label.isdigit() or not 0 <= int(label) < num_classes or not sentence.strip():
            raise DataError(
                f"{path}:{number}: expected '<label 0-{num_classes - 1}> <sentence>', got {line[:60]!r}"
            )
        examples.append(LabelledText(sentence.split(" "), int(label)))
    return examples


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens (int64 [batch, longest]) and lengths (int64 [batch])."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return tokens, lengths


_TREE_TOKEN = re.compile(r"\(\d|\)|[^\s()]+")


def _tree_phrases(line: str) -> list[tuple[int, list[str]]]:
    """Every labelled node of one SST tree, ``(3 (2 The) (2 Rock))``, as (label, leaves)."""
    phrases: list[tuple[int, list[str]]] = []
    stack: list[tuple[int, list[str]]] = []
    for match in _TREE_TOKEN.finditer(line):
        token = match.group()
        if token.startswith("("):
            stack.append((int(token[1:]), []))
        elif token == ")":
            if not stack:
                raise ValueError("unbalanced ')'")
            label, leaves = stack.pop()
            phrases.append((label, leaves))
            if stack:
                stack[-1][1].extend(leaves)
        elif stack:
            stack[-1][1].append(token.lower())
        else:
            raise ValueError(f"word {token!r} outside a node")
    if stack or not phrases:
        raise ValueError("unbalanced '('" if stack else "no tree")
    return phrases


def read_tree_phrases(path: str | Path, num_classes: int) -> list[LabelledText]:
    """Every distinct labelled phrase of an SST tree file (``sst_trees/trees/train.txt``),
    lower-cased like the ``stsa.*`` files. With ``num_classes=2`` neutral phrases are dropped
    and 0-1 map to negative, 3-4 to positive (the SST-2 convention)."""
    seen: dict[str, LabelledText] = {}
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            phrases = _tree_phrases(line)
        except ValueError as e:
            raise DataError(f"{path}:{number}: not an SST tree ({e})") from None
        for label, leaves in phrases:
            if num_classes == 2:
                if label == 2:
                    continue
                label = int(label > 2)
            seen.setdefault(" ".join(leaves), LabelledText(leaves, label))
    return list(seen.values())


