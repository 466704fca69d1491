"""Text handling shared by training and serving: normalisers and the vocabulary.

Everything that turns raw text into token ids lives here, so the service sees exactly the
tokens the model was trained on. Pure Python (plus NLTK's regex tokenizer); no torch.
"""

from __future__ import annotations

import bisect
import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from nltk.tokenize import NLTKWordTokenizer

UNK = "<unk>"
EOS = "<eos>"
PAD = "<pad>"

_treebank = NLTKWordTokenizer()

# Typographic characters users paste, mapped to what the treebank tokenizer expects.
_TYPOGRAPHY = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "--",
        "\u2014": "--",
        "\u2026": "...",
        "\u00a0": " ",
    }
)

_INNER_AMPERSAND = re.compile(r"(?<=\w)&(?=\w)")
_AMPERSAND_MARK = "\ue000"  # a private-use character no user text is expected to contain
_SENTINEL = "x"
_ALPHANUMERIC = re.compile(r"\w")
_NUMBER = re.compile(r"^[+-]?(\d+([.,:/]\d+)*|\.\d+)(st|nd|rd|th)?$")
# PTB keeps the period on initialisms (u.s., p.m.) and on a closed list of abbreviations.
_WORD_WITH_PERIOD = re.compile(r"^[^.]+\.$")
_INITIALISM = re.compile(r"^([a-z]\.)+[a-z]?\.?$")
_PTB_ABBREVIATIONS = frozenset(
    "mr. mrs. ms. dr. jr. sr. st. mt. ft. co. corp. inc. ltd. cos. bros. no. vs. etc. "
    "sen. rep. gov. gen. col. lt. sgt. prof. rev. "
    "jan. feb. mar. apr. aug. sept. oct. nov. dec. "
    "ala. ariz. ark. calif. colo. conn. del. fla. ga. ill. ind. kan. ky. la. md. mass. "
    "mich. minn. miss. mo. mont. neb. nev. okla. ore. pa. tenn. tex. va. vt. wash. wis. wyo.".split()
)
# Symbols the PTB language-model corpus kept; all other punctuation was removed from it.
_PTB_SYMBOLS = frozenset({"$", "&", "#", "'"})
_SST_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def _treebank_tokens(text: str) -> list[str]:
    """NLTK's treebank tokenization of ``text``, computed chunk by chunk from a cache so that text
    the service has seen before (a growing autocomplete prefix) costs lookups, not regexes.

    NLTK's rules look no further than the space around a whitespace-separated chunk, except at the
    end of the text (the final period, and the closing quotes and brackets after it). So every chunk
    before the last one holding a letter or digit is tokenized on its own between sentinel words,
    and that last chunk with everything after it is tokenized as one piece. tests/test_text.py
    checks the result against NLTK on the whole text."""
    text = unicodedata.normalize("NFC", text).translate(_TYPOGRAPHY)
    # The treebank keeps "at&t" and "s&p" whole; NLTK would split the ampersand off.
    text = _INNER_AMPERSAND.sub(_AMPERSAND_MARK, text)
    chunks = text.split()
    tail = next((i for i in range(len(chunks) - 1, -1, -1) if _ALPHANUMERIC.search(chunks[i])), 0)
    tokens: list[str] = []
    for number, chunk in enumerate(chunks[:tail]):
        tokens.extend(_in_context(chunk, number == 0, False))
    if chunks:
        tokens.extend(_in_context(" ".join(chunks[tail:]), tail == 0, True))
    return tokens


# Words NLTK's contraction rules split although they are letters only ("cannot" -> "can not"), read from
# its own rules: each is written (first part)(?#X)(second part).
_SPLIT_WORDS = frozenset(
    (first + second).lower()
    for rule in _treebank.CONTRACTIONS2 for first, second in re.findall(r"\((\w+)\)\(\?#X\)\((\w+)\)", rule.pattern)
)
_PLAIN_CHUNK = re.compile(r"[A-Za-z0-9]+")


@functools.lru_cache(maxsize=1 << 16)
def _in_context(piece: str, first: bool, last: bool) -> tuple[str, ...]:
    """The tokens of ``piece`` as NLTK gives them inside a text, with sentinel words standing in for
    the text before it (unless ``first``) and after it (unless ``last``).

    A piece of ASCII letters and digits alone is one token (no rule for punctuation, quotes or
    brackets applies to it) unless a contraction rule splits it: such pieces, most words of most
    texts, skip NLTK's dozen ReDoS-guarded regex passes (measured: 0.3 ms a /predict-next request
    went to tokenizing, most of it here)."""
    if _PLAIN_CHUNK.fullmatch(piece) and piece.lower() not in _SPLIT_WORDS:
        return (piece,)
    tokens = _treebank.tokenize(f"{'' if first else _SENTINEL + ' '}{piece}{'' if last else ' ' + _SENTINEL}")
    tokens = tokens[(0 if first else 1) : (len(tokens) if last else -1)]
    return tuple(token.replace(_AMPERSAND_MARK, "&") for token in tokens)


@functools.lru_cache(maxsize=1 << 16)
def _is_punctuation(token: str) -> bool:
    return all(unicodedata.category(ch)[0] in "PS" for ch in token)


def _strip_sentence_period(token: str) -> str:
    """NLTK splits only the text's final period; strip the others unless they mark an abbreviation."""
    if _WORD_WITH_PERIOD.match(token) and token not in _PTB_ABBREVIATIONS and not _INITIALISM.match(token):
        return token[:-1]
    return token


def normalise_ptb(text: str) -> list[str]:
    """Tokens in Mikolov's PTB conventions: lower case, numbers as ``N``, clitics split
    (``do n't``, ``it 's``), punctuation dropped except ``$ & # '``, periods kept only on
    abbreviations and initialisms."""
    tokens: list[str] = []
    for token in _treebank_tokens(text.lower()):
        token = _strip_sentence_period(token)
        if not token or token == ".":
            continue
        if _NUMBER.match(token) or (token == "%" and tokens and tokens[-1] == "N"):
            tokens.append("N")
        elif token in _PTB_SYMBOLS or not _is_punctuation(token):
            tokens.append(token)
    return tokens


def normalise_sst(text: str) -> list[str]:
    """Tokens in the Stanford Sentiment Treebank's conventions: lower case, PTB tokenization,
    brackets as ``-lrb-``/``-rrb-``, ``/`` escaped as ``\\/``, quotes as ``\u0060\u0060`` and ``''``."""
    tokens = []
    for token in _treebank_tokens(text.lower()):
        stripped = _strip_sentence_period(token)
        tokens.append(_SST_BRACKETS.get(stripped, stripped).replace("/", "\\/"))
        if stripped != token:
            tokens.append(".")
    return tokens


def normalise_identity(text: str) -> list[str]:
    """Whitespace split, for text that is already in the corpus's conventions."""
    return text.split()


NORMALISERS: dict[str, Callable[[str], list[str]]] = {
    "ptb": normalise_ptb,
    "sst": normalise_sst,
    "whitespace": normalise_identity,
}


def get_normaliser(name: str) -> Callable[[str], list[str]]:
    try:
        return NORMALISERS[name]
    except KeyError:
        raise ValueError(f"unknown normaliser {name!r}; known: {', '.join(sorted(NORMALISERS))}") from None


class Vocabulary:
    """A fixed list of tokens; a token's id is its index. Unknown tokens map to ``<unk>``."""

    def __init__(self, tokens: Sequence[str]):
        if len(set(tokens)) != len(tokens):
            raise ValueError("vocabulary has duplicate tokens")
        if UNK not in tokens:
            raise ValueError(f"vocabulary must contain {UNK}")
        self.tokens = list(tokens)
        self._ids = {token: i for i, token in enumerate(self.tokens)}
        self.unk_id = self._ids[UNK]
        self.eos_id = self._ids.get(EOS)
        self.pad_id = self._ids.get(PAD)

    @classmethod
    def build(
        cls,
        sentences: Iterable[Sequence[str]],
        specials: Sequence[str] = (UNK, EOS),
        min_count: int = 1,
        max_size: int | None = None,
    ) -> Vocabulary:
        """Specials first (in the order given), then tokens by falling frequency, ties by
        first appearance, so the same corpus always gives the same ids."""
        counts: Counter[str] = Counter()
        for sentence in sentences:
            counts.update(sentence)
        words = [w for w, n in counts.most_common() if n >= min_count and w not in specials]
        if max_size is not None:
            words = words[: max(0, max_size - len(specials))]
        return cls([*specials, *words])

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return cls(lines)

    def save(self, path: str | Path) -> None:
        Path(path).write_text("".join(f"{t}\n" for t in self.tokens), encoding="utf-8")

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def id(self, token: str) -> int:
        return self._ids.get(token, self.unk_id)

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return [self._ids.get(t, self.unk_id) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    def unknown(self, tokens: Iterable[str]) -> list[str]:
        """The tokens (in order, repeats kept) that this vocabulary maps to ``<unk>``."""
        return [t for t in tokens if t not in self._ids]

    def ids_with_prefix(self, prefix: str) -> list[int]:
        """Ids of the tokens that start with ``prefix`` (a word being typed), special tokens
        (``<unk>``, ``<eos>``, ``<pad>``) left out; in alphabetical order of the tokens."""
        if not prefix:
            return []
        words, ids = self._alphabetical
        start = bisect.bisect_left(words, prefix)
        end = start
        while end < len(words) and words[end].startswith(prefix):
            end += 1
        return ids[start:end]

    @functools.cached_property
    def _alphabetical(self) -> tuple[list[str], list[int]]:
        ordered = sorted((t, i) for i, t in enumerate(self.tokens) if t not in (UNK, EOS, PAD))
        return [t for t, _ in ordered], [i for _, i in ordered]
