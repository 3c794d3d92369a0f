"""The default criterion (``loss_type``) and the classification losses it names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class FocalLoss(nn.Module):
    """Focal loss (Lin et al.): mean of ``-(1 - p_t)^gamma * log p_t``."""

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_pt = torch.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        return (-((1.0 - log_pt.exp()) ** self.gamma) * log_pt).mean()


class LabelSmoothing(nn.Module):
    """Cross-entropy against targets smoothed to ``1 - s`` on the class, ``s / C`` on all."""

    def __init__(self, smoothing: float = 0.1) -> None:
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits.float(), dim=1)
        nll = -log_probs.gather(1, target[:, None]).squeeze(1)
        uniform = -log_probs.mean(dim=1)
        return ((1.0 - self.smoothing) * nll + self.smoothing * uniform).mean()


def build_criterion(cfg: Mapping[str, Any]) -> nn.Module:
    """``loss_type``: CrossEntropyLoss (alias CELoss), LabelSmoothing (``smoothing``),
    FocalLoss (``focal_gamma``). The names are checked by the config's ``loss_type`` key."""
    if cfg["loss_type"] == "LabelSmoothing":
        return LabelSmoothing(cfg["smoothing"])
    if cfg["loss_type"] == "FocalLoss":
        return FocalLoss(cfg["focal_gamma"])
    return nn.CrossEntropyLoss()
