"""The two networks, a stacked-LSTM language model and a stacked-LSTM sentiment classifier, and the
language model's last-position view exported as its "last" graph."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LanguageModel(nn.Module):
    """embedding -> stacked LSTM -> linear -> log-softmax, dropout on the non-recurrent
    connections only (Zaremba et al. 2014). Batch-first: tokens are [batch, seq]."""

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        layers: int,
        dropout: float,
        tied: bool,
        init_range: float,
    ):
        super().__init__()
        if tied and embedding_size != hidden_size:
            raise ValueError("tied weights need embedding_size == hidden_size")
        self.layers, self.hidden_size = layers, hidden_size
        self.drop = nn.Dropout(dropout)
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.lstm = nn.LSTM(embedding_size, hidden_size, layers, dropout=dropout, batch_first=True)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        if tied:
            # Press & Wolf (2017), Inan et al. (2017): one matrix for input and output words.
            self.decoder.weight = self.embedding.weight
        for p in self.parameters():
            nn.init.uniform_(p, -init_range, init_range)

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(self.layers, batch_size, self.hidden_size, device=self.embedding.weight.device)
        return zeros, zeros.clone()

    def encode(
        self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top LSTM layer's output [batch, seq, hidden] and the final state [layers, batch, hidden]."""
        out, (hn, cn) = self.lstm(self.drop(self.embedding(tokens)), (h0, c0))
        return out, hn, cn

    def logits(
        self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unnormalised scores [batch, seq, vocab] and the final state [layers, batch, hidden]."""
        out, hn, cn = self.encode(tokens, h0, c0)
        return self.decoder(self.drop(out)), hn, cn

    def forward(
        self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Natural-log probabilities [batch, seq, vocab] and the final state (the ONNX signature)."""
        logits, hn, cn = self.logits(tokens, h0, c0)
        return F.log_softmax(logits, dim=-1), hn, cn


class LastPositionLM(nn.Module):
    """The language model returning only the final position's distribution, so next-word
    prediction does not pay for a softmax at positions it throws away."""

    def __init__(self, model: LanguageModel):
        super().__init__()
        self.model = model

    def forward(
        self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Natural-log probabilities [batch, vocab] of the word after the last token, and the final state."""
        out, hn, cn = self.model.encode(tokens, h0, c0)
        logits = self.model.decoder(out[:, -1])
        return torch.log_softmax(logits, dim=-1), hn, cn


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first ``lengths[b]`` steps of each row of x [batch, seq, features] and leave
    the padding where it is; applying it twice gives x back."""
    positions = torch.arange(x.size(1), device=x.device).unsqueeze(0)
    lengths = lengths.unsqueeze(1)
    index = torch.where(positions < lengths, lengths - 1 - positions, positions)
    return x.gather(1, index.unsqueeze(-1).expand_as(x))


class SentimentClassifier(nn.Module):
    """embedding -> stacked (bi)LSTM over right-padded tokens -> masked max- and mean-pooling
    -> linear -> softmax.

    Padding never changes a prediction: the forward direction is causal, the backward
    direction reads each row reversed within its own length (`reverse_padded`), and pooling
    masks positions past ``lengths[b]``. This keeps the exported graph free of
    pack_padded_sequence, whose ONNX export is fragile."""

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        layers: int,
        dropout: float,
        bidirectional: bool,
        num_classes: int,
        pad_id: int,
    ):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=pad_id)
        directions = 2 if bidirectional else 1
        self.forward_layers = nn.ModuleList()
        self.backward_layers = nn.ModuleList()
        for layer in range(layers):
            size_in = embedding_size if layer == 0 else hidden_size * directions
            self.forward_layers.append(nn.LSTM(size_in, hidden_size, batch_first=True))
            if bidirectional:
                self.backward_layers.append(nn.LSTM(size_in, hidden_size, batch_first=True))
        self.classifier = nn.Linear(2 * hidden_size * directions, num_classes)

    def logits(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Unnormalised class scores [batch, classes]."""
        positions = torch.arange(tokens.size(1), device=tokens.device).unsqueeze(0)
        mask = (positions < lengths.unsqueeze(1)).unsqueeze(-1)
        x = self.embedding(tokens)
        for layer, forward_lstm in enumerate(self.forward_layers):
            x = self.drop(x)
            out, _ = forward_lstm(x)
            if self.backward_layers:
                backward, _ = self.backward_layers[layer](reverse_padded(x, lengths))
                out = torch.cat([out, reverse_padded(backward, lengths)], dim=-1)
            x = out
        pooled_max = x.masked_fill(~mask, -1e4).max(dim=1).values
        pooled_mean = (x * mask).sum(dim=1) / lengths.clamp(min=1).unsqueeze(-1).to(x.dtype)
        return self.classifier(self.drop(torch.cat([pooled_max, pooled_mean], dim=-1)))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Class probabilities [batch, classes] (softmax)."""
        return F.softmax(self.logits(tokens, lengths), dim=-1)
