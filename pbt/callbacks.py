"""Callbacks: one small base class, and built-in callbacks that each do one thing.

Hooks have PBT's (Keras's) signatures, so PBT callbacks port unchanged. Before
``on_train_begin`` the engine sets ``self.trainer`` (its state: ``epoch``, ``global_step``,
``batch_idx``, ``accelerator``, ``optimizer``, ``cfg``, ``lr``, ``targets``, ``loss``, ...)
and ``self.model`` (the model being trained, as Keras's ``self.model``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


class Callback:
    """Base class. Override the hooks you need; all of them do nothing by default.

    Hook order (PBT's)::

        on_train_begin(logs)
        for epoch:
            on_epoch_begin(epoch, logs)
            for batch in train:
                on_batch_begin(batch, logs) -> run_step -> [on_after_backward(batch, logs)]
                -> on_train_summary(inputs, outputs, losses, epoch, batch, logs)
                -> on_batch_end(batch, logs)
            on_test_begin(logs)
            for batch in test:  run_step (no grad)
                -> on_test_summary(inputs, outputs, losses, epoch, batch, logs)
            on_test_end(logs)
            on_epoch_end(epoch, logs)
        on_train_end(logs)

    ``epoch`` and ``batch`` count from 0. ``on_after_backward`` runs between backward and
    the optimizer step, on every micro-batch. ``state_dict`` / ``load_state_dict`` let a
    callback's state travel in resumable checkpoints (plain data: numbers, strings,
    tensors, numpy values, and lists / dicts of them).
    """

    trainer: Any = None
    model: Any = None

    def set_trainer(self, trainer: Any) -> None:
        self.trainer = trainer
        self.set_model(trainer.model)

    def set_model(self, model: Any) -> None:
        self.model = model

    def on_train_begin(self, logs: dict) -> None: ...

    def on_epoch_begin(self, epoch: int, logs: dict) -> None: ...

    def on_batch_begin(self, batch: int, logs: dict) -> None: ...

    def on_after_backward(self, batch: int, logs: dict) -> None: ...

    def on_train_summary(self, inputs: Any, outputs: Any, losses: Any, epoch: int, batch: int,
                         logs: dict) -> None: ...

    def on_batch_end(self, batch: int, logs: dict) -> None: ...

    def on_test_begin(self, logs: dict) -> None: ...

    def on_test_summary(self, inputs: Any, outputs: Any, losses: Any, epoch: int, batch: int,
                        logs: dict) -> None: ...

    def on_test_end(self, logs: dict) -> None: ...

    def on_epoch_end(self, epoch: int, logs: dict) -> None: ...

    def on_train_end(self, logs: dict) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where it stopped.

    ``exit_code`` is what the process exits with (``launch`` uses it)."""

    exit_code = 1


def read_metric(logs: dict, key: str) -> float | None:
    """``"test/top1"`` -> ``logs["test"]["top1"]``; None only when absent (0 is a value)."""
    phase, _, name = key.partition("/")
    value = logs.get(phase, {}).get(name) if name else logs.get(phase)
    return None if value is None else float(value)


def summarize(history: list[dict], monitor: str, mode: str) -> dict:
    """The monitored metric over a run's per-epoch history (best, its epoch, last) and the
    last test metrics; for classifiers also PBT users' best / last top-1."""
    import math

    tested = [entry for entry in history if read_metric(entry, monitor) is not None]
    finite = [entry for entry in tested if math.isfinite(read_metric(entry, monitor))]
    pick = max if mode == "max" else min
    best = pick(finite, key=lambda entry: read_metric(entry, monitor)) if finite else None
    summary = {
        "monitor": monitor, "mode": mode,
        "best": read_metric(best, monitor) if best else None,
        "best_epoch": best["epoch"] if best else None,
        "last": read_metric(tested[-1], monitor) if tested else None,
        "test": dict(history[-1].get("test", {})) if history else {},
        "epochs": history[-1]["epoch"] if history else 0,
    }
    top1 = [entry["test"]["top1"] for entry in history if "top1" in entry.get("test", {})]
    if top1:
        summary["best_top1"], summary["last_top1"] = max(top1), top1[-1]
    return summary


def require_metric(logs: dict, key: str, who: str) -> float:
    """The value of ``key``; a ConfigError listing the logged metrics when there is none."""
    from pbt.config import ConfigError

    value = read_metric(logs, key)
    if value is None:
        logged = [f"{phase}/{name}" for phase in ("train", "test")
                  for name, v in logs.get(phase, {}).items() if isinstance(v, (int, float))]
        raise ConfigError(f"key 'monitor' has value {key!r}, which names no logged metric "
                          f"({who}); the metrics logged are: {', '.join(logged) or 'none'}")
    return value


class _Mean:
    """A sum and a count, reduced across processes on demand."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, value: float, count: int) -> None:
        self.total += value * count
        self.count += count

    def reduce(self, accelerator: Any) -> float | None:
        import torch

        pair = torch.tensor([self.total, float(self.count)], dtype=torch.float64,
                            device=accelerator.device)
        if accelerator.num_processes > 1:
            pair = accelerator.reduce(pair, reduction="sum")
        return None if pair[1] == 0 else float(pair[0] / pair[1])


def sum_losses(losses: Any) -> Any:
    """The total loss the engine backpropagates: a tensor, or the sum of a list or dict."""
    import torch

    if torch.is_tensor(losses):
        return losses
    if isinstance(losses, dict):
        losses = list(losses.values())
    if isinstance(losses, (list, tuple)) and losses:
        return torch.stack([sum_losses(item) for item in losses]).sum()
    raise TypeError(f"run_step must return losses as a tensor, list or dict, got {losses!r}")


def padding_free_count(accelerator: Any, inputs: Any) -> int | None:
    """Under DDP the last test batch of a process may end with repeats of the first samples
    (Accelerate gives every process as many batches of the same size); how many samples of
    ``inputs`` are not repeats, counted as ``gather_for_metrics`` drops them. None when the
    batch holds no repeats on any process (then every process returns None)."""
    state = accelerator.gradient_state
    if accelerator.num_processes == 1 or not state.end_of_dataloader or state.remainder <= 0:
        return None
    per_process = state.active_dataloader.total_batch_size // accelerator.num_processes
    remainder = state.remainder - accelerator.process_index * per_process
    return max(0, min(batch_size_of(inputs), remainder))


def batch_size_of(inputs: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor."""
    import torch

    if torch.is_tensor(inputs):
        return int(inputs.shape[0]) if inputs.ndim else 1
    items = inputs.values() if isinstance(inputs, dict) else inputs
    if isinstance(items, (list, tuple)) or isinstance(inputs, dict):
        for item in items:
            return batch_size_of(item)
    return 1


class LossesRecorder(Callback):
    """Epoch mean of the loss into ``logs[phase]["loss"]``; for dict losses also each key
    into ``logs[phase]["loss/<key>"]``. Reduced across processes."""

    def __init__(self) -> None:
        self.means: dict[str, dict[str, _Mean]] = {"train": {}, "test": {}}

    def _add(self, phase: str, inputs: Any, losses: Any, loss: Any = None) -> None:
        parts = {"loss": self.trainer.loss if loss is None else loss}
        if isinstance(losses, dict):
            parts.update({f"loss/{key}": value for key, value in losses.items()})
        count = batch_size_of(inputs)
        for key, value in parts.items():
            self.means[phase].setdefault(key, _Mean()).add(float(value.detach()), count)

    def _finish(self, phase: str, logs: dict) -> None:
        for key, mean in self.means[phase].items():
            logs[phase][key] = mean.reduce(self.trainer.accelerator)
        self.means[phase] = {}

    def on_train_summary(self, inputs, outputs, losses, epoch, batch, logs) -> None:
        self._add("train", inputs, losses)

    def on_test_begin(self, logs: dict) -> None:
        self._finish("train", logs)

    def on_test_summary(self, inputs, outputs, losses, epoch, batch, logs) -> None:
        real = padding_free_count(self.trainer.accelerator, inputs)
        if real is None:
            self._add("test", inputs, losses)
            return
        # the batch ends with repeats, and its losses are means over them: the losses of the
        # real samples alone. Every process runs this forward (DDP syncs buffers in each).
        from accelerate.utils import slice_tensors

        head = slice_tensors(inputs, slice(0, real)) if real else inputs
        head_losses = self.trainer.run_step(head)[1]
        if real:
            self._add("test", head, head_losses, sum_losses(head_losses))

    def on_test_end(self, logs: dict) -> None:
        self._finish("test", logs)

    def state_dict(self) -> dict:
        return {key: [m.total, m.count] for key, m in self.means["train"].items()}

    def load_state_dict(self, state: dict) -> None:
        for key, (total, count) in state.items():
            mean = self.means["train"].setdefault(key, _Mean())
            mean.total, mean.count = total, count


# PBT had a separate recorder for dict losses; LossesRecorder logs each key itself.
MultiLossesRecorder = LossesRecorder


def _class_scores(outputs: Any, targets: Any) -> bool:
    """True for classifier outputs: (N, C) scores and N integer labels."""
    import torch

    return (torch.is_tensor(outputs) and torch.is_tensor(targets) and outputs.ndim == 2
            and outputs.is_floating_point() and targets.ndim == 1
            and not targets.is_floating_point() and outputs.shape[0] == targets.shape[0])


class AccuracyRecorder(Callback):
    """Top-1 (and top-5) accuracy in percent, for (N, C) scores with integer labels (other
    batches are left out).

    Train accuracy is a running count per process, summed at epoch end. Test accuracy is
    computed over the whole test set gathered across processes, each sample once; the
    confusion matrix and classification report go to the run dir (main process).
    """

    def __init__(self, class_names: list[str] | None = None, topk: tuple[int, ...] = (1,),
                 write_reports: bool = True) -> None:
        self.class_names = class_names
        self.topk = topk
        self.write_reports = write_reports
        self.train_correct = _Mean()
        self.predictions: list = []
        self.labels: list = []
        self.image: Any = None  # the last confusion matrix plot, HWC uint8

    def on_train_summary(self, inputs, outputs, losses, epoch, batch, logs) -> None:
        targets = self.trainer.targets
        if not _class_scores(outputs, targets):
            return
        correct = (outputs.detach().argmax(dim=1) == targets).float().mean()
        self.train_correct.add(float(correct) * 100.0, int(targets.shape[0]))

    def on_test_begin(self, logs: dict) -> None:
        top1 = self.train_correct.reduce(self.trainer.accelerator)
        if top1 is not None:
            logs["train"]["top1"] = top1
        self.train_correct = _Mean()
        self.predictions, self.labels = [], []

    def on_test_summary(self, inputs, outputs, losses, epoch, batch, logs) -> None:
        targets = self.trainer.targets
        if not _class_scores(outputs, targets):
            return
        k = min(max(self.topk), outputs.shape[1])
        top = outputs.topk(k, dim=1).indices
        top, labels = self.trainer.accelerator.gather_for_metrics((top, targets))
        self.predictions.append(top.cpu())
        self.labels.append(labels.cpu())

    def on_test_end(self, logs: dict) -> None:
        import torch

        if not self.labels:
            return
        top = torch.cat(self.predictions)
        labels = torch.cat(self.labels)
        hits = top == labels[:, None]
        logs["test"]["count"] = int(labels.numel())
        for k in self.topk:
            if k <= top.shape[1]:
                logs["test"][f"top{k}"] = float(hits[:, :k].any(dim=1).float().mean() * 100)
        logs["test"]["correct"] = int(hits[:, 0].sum())
        trainer = self.trainer
        if self.write_reports and trainer.is_main_process and hasattr(trainer, "run_dir"):
            self._write_reports(trainer.run_dir, top[:, 0], labels)
            if self.image is not None:  # for LogHistory (TensorBoard); not part of history
                logs.setdefault("images", {})["test/confusion_matrix"] = self.image

    def _write_reports(self, run_dir: Any, predicted: Any, labels: Any) -> None:
        import io

        import torch

        from pbt.checkpoint import write_bytes_atomic, write_text_atomic

        num_classes = max(len(self.class_names or []),
                          int(max(predicted.max(), labels.max()) + 1))
        names = list(self.class_names or [])
        names += [str(i) for i in range(len(names), num_classes)]
        matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
        matrix.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
        lines = ["true\\pred," + ",".join(names)]
        lines += [f"{name}," + ",".join(str(int(v)) for v in row)
                  for name, row in zip(names, matrix)]
        write_text_atomic(run_dir / "confusion_matrix.csv", "\n".join(lines) + "\n")
        report = [f"{'class':>16} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
        for i, name in enumerate(names):
            tp = int(matrix[i, i])
            precision = tp / max(int(matrix[:, i].sum()), 1)
            recall = tp / max(int(matrix[i].sum()), 1)
            f1 = 2 * precision * recall / max(precision + recall, 1e-12)
            report.append(f"{name:>16} {precision:9.4f} {recall:9.4f} {f1:9.4f} "
                          f"{int(matrix[i].sum()):8d}")
        accuracy = float(matrix.diag().sum()) / max(int(matrix.sum()), 1)
        report.append(f"{'accuracy':>16} {accuracy:9.4f} {'':9} {'':9} {int(matrix.sum()):8d}")
        write_text_atomic(run_dir / "classification_report.txt", "\n".join(report) + "\n")
        if num_classes <= MAX_CONFUSION_PLOT_CLASSES:
            self.image = confusion_image(matrix, names)
            from PIL import Image

            png = io.BytesIO()
            Image.fromarray(self.image).save(png, format="PNG")
            write_bytes_atomic(run_dir / "confusion_matrix.png", png.getvalue())

    def state_dict(self) -> dict:
        return {"train_total": self.train_correct.total, "train_count": self.train_correct.count}

    def load_state_dict(self, state: dict) -> None:
        self.train_correct.total = state["train_total"]
        self.train_correct.count = state["train_count"]


MAX_CONFUSION_PLOT_CLASSES = 50  # beyond this a plot is unreadable; the CSV is still written


def confusion_image(matrix: Any, names: list[str]) -> Any:
    """The confusion matrix drawn with counts, rows true and columns predicted (HWC uint8)."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    counts = matrix.numpy()
    size = 2.5 + 0.45 * len(names)
    figure, axes = plt.subplots(figsize=(size, size), dpi=80)
    axes.imshow(counts, cmap="Blues")
    ticks = range(len(names))
    axes.set_xticks(ticks, names, rotation=90 if len(names) > 10 else 0)
    axes.set_yticks(ticks, names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    if len(names) <= 20:
        limit = counts.max() / 2
        for (row, column), count in np.ndenumerate(counts):
            axes.text(column, row, str(count), ha="center", va="center", fontsize=8,
                      color="white" if count > limit else "black")
    figure.tight_layout()
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return image


def _scalars(logs: dict, phase: str) -> dict[str, float]:
    return {name: float(value) for name, value in logs.get(phase, {}).items()
            if isinstance(value, (int, float)) and name not in ("count", "correct")}


def _quiet_tensorboard_thread_on_full_disk() -> None:
    """TensorBoard's writer thread prints a traceback when the disk fills; the training
    thread then stops with pbt's one message about it, so that traceback is dropped."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "_pbt", False):
        return

    def excepthook(args: Any) -> None:
        from pbt.checkpoint import out_of_space

        if type(args.thread).__name__ == "_AsyncWriterThread" and out_of_space(args.exc_value):
            return
        previous(args)

    excepthook._pbt = True  # type: ignore[attr-defined]
    threading.excepthook = excepthook


class LogHistory(Callback):
    """TensorBoard: train loss (each dict-loss key too) and lr every ``log_freq`` optimizer
    steps, every epoch's train/test metrics, images other callbacks put in
    ``logs["images"]`` (the confusion matrix), and the config as text. Main process only."""

    def __init__(self, log_dir: Any, log_freq: int = 20) -> None:
        self.log_dir, self.log_freq = log_dir, log_freq
        self.writer: Any = None

    def on_train_begin(self, logs: dict) -> None:
        trainer = self.trainer
        if not trainer.is_main_process:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, TensorBoard drops what the crashed run logged after the state
        _quiet_tensorboard_thread_on_full_disk()
        self.writer = SummaryWriter(str(self.log_dir), purge_step=trainer.global_step or None)
        if trainer.global_step == 0:
            import yaml

            text = yaml.safe_dump(dict(trainer.cfg), sort_keys=False)
            self.writer.add_text("config", "```\n" + text + "\n```", 0)

    @contextlib.contextmanager
    def _naming_the_event_file(self) -> Iterator[None]:
        """A full disk met by TensorBoard's writer thread surfaces here without a file
        name: give it the event file's, for pbt's one message."""
        try:
            yield
        except OSError as err:
            if not err.filename and self.writer is not None:
                err.filename = self.writer.file_writer.event_writer._file_name
            raise

    def on_batch_end(self, batch: int, logs: dict) -> None:
        with self._naming_the_event_file():
            self._log_step()

    def _log_step(self) -> None:
        trainer = self.trainer
        if self.writer is None or not trainer.accelerator.sync_gradients:
            return
        step = trainer.global_step
        if step % self.log_freq == 0:
            self.writer.add_scalar("train/loss_step", float(trainer.loss.detach()), step)
            if isinstance(trainer.losses, dict):
                for key, value in trainer.losses.items():
                    self.writer.add_scalar(f"train/loss_step/{key}", float(value.detach()), step)
            self.writer.add_scalar("train/lr", trainer.lr, step)

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        if self.writer is None:
            return
        with self._naming_the_event_file():
            for phase in ("train", "test"):
                for name, value in _scalars(logs, phase).items():
                    self.writer.add_scalar(f"epoch/{phase}_{name}", value, epoch + 1)
            self.writer.add_scalar("epoch/lr", self.trainer.lr, epoch + 1)
            for tag, image in logs.pop("images", {}).items():
                self.writer.add_image(tag, image, epoch + 1, dataformats="HWC")
            self.writer.flush()

    def on_train_end(self, logs: dict) -> None:
        if self.writer is not None:
            with self._naming_the_event_file():
                self.writer.close()
            self.writer = None


class ModelCheckpoint(Callback):
    """Save ``best.pth`` when the monitored metric improves (``mode`` max or min) and
    ``last.pth`` every epoch; main process only; weights of the unwrapped model.

    A ``monitor`` that names no logged metric is an error at the first epoch end, listing
    the metrics that are logged. Files are written atomically by a background thread while
    the next epoch trains; ``join()`` waits for it (``run()`` does, also on failure).
    """

    def __init__(self, run_dir: Any, monitor: str = "test/loss", mode: str = "min",
                 save_last: bool = True) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"ModelCheckpoint mode must be 'max' or 'min', got {mode!r}")
        self.run_dir, self.monitor, self.mode, self.save_last = run_dir, monitor, mode, save_last
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.writer: Any = None  # the background thread of the last save
        self.write_error: BaseException | None = None

    def improved(self, value: float) -> bool:
        import math

        if not math.isfinite(value):  # a NaN is never a best, nor the bar for the next
            return False
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        import threading

        from pbt.checkpoint import weights_state

        value = require_metric(logs, self.monitor, "ModelCheckpoint")
        is_best = self.improved(value)
        if is_best:
            self.best, self.best_epoch = value, epoch + 1
        if not self.trainer.is_main_process or not (is_best or self.save_last):
            return
        self.join()
        state = weights_state(self.trainer, metric=value)
        self.writer = threading.Thread(target=self._write, args=(state, is_best),
                                       name="pbt-checkpoint")
        self.writer.start()

    def _write(self, state: dict, is_best: bool) -> None:
        from pbt.checkpoint import link_atomic, save_atomic

        try:
            if self.save_last:
                save_atomic(state, self.run_dir / "last.pth")
            if is_best and self.save_last:  # the same bytes: link, do not write them twice
                link_atomic(self.run_dir / "last.pth", self.run_dir / "best.pth")
            elif is_best:
                save_atomic(state, self.run_dir / "best.pth")
        except BaseException as err:  # re-raised in the training thread by join()
            self.write_error = err

    def join(self) -> None:
        """Wait until the files of the last epoch are on disk; raise if writing failed."""
        if self.writer is not None:
            self.writer.join()
            self.writer = None
        if self.write_error is not None:
            error, self.write_error = self.write_error, None
            raise error

    def on_train_end(self, logs: dict) -> None:
        self.join()

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class ProgressBar(Callback):
    """tqdm bar on the main process with loss, accuracy (classifiers) and lr;
    ``enabled=False`` logs a line every ``log_freq`` optimizer steps instead. The epoch's
    line ends with the training time per batch (what a teacher or a callback costs)."""

    def __init__(self, enabled: bool = True, log_freq: int = 20) -> None:
        self.enabled, self.log_freq = enabled, log_freq
        self.bar: Any = None
        self.started, self.batches, self.train_seconds = 0.0, 0, 0.0

    def on_epoch_begin(self, epoch: int, logs: dict) -> None:
        trainer = self.trainer
        self.started, self.batches = time.perf_counter(), 0
        if self.enabled and trainer.is_main_process:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(trainer.train_loader), initial=trainer.batch_idx,
                            desc=f"epoch {epoch + 1}/{trainer.num_epochs}",
                            leave=False, dynamic_ncols=True)

    def on_batch_end(self, batch: int, logs: dict) -> None:
        trainer = self.trainer
        if not trainer.is_main_process:
            return
        self.batches += 1
        loss = float(trainer.loss.detach())
        if self.bar is not None:
            self.bar.update(1)
            postfix = {"loss": f"{loss:.4f}", "lr": f"{trainer.lr:.3g}"}
            if _class_scores(trainer.outputs, trainer.targets):
                accuracy = (trainer.outputs.detach().argmax(1) == trainer.targets).float().mean()
                postfix["acc"] = f"{100 * float(accuracy):.1f}"
            self.bar.set_postfix(postfix, refresh=False)
        elif trainer.accelerator.sync_gradients and trainer.global_step % self.log_freq == 0:
            trainer.log(f"epoch {trainer.epoch + 1}/{trainer.num_epochs} step "
                        f"{trainer.global_step} batch {batch + 1}/{len(trainer.train_loader)} "
                        f"loss {loss:.4f} lr {trainer.lr:.5g}")

    def on_test_begin(self, logs: dict) -> None:
        self.train_seconds = time.perf_counter() - self.started
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        trainer = self.trainer
        if not trainer.is_main_process:
            return
        parts = [f"epoch {epoch + 1}/{trainer.num_epochs}"]
        for phase in ("train", "test"):
            parts += [f"{phase}_{name} {v:.4f}" for name, v in _scalars(logs, phase).items()]
        parts.append(f"lr {trainer.lr:.5g}")
        if self.batches:
            parts.append(f"{1000 * self.train_seconds / self.batches:.0f} ms/batch")
        trainer.log("  ".join(parts))

    def on_train_end(self, logs: dict) -> None:
        self.on_test_begin(logs)


class CSVLogger(Callback):
    """``history.csv`` in the run dir: one row per epoch (epoch, step, lr, train_*, test_*),
    rewritten whole from the run's history each epoch, so a resumed run's file is whole."""

    def __init__(self, path: Any) -> None:
        self.path = path

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        import csv
        import io

        from pbt.checkpoint import write_text_atomic

        if not self.trainer.is_main_process:
            return
        rows = []
        for entry in self.trainer.history:
            row = {"epoch": entry["epoch"], "global_step": entry.get("global_step"),
                   "lr": entry.get("lr")}
            for phase in ("train", "test"):
                row.update({f"{phase}_{name}": value
                            for name, value in entry.get(phase, {}).items()})
            rows.append(row)
        columns = list(dict.fromkeys(name for row in rows for name in row))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.path, text.getvalue())


class ModelEMA(Callback):
    """An exponential moving average of the weights, updated after every optimizer step.

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n steps (timm's and
    TensorFlow's rule), so the random initial weights fade fast. With ``eval_weights`` the
    test pass runs on the averaged weights (swapped in, then back) and ``best.pth`` /
    ``last.pth`` hold them (``"weights": "ema"``). The average travels in resumable states.
    Every process keeps its own average of the same (DDP-synchronised) weights.
    """

    def __init__(self, decay: float = 0.9998, eval_weights: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ModelEMA decay must be in (0, 1), got {decay!r}")
        self.decay, self.eval_weights = decay, eval_weights
        self.weights: dict | None = None  # name -> averaged tensor, as the model's state_dict
        self.live: dict | None = None  # the trained weights while the test pass uses the EMA

    def on_train_begin(self, logs: dict) -> None:
        state = self.trainer.unwrapped_model.state_dict()
        if self.weights is None:
            self.weights = {name: value.detach().clone() for name, value in state.items()}
        else:  # restored from a resumable state (on the CPU)
            self.weights = {name: self.weights[name].to(value.device)
                            for name, value in state.items()}

    def on_batch_end(self, batch: int, logs: dict) -> None:
        import torch

        trainer = self.trainer
        if self.weights is None or not trainer.accelerator.sync_gradients:
            return
        step = trainer.global_step  # optimizer steps done, this one included
        decay = min(self.decay, (1 + step) / (10 + step))
        averages, values = [], []
        with torch.no_grad():
            for name, value in trainer.unwrapped_model.state_dict().items():
                if value.is_floating_point():
                    averages.append(self.weights[name])
                    values.append(value.detach())
                else:  # counters (BatchNorm's num_batches_tracked): the current value
                    self.weights[name].copy_(value)
            torch._foreach_lerp_(averages, values, 1.0 - decay)

    def _swap(self, weights: dict) -> dict:
        import torch

        state = self.trainer.unwrapped_model.state_dict()
        previous = {name: value.detach().clone() for name, value in state.items()}
        with torch.no_grad():
            for name, value in state.items():
                value.copy_(weights[name])
        return previous

    def on_test_begin(self, logs: dict) -> None:
        if self.eval_weights and self.weights is not None:
            self.live = self._swap(self.weights)

    def on_test_end(self, logs: dict) -> None:
        if self.live is not None:
            self._swap(self.live)
            self.live = None

    def state_dict(self) -> dict:
        return {"weights": {name: value.cpu() for name, value in (self.weights or {}).items()}}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"] or None


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    def __init__(self, monitor: str = "test/loss", patience: int = 5, min_delta: float = 0.0,
                 mode: str = "min") -> None:
        self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, min_delta, mode
        self.best: float | None = None
        self.wait = 0

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        value = require_metric(logs, self.monitor, "EarlyStopping")
        gain = (value - self.best if self.mode == "max" else self.best - value) \
            if self.best is not None else float("inf")
        if gain > self.min_delta:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.trainer.stop_training = True
            self.trainer.log(f"early stopping: {self.monitor} has not improved for "
                             f"{self.patience} epochs (best {self.best:.4f})")

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait = state["best"], state["wait"]


class TerminateOnNaN(Callback):
    """Stop the run when the training loss is not finite, naming epoch and step, or when a
    test loss is (before that epoch's checkpoints are written)."""

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        import math

        for name, value in logs.get("test", {}).items():
            if name.startswith("loss") and isinstance(value, float) and not math.isfinite(value):
                raise TrainingError(
                    f"non-finite test {name} ({value}) at epoch {epoch + 1}; nothing of this "
                    "epoch was saved and the checkpoints already saved are intact (check the "
                    "test data, or the model's eval mode: BatchNorm statistics, lr)")

    def on_train_summary(self, inputs, outputs, losses, epoch, batch, logs) -> None:
        import math

        loss = float(self.trainer.loss.detach())
        if not math.isfinite(loss):
            raise TrainingError(
                f"non-finite training loss ({loss}) at epoch {epoch + 1}, batch {batch + 1}, "
                f"global step {self.trainer.global_step}; the checkpoints already saved are "
                "intact (lower lr, or check the data)"
            )
