"""The training engine: a visible hook loop (``Engine``) and a trainer built from ``build_*``
methods on an Accelerate ``Accelerator`` (``EngineTrainer``), plus ``launch``.

Accelerate does device placement, mixed precision, gradient accumulation and DDP; the engine
only orders the work and calls the callbacks.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pbt.callbacks import Callback, TrainingError
from pbt.config import Config, ConfigError, load_config, make_run_dir, save_config

logger = logging.getLogger("pbt")

HOOKS = (
    "on_train_begin", "on_epoch_begin", "on_batch_begin", "on_after_backward",
    "on_train_summary", "on_batch_end", "on_test_begin", "on_test_summary", "on_test_end",
    "on_epoch_end", "on_train_end",
)


def sum_losses(losses: torch.Tensor | list | tuple | dict) -> torch.Tensor:
    """The total loss the engine backpropagates: a tensor, or the sum of a list or dict."""
    if torch.is_tensor(losses):
        return losses
    if isinstance(losses, dict):
        losses = list(losses.values())
    if isinstance(losses, (list, tuple)) and losses:
        return torch.stack([sum_losses(item) for item in losses]).sum()
    raise TypeError(f"run_step must return losses as a tensor, list or dict, got {losses!r}")


class Engine:
    """The hook loop of the spec. Subclasses provide model, optimizer, loaders, criterion.

    State for callbacks: ``epoch`` (0-based), ``global_step`` (optimizer steps),
    ``batch_idx``, ``model``, ``unwrapped_model``, ``optimizer``, ``accelerator``, ``cfg``,
    ``lr``, ``logs``; per step ``inputs``, ``targets``, ``outputs``, ``losses``, ``loss``.
    """

    def __init__(self, cfg: Config, accelerator: Any) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.callbacks: list[Callback] = []
        self.logs: dict = {"train": {}, "test": {}, "lr": None}
        self.history: list[dict] = []
        self.epoch = 0
        self.start_epoch = 0
        self.global_step = 0
        self.batch_idx = 0
        self.skip_batches = 0
        self.num_epochs = int(cfg.num_epochs)
        self.stop_training = False
        self.phase = "train"
        self.inputs = self.targets = self.outputs = self.losses = self.loss = None
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.criterion: Callable
        self.train_loader: Iterable
        self.test_loader: Iterable

    # -- state for callbacks --------------------------------------------------------------
    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (batches per process / accumulation, rounded up)."""
        return math.ceil(len(self.train_loader) / self.accelerator.gradient_accumulation_steps)

    def fire(self, hook: str) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, self.logs)

    # -- the steps ------------------------------------------------------------------------
    def get_targets(self, batch: Any) -> Any:
        """Labels of a batch: ``batch[1]`` for (inputs, labels); override for other layouts."""
        if isinstance(batch, (list, tuple)) and len(batch) > 1:
            return batch[1]
        if isinstance(batch, dict):
            return batch.get("target", batch.get("label"))
        return None

    def run_step(self, inputs: Any) -> tuple[Any, Any]:
        """One forward pass on a batch; return ``(outputs, losses)``. Override freely."""
        images, labels = inputs[0], inputs[1]
        outputs = self.model(images)
        return outputs, self.criterion(outputs, labels)

    def train_step(self, batch: Any) -> None:
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            self.outputs, self.losses = self.run_step(batch)
            self.loss = sum_losses(self.losses)
            accelerator.backward(self.loss)
            self.fire("on_after_backward")
            if accelerator.sync_gradients and self.cfg.get("clip_grad_norm"):
                accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            self.global_step += 1

    def train_epoch(self) -> None:
        self.phase = "train"
        self.model.train()
        loader = self.train_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        first = 0
        if self.skip_batches:  # resuming inside an epoch
            first, self.skip_batches = self.skip_batches, 0
            loader = self.accelerator.skip_first_batches(loader, first)
        self.fire("on_epoch_begin")
        for batch_idx, batch in enumerate(loader, start=first):
            self.batch_idx = batch_idx
            self.inputs, self.targets = batch, self.get_targets(batch)
            self.fire("on_batch_begin")
            self.train_step(batch)
            self.fire("on_train_summary")
            self.fire("on_batch_end")
            if self.stop_training:
                break

    @torch.no_grad()
    def test_epoch(self) -> None:
        self.phase = "test"
        self.model.eval()
        self.fire("on_test_begin")
        for batch_idx, batch in enumerate(self.test_loader):
            self.batch_idx = batch_idx
            self.inputs, self.targets = batch, self.get_targets(batch)
            self.outputs, self.losses = self.run_step(batch)
            self.loss = sum_losses(self.losses)
            self.fire("on_test_summary")
        self.fire("on_test_end")

    def loop(self) -> None:
        """The whole run, in the spec's hook order."""
        self.fire("on_train_begin")
        for epoch in range(self.start_epoch, self.num_epochs):
            self.epoch = epoch
            self.logs["train"], self.logs["test"] = {}, {}
            self.train_epoch()
            if self.stop_training and self.phase == "train" and self.batch_idx + 1 < len(
                self.train_loader
            ):
                break  # stopped inside an epoch: no test on a half-trained epoch
            self.test_epoch()
            self.history.append({
                "epoch": epoch + 1, "global_step": self.global_step, "lr": self.lr,
                "train": dict(self.logs["train"]), "test": dict(self.logs["test"]),
            })
            self.fire("on_epoch_end")
            if self.stop_training:
                break
        self.fire("on_train_end")


# -- reproducible data order ----------------------------------------------------------------
class ShuffleSampler(Sampler[int]):
    """A permutation drawn from ``seed + epoch``: the same order on every process and after
    a resume (PBT's sampler reshuffled nothing between epochs)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)`` so each sample's augmentation is seeded by what it is, not
    by which worker or process loads it; forwards ``set_epoch`` to the wrapped sampler."""

    def __init__(self, sampler: Sampler[int]) -> None:
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in self.sampler)


class SeededDataset(Dataset):
    """Loads ``(epoch, index)`` keys with torch's RNG seeded from (seed, epoch, index), so
    random augmentation is identical with 0 or N workers, 1 or N processes, and on resume."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # classes, targets, samples of the dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, int):
            return self.dataset[key]
        epoch, index = key
        # fork_rng: the caller's RNG (dropout in the main process) is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 10_007 + index) % (2**63))
            return self.dataset[index]


def _seed_worker(worker_id: int) -> None:
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


# -- losses --------------------------------------------------------------------------------
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


# -- the trainer ---------------------------------------------------------------------------
class EngineTrainer(Engine):
    """Build everything from ``cfg`` through ``build_*`` methods, then ``run()``.

    Subclasses implement ``build_train_loader``, ``build_test_loader`` and ``build_model``;
    ``build_optimizer``, ``build_criterion`` and ``build_callbacks`` have defaults.
    """

    def __init__(self, cfg: Config) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, set_seed

        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum_steps,
            cpu=not torch.cuda.is_available(),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True,
                                                      data_seed=cfg.seed),
        )
        super().__init__(cfg, accelerator)
        set_seed(cfg.seed)
        self.run_dir = self.make_run_dir()
        self.started = time.time()

    # -- run directory and logging --------------------------------------------------------
    def make_run_dir(self) -> Path:
        """Main process names and creates the run dir; every process learns its path."""
        from accelerate.utils import broadcast_object_list

        holder = [None]
        if self.accelerator.is_main_process:
            holder = [str(make_run_dir(self.cfg, time.strftime("%Y%m%d-%H%M%S")))]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(holder)
        run_dir = Path(holder[0])
        if self.accelerator.is_main_process:
            save_config(self.cfg, run_dir / "config.yaml")
            setup_logging(run_dir / "train.log")
        return run_dir

    def log(self, message: str) -> None:
        """Log on the main process only (to the console and the run's train.log)."""
        if self.accelerator.is_main_process:
            logger.info(message)

    # -- build ----------------------------------------------------------------------------
    def build(self, cfg: Config) -> None:
        """Call the ``build_*`` methods, then hand everything to ``accelerator.prepare``."""
        self.train_loader = self.build_train_loader(cfg)
        self.test_loader = self.build_test_loader(cfg)
        model = self.build_model(cfg)
        if cfg.get("sync_bn") and self.accelerator.num_processes > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.optimizer = self.build_optimizer(cfg, model)
        self.criterion = self.build_criterion(cfg)
        self.model, self.optimizer, self.train_loader, self.test_loader = self.accelerator.prepare(
            model, self.optimizer, self.train_loader, self.test_loader
        )
        self.callbacks = list(self.build_callbacks(cfg))

    def build_train_loader(self, cfg: Config) -> DataLoader:
        raise NotImplementedError("build_train_loader not implemented")

    def build_test_loader(self, cfg: Config) -> DataLoader:
        raise NotImplementedError("build_test_loader not implemented")

    def build_model(self, cfg: Config) -> nn.Module:
        raise NotImplementedError("build_model not implemented")

    def load_weights(self, model: nn.Module, path: str) -> None:
        """Initial weights from ``model_file`` (or a ``finetune`` path).

        With ``finetune`` keys are matched by name and shape and the skipped ones logged
        (a new number of classes, say); otherwise every key must fit.
        """
        from pbt.models import load_weights

        finetune = bool(self.cfg.get("finetune"))
        skipped = load_weights(model, path, strict=not finetune)
        self.log(f"loaded weights from {path}" + (
            f"; skipped {len(skipped)} keys that do not fit: {', '.join(skipped)}"
            if skipped else ""))

    def build_dataloader(self, dataset: Dataset, cfg: Config, train: bool,
                         sampler: Sampler[int] | None = None) -> DataLoader:
        """A DataLoader whose order and augmentation depend only on the seed and epoch.

        ``batch_size`` is per process, as in PBT. Sharding across processes is done by
        ``accelerator.prepare`` (by global rank).
        """
        if sampler is None:
            sampler = ShuffleSampler(len(dataset), cfg.seed, shuffle=train)  # type: ignore[arg-type]
        workers = cfg.num_workers
        if workers is None:
            import os

            workers = min(4, max(0, (os.cpu_count() or 1) - 1))
        return DataLoader(
            SeededDataset(dataset, cfg.seed),
            batch_size=cfg.batch_size,
            sampler=EpochSampler(sampler),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_seed_worker,
            generator=torch.Generator().manual_seed(cfg.seed),
            drop_last=False,
        )

    def build_optimizer(self, cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
        """SGD / Adam / AdamW; by default no weight decay on BatchNorm and bias parameters."""
        decay, no_decay = [], []
        for param in model.parameters():
            if param.requires_grad:
                (no_decay if cfg.no_decay_bn_bias and param.ndim <= 1 else decay).append(param)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        if cfg.optim_type == "SGD":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov and cfg.momentum > 0)
        if cfg.optim_type == "Adam":
            return torch.optim.Adam(groups, lr=cfg.lr)
        if cfg.optim_type == "AdamW":
            return torch.optim.AdamW(groups, lr=cfg.lr)
        raise ConfigError(f"key 'optim_type' has value {cfg.optim_type!r}; "
                          "expected one of SGD, Adam, AdamW")

    def build_criterion(self, cfg: Config) -> nn.Module:
        """CrossEntropyLoss (alias CELoss), LabelSmoothing (``smoothing``), FocalLoss
        (``focal_gamma``)."""
        if cfg.loss_type in ("CrossEntropyLoss", "CELoss"):
            return nn.CrossEntropyLoss()
        if cfg.loss_type == "LabelSmoothing":
            return LabelSmoothing(cfg.smoothing)
        if cfg.loss_type == "FocalLoss":
            return FocalLoss(cfg.focal_gamma)
        raise ConfigError(f"key 'loss_type' has value {cfg.loss_type!r}; "
                          "expected CrossEntropyLoss, CELoss, LabelSmoothing or FocalLoss")

    def build_callbacks(self, cfg: Config) -> list[Callback]:
        """The default set: schedule, recorders, TensorBoard, checkpoints, progress, stops."""
        from pbt import callbacks as cb
        from pbt.schedulers import build_scheduler

        num_classes = getattr(self, "num_classes", None)
        callbacks: list[Callback] = [
            build_scheduler(cfg),
            cb.TerminateOnNaN(),
            cb.LossesRecorder(),
            cb.AccuracyRecorder(class_names=getattr(self, "class_names", None),
                                topk=(1, 5) if (num_classes or 0) >= 5 else (1,)),
            cb.LogHistory(self.run_dir / "tensorboard", log_freq=cfg.log_freq),
            cb.ModelCheckpoint(self.run_dir, monitor=cfg.monitor, mode=cfg.monitor_mode),
            cb.ProgressBar(enabled=cfg.progress, log_freq=cfg.log_freq),
        ]
        if cfg.early_stop_patience > 0:
            callbacks.append(cb.EarlyStopping(cfg.monitor, cfg.early_stop_patience,
                                              cfg.early_stop_min_delta, cfg.monitor_mode))
        return callbacks

    # -- run ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train (or only evaluate with ``eval_only``) and return the summary."""
        if self.cfg.get("eval_only"):
            self.epoch = 0
            self.test_epoch()
            self.history.append({"epoch": 0, "test": dict(self.logs["test"])})
        else:
            self.loop()
        return self.write_summary()

    def summary(self) -> dict:
        tested = [entry for entry in self.history if "top1" in entry.get("test", {})]
        best = max(tested, key=lambda entry: entry["test"]["top1"], default=None)
        return {
            "best_top1": best["test"]["top1"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "last_top1": tested[-1]["test"]["top1"] if tested else None,
            "epochs": self.history[-1]["epoch"] if self.history else 0,
            "global_step": self.global_step,
            "world_size": self.accelerator.num_processes,
            "seconds": round(time.time() - self.started, 2),
            "run_dir": str(self.run_dir),
            "history": self.history,
        }

    def write_summary(self) -> dict:
        summary = self.summary()
        if self.accelerator.is_main_process:
            write_json_atomic(self.run_dir / "summary.json", summary)
            if summary["best_top1"] is not None:
                self.log(f"best test top1 {summary['best_top1']:.2f}% at epoch "
                         f"{summary['best_epoch']} of {summary['epochs']}; run dir {self.run_dir}")
        self.accelerator.wait_for_everyone()
        return summary


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name, then rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def setup_logging(log_file: Path | None = None) -> None:
    """Console + file logging for the ``pbt`` logger (called by the trainer, not at import)."""
    logger.setLevel(logging.INFO)
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_pbt_console", False) for h in logger.handlers):
        console = logging.StreamHandler(sys.stdout)
        console._pbt_console = True  # type: ignore[attr-defined]
        console.setFormatter(formatter)
        logger.addHandler(console)
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(handler)
        handler.close()
    if log_file is not None:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)


def launch(main: Callable[[Config], Any], cfg: Config | None = None) -> Any:
    """Run ``main(cfg)``; bad input and stopped training end with one message and exit code.

    ``cfg`` defaults to the command line (``-c file.yaml`` and flags).
    """
    try:
        if cfg is None:
            cfg = load_config()
        return main(cfg)
    except ConfigError as err:
        print(f"pbt: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingError as err:
        print(f"pbt: stopped: {err}", file=sys.stderr)
        raise SystemExit(1) from None
