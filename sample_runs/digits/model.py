"""The digits sample run's model: an MLP on 8x8 images, 64 -> 64 -> 10."""

import torch
from torch import nn


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 64] -> logits [N, 10]
        return self.fc2(torch.tanh(self.fc1(x)))


def build() -> nn.Module:
    return DigitsMLP()
