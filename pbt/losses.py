"""The default criterion (``loss_type``), the classification losses it names, and
knowledge distillation (``distill_from``)."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pbt.config import ConfigError


class FocalLoss(nn.Module):
    """Focal loss (Lin et al.): mean of ``-(1 - p_t)^gamma * log p_t``."""

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_pt = torch.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        return (-((1.0 - log_pt.exp()) ** self.gamma) * log_pt).mean()


class LabelSmoothing(nn.Module):
    """Cross-entropy against targets smoothed to ``1 - s`` on the class, ``s / C`` on all.
    Targets are class indices, or class probabilities (mixup / CutMix), smoothed alike."""

    def __init__(self, smoothing: float = 0.1) -> None:
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits.float(), dim=1)
        if target.is_floating_point():
            smoothed = target.float() * (1.0 - self.smoothing) + self.smoothing / target.shape[1]
            return -(smoothed * log_probs).sum(dim=1).mean()
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


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """Hinton's KD term: ``T² · KL(softmax(teacher / T) ‖ softmax(student / T))``, mean over
    the batch. ``T²`` keeps its gradients on the scale of the task loss's."""
    log_student = torch.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = torch.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = torch.nn.functional.kl_div(log_student, log_teacher, reduction="batchmean",
                                    log_target=True)
    return kl * temperature**2


class Distiller:
    """Adds the KD loss of a frozen teacher to the task loss of each training step:
    ``(1 - alpha) · task + alpha · KD``, logged as ``loss/task`` and ``loss/distill``.

    The teacher sees the step's input (``batch[0]``), in eval mode, without gradients and
    under the run's mixed precision. It is never prepared by Accelerate (so DDP neither
    wraps nor syncs it) and never saved: only its path is, in the run's config.
    """

    def __init__(self, teacher: nn.Module, alpha: float, temperature: float,
                 autocast: Any = None) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature
        self.autocast = autocast  # a context manager factory, e.g. accelerator.autocast

    @classmethod
    def from_config(cls, trainer: Any) -> Distiller:
        """The teacher of ``distill_from``: ``trainer.build_teacher`` rebuilds its network
        (pruned ones from their ``prune_history``) and every weight must fit."""
        from pbt.checkpoint import load_weights, safe_load

        cfg = trainer.cfg
        path = Path(cfg.distill_from)  # the config has checked that it exists
        saved = safe_load(path, key="distill_from")
        saved = saved if isinstance(saved, dict) else {}
        names, ours = saved.get("class_names"), getattr(trainer, "class_names", None)
        if names and ours and list(names) != list(ours):
            raise ConfigError(
                f"key 'distill_from': {str(path)!r} was trained on the classes "
                f"{', '.join(map(str, names[:20]))} and this run's data has "
                f"{', '.join(map(str, ours[:20]))}; the teacher's logits must mean the same "
                "classes in the same order")
        with torch.random.fork_rng(devices=[]):  # its random init must not shift the run's RNG
            teacher = trainer.build_teacher(cfg, saved)
            if saved.get("prune_history"):
                from pbt.prune import apply_prune_history

                apply_prune_history(teacher, trainer.example_inputs(), saved["prune_history"])
        load_weights(teacher, path, strict=True, key="distill_from", loaded=saved)
        teacher.to(trainer.accelerator.device)
        params = sum(p.numel() for p in teacher.parameters())
        trainer.log(f"distilling from {path} ({params:,} params; alpha {cfg.distill_alpha}, "
                    f"temperature {cfg.distill_temperature}): one teacher forward per step")
        return cls(teacher, cfg.distill_alpha, cfg.distill_temperature,
                   trainer.accelerator.autocast)

    def __call__(self, batch: Any, outputs: Any, losses: Any) -> dict[str, torch.Tensor]:
        """The step's losses with the KD term added (``losses``: tensor, list or dict)."""
        if not torch.is_tensor(outputs) or outputs.ndim != 2:
            raise TypeError("distill_from needs a model that returns logits [batch, classes], "
                            f"got {type(outputs).__name__}")
        data = batch[0] if isinstance(batch, (list, tuple)) else batch
        with torch.no_grad(), (self.autocast() if self.autocast else nullcontext()):
            teacher_logits = self.teacher(data)
        if isinstance(losses, dict):
            task = {f"task/{key}" if len(losses) > 1 else "task": value
                    for key, value in losses.items()}
        elif isinstance(losses, (list, tuple)):
            task = {f"task/{i}": value for i, value in enumerate(losses)}
        else:
            task = {"task": losses}
        kd = distillation_loss(outputs, teacher_logits, self.temperature)
        return {**{key: (1.0 - self.alpha) * value for key, value in task.items()},
                "distill": self.alpha * kd}
