"""The prefix-state cache: the language model's LSTM state (and next-word distribution) at the
end of token-id prefixes it has already read, so a request whose prefix extends a cached one only
runs its new tokens. An autocomplete client sends a growing prefix on every keystroke; this is
what makes that cheap."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Python-side bookkeeping per entry (dict slot, key tuple, dataclass, array headers), counted
# towards the byte bound on top of the arrays and the token ids.
ENTRY_OVERHEAD_BYTES = 512

ModelKey = tuple[str, int, int, str]
"""(model name, version, load id, precision): a cache entry is only valid for the graph (and the
load of it) that produced it."""


@dataclass(frozen=True)
class PrefixState:
    """The model after reading a prefix (which starts with ``<eos>``): ``h`` and ``c`` float32
    [layers, hidden], and ``log_probs`` float32 [vocab], the natural-log next-word distribution."""

    h: np.ndarray
    c: np.ndarray
    log_probs: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.h.nbytes + self.c.nbytes + self.log_probs.nbytes


@dataclass(frozen=True)
class CacheStats:
    hits: int  # lookups that found a cached prefix (exact or shorter)
    misses: int  # lookups that found nothing
    evictions: int
    entries: int
    bytes: int


def prefix_digests(ids: Sequence[int]) -> list[int]:
    """``digests[n]`` identifies ``ids[:n + 1]``: each is chained from the one before, so all
    prefixes of a sequence cost one pass (entries keep their ids, so a collision is caught)."""
    digests = []
    digest = 0
    for token in ids:
        digest = hash((digest, token))
        digests.append(digest)
    return digests


@dataclass(frozen=True)
class Resumption:
    """Where a prefix's computation starts: ``cached`` tokens of ``ids`` are already read into
    ``state`` (0 and None: nothing cached), and ``ends`` are the prefix lengths to run to, in order.
    An empty ``ends`` means ``state`` answers the whole prefix."""

    ids: list[int]
    cached: int
    state: PrefixState | None
    ends: list[int]


class PrefixStateCache:
    """A least-recently-used map from (model, version, precision, token-id prefix) to its
    ``PrefixState``, bounded by ``max_bytes`` (0 disables it). Thread-safe. With ``split_last_word``
    a prefix of several new tokens runs its last one as a step of its own (see `plan`)."""

    def __init__(self, max_bytes: int, split_last_word: bool = False):
        self.max_bytes = max_bytes
        self.split_last_word = split_last_word
        self._entries: OrderedDict[tuple[ModelKey, int, int], tuple[tuple[int, ...], PrefixState, int]] = (
            OrderedDict()
        )
        self._lengths: dict[ModelKey, dict[int, int]] = {}  # prefix lengths cached per model, with counts
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def longest_prefix(self, model: ModelKey, ids: Sequence[int]) -> tuple[int, PrefixState | None]:
        """The longest cached prefix of ``ids`` for ``model``: its length and state, or
        ``(0, None)`` when none is cached."""
        if not self.enabled:
            return 0, None
        digests = prefix_digests(ids)
        with self._lock:
            lengths = self._lengths.get(model, {})
            for length in sorted((n for n in lengths if n <= len(ids)), reverse=True):
                key = (model, length, digests[length - 1])
                entry = self._entries.get(key)
                if entry is not None and entry[0] == tuple(ids[:length]):
                    self._entries.move_to_end(key)
                    self._hits += 1
                    return length, entry[1]
            self._misses += 1
            return 0, None

    def plan(self, model: ModelKey, ids: list[int]) -> Resumption:
        """The steps that answer the prefix ``ids`` from its longest cached prefix: one step of the new
        tokens, or with ``split_last_word`` and two or more new tokens, two, the last token alone, so
        that the state before it is cached too for a client whose next request changes only the last
        word. That costs a second onnxruntime call on every prefix not seen before (measured: 1.4 ms
        at one connection, 28% of /predict-next's throughput at 32), and clients that type ahead with
        ``complete_last_word`` never send the unfinished word as context, so it is off by default."""
        cached, state = self.longest_prefix(model, ids)
        n = len(ids)
        ends = [] if cached == n else [n - 1, n] if self.split_last_word and n - cached > 1 else [n]
        return Resumption(ids, cached, state, ends)

    def put(self, model: ModelKey, ids: Sequence[int], state: PrefixState) -> None:
        """Remember ``state`` as the model after reading ``ids``, evicting the least recently
        used entries to stay within the byte bound. Arrays are stored as given: pass copies
        that nothing else writes to."""
        if not self.enabled or not ids:
            return
        prefix = tuple(ids)
        size = state.nbytes + 8 * len(prefix) + ENTRY_OVERHEAD_BYTES
        if size > self.max_bytes:
            return
        key = (model, len(prefix), prefix_digests(prefix)[-1])
        with self._lock:
            if key in self._entries:
                self._remove(key)
            self._entries[key] = (prefix, state, size)
            self._bytes += size
            lengths = self._lengths.setdefault(model, {})
            lengths[len(prefix)] = lengths.get(len(prefix), 0) + 1
            while self._bytes > self.max_bytes:
                self._remove(next(iter(self._entries)))
                self._evictions += 1

    def _remove(self, key: tuple[ModelKey, int, int]) -> None:
        _, _, size = self._entries.pop(key)
        self._bytes -= size
        model, length, _ = key
        lengths = self._lengths[model]
        lengths[length] -= 1
        if not lengths[length]:
            del lengths[length]

    def forget(self, name: str, version: int, load_id: int) -> None:
        """Drop every entry of one load of a model version (it has been unloaded)."""
        with self._lock:
            for key in [k for k in self._entries if k[0][:3] == (name, version, load_id)]:
                self._remove(key)
            for model in [m for m in self._lengths if m[:3] == (name, version, load_id)]:
                if not self._lengths[model]:
                    del self._lengths[model]

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self._hits, self._misses, self._evictions, len(self._entries), self._bytes)
