"""The toxicity sample run's model: mean of token embeddings -> LayerNorm -> 2 logits."""

import torch
from torch import nn

VOCAB_SIZE = 125
DIM = 24


class BagOfEmbeddings(nn.Module):
    def __init__(self, vocab_size: int = VOCAB_SIZE, dim: int = DIM) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: [N, L] int64, 0 = pad
        mask = (tokens != 0).unsqueeze(-1).to(self.embed.weight.dtype)  # [N, L, 1]
        summed = (self.embed(tokens) * mask).sum(dim=1)  # [N, D]
        pooled = summed / mask.sum(dim=1).clamp_min(1.0)
        return self.head(self.norm(pooled))  # [N, 2]


def build() -> nn.Module:
    return BagOfEmbeddings()
