"""The training engine: PBT's hook loop (``Engine``) and a trainer built from ``build_*``
methods on an Accelerate ``Accelerator`` (``EngineTrainer``).

Accelerate does device placement, mixed precision, gradient accumulation and DDP; the engine
orders the work and calls the callbacks. Task specifics (example inputs, test metrics for
the pruning report, what a checkpoint records) come from overridable methods.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pbt.callbacks import Callback, TrainingError, sum_losses, summarize
from pbt.checkpoint import (
    load_initial_weights,
    out_of_space,
    read_initial_state,
    restore_trainer,
    save_failed,
    save_trainer_state,
    write_json_atomic,
)
from pbt.config import Config, ConfigError
from pbt.launch import Preempted, accelerator_settings, setup_logging, stop_on_signals
from pbt.rundir import open_run_dir, resolve_run_dir

logger = logging.getLogger("pbt")


def compile_model(model: nn.Module, mode: str, log: Callable[[str], None]) -> None:
    """``torch.compile`` the model's forward in place (its state_dict keeps its names: no
    ``_orig_mod.``). Compilation happens at the first call; if it fails there, the model
    runs eagerly from then on and ``log`` says why in one line."""
    import torch._dynamo

    compiled = torch.compile(model._call_impl, mode=None if mode == "default" else mode)
    failed = False

    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal failed
        if not failed:
            try:
                return compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as err:
                failed = True
                reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
                log(f"compile: torch.compile failed ({type(err).__name__}: {reason}); "
                    "the model runs without it")
        return model._call_impl(*args, **kwargs)

    # nn.Module.compile() stores its compiled forward here; ours adds the fallback
    model._compiled_call_impl = call


class Engine:
    """The hook loop of the spec; subclasses provide model, optimizer, loaders, criterion.

    State for callbacks: ``epoch`` (0-based), ``global_step`` (optimizer steps),
    ``batch_idx``, ``model``, ``unwrapped_model``, ``optimizer``, ``accelerator``, ``cfg``,
    ``lr``, ``logs``; per step ``inputs``, ``targets``, ``outputs``, ``losses``, ``loss``.
    """

    def __init__(self, cfg: Config, accelerator: Any) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        self.callbacks: list[Callback] = []
        self.logs: dict = {"train": {}, "test": {}, "lr": None}
        self.history: list[dict] = []
        self.epoch = self.start_epoch = self.global_step = self.batch_idx = 0
        self.skip_batches = self.batches_done = 0
        self.num_epochs = int(cfg.num_epochs)
        self.stop_training = False
        self.inputs = self.targets = self.outputs = self.losses = self.loss = None
        self.distiller: Callable | None = None  # pbt.losses.Distiller with distill_from
        self.batch_mixer: Callable | None = None  # pbt.data.BatchMixer with mixup / CutMix
        self.model: nn.Module
        self.optimizer: torch.optim.Optimizer
        self.criterion: Callable
        self.train_loader: Iterable
        self.test_loader: Iterable

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (batches per process / accumulation, rounded up)."""
        return math.ceil(len(self.train_loader) / self.accelerator.gradient_accumulation_steps)

    num_steps = steps_per_epoch  # PBT's name

    def fire(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args, self.logs)

    def get_targets(self, batch: Any) -> Any:
        """Labels of a batch: ``batch[1]`` for (inputs, labels); override for other layouts."""
        if isinstance(batch, (list, tuple)) and len(batch) > 1:
            return batch[1]
        if isinstance(batch, dict):
            return batch.get("target", batch.get("label"))
        return None

    def run_step(self, inputs: Any) -> tuple[Any, Any]:
        """Forward a batch as the loader yields it; return ``(outputs, losses)``."""
        data, targets = inputs[0], inputs[1]
        outputs = self.model(data)
        return outputs, self.criterion(outputs, targets)

    def train_step(self, batch: Any) -> None:
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            self.outputs, self.losses = self.run_step(batch)
            if self.distiller is not None:
                self.losses = self.distiller(batch, self.outputs, self.losses)
            self.loss = sum_losses(self.losses)
            accelerator.backward(self.loss)
            self.fire("on_after_backward", self.batch_idx)
            if accelerator.sync_gradients and self.cfg.get("clip_grad_norm"):
                accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            self.global_step += 1

    def train_epoch(self) -> None:
        self.model.train()
        loader = self.train_loader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        first = 0
        if self.skip_batches:  # resuming inside an epoch
            first, self.skip_batches = self.skip_batches, 0
            loader = self.accelerator.skip_first_batches(loader, first)
        self.batch_idx = self.batches_done = first
        self.fire("on_epoch_begin", self.epoch)
        for batch_idx, batch in enumerate(loader, start=first):
            self.batch_idx = batch_idx
            if self.batch_mixer is not None:  # mixed targets are class probabilities
                batch = self.batch_mixer(batch, self.epoch, batch_idx)
            self.inputs, self.targets = batch, self.get_targets(batch)
            self.fire("on_batch_begin", batch_idx)
            self.train_step(batch)
            self.fire("on_train_summary", batch, self.outputs, self.losses, self.epoch, batch_idx)
            self.fire("on_batch_end", batch_idx)
            self.batches_done = batch_idx + 1
            if self.accelerator.sync_gradients:
                self.after_optimizer_step()
            if self.stop_training:
                break

    @torch.no_grad()
    def test_epoch(self) -> None:
        self.model.eval()
        self.fire("on_test_begin")
        for batch_idx, batch in enumerate(self.test_loader):
            self.batch_idx = batch_idx
            self.inputs, self.targets = batch, self.get_targets(batch)
            self.outputs, self.losses = self.run_step(batch)
            self.loss = sum_losses(self.losses)
            self.fire("on_test_summary", batch, self.outputs, self.losses, self.epoch, batch_idx)
        self.fire("on_test_end")

    def loop(self) -> None:
        """The whole run, in the spec's hook order."""
        for callback in self.callbacks:
            callback.set_trainer(self)
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
            self.fire("on_epoch_end", epoch)
            self.after_epoch()
            if self.stop_training:
                break
        self.fire("on_train_end")

    def after_optimizer_step(self) -> None:
        """Engine-level work after each optimizer step (the trainer saves states here)."""

    def after_epoch(self) -> None:
        """Engine-level work after ``on_epoch_end`` (the trainer saves states here)."""


class EngineTrainer(Engine):
    """PBT's ``build_*(self, cfg)`` methods on an Accelerator, then ``run()``: implement
    the loaders and ``build_model``; optimizer, criterion and callbacks have defaults."""

    def __init__(self, cfg: Config) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, set_seed

        settings, notes = accelerator_settings(cfg, os.environ)
        accelerator = Accelerator(
            **settings, cpu=not torch.cuda.is_available(),
            dataloader_config=DataLoaderConfiguration(  # non_blocking: pinned batches
                use_seedable_sampler=True, data_seed=cfg.seed, non_blocking=True))
        super().__init__(cfg, accelerator)
        set_seed(cfg.seed)
        self.started, self.seconds_before = time.time(), 0.0
        self.stop_signal: int | None = None
        self.run_lock: Any = None  # pbt.rundir.RunLock of the main process
        self.prune_history: list | None = None
        self.logger = logger
        if accelerator.is_main_process:
            setup_logging(None)  # console now; the file joins once the run dir is safe
        for note in [*getattr(cfg, "notes", []), *notes]:
            self.log(note)
        self.run_dir, self.resume_from = resolve_run_dir(self)

    def run_name_parts(self, cfg: Config) -> list[str]:
        """Parts of the generated run name (before ``flag`` and a timestamp)."""
        return [type(self).__name__.removesuffix("Trainer").lower() or "run"]

    def log(self, message: str) -> None:
        """Log on the main process only (to the console and the run's train.log)."""
        if self.accelerator.is_main_process:
            logger.info(message)

    # -- build ----------------------------------------------------------------------------
    def build(self, cfg: Config) -> None:
        """The ``build_*`` methods, then weights / pruning on the plain model (so
        ``build_optimizer`` sees the final ``self.model``), then ``accelerator.prepare``."""
        self.train_loader = self.build_train_loader(cfg)
        self.test_loader = self.build_test_loader(cfg)
        initial = read_initial_state(self)  # checked, and the data's labels mapped to it
        self.model = self.build_model(cfg)
        saved = load_initial_weights(self, initial)
        extra: list[Callback] = []
        if saved is None and cfg.use_prune:
            from pbt.prune import prune_for_training

            self.model, report = prune_for_training(self, self.model)
            extra.append(report)
        if cfg.sync_bn and self.accelerator.num_processes > 1:
            if self.accelerator.device.type == "cpu":  # torch's SyncBatchNorm is GPU-only
                self.log("sync_bn: true is ignored on CPU (SyncBatchNorm needs GPUs); each "
                         "process keeps its own BatchNorm statistics")
            else:
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        if cfg.distill_from:  # outside prepare: the teacher is never wrapped, synced or saved
            from pbt.losses import Distiller

            self.distiller = Distiller.from_config(self)
        if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
            from pbt.data import BatchMixer

            self.batch_mixer = BatchMixer.from_config(self)
        summary = self.model_summary(cfg)  # of the final network, before compile wraps it
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.compile:  # after pruning, before DDP; the weights keep their names
            compile_model(self.model, cfg.compile_mode, self.log)
        self.optimizer = self.build_optimizer(cfg)
        self.criterion = self.build_criterion(cfg)
        self.model, self.optimizer, self.train_loader, self.test_loader = self.accelerator.prepare(
            self.model, self.optimizer, self.train_loader, self.test_loader)
        self.monitor = cfg.monitor or ("test/top1" if self.is_classifier() else "test/loss")
        self.monitor_mode = cfg.monitor_mode or (
            "min" if "loss" in self.monitor.rpartition("/")[2] else "max")
        self.callbacks = list(self.build_callbacks(cfg)) + extra
        if saved is not None:
            self.restore(saved)
        open_run_dir(self)  # the first write: every check has passed
        self.log(summary)
        device = self.accelerator.device
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # Accelerate's wrapper
        self.log(f"device {device} ({where}), {self.accelerator.num_processes} process(es), "
                 f"mixed precision {self.accelerator.mixed_precision}; optimizer "
                 f"{type(optimizer).__name__}, loss {type(self.criterion).__name__}")

    def build_train_loader(self, cfg: Config) -> DataLoader:
        raise NotImplementedError("build_train_loader not implemented")

    def build_test_loader(self, cfg: Config) -> DataLoader:
        raise NotImplementedError("build_test_loader not implemented")

    def build_model(self, cfg: Config) -> nn.Module:
        raise NotImplementedError("build_model not implemented")

    def build_teacher(self, cfg: Config, saved: dict) -> nn.Module:
        """The network of ``distill_from`` (``saved``: its file) before its weights load;
        by default ``build_model``'s. Pruned teachers are rebuilt from their history."""
        return self.build_model(cfg)

    def build_model_parallel(self, model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        """PBT's; returns ``model`` unchanged: ``accelerator.prepare`` places and wraps it."""
        return model

    def build_optimizer(self, cfg: Config) -> torch.optim.Optimizer:
        """SGD / Adam / AdamW over ``self.model``; by default no weight decay on BatchNorm
        and bias parameters."""
        decay, no_decay = [], []
        for param in self.model.parameters():
            if param.requires_grad:
                (no_decay if cfg.no_decay_bn_bias and param.ndim <= 1 else decay).append(param)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        if cfg.optim_type == "SGD":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov and cfg.momentum > 0)
        return getattr(torch.optim, cfg.optim_type)(groups, lr=cfg.lr)

    def build_criterion(self, cfg: Config) -> nn.Module:
        """The loss named by ``loss_type`` (see :mod:`pbt.losses`)."""
        from pbt.losses import build_criterion

        return build_criterion(cfg)

    def build_callbacks(self, cfg: Config) -> list[Callback]:
        """The default set: schedule, NaN stop, losses, accuracy (classifiers only),
        TensorBoard, history.csv, checkpoints, progress; EMA, slim regularizer and early
        stopping when set."""
        from pbt import callbacks as cb
        from pbt.schedulers import build_scheduler

        callbacks: list[Callback] = [build_scheduler(cfg), cb.TerminateOnNaN(),
                                     cb.LossesRecorder()]
        if cfg.ema_decay > 0:
            callbacks.append(cb.ModelEMA(cfg.ema_decay, eval_weights=cfg.ema_eval))
        if self.is_classifier():
            num_classes = getattr(self, "num_classes", None) or cfg.get("num_classes") or 0
            callbacks.append(cb.AccuracyRecorder(getattr(self, "class_names", None),
                                                 topk=(1, 5) if num_classes >= 5 else (1,)))
        callbacks += [cb.LogHistory(self.run_dir / "tensorboard", log_freq=cfg.log_freq),
                      cb.CSVLogger(self.run_dir / "history.csv"),
                      cb.ModelCheckpoint(self.run_dir, self.monitor, self.monitor_mode),
                      cb.ProgressBar(enabled=cfg.progress, log_freq=cfg.log_freq)]
        if cfg.slim_reg > 0:
            from pbt.prune import SlimRegularizer

            callbacks.append(SlimRegularizer(cfg.slim_reg))
        if cfg.early_stop_patience > 0:
            callbacks.append(cb.EarlyStopping(self.monitor, cfg.early_stop_patience,
                                              cfg.early_stop_min_delta, self.monitor_mode))
        return callbacks

    def build_dataloader(self, dataset: Dataset, batch_size: int | None = None,
                         num_workers: int | None = None, phase: str = "train",
                         shuffle: bool | None = None, pin_memory: Any = None,
                         drop_last: bool = False, distributed: Any = None, *,
                         train: bool | None = None,
                         sampler: Sampler[int] | None = None) -> DataLoader:
        """A loader whose order and augmentation depend only on seed and epoch, with PBT's
        arguments (batch size per process; ``pin_memory``, ``distributed``: pbt decides)."""
        from pbt.data import build_dataloader

        train = phase == "train" if train is None else train
        return build_dataloader(
            dataset, batch_size or self.cfg.batch_size,
            self.cfg.num_workers if num_workers is None else num_workers, self.cfg.seed,
            shuffle=train if shuffle is None else shuffle, sampler=sampler,
            drop_last=drop_last, processes_here=self.local_processes())

    def local_processes(self) -> int:
        """Training processes on this machine (they share its CPUs)."""
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or self.accelerator.num_processes))

    # -- task specifics (a recipe overrides these) ----------------------------------------
    def is_classifier(self) -> bool:
        """Whether accuracy is recorded: the trainer (or cfg, as in PBT) names classes."""
        return bool(getattr(self, "num_classes", None) or getattr(self, "class_names", None)
                    or self.cfg.get("num_classes"))

    def model_summary(self, cfg: Config) -> str:
        """Parameters (trainable / total), MACs of one ``example_inputs()`` forward, and
        with ``summary_layers`` a table of the layers."""
        from pbt.prune import summarize_model

        with torch.random.fork_rng(devices=[]):  # example inputs may draw random numbers
            inputs = self.example_inputs()
        return summarize_model(self.model, inputs, layers=cfg.summary_layers)

    def example_inputs(self) -> Any:
        """One input for tracing the model (pruning): the first test sample's data."""
        batch = next(iter(self.test_loader))
        data = batch[0] if isinstance(batch, (list, tuple)) else batch
        return data[:1] if torch.is_tensor(data) else data

    def evaluate_model(self, model: nn.Module) -> dict[str, float]:
        """Test metrics of a plain (not prepared) model, for the pruning report."""
        return {}

    def checkpoint_meta(self) -> dict:
        """What a weights file records besides the weights (what rebuilds the network)."""
        return {"class_names": getattr(self, "class_names", None)}

    @property
    def num_samples(self) -> int:
        """PBT's: training samples (of this loader, before sharding)."""
        return len(getattr(self.train_loader, "dataset", ()))

    # -- weights, resumable states ---------------------------------------------------------
    def rebuild_pruned(self, model: nn.Module, history: list) -> None:
        """Replay a saved pruning history on a freshly built model (resume, model_file)."""
        from pbt.prune import apply_prune_history

        self.prune_history = history
        apply_prune_history(model, self.example_inputs(), history)

    def save_resumable(self, epoch: int, batches_done: int) -> Path:
        return save_trainer_state(self, epoch, batches_done)

    def restore(self, saved: dict) -> None:
        """Load model, optimizer, scaler (Accelerate) and pbt's counters, callbacks, RNG."""
        restore_trainer(self, saved)

    def after_optimizer_step(self) -> None:
        stop = self.stop_signal is not None
        if self.accelerator.num_processes > 1:  # every rank must agree on where to stop
            flag = torch.tensor([1.0 if stop else 0.0], device=self.accelerator.device)
            stop = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        save_steps = self.cfg.save_steps
        # the last step of an epoch is saved by after_epoch, with the epoch's test results
        epoch_end = self.batches_done == len(self.train_loader)
        if stop or (save_steps and self.global_step % save_steps == 0 and not epoch_end):
            self.save_resumable(self.epoch, self.batches_done)
        if stop:
            raise Preempted(self.stop_signal or 15, self.run_dir)

    def after_epoch(self) -> None:
        self.save_resumable(self.epoch + 1, 0)

    # -- run ------------------------------------------------------------------------------
    def run(self, logs: dict | None = None) -> dict:
        """Train (or only evaluate, with ``eval_only``) and return the summary.
        SIGINT / SIGTERM finish the current step, save a resumable state and stop."""
        try:
            if self.cfg.lr_find:  # the LR range test; the weights are left as they were
                from pbt.lr_find import lr_find

                return lr_find(self)
            if self.cfg.eval_only:
                for callback in self.callbacks:
                    callback.set_trainer(self)
                self.test_epoch()
                self.history.append({"epoch": 0, "test": dict(self.logs["test"])})
                return self.write_summary()
            try:
                with stop_on_signals(self):
                    self.loop()
            finally:  # files being written in the background reach the disk, even on failure
                for callback in self.callbacks:
                    if hasattr(callback, "join"):
                        callback.join()
            return self.write_summary()
        except (TrainingError, ConfigError) as err:
            self.log(f"stopped: {err}")  # into train.log as well as the console
            raise
        except Exception as err:  # a full disk under any writer (TensorBoard, reports...)
            if not out_of_space(err):
                raise
            error = save_failed(err, Path(getattr(err, "filename", None) or self.run_dir), 0)
            self.log(f"stopped: {error}")
            raise error from None
        finally:
            from pbt.data import stop_workers

            stop_workers(self.train_loader, self.test_loader)
            if self.run_lock is not None:
                self.run_lock.release()

    def summary(self) -> dict:
        """The monitored metric (best, its epoch, last), the last test metrics, counters."""
        return {**summarize(self.history, self.monitor, self.monitor_mode),
                "global_step": self.global_step, "world_size": self.accelerator.num_processes,
                "seconds": round(self.seconds_before + time.time() - self.started, 2),
                "run_dir": str(self.run_dir), "history": self.history}

    def write_summary(self) -> dict:
        summary = self.summary()
        if self.accelerator.is_main_process:
            write_json_atomic(self.run_dir / "summary.json", summary)
            if summary["best"] is not None:
                top = summary["monitor"].rpartition("/")[2].startswith("top")  # percent
                value = f"{summary['best']:.2f}%" if top else f"{summary['best']:.4g}"
                self.log(f"best {summary['monitor'].replace('/', ' ')} {value} at epoch "
                         f"{summary['best_epoch']} of {summary['epochs']}; run dir "
                         f"{self.run_dir}")
        self.accelerator.wait_for_everyone()
        return summary
