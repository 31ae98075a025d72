"""Caption encoder of the tiny model: a learned per-word embedding table plus learned positions.

There is no external text encoder: the grammar's vocabulary is small and fixed, so a caption becomes a short
sequence of word embeddings, which the transformer's own text projection and cross-attention read as
encoder_hidden_states. The table is trained with the transformer and shipped in the same weights file.
"""

from __future__ import annotations

import torch
from torch import nn

from . import data

PAD = "<pad>"
MAX_WORDS = 16


def vocabulary() -> list:
    words = {"a", "and", "over", data.CROSSING}
    words.update(data.COLOR_NAMES)
    words.update(data.SHAPES)
    words.update(data.TEXTURES)
    for m in data.MOTIONS:
        words.update(m.split())
    return [PAD] + sorted(words)


class CaptionEncoder(nn.Module):
    def __init__(self, text_dim: int, vocab: list | None = None, max_words: int = MAX_WORDS):
        super().__init__()
        self.vocab = list(vocab or vocabulary())
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_words = max_words
        self.embed = nn.Embedding(len(self.vocab), text_dim)
        self.position = nn.Parameter(torch.zeros(max_words, text_dim))
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.position, std=0.1)

    def tokenize(self, captions) -> torch.Tensor:
        """[B, max_words] int64 word ids, padded; the empty caption "" is the unconditional prompt."""
        rows = []
        for c in captions:
            words = c.lower().split()
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise ValueError(f"caption {c!r} uses words the tiny model does not know: {unknown}; "
                                 f"known words: {self.vocab[1:]}")
            if len(words) > self.max_words:
                raise ValueError(f"caption {c!r} has {len(words)} words; at most {self.max_words}")
            rows.append([self.index[w] for w in words] + [0] * (self.max_words - len(words)))
        return torch.tensor(rows, dtype=torch.long)

    def forward(self, captions, device=None) -> torch.Tensor:
        """[B, max_words, text_dim] encoder_hidden_states."""
        ids = self.tokenize(captions).to(device or self.embed.weight.device)
        return self.embed(ids) + self.position[None]
