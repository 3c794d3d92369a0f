"""Callbacks: one small base class, and built-in callbacks that each do one thing.

Every hook receives the engine (its state: ``epoch``, ``global_step``, ``batch_idx``,
``model``, ``unwrapped_model``, ``optimizer``, ``accelerator``, ``cfg``, ``lr``, and the
current step's ``inputs``, ``targets``, ``outputs``, ``losses``, ``loss``) and the run's
``logs`` dict (``logs["train"]``, ``logs["test"]``, ``logs["lr"]``).
"""

from __future__ import annotations

from typing import Any


class Callback:
    """Base class. Override the hooks you need; all of them do nothing by default.

    Hook order (names kept from PBT)::

        on_train_begin
        for epoch:
            on_epoch_begin
            for batch in train: on_batch_begin -> run_step -> [on_after_backward]
                                -> on_train_summary -> on_batch_end
            on_test_begin
            for batch in test:  run_step (no grad) -> on_test_summary
            on_test_end
            on_epoch_end
        on_train_end

    ``on_after_backward`` runs between backward and the optimizer step, on every
    micro-batch (e.g. to add a sparsity gradient). ``state_dict`` / ``load_state_dict``
    let a callback's state travel in resumable checkpoints.
    """

    def on_train_begin(self, engine: Any, logs: dict) -> None: ...

    def on_epoch_begin(self, engine: Any, logs: dict) -> None: ...

    def on_batch_begin(self, engine: Any, logs: dict) -> None: ...

    def on_after_backward(self, engine: Any, logs: dict) -> None: ...

    def on_train_summary(self, engine: Any, logs: dict) -> None: ...

    def on_batch_end(self, engine: Any, logs: dict) -> None: ...

    def on_test_begin(self, engine: Any, logs: dict) -> None: ...

    def on_test_summary(self, engine: Any, logs: dict) -> None: ...

    def on_test_end(self, engine: Any, logs: dict) -> None: ...

    def on_epoch_end(self, engine: Any, logs: dict) -> None: ...

    def on_train_end(self, engine: Any, logs: dict) -> None: ...

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


def _batch_size(engine: Any) -> int:
    targets = engine.targets
    return int(targets.shape[0]) if hasattr(targets, "shape") and targets.ndim else 1


class LossesRecorder(Callback):
    """Epoch mean of the total loss into ``logs["train"]["loss"]`` and ``logs["test"]["loss"]``."""

    def __init__(self) -> None:
        self.means = {"train": _Mean(), "test": _Mean()}

    def on_train_summary(self, engine: Any, logs: dict) -> None:
        self.means["train"].add(float(engine.loss.detach()), _batch_size(engine))

    def on_test_begin(self, engine: Any, logs: dict) -> None:
        logs["train"]["loss"] = self.means["train"].reduce(engine.accelerator)
        self.means["train"] = _Mean()
        self.means["test"] = _Mean()

    def on_test_summary(self, engine: Any, logs: dict) -> None:
        self.means["test"].add(float(engine.loss.detach()), _batch_size(engine))

    def on_test_end(self, engine: Any, logs: dict) -> None:
        logs["test"]["loss"] = self.means["test"].reduce(engine.accelerator)

    def state_dict(self) -> dict:
        train = self.means["train"]
        return {"train_total": train.total, "train_count": train.count}

    def load_state_dict(self, state: dict) -> None:
        self.means["train"].total = state["train_total"]
        self.means["train"].count = state["train_count"]


class MultiLossesRecorder(Callback):
    """For dict losses: the epoch mean of every key (``logs[phase]["loss/<key>"]``)."""

    def __init__(self) -> None:
        self.means: dict[str, dict[str, _Mean]] = {"train": {}, "test": {}}

    def _add(self, phase: str, engine: Any) -> None:
        losses = engine.losses if isinstance(engine.losses, dict) else {"loss": engine.loss}
        for key, value in losses.items():
            self.means[phase].setdefault(key, _Mean()).add(float(value.detach()),
                                                           _batch_size(engine))

    def _finish(self, phase: str, engine: Any, logs: dict) -> None:
        for key, mean in sorted(self.means[phase].items()):
            logs[phase][f"loss/{key}"] = mean.reduce(engine.accelerator)
        self.means[phase] = {}

    def on_train_summary(self, engine: Any, logs: dict) -> None:
        self._add("train", engine)

    def on_test_begin(self, engine: Any, logs: dict) -> None:
        self._finish("train", engine, logs)

    def on_test_summary(self, engine: Any, logs: dict) -> None:
        self._add("test", engine)

    def on_test_end(self, engine: Any, logs: dict) -> None:
        self._finish("test", engine, logs)

    def state_dict(self) -> dict:
        return {key: [m.total, m.count] for key, m in self.means["train"].items()}

    def load_state_dict(self, state: dict) -> None:
        for key, (total, count) in state.items():
            mean = self.means["train"].setdefault(key, _Mean())
            mean.total, mean.count = total, count


class AccuracyRecorder(Callback):
    """Top-1 (and top-5) accuracy in percent.

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

    def on_train_summary(self, engine: Any, logs: dict) -> None:
        outputs = engine.outputs
        if not hasattr(outputs, "argmax") or engine.targets is None:
            return
        correct = (outputs.detach().argmax(dim=1) == engine.targets).float().mean()
        self.train_correct.add(float(correct) * 100.0, _batch_size(engine))

    def on_test_begin(self, engine: Any, logs: dict) -> None:
        logs["train"]["top1"] = self.train_correct.reduce(engine.accelerator)
        self.train_correct = _Mean()
        self.predictions, self.labels = [], []

    def on_test_summary(self, engine: Any, logs: dict) -> None:
        k = min(max(self.topk), engine.outputs.shape[1])
        top = engine.outputs.topk(k, dim=1).indices
        top, labels = engine.accelerator.gather_for_metrics((top, engine.targets))
        self.predictions.append(top.cpu())
        self.labels.append(labels.cpu())

    def on_test_end(self, engine: Any, logs: dict) -> None:
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
        if self.write_reports and engine.is_main_process and hasattr(engine, "run_dir"):
            self._write_reports(engine.run_dir, top[:, 0], labels)

    def _write_reports(self, run_dir: Any, predicted: Any, labels: Any) -> None:
        import torch

        num_classes = len(self.class_names) if self.class_names else int(
            max(predicted.max(), labels.max()) + 1)
        names = self.class_names or [str(i) for i in range(num_classes)]
        matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
        matrix.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
        lines = ["true\\pred," + ",".join(names)]
        lines += [f"{name}," + ",".join(str(int(v)) for v in row)
                  for name, row in zip(names, matrix)]
        (run_dir / "confusion_matrix.csv").write_text("\n".join(lines) + "\n")
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
        (run_dir / "classification_report.txt").write_text("\n".join(report) + "\n")

    def state_dict(self) -> dict:
        return {"train_total": self.train_correct.total, "train_count": self.train_correct.count}

    def load_state_dict(self, state: dict) -> None:
        self.train_correct.total = state["train_total"]
        self.train_correct.count = state["train_count"]


class LogHistory(Callback):
    """TensorBoard: train loss and lr every ``log_freq`` optimizer steps, every epoch's
    train/test metrics, and the config as text. Main process only."""

    def __init__(self, log_dir: Any, log_freq: int = 20) -> None:
        self.log_dir, self.log_freq = log_dir, log_freq
        self.writer: Any = None

    def on_train_begin(self, engine: Any, logs: dict) -> None:
        if not engine.is_main_process:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, TensorBoard drops what the crashed run logged after the state
        self.writer = SummaryWriter(str(self.log_dir), purge_step=engine.global_step or None)
        if engine.global_step == 0:
            import yaml

            text = yaml.safe_dump(dict(engine.cfg), sort_keys=False)
            self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def on_batch_end(self, engine: Any, logs: dict) -> None:
        if self.writer is None or not engine.accelerator.sync_gradients:
            return
        if engine.global_step % self.log_freq == 0:
            self.writer.add_scalar("train/loss_step", float(engine.loss.detach()),
                                   engine.global_step)
            self.writer.add_scalar("train/lr", engine.lr, engine.global_step)

    def on_epoch_end(self, engine: Any, logs: dict) -> None:
        if self.writer is None:
            return
        epoch = engine.epoch + 1
        for phase in ("train", "test"):
            for name, value in logs.get(phase, {}).items():
                if value is not None and name not in ("count", "correct"):
                    self.writer.add_scalar(f"epoch/{phase}_{name}", value, epoch)
        self.writer.add_scalar("epoch/lr", engine.lr, epoch)
        self.writer.flush()

    def on_train_end(self, engine: Any, logs: dict) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ModelCheckpoint(Callback):
    """Save ``best.pth`` when the monitored metric improves (``mode`` max or min) and
    ``last.pth`` every epoch; main process only; weights of the unwrapped model.

    Files are written to a temporary name and renamed, so a crash never leaves half a file.
    The weights are copied at epoch end and written by a background thread while the next
    epoch trains; ``join()`` waits for it (``run()`` does, also when training fails).
    """

    def __init__(self, run_dir: Any, monitor: str = "test/top1", mode: str = "max",
                 save_last: bool = True) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"ModelCheckpoint mode must be 'max' or 'min', got {mode!r}")
        self.run_dir, self.monitor, self.mode, self.save_last = run_dir, monitor, mode, save_last
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.writer: Any = None  # the background thread of the last save
        self.write_error: BaseException | None = None

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_epoch_end(self, engine: Any, logs: dict) -> None:
        import threading

        value = read_metric(logs, self.monitor)
        is_best = value is not None and self.improved(value)
        if is_best:
            self.best, self.best_epoch = value, engine.epoch + 1
        if not engine.is_main_process or not (is_best or self.save_last):
            return
        self.join()
        state = weights_state(engine, metric=value)
        self.writer = threading.Thread(target=self._write, args=(state, is_best),
                                       name="pbt-checkpoint")
        self.writer.start()

    def _write(self, state: dict, is_best: bool) -> None:
        try:
            if self.save_last:
                write_atomic(state, self.run_dir / "last.pth")
            if is_best and self.save_last:  # the same bytes: link, do not write them twice
                link_atomic(self.run_dir / "last.pth", self.run_dir / "best.pth")
            elif is_best:
                write_atomic(state, self.run_dir / "best.pth")
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

    def on_train_end(self, engine: Any, logs: dict) -> None:
        self.join()

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


def link_atomic(source: Any, target: Any) -> None:
    """Make ``target`` a hard link to ``source`` by an atomic rename (copy where links
    are not supported). Replacing ``source`` later leaves ``target`` untouched."""
    import os
    import shutil

    tmp = f"{target}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def weights_state(engine: Any, metric: float | None = None) -> dict:
    """A plain weights checkpoint (loads with ``weights_only=True``) with what rebuilds the
    net; tensors are copies, so training may go on while it is written."""
    cfg = engine.cfg
    state = {
        "model": {k: v.detach().to("cpu", copy=True)
                  for k, v in engine.unwrapped_model.state_dict().items()},
        "net_type": cfg.get("net_type"),
        "num_classes": getattr(engine, "num_classes", None),
        "class_names": getattr(engine, "class_names", None),
        "input_size": list(cfg.get("input_size") or []),
        "epoch": engine.epoch + 1,
        "global_step": engine.global_step,
        "metric": metric,
    }
    history = getattr(engine, "prune_history", None)
    if history is not None:
        state["prune_history"] = history
    return state


def write_atomic(state: dict, path: Any) -> None:
    """``torch.save`` to a temporary name, then rename: readers never see half a file."""
    import os

    import torch

    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


class ProgressBar(Callback):
    """tqdm bar on the main process with loss, top-1 and lr; ``enabled=False`` logs a line
    every ``log_freq`` optimizer steps instead."""

    def __init__(self, enabled: bool = True, log_freq: int = 20) -> None:
        self.enabled, self.log_freq = enabled, log_freq
        self.bar: Any = None

    def on_epoch_begin(self, engine: Any, logs: dict) -> None:
        if self.enabled and engine.is_main_process:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(engine.train_loader), initial=engine.batch_idx,
                            desc=f"epoch {engine.epoch + 1}/{engine.num_epochs}",
                            leave=False, dynamic_ncols=True)

    def on_batch_end(self, engine: Any, logs: dict) -> None:
        if not engine.is_main_process:
            return
        if self.bar is not None:
            self.bar.update(1)
            postfix = {"loss": f"{float(engine.loss.detach()):.4f}", "lr": f"{engine.lr:.3g}"}
            outputs, targets = engine.outputs, engine.targets
            if hasattr(outputs, "argmax") and outputs.ndim == 2 and targets is not None:
                accuracy = (outputs.detach().argmax(1) == targets).float().mean()
                postfix["acc"] = f"{100 * float(accuracy):.1f}"
            self.bar.set_postfix(postfix, refresh=False)
        elif engine.accelerator.sync_gradients and engine.global_step % self.log_freq == 0:
            engine.log(f"epoch {engine.epoch + 1}/{engine.num_epochs} step {engine.global_step} "
                       f"batch {engine.batch_idx + 1}/{len(engine.train_loader)} "
                       f"loss {float(engine.loss.detach()):.4f} lr {engine.lr:.5g}")

    def on_test_begin(self, engine: Any, logs: dict) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_epoch_end(self, engine: Any, logs: dict) -> None:
        if not engine.is_main_process:
            return
        parts = [f"epoch {engine.epoch + 1}/{engine.num_epochs}"]
        for phase in ("train", "test"):
            for name, value in logs.get(phase, {}).items():
                if value is not None and name not in ("count", "correct"):
                    parts.append(f"{phase}_{name} {value:.4f}")
        parts.append(f"lr {engine.lr:.5g}")
        engine.log("  ".join(parts))

    on_train_end = on_test_begin


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    def __init__(self, monitor: str = "test/top1", patience: int = 5, min_delta: float = 0.0,
                 mode: str = "max") -> None:
        self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, min_delta, mode
        self.best: float | None = None
        self.wait = 0

    def on_epoch_end(self, engine: Any, logs: dict) -> None:
        value = read_metric(logs, self.monitor)
        if value is None:
            return
        gain = (value - self.best if self.mode == "max" else self.best - value) \
            if self.best is not None else float("inf")
        if gain > self.min_delta:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            engine.stop_training = True
            engine.log(f"early stopping: {self.monitor} has not improved for "
                       f"{self.patience} epochs (best {self.best:.4f})")

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait = state["best"], state["wait"]


class TerminateOnNaN(Callback):
    """Stop the run when the training loss is not finite, naming epoch and step."""

    def on_train_summary(self, engine: Any, logs: dict) -> None:
        import math

        loss = float(engine.loss.detach())
        if not math.isfinite(loss):
            raise TrainingError(
                f"non-finite training loss ({loss}) at epoch {engine.epoch + 1}, batch "
                f"{engine.batch_idx + 1}, global step {engine.global_step}; the checkpoints "
                "already saved are intact (lower lr, or check the data)"
            )
