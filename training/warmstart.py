"""Start a language-model run from a model-store version's weights.

Training checkpoints live in run directories that are not shipped; the model store is what
survives. ``train-lm --init-from model_store/ptb-lm/3`` reads the version's ``full`` ONNX graph back
into a `LanguageModel`, so a shipped model can be trained further (a learning-rate restart, more
epochs, new data with the same vocabulary) without its original run directory.

The legacy exporter writes ``nn.LSTM`` as one ONNX ``LSTM`` node per layer with weights ``W``
[1, 4H, in], ``R`` [1, 4H, H] and ``B`` [1, 8H] (input bias, then recurrent bias), gates in the
order i, o, f, c; PyTorch keeps i, f, g(=c), o. The decoder is ``MatMul`` by the transposed
output matrix (the embedding's, through a ``Transpose``, when tied) plus ``decoder.bias``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from app.manifest import FULL
from app.text import Vocabulary
from training.data import DataError
from training.evaluate import read_version, read_vocabulary

# What the weights fix; a run started from them may change anything else (dropout, the schedule).
ARCHITECTURE_FIELDS = ("layers", "hidden_size", "embedding_size", "tied")
# PyTorch gate blocks (i, f, g, o) taken from ONNX blocks (i, o, f, c).
_TORCH_FROM_ONNX_GATES = (0, 2, 3, 1)


def _gates_to_torch(weight: np.ndarray, hidden: int) -> np.ndarray:
    blocks = [weight[k * hidden : (k + 1) * hidden] for k in _TORCH_FROM_ONNX_GATES]
    return np.concatenate(blocks, axis=0)


def language_model_weights(version_dir: Path) -> tuple[dict[str, torch.Tensor], dict, Vocabulary, str]:
    """The `LanguageModel` state dict held by a language-model version's ``full`` graph, the
    architecture it implies (`ARCHITECTURE_FIELDS`), the version's vocabulary and normaliser.

    A DataError when the directory is not a language-model version or its graph is not the
    shape the exporter writes."""
    manifest = read_version(version_dir)
    if manifest.task != "language-model":
        raise DataError(f"{version_dir} is a {manifest.task} model, not a language model")
    graph = onnx.load(str(version_dir / manifest.graphs[FULL].file), load_external_data=True).graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    transposed = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose"}
    lstms = [n for n in graph.node if n.op_type == "LSTM"]
    decoder = [n for n in graph.node if n.op_type == "MatMul"]
    if not lstms or len(decoder) != 1 or "embedding.weight" not in initializers or "decoder.bias" not in initializers:
        raise DataError(f"{version_dir}: the {FULL} graph is not a stacked-LSTM language model as exported "
                        "by this package (embedding, LSTM layers, decoder)")

    state: dict[str, torch.Tensor] = {"embedding.weight": torch.from_numpy(initializers["embedding.weight"].copy())}
    for layer, node in enumerate(lstms):
        w, r, b = (initializers[name][0] for name in node.input[1:4])
        hidden = r.shape[1]
        state[f"lstm.weight_ih_l{layer}"] = torch.from_numpy(_gates_to_torch(w, hidden))
        state[f"lstm.weight_hh_l{layer}"] = torch.from_numpy(_gates_to_torch(r, hidden))
        state[f"lstm.bias_ih_l{layer}"] = torch.from_numpy(_gates_to_torch(b[: 4 * hidden], hidden))
        state[f"lstm.bias_hh_l{layer}"] = torch.from_numpy(_gates_to_torch(b[4 * hidden :], hidden))
    output = decoder[0].input[1]
    if transposed.get(output) == "embedding.weight":
        state["decoder.weight"] = state["embedding.weight"]
    elif output in initializers:
        state["decoder.weight"] = torch.from_numpy(initializers[output].T.copy())
    else:
        raise DataError(f"{version_dir}: cannot find the decoder's weights in the {FULL} graph")
    state["decoder.bias"] = torch.from_numpy(initializers["decoder.bias"].copy())

    architecture = {
        "layers": len(lstms),
        "hidden_size": state["lstm.weight_hh_l0"].shape[1],
        "embedding_size": state["embedding.weight"].shape[1],
        "tied": state["decoder.weight"] is state["embedding.weight"],
    }
    return state, architecture, read_vocabulary(version_dir, manifest), manifest.tokenizer.normaliser


def architecture_conflicts(options: dict, architecture: dict) -> list[str]:
    """The options given explicitly (``--hidden-size`` …) that contradict a version's architecture."""
    return [f"--{key.replace('_', '-')} {options[key]} (the version has {architecture[key]})"
            for key in ARCHITECTURE_FIELDS
            if key in options and options[key] != architecture[key]]
