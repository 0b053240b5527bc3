"""The lm sample run's metric and training loss: per-example mean next-token cross-entropy
over label tokens (Hugging Face's shift: logits at position t predict labels[t + 1]; label
-100 is not counted). Equal to GPT2LMHeadModel's own loss for one example."""

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits, labels = logits[:, :-1], labels[:, 1:].long()
    counted = labels != -100
    per_token = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return (per_token * counted).sum(1) / counted.sum(1)
