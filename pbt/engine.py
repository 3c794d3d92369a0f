"""The training engine: a visible hook loop (``Engine``) and a trainer built from ``build_*``
methods on an Accelerate ``Accelerator`` (``EngineTrainer``), plus ``launch``.

Accelerate does device placement, mixed precision, gradient accumulation and DDP; the engine
only orders the work and calls the callbacks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pbt.callbacks import Callback, TrainingError
from pbt.config import Config, ConfigError, load_config, save_config

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
        self.batches_done = 0
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
        self.batch_idx = self.batches_done = first
        self.fire("on_epoch_begin")
        for batch_idx, batch in enumerate(loader, start=first):
            self.batch_idx = batch_idx
            self.inputs, self.targets = batch, self.get_targets(batch)
            self.fire("on_batch_begin")
            self.train_step(batch)
            self.fire("on_train_summary")
            self.fire("on_batch_end")
            self.batches_done = batch_idx + 1
            if self.accelerator.sync_gradients:
                self.after_optimizer_step()
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
            if self.stop_training and self.batches_done < len(self.train_loader):
                break  # stopped inside an epoch: no test on a half-trained epoch
            self.test_epoch()
            self.history.append({
                "epoch": epoch + 1, "global_step": self.global_step, "lr": self.lr,
                "train": dict(self.logs["train"]), "test": dict(self.logs["test"]),
            })
            self.fire("on_epoch_end")
            self.after_epoch()
            if self.stop_training:
                break
        self.fire("on_train_end")

    def after_optimizer_step(self) -> None:
        """Engine-level work after each optimizer step (the trainer saves states here)."""

    def after_epoch(self) -> None:
        """Engine-level work after ``on_epoch_end`` (the trainer saves states here)."""


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
        # Only the CPU generator: torch.manual_seed would also queue CUDA seeding (slow), and
        # the caller's RNG state (dropout in the main process) is put back afterwards.
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed((self.seed * 1_000_003 + epoch * 10_007 + index) % (2**63))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(saved)


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
        self.started = time.time()
        self.seconds_before = 0.0  # time spent before a resume
        self.stop_signal: int | None = None
        self.prune_history: list | None = None
        if accelerator.is_main_process:
            setup_logging(None)  # console now; the file joins once the run dir is safe
        self.run_dir, self.resume_from = self.resolve_run_dir()

    # -- run directory and logging --------------------------------------------------------
    def resolve_run_dir(self) -> tuple[Path, Path | None]:
        """The run dir (and state to resume from); the main process decides for everyone.

        Nothing is written here, so a bad ``resume`` changes nothing on disk.
        """
        from accelerate.utils import broadcast_object_list

        from pbt.checkpoint import find_resume
        from pbt.config import default_run_name

        cfg = self.cfg
        holder: list = [None, None, None]
        if self.accelerator.is_main_process:
            try:
                name = cfg.run_name or default_run_name(cfg, time.strftime("%Y%m%d-%H%M%S"))
                run_dir, state = Path(cfg.work_dir) / name, None
                if cfg.resume:
                    prefix = cfg.run_name or default_run_name(cfg, "").rstrip("_")
                    found = find_resume(cfg.resume, Path(cfg.work_dir), prefix)
                    if found is not None:
                        run_dir, state = found
                    else:
                        logger.info("resume auto: no usable state under %s, starting fresh",
                                    cfg.work_dir)
                holder = [str(run_dir), str(state) if state else None, None]
            except ConfigError as err:
                holder = [None, None, str(err)]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(holder)
        if holder[2]:
            raise ConfigError(holder[2])
        return Path(holder[0]), (Path(holder[1]) if holder[1] else None)

    def open_run_dir(self) -> None:
        """Create the run dir, save the resolved config, start the log file."""
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            setup_logging(self.run_dir / "train.log")
            if getattr(self, "class_names", None):  # predictions map back to names
                (self.run_dir / "class_names.txt").write_text("\n".join(self.class_names) + "\n")
        self.accelerator.wait_for_everyone()

    def log(self, message: str) -> None:
        """Log on the main process only (to the console and the run's train.log)."""
        if self.accelerator.is_main_process:
            logger.info(message)

    # -- build ----------------------------------------------------------------------------
    def build(self, cfg: Config) -> None:
        """Call the ``build_*`` methods, then hand everything to ``accelerator.prepare``.

        Order matters: pruning (or rebuilding a pruned structure on resume) happens on the
        plain model, before the optimizer is made and before ``prepare`` wraps anything.
        """
        from pbt.checkpoint import check_model_fits, load_pbt_state, verify_state_files

        self.train_loader = self.build_train_loader(cfg)
        self.test_loader = self.plain_test_loader = self.build_test_loader(cfg)
        model = self.build_model(cfg)
        saved: dict | None = None
        if self.resume_from is not None:
            verify_state_files(self.resume_from)
            saved = load_pbt_state(self.resume_from)
            if saved["world_size"] != self.accelerator.num_processes:
                raise ConfigError(
                    f"key 'resume': the state in {str(self.resume_from)!r} was saved by "
                    f"{saved['world_size']} processes and this run has "
                    f"{self.accelerator.num_processes}; resume with the same number of "
                    "processes (the data order and optimizer shards depend on it)")
            if saved.get("prune_history") is not None:
                model = self.rebuild_pruned(model, saved["prune_history"])
            check_model_fits(self.resume_from, model)
        elif cfg.get("use_prune"):
            model = self.prune(model)
        if cfg.get("sync_bn") and self.accelerator.num_processes > 1:
            if self.accelerator.device.type == "cpu":  # torch's SyncBatchNorm is GPU-only
                self.log("sync_bn: true is ignored on CPU (SyncBatchNorm needs GPUs); each "
                         "process keeps its own BatchNorm statistics")
            else:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.optimizer = self.build_optimizer(cfg, model)
        self.criterion = self.build_criterion(cfg)
        self.model, self.optimizer, self.train_loader, self.test_loader = self.accelerator.prepare(
            model, self.optimizer, self.train_loader, self.test_loader
        )
        self.plain_test_loader = None
        self.callbacks = list(self.build_callbacks(cfg))
        self.open_run_dir()
        if saved is not None:
            self.restore(saved)

    # -- pruning (before prepare; see pbt.prune) -------------------------------------------
    def example_inputs(self) -> torch.Tensor:
        """One input batch for tracing the model; override for non-image models."""
        width, height = self.cfg.input_size
        return torch.randn(1, 3, height, width)

    @torch.no_grad()
    def evaluate_plain(self, model: nn.Module) -> float | None:
        """Test top-1 of a model that is not prepared yet (for the pruning report)."""
        loader = getattr(self, "plain_test_loader", None)
        if loader is None:
            return None
        was_training = model.training
        model.eval()
        correct = total = 0
        for batch in loader:
            images, labels = batch[0], batch[1]
            correct += int((model(images).argmax(1) == labels).sum())
            total += int(labels.numel())
        model.train(was_training)
        return 100.0 * correct / max(total, 1)

    def prune(self, model: nn.Module) -> nn.Module:
        """Physically remove channels (``prune_method``, ``prune_ratio``) and record a report."""
        from pbt.prune import measure_model, prune_model

        cfg, example = self.cfg, self.example_inputs()
        before = {**measure_model(model, example), "top1": self.evaluate_plain(model)}
        result = prune_model(model, example, method=cfg.prune_method, ratio=cfg.prune_ratio,
                             round_to=cfg.round_to or None, global_pruning=cfg.prune_global,
                             ignored_layers=cfg.prune_ignore or None,
                             iterative_steps=cfg.prune_steps, backend=cfg.prune_backend)
        after = {**measure_model(model, example), "top1": self.evaluate_plain(model)}
        self.prune_history = (self.prune_history or []) + result.history  # iterative runs
        self.prune_report = {"method": cfg.prune_method, "backend": cfg.prune_backend,
                             "ratio": cfg.prune_ratio,
                             "round_to": cfg.round_to, "global": cfg.prune_global,
                             "input_size": list(cfg.input_size),
                             "before_pruning": before, "after_pruning": after}
        self.log(f"pruned ({cfg.prune_method}, ratio {cfg.prune_ratio}): params "
                 f"{before['params']:,} -> {after['params']:,}, MACs {before['macs']:,} -> "
                 f"{after['macs']:,}, CPU latency {before['latency_ms']:.2f} -> "
                 f"{after['latency_ms']:.2f} ms, test top1 {before['top1']} -> {after['top1']}")
        return model

    def rebuild_pruned(self, model: nn.Module, history: list) -> nn.Module:
        """Replay a saved pruning history on a freshly built model (resume, finetune)."""
        from pbt.prune import apply_prune_history

        self.prune_history = history
        return apply_prune_history(model, self.example_inputs(), history)

    def write_prune_report(self) -> None:
        from pbt.prune import measure_model

        report = getattr(self, "prune_report", None)
        if report is None or not self.accelerator.is_main_process:
            return
        model = self.unwrapped_model
        tested = [e["test"]["top1"] for e in self.history if "top1" in e.get("test", {})]
        report["after_finetuning"] = {**measure_model(model, self.example_inputs()),
                                      "top1": tested[-1] if tested else None,
                                      "best_top1": max(tested) if tested else None}
        write_json_atomic(self.run_dir / "prune_report.json", report)
        self.log("prune report: " + json.dumps(report))

    # -- resumable states -----------------------------------------------------------------
    def pbt_state(self, epoch: int, batches_done: int) -> dict:
        """pbt's own part of a resumable state (plain data only); training goes on at
        ``epoch`` after ``batches_done`` of its batches."""
        return {
            "epoch": epoch, "batches_done": batches_done,
            "global_step": self.global_step, "history": self.history,
            "world_size": self.accelerator.num_processes,
            "seconds": self.seconds_before + time.time() - self.started,
            "prune_history": self.prune_history,
        }

    def callback_keys(self) -> dict[str, Callback]:
        """Callbacks by ``ClassName#k`` (k-th of its class), the key of their saved state."""
        keys: dict[str, Callback] = {}
        for callback in self.callbacks:
            name = type(callback).__name__
            count = sum(key.startswith(name + "#") for key in keys)
            keys[f"{name}#{count}"] = callback
        return keys

    def save_resumable(self, epoch: int, batches_done: int) -> Path:
        from pbt.checkpoint import save_state

        callbacks = {key: state for key, cb in self.callback_keys().items()
                     if (state := cb.state_dict())}
        return save_state(self.accelerator, self.run_dir, self.global_step,
                          self.pbt_state(epoch, batches_done), {"callbacks": callbacks},
                          keep=self.cfg.keep_checkpoints)

    def restore(self, saved: dict) -> None:
        """Load model, optimizer, scaler (Accelerate) and pbt's counters, callbacks, RNG."""
        from pbt.checkpoint import load_rank_state, restore_rng

        self.accelerator.load_state(str(self.resume_from))
        mine = load_rank_state(self.resume_from, self.accelerator.process_index)
        callbacks = self.callback_keys()
        for key, state in mine["callbacks"].items():
            if key in callbacks:
                callbacks[key].load_state_dict(state)
            else:
                self.log(f"resume: the state of callback {key} has no callback in this run")
        self.history = saved["history"]
        self.global_step = saved["global_step"]
        self.seconds_before = saved["seconds"]
        self.prune_history = saved.get("prune_history")
        self.start_epoch, self.skip_batches = saved["epoch"], saved["batches_done"]
        restore_rng(mine["rng"])
        self.log(f"resumed from {self.resume_from}: epoch {self.start_epoch + 1}, "
                 f"batch {self.skip_batches}, global step {self.global_step}")

    def after_optimizer_step(self) -> None:
        stop = self.stop_signal is not None
        if self.accelerator.num_processes > 1:  # every rank must agree on where to stop
            flag = torch.tensor([1.0 if stop else 0.0], device=self.accelerator.device)
            stop = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        save_steps = self.cfg.get("save_steps") or 0
        # the last step of an epoch is saved by after_epoch, with the epoch's test results
        epoch_end = self.batches_done == len(self.train_loader)
        if stop or (save_steps and self.global_step % save_steps == 0 and not epoch_end):
            self.save_resumable(self.epoch, self.batches_done)
        if stop:
            signum = self.stop_signal or 15
            raise Preempted(signum, self.run_dir)

    def after_epoch(self) -> None:
        self.save_resumable(self.epoch + 1, 0)

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
        from pbt.checkpoint import safe_load
        from pbt.models import load_weights

        key = "finetune" if isinstance(self.cfg.get("finetune"), str) else "model_file"
        saved = safe_load(Path(path), key=key)
        if isinstance(saved, dict) and saved.get("prune_history"):
            self.rebuild_pruned(model, saved["prune_history"])
        finetune = bool(self.cfg.get("finetune"))
        skipped = load_weights(model, path, strict=not finetune, key=key, loaded=saved)
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
            from pbt.data import default_num_workers

            # processes on this machine (torchrun and accelerate launch set LOCAL_WORLD_SIZE)
            local = os.environ.get("LOCAL_WORLD_SIZE") or self.accelerator.num_processes
            workers = default_num_workers(int(local))
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
        if cfg.slim_reg > 0:
            from pbt.prune import SlimRegularizer

            callbacks.append(SlimRegularizer(cfg.slim_reg))
        if cfg.early_stop_patience > 0:
            callbacks.append(cb.EarlyStopping(cfg.monitor, cfg.early_stop_patience,
                                              cfg.early_stop_min_delta, cfg.monitor_mode))
        return callbacks

    # -- run ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train (or only evaluate with ``eval_only``) and return the summary.

        SIGINT / SIGTERM finish the current step, save a resumable state and stop.
        """
        if self.cfg.get("eval_only"):
            self.epoch = 0
            self.test_epoch()
            self.history.append({"epoch": 0, "test": dict(self.logs["test"])})
            return self.write_summary()
        try:
            with self.stop_on_signals():
                self.loop()
        finally:  # files being written in the background reach the disk, even on failure
            for callback in self.callbacks:
                if hasattr(callback, "join"):
                    callback.join()
        self.write_prune_report()
        return self.write_summary()

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, frame: Any) -> None:
            if self.stop_signal is not None:
                if signum == signal.SIGINT and self.stop_signal == signal.SIGINT:
                    raise KeyboardInterrupt  # a second Ctrl-C stops at once
                return  # e.g. a launcher's SIGTERM after the Ctrl-C: keep the first signal
            self.stop_signal = signum
            self.log(f"{signal.Signals(signum).name}: saving a resumable state after this step")

        previous = {sig: signal.signal(sig, request_stop)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

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
            "seconds": round(self.seconds_before + time.time() - self.started, 2),
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


class Preempted(TrainingError):
    """SIGINT / SIGTERM: a resumable state was saved; the message says how to resume."""

    def __init__(self, signum: int, run_dir: Path) -> None:
        import signal

        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received; a resumable state was saved in {run_dir}. Resume with the "
            f"same command plus: --resume {run_dir}")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name, then rename: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def setup_logging(log_file: Path | None = None) -> None:
    """Console + file logging for the ``pbt`` logger (called by the trainer, not at import).

    Without ``log_file`` records are also kept in memory, and written to the file once it
    is given, so the log holds everything printed before the run dir was safe to create.
    """
    from logging.handlers import MemoryHandler

    logger.setLevel(logging.INFO)
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_pbt_console", False) for h in logger.handlers):
        console = logging.StreamHandler(sys.stdout)
        console._pbt_console = True  # type: ignore[attr-defined]
        console.setFormatter(formatter)
        logger.addHandler(console)
    buffers = [h for h in logger.handlers if isinstance(h, MemoryHandler)]
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(handler)
        handler.close()
    if log_file is None:
        for buffer in buffers:
            logger.removeHandler(buffer)
        logger.addHandler(MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1))
        return
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(formatter)
    for buffer in buffers:
        buffer.setTarget(file_handler)
        buffer.flush()
        logger.removeHandler(buffer)
        buffer.close()
    logger.addHandler(file_handler)


def launch(main: Callable[[Config], Any], cfg: Config | None = None) -> Any:
    """Run ``main(cfg)`` in this process or as DDP workers; bad input and stopped training
    end with one message and an exit code.

    ``cfg`` defaults to the command line (``-c file.yaml`` and flags). Under a launcher
    (``accelerate launch``, ``torchrun``, ``mpirun``) this process is one worker and runs
    ``main`` itself. Otherwise pbt starts the workers on this machine with torch's elastic
    launcher: one per GPU listed in ``gpu_id`` (``CUDA_VISIBLE_DEVICES`` is set from it),
    or, without CUDA, ``num_processes`` CPU workers on gloo. Several GPUs always mean DDP,
    whatever ``distributed`` says (pbt has no DataParallel mode). When a worker dies the
    others are stopped and the job exits non-zero, naming the failed rank.
    """
    try:
        if cfg is None:
            cfg = load_config()
        if launched_world_size(os.environ) is not None:
            return _run_main(main, cfg)
        visible = select_gpus(cfg.gpu_id, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if visible is not None:  # before anything asks CUDA for its devices
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
        num_processes, note = plan_processes(cfg, torch.cuda.device_count())
        if note:
            print(f"pbt: {note}", flush=True)
        if num_processes == 1:
            return _run_main(main, cfg)
        return _start_workers(main, cfg, num_processes)
    except ConfigError as err:
        print(f"pbt: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def launched_world_size(env: Any) -> int | None:
    """The world size a launcher gave this process (torchrun / accelerate / MPI), else None."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        if env.get(key):
            return int(env[key])
    return None


def select_gpus(gpu_id: list[int], visible: str | None) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for ``gpu_id``: the ids themselves, or, when the variable is
    already set, the listed positions in it (so ``gpu_id`` counts the devices you can see).
    None when it is set to nothing (CUDA hidden: nothing to select)."""
    if len(set(gpu_id)) != len(gpu_id) or min(gpu_id, default=0) < 0:
        raise ConfigError(f"key 'gpu_id' has value {gpu_id!r}; expected distinct device ids >= 0")
    if visible is None:
        return ",".join(str(i) for i in gpu_id)
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    if not devices:
        return None
    if max(gpu_id) >= len(devices):
        raise ConfigError(f"key 'gpu_id' has value {gpu_id!r}, but CUDA_VISIBLE_DEVICES="
                          f"{visible!r} makes only {len(devices)} device(s) visible "
                          f"(ids 0..{len(devices) - 1})")
    return ",".join(devices[i] for i in gpu_id)


def plan_processes(cfg: Config, cuda_devices: int) -> tuple[int, str | None]:
    """How many workers to start on this machine, and a note for the user (or None).

    With CUDA: one per ``gpu_id`` entry (``cuda_devices`` is what ``CUDA_VISIBLE_DEVICES``
    from :func:`select_gpus` left visible). Without: ``num_processes`` (0 = 1) on CPU.
    """
    gpu_id, wanted = list(cfg.gpu_id), int(cfg.num_processes)
    if wanted < 0:
        raise ConfigError(f"key 'num_processes' has value {wanted!r}; expected 0 (auto) or more")
    if cuda_devices == 0:
        note = None
        if len(gpu_id) > 1:
            note = (f"no CUDA device visible: gpu_id {gpu_id} is ignored "
                    "(--num_processes N starts N CPU workers)")
        return max(wanted, 1), note
    if cuda_devices < len(gpu_id):
        raise ConfigError(f"key 'gpu_id' has value {gpu_id!r}, but only {cuda_devices} of these "
                          "CUDA devices exist")
    if wanted not in (0, len(gpu_id)):
        raise ConfigError(f"key 'num_processes' has value {wanted!r}, but gpu_id {gpu_id} lists "
                          f"{len(gpu_id)} GPU(s); pbt starts one process per listed GPU")
    note = None
    if len(gpu_id) > 1 and not cfg.distributed:
        note = (f"distributed: false, but gpu_id lists {len(gpu_id)} GPUs: training with DDP, "
                "one process per GPU (pbt has no DataParallel mode; PyTorch recommends DDP)")
    return len(gpu_id), note


def _run_main(main: Callable[[Config], Any], cfg: Config) -> Any:
    """``main(cfg)`` in this process; with several processes each says it is up first."""
    import socket

    world = launched_world_size(os.environ) or 1
    rank = next((os.environ[k] for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
                 if os.environ.get(k)), "0")
    where = f" (rank {rank})" if world > 1 else ""
    if world > 1:
        print(f"pbt: rank {rank}/{world} ready (pid {os.getpid()}, host {socket.gethostname()})",
              flush=True)
    try:
        return main(cfg)
    except ConfigError as err:
        print(f"pbt: error{where}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except TrainingError as err:
        print(f"pbt: stopped{where}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None


def _start_workers(main: Callable[[Config], Any], cfg: Config, num_processes: int) -> Any:
    """Start ``num_processes`` workers on this machine (torch elastic, no restarts) and
    return rank 0's result; any failed worker stops them all and exits non-zero."""
    import shutil
    import uuid

    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # as torchrun does: N processes x all cores each would oversubscribe the CPU
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    on_gpu = torch.cuda.device_count() > 0
    where = f"GPUs {os.environ['CUDA_VISIBLE_DEVICES']} (nccl)" if on_gpu else "CPU (gloo)"
    print(f"pbt: starting {num_processes} DDP worker processes on {where}; batch_size "
          f"{cfg.batch_size} is per process", flush=True)
    port = int(cfg.main_process_port)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=num_processes, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}",
        # is_host: a busy port is an error, never a silent join of another job's store
        rdzv_configs={"is_host": True}, max_restarts=0, start_method="spawn",
        # Ctrl-C reaches the workers from the terminal; the agent then sends SIGTERM, not a
        # second SIGINT (which would abort their resumable save)
        signals_to_handle="SIGTERM,SIGHUP,SIGQUIT",
        logs_specs=DefaultLogsSpecs(),  # a temporary dir for the workers' error files
    )
    try:
        results = elastic_launch(config, _run_main)(main, cfg)
    except RendezvousError as err:
        reason = str(err.__cause__ or err).split(". ")[-1]  # e.g. "... address already in use"
        raise ConfigError(f"key 'main_process_port': cannot listen on 127.0.0.1:{port} "
                          f"({reason}); pass --main_process_port 0 to use any free port") from None
    except ChildFailedError as err:
        failures = sorted(err.failures.items())
        for rank, failure in failures:
            how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
                   else f"exited with code {failure.exitcode}")
            # an uncaught exception leaves an error file: {"message": "ValueError: ...", ...}
            error = failure.message.get("message") if isinstance(failure.message, dict) else None
            print(f"pbt: worker rank {rank} (pid {failure.pid}) {how}"
                  + (f": {str(error).strip().splitlines()[-1]}" if error else ""), file=sys.stderr)
        print(f"pbt: stopped all {num_processes} workers; checkpoints already saved in the run "
              "dir are intact", file=sys.stderr, flush=True)
        codes = [failure.exitcode for _, failure in failures if failure.exitcode > 0]
        raise SystemExit(max(codes, default=1)) from None
    except SignalException as err:
        print(f"pbt: {err.sigval.name} received; all workers were stopped", file=sys.stderr)
        raise SystemExit(128 + int(err.sigval)) from None
    except KeyboardInterrupt:
        print("pbt: SIGINT received; all workers were stopped", file=sys.stderr)
        raise SystemExit(130) from None
    finally:  # the error files were read into the failures above
        shutil.rmtree(config.logs_specs.root_log_dir, ignore_errors=True)
    return results[0]
