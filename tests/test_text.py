"""Normalisers and the vocabulary: raw user text must meet each corpus's conventions."""

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.tokenize import NLTKWordTokenizer

from app.text import EOS, PAD, UNK, Vocabulary, _treebank_tokens, get_normaliser, normalise_ptb, normalise_sst


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("The company said it expects higher earnings.",
         ["the", "company", "said", "it", "expects", "higher", "earnings"]),
        ("Shares rose 3.5% to $1,200 on Friday", ["shares", "rose", "N", "N", "to", "$", "N", "on", "friday"]),
        ("I don't think they're ready, and it's late!",
         ["i", "do", "n't", "think", "they", "'re", "ready", "and", "it", "'s", "late"]),
        ("Mr. Smith of the U.S. Treasury can't comment.",
         ["mr.", "smith", "of", "the", "u.s.", "treasury", "ca", "n't", "comment"]),
        ("AT&T's 30-year bonds (rated \u201cAAA\u201d) fell.",
         ["at&t", "'s", "30-year", "bonds", "rated", "aaa", "fell"]),
        ("We'll see. I'm sure you've heard; he'd agree",
         ["we", "'ll", "see", "i", "'m", "sure", "you", "'ve", "heard", "he", "'d", "agree"]),
        ("The investors' shares", ["the", "investors", "'", "shares"]),
        ("", []),
    ],
)
def test_ptb_normaliser_meets_treebank_conventions(text, tokens):
    assert normalise_ptb(text) == tokens


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("A stirring, funny and finally transporting re-imagining of Beauty and the Beast.",
         ["a", "stirring", ",", "funny", "and", "finally", "transporting", "re-imagining", "of", "beauty",
          "and", "the", "beast", "."]),
        ("It isn't \"great\" (but 1/2 of it works)...",
         ["it", "is", "n't", "``", "great", "''", "-lrb-", "but", "1\\/2", "of", "it", "works", "-rrb-", "..."]),
        ("Don't miss it. Really!", ["do", "n't", "miss", "it", ".", "really", "!"]),
    ],
)
def test_sst_normaliser_meets_sst_conventions(text, tokens):
    assert normalise_sst(text) == tokens


def test_unknown_normaliser_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown normaliser 'nope'"):
        get_normaliser("nope")


def test_vocabulary_build_orders_specials_then_frequency():
    vocab = Vocabulary.build([["b", "a", "b"], ["c", "b", "a"]], specials=(EOS, UNK))
    assert vocab.tokens == [EOS, UNK, "b", "a", "c"]
    assert vocab.encode(["a", "zzz", "b"]) == [3, 1, 2]
    assert vocab.unknown(["a", "zzz", "b", "zzz"]) == ["zzz", "zzz"]
    assert vocab.eos_id == 0 and vocab.unk_id == 1 and vocab.pad_id is None


def test_vocabulary_round_trips_through_vocab_txt(tmp_path):
    vocab = Vocabulary.build([["crème", "brûlée", "'s", "n't", "\\/"]], specials=(PAD, UNK), max_size=5)
    vocab.save(tmp_path / "vocab.txt")
    loaded = Vocabulary.load(tmp_path / "vocab.txt")
    assert loaded.tokens == vocab.tokens
    assert len(loaded) == 5
    assert loaded.decode(loaded.encode(["crème", "'s"])) == ["crème", "'s"]


def test_vocabulary_rejects_duplicates_and_missing_unk():
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary([UNK, "a", "a"])
    with pytest.raises(ValueError, match="<unk>"):
        Vocabulary(["a", "b"])


_PIECES = ["the", "Mr.", "U.S.", "can't", "dogs'", "it's", "\"", "'", "''", "``", "(", ")", ".", "...", ",", ";", ":",
           "?", "!", "--", "-", "$", "5", "3.5", "1,000", "%", "&", "AT&T", "x", "end.", "'s", "cannot", "gonna",
           "[", "]", "{", "}", "<", ">", "#", "@", "/", "\\", "'tis", "n't", "I'm", "they're"]


@given(st.lists(st.sampled_from(_PIECES), max_size=12), st.lists(st.sampled_from(["", " ", "  "]), max_size=12))
@settings(max_examples=400, deadline=None)
def test_chunked_tokenization_equals_whole_text_tokenization(pieces, glue):
    """The chunk-by-chunk cache in app.text must give exactly NLTK's answer on the whole text."""
    text = "".join(p + (glue[i] if i < len(glue) else " ") for i, p in enumerate(pieces))
    # The whole text through NLTK at once, ampersands inside words protected as app.text does.
    marked = re.sub(r"(?<=\w)&(?=\w)", "\ue000", " ".join(text.split()))
    whole = [token.replace("\ue000", "&") for token in NLTKWordTokenizer().tokenize(marked)]
    assert _treebank_tokens(text) == whole


def test_plain_words_skip_the_regexes_with_nltks_answer():
    """Letters and digits alone are one token, except the words NLTK's contraction rules split: checked
    for every such word of the shipped vocabularies, in upper case too, first and last in a text."""
    from pathlib import Path

    from app.text import _PLAIN_CHUNK, _SPLIT_WORDS

    assert _SPLIT_WORDS == {"cannot", "gimme", "gonna", "gotta", "lemme", "wanna"}  # read from NLTK's rules
    store = Path(__file__).resolve().parents[1] / "model_store"
    words = {w for path in store.glob("*/*/vocab.txt") for w in path.read_text().split() if _PLAIN_CHUNK.fullmatch(w)}
    assert len(words) > 5000
    nltk = NLTKWordTokenizer()
    for word in sorted(words | _SPLIT_WORDS | {"Cannot", "GONNA", "Wanna"}):
        for text in (f"{word} {word}", f"{word.upper()} x"):
            assert _treebank_tokens(text) == nltk.tokenize(text), text
