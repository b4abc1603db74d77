"""A user model for paraplan's factory path: ``PYTHONPATH=examples paraplan plan custom_factory:build ...``.

The factory returns a :class:`paraplan.models.LayerChain`: an embedding (tokens (b, s) -> (b, s, h)), identical
causal blocks ((b, s, h) -> (b, s, h)) and a head ((b, s, h) -> logits (b, s, v)). paraplan profiles ``blocks[0]``
once and plans the chain from that profile.
"""

from __future__ import annotations

import torch
from torch import nn

from paraplan.models import LayerChain

VOCAB, HIDDEN, HEADS, LAYERS, MAX_SEQ = 256, 256, 4, 4, 1024


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, HIDDEN)
        self.positions = nn.Embedding(MAX_SEQ, HIDDEN)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tokens(tokens) + self.positions(torch.arange(tokens.shape[1], device=tokens.device))


class CausalBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, 4 * HIDDEN, dropout=0.0, batch_first=True,
                                                norm_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device, dtype=x.dtype)
        return self.layer(x, src_mask=mask, is_causal=True)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.out = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


def build() -> LayerChain:
    return LayerChain(Embed(), [CausalBlock() for _ in range(LAYERS)], Head())
