"""Engine: hook order, losses, accumulation, determinism, checkpoints, TensorBoard, stops."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import NoisyBlobs, tiny_cfg

from pbt.callbacks import Callback, ModelCheckpoint, TrainingError
from pbt.engine import sum_losses
from pbt.losses import FocalLoss, LabelSmoothing


class HookRecorder(Callback):
    def __init__(self):
        self.calls = []
        for hook in ("on_train_begin", "on_epoch_begin", "on_batch_begin", "on_train_summary",
                     "on_batch_end", "on_test_begin", "on_test_summary", "on_test_end",
                     "on_epoch_end", "on_train_end"):
            setattr(self, hook, self._recorder(hook))

    def _recorder(self, hook):
        def record(*args):
            self.calls.append(hook)
            trainer, logs = self.trainer, args[-1]
            assert trainer.cfg is not None and trainer.accelerator is not None
            assert trainer.optimizer is not None and self.model is trainer.model
            assert isinstance(logs, dict) and "train" in logs and "test" in logs
        return record


def test_hook_order_is_the_spec(tmp_path, tiny_trainer):
    recorder = HookRecorder()
    cfg = tiny_cfg(tmp_path, num_epochs=2, batch_size=20)
    tiny_trainer(cfg, [recorder], train_size=40, test_size=23).run()
    train = ["on_batch_begin", "on_train_summary", "on_batch_end"] * 2
    test = ["on_test_begin"] + ["on_test_summary"] * 2 + ["on_test_end"]
    epoch = ["on_epoch_begin", *train, *test, "on_epoch_end"]
    assert recorder.calls == ["on_train_begin", *epoch, *epoch, "on_train_end"]


def test_summary_and_run_dir(tmp_path, tiny_trainer):
    cfg = tiny_cfg(tmp_path)
    summary = tiny_trainer(cfg).run()
    run_dir = tmp_path / "work" / "tiny"
    saved = json.loads((run_dir / "summary.json").read_text())
    for key in ("best_top1", "last_top1", "best_epoch", "epochs", "global_step", "world_size",
                "seconds", "run_dir"):
        assert key in saved
    assert saved["epochs"] == 3 and saved["world_size"] == 1
    assert saved["global_step"] == 3 * math.ceil(40 / 8) == summary["global_step"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "train.log").is_file()
    assert (run_dir / "best.pth").is_file() and (run_dir / "last.pth").is_file()
    assert (run_dir / "confusion_matrix.csv").is_file()
    assert "best test top1" in (run_dir / "train.log").read_text()


def test_losses_tensor_list_dict_are_summed():
    a, b = torch.tensor(1.5), torch.tensor(2.0)
    assert sum_losses(a) == a
    assert sum_losses([a, b]) == 3.5
    assert sum_losses({"x": a, "y": b}) == 3.5
    with pytest.raises(TypeError):
        sum_losses(3.0)


def test_dict_losses_backprop_their_sum(tmp_path, tiny_trainer):
    """Two halves of the same loss as a dict give the same weights as the loss itself."""

    class SplitLoss(tiny_trainer):
        def run_step(self, inputs):
            outputs, loss = super().run_step(inputs)
            return outputs, {"half_a": loss * 0.5, "half_b": loss * 0.5}

    plain = tiny_trainer(tiny_cfg(tmp_path, run_name="plain", num_epochs=1))
    plain.run()
    split = SplitLoss(tiny_cfg(tmp_path, run_name="split", num_epochs=1))
    split.run()
    for p, q in zip(plain.unwrapped_model.parameters(), split.unwrapped_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, tiny_trainer):
    steps = []

    class StepSpy(Callback):
        def on_batch_end(self, batch, logs):
            steps.append((self.trainer.global_step, self.trainer.lr))

    cfg = tiny_cfg(tmp_path, grad_accum_steps=2, num_epochs=2, num_warn_up=1)
    trainer = tiny_trainer(cfg, [StepSpy()], train_size=40)
    assert trainer.steps_per_epoch == 3  # 5 batches / 2, rounded up
    trainer.run()
    assert trainer.global_step == 6
    assert [s for s, _ in steps] == [0, 1, 1, 2, 3, 3, 4, 4, 5, 6]
    # warm-up of one epoch: the lr reaches the base lr exactly at the last step of epoch 1
    assert steps[4][1] == pytest.approx(0.05)


def test_same_seed_gives_bit_identical_weights(tmp_path, tiny_trainer):
    """Shuffle, dropout and random augmentation on, two workers: still bit-identical."""
    weights = []
    for name in ("a", "b"):
        trainer = tiny_trainer(tiny_cfg(tmp_path, run_name=name, num_workers=2, seed=7))
        trainer.run()
        weights.append({k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    other = tiny_trainer(tiny_cfg(tmp_path, run_name="c", num_workers=0, seed=8))
    other.run()
    assert not torch.equal(other.unwrapped_model.state_dict()["0.weight"], weights[0]["0.weight"])


def test_workers_do_not_change_the_result(tmp_path, tiny_trainer):
    results = []
    for workers in (0, 2):
        trainer = tiny_trainer(tiny_cfg(tmp_path, run_name=f"w{workers}", num_workers=workers))
        trainer.run()
        results.append(trainer.unwrapped_model.state_dict()["4.weight"].clone())
    assert torch.equal(results[0], results[1])


def test_best_checkpoint_holds_best_epoch_weights(tmp_path, tiny_trainer):
    cfg = tiny_cfg(tmp_path, num_epochs=4, lr=0.5, milestones=[10])
    summary = tiny_trainer(cfg).run()
    best = torch.load(tmp_path / "work" / "tiny" / "best.pth", weights_only=True)
    assert best["epoch"] == summary["best_epoch"]
    # evaluate the saved weights independently of the engine
    model = tiny_trainer.__mro__[0].build_model(None, cfg)
    model.load_state_dict(best["model"])
    model.eval()
    data = NoisyBlobs(23, 1)
    with torch.no_grad():
        correct = int((model(data.data).argmax(1) == data.targets).sum())
    entry = summary["history"][summary["best_epoch"] - 1]
    assert correct == entry["test"]["correct"]
    assert 100.0 * correct / 23 == pytest.approx(summary["best_top1"])


@pytest.mark.parametrize("mode,later", [("max", -0.5), ("min", 0.5)])
def test_zero_metric_is_a_value_not_missing(tmp_path, tiny_trainer, mode, later):
    """A monitored metric of exactly 0 at epoch 1 is the best (PBT treated 0 as missing):
    ModelCheckpoint writes best.pth for it and a worse later value does not replace it."""

    class ScoredTrainer(tiny_trainer):
        def run_step(self, inputs):
            outputs, loss = super().run_step(inputs)
            return outputs, {"ce": loss, "score": torch.tensor(0.0 if self.epoch == 0 else later)}

    trainer = ScoredTrainer(tiny_cfg(tmp_path, num_epochs=2, monitor="test/loss/score",
                                     monitor_mode=mode))
    summary = trainer.run()
    checkpoint = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint))
    assert [e["test"]["loss/score"] for e in summary["history"]] == [0.0, later]
    assert checkpoint.best == 0.0 and checkpoint.best_epoch == 1
    assert summary["best"] == 0.0 and summary["best_epoch"] == 1
    run_dir = tmp_path / "work" / "tiny"
    best = torch.load(run_dir / "best.pth", weights_only=True)
    assert best["epoch"] == 1 and best["metric"] == 0.0
    assert torch.load(run_dir / "last.pth", weights_only=True)["epoch"] == 2


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path, tiny_trainer):
    class PoisonAfterFirstEpoch(Callback):
        def on_train_summary(self, inputs, outputs, losses, epoch, batch, logs):
            if epoch == 1 and batch == 2:
                self.trainer.loss = self.trainer.loss * float("nan")

    cfg = tiny_cfg(tmp_path)
    trainer = tiny_trainer(cfg)
    trainer.callbacks.insert(0, PoisonAfterFirstEpoch())
    with pytest.raises(TrainingError, match="epoch 2, batch 3"):
        trainer.run()
    last = torch.load(tmp_path / "work" / "tiny" / "last.pth", weights_only=True)
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


# The monitored value per epoch, scripted: min_delta 0.1, patience 2. Epoch 2 gains 0.05
# (too little: wait 1), epoch 3 gains 0.15 over the best (improved: wait 0), epochs 4 and 5
# gain 0.05 and 0.07 over that best (waits 1, 2): the run stops after epoch 5. Counting
# any gain, it would run all 8; patience off by one: 4 or 6; min and max swapped: 3.
EARLY_STOP_SCRIPT = [1.0, 0.95, 0.85, 0.80, 0.78, 0.76, 0.74, 0.72]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_early_stopping_needs_a_gain_above_min_delta_for_patience_epochs(tmp_path,
                                                                         tiny_trainer, mode):
    values = EARLY_STOP_SCRIPT if mode == "min" else [1.0 - v for v in EARLY_STOP_SCRIPT]

    class ScriptedMetric(tiny_trainer):
        def run_step(self, inputs):
            outputs, loss = super().run_step(inputs)
            return outputs, {"ce": loss, "score": torch.tensor(values[self.epoch])}

    cfg = tiny_cfg(tmp_path, num_epochs=len(values), monitor="test/loss/score",
                   monitor_mode=mode, early_stop_patience=2, early_stop_min_delta=0.1)
    trainer = ScriptedMetric(cfg)
    summary = trainer.run()
    assert [e["test"]["loss/score"] for e in summary["history"]] == \
        pytest.approx(values[:5])
    assert summary["epochs"] == 5
    stopper = next(c for c in trainer.callbacks if type(c).__name__ == "EarlyStopping")
    best = 0.85 if mode == "min" else 0.15
    assert stopper.best == pytest.approx(best) and stopper.wait == 2
    log = (trainer.run_dir / "train.log").read_text()
    assert f"early stopping: test/loss/score has not improved for 2 epochs (best {best:.4f})" \
        in log


def test_tensorboard_events_read_back(tmp_path, tiny_trainer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_trainer(tiny_cfg(tmp_path, num_epochs=2, log_freq=2)).run()
    events = EventAccumulator(str(tmp_path / "work" / "tiny" / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss_step", "train/lr", "epoch/train_loss", "epoch/test_loss",
            "epoch/test_top1", "epoch/train_top1", "epoch/lr"} <= scalars
    assert [e.step for e in events.Scalars("train/loss_step")] == [2, 4, 6, 8, 10]
    assert [e.step for e in events.Scalars("epoch/test_top1")] == [1, 2]
    assert "config/text_summary" in events.Tags()["tensors"]


def test_focal_and_label_smoothing_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    target = torch.tensor([0, 2])
    probs = torch.softmax(logits, 1)
    pt = probs[[0, 1], target]
    expected_focal = (-(1 - pt) ** 2 * torch.log(pt)).mean()
    torch.testing.assert_close(FocalLoss(2.0)(logits, target), expected_focal)
    assert FocalLoss(0.0)(logits, target) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, target)))
    s = 0.2
    smooth = torch.full((2, 3), s / 3)
    smooth[[0, 1], target] += 1 - s
    expected_smooth = -(smooth * torch.log(probs)).sum(1).mean()
    torch.testing.assert_close(LabelSmoothing(s)(logits, target), expected_smooth)


def test_no_weight_decay_on_bn_and_bias(tmp_path, tiny_trainer):
    trainer = tiny_trainer(tiny_cfg(tmp_path, weight_decay=0.01))
    groups = trainer.optimizer.param_groups
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in groups[0]["params"])
    assert all(p.ndim == 1 for p in groups[1]["params"])


class LayerOutputDtypes(Callback):
    """Dtypes of the first Linear layer's output (inside the model, where autocast acts;
    Accelerate turns the model's own output back to float32), in train and test forwards."""

    def __init__(self):
        self.train, self.test, self.criterion_inputs = set(), set(), set()

    def on_train_begin(self, logs):
        self.handle = self.trainer.unwrapped_model[0].register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        (self.train if module.training else self.test).add(output.dtype)

    def on_train_summary(self, inputs, outputs, losses, epoch, batch, logs):
        self.criterion_inputs.add(outputs.dtype)

    def on_train_end(self, logs):
        self.handle.remove()


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_mixed_precision_forward_dtype_on_cpu(tmp_path, tiny_trainer, precision, dtype):
    """bf16 on CPU really runs the forward in bfloat16 (train and test), keeps float32
    weights, and still trains; ``no`` stays in float32."""
    probe = LayerOutputDtypes()
    trainer = tiny_trainer(tiny_cfg(tmp_path, mixed_precision=precision, num_epochs=1), [probe])
    assert trainer.accelerator.mixed_precision == precision
    start = [p.detach().clone() for p in trainer.unwrapped_model.parameters()]
    summary = trainer.run()
    assert summary["global_step"] == 5 and summary["best_top1"] is not None
    assert probe.train == {dtype} and probe.test == {dtype}
    assert probe.criterion_inputs == {torch.float32}
    final = list(trainer.unwrapped_model.parameters())
    assert all(p.dtype == torch.float32 for p in final)
    assert all(not torch.equal(p, q) for p, q in zip(final, start))


def test_clip_grad_norm_limits_the_update(tmp_path, tiny_trainer):
    """With momentum off, one SGD step moves the weights by at most lr * max_norm."""
    cfg = tiny_cfg(tmp_path, clip_grad_norm=1e-3, momentum=0.0, weight_decay=0.0,
                   num_epochs=1, lr=1.0)
    trainer = tiny_trainer(cfg, train_size=8)
    before = torch.cat([p.detach().flatten().clone() for p in trainer.model.parameters()])
    trainer.run()
    after = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    assert 0 < float((after - before).norm()) <= 1.0 * 1e-3 + 1e-7


def test_epoch_end_state_is_saved_once(tmp_path, tiny_trainer):
    """``save_steps`` landing on an epoch's last step: one state (the epoch-end one, which
    holds the test results), not a mid-epoch save of the same step first."""
    saves = []

    class SaveSpy(tiny_trainer):
        def save_resumable(self, epoch, batches_done):
            saves.append((epoch, batches_done, self.global_step))
            return super().save_resumable(epoch, batches_done)

    SaveSpy(tiny_cfg(tmp_path, num_epochs=2, save_steps=5), train_size=40).run()  # 5 steps/epoch
    assert saves == [(1, 0, 5), (2, 0, 10)]
    saves.clear()
    SaveSpy(tiny_cfg(tmp_path, run_name="two", num_epochs=2, save_steps=2), train_size=40).run()
    assert saves == [(0, 2, 2), (0, 4, 4), (1, 0, 5), (1, 1, 6), (1, 3, 8), (2, 0, 10)]


def test_build_methods_run_in_the_readme_order(tmp_path, tiny_trainer):
    """README's table: loaders, model, optimizer (over the plain, loaded model), criterion,
    callbacks, each ``build_*(self, cfg)`` once."""
    from torch import nn

    calls = []
    parts = ("train_loader", "test_loader", "model", "optimizer", "criterion", "callbacks")

    def recording(part):
        def build(self, cfg):
            calls.append(part)
            if part == "optimizer":  # over the plain model: not yet prepared / wrapped
                assert isinstance(self.model, nn.Sequential)
            return getattr(tiny_trainer, f"build_{part}")(self, cfg)
        return build

    OrderSpy = type("OrderSpy", (tiny_trainer,),
                    {f"build_{part}": recording(part) for part in parts})
    OrderSpy(tiny_cfg(tmp_path, num_epochs=1))
    assert calls == ["train_loader", "test_loader", "model", "optimizer", "criterion",
                     "callbacks"]


def test_progress_off_logs_every_log_freq_steps_and_epoch_lines(tmp_path, tiny_trainer):
    """``progress: false``: a line every ``log_freq`` optimizer steps; each epoch's line ends
    with the time per batch; the run ends with README's one line naming best and run dir."""
    import re

    trainer = tiny_trainer(tiny_cfg(tmp_path, num_epochs=3, log_freq=2, progress=False))
    summary = trainer.run()  # 5 steps per epoch: global steps 1..15
    log = (trainer.run_dir / "train.log").read_text().splitlines()
    steps = [int(m.group(1)) for line in log if (m := re.search(r" step (\d+) batch ", line))]
    assert steps == [2, 4, 6, 8, 10, 12, 14]
    epoch_lines = [line for line in log if re.search(r" epoch \d/3  train_loss ", line)]
    assert len(epoch_lines) == 3
    assert all(re.search(r"  \d+ ms/batch$", line) for line in epoch_lines), epoch_lines
    final = (f"best test top1 {summary['best']:.2f}% at epoch {summary['best_epoch']} of 3; "
             f"run dir {trainer.run_dir}")
    assert log[-1].endswith(final), log[-1]


def test_lines_logged_before_the_run_dir_exists_reach_train_log(tmp_path, tiny_trainer):
    """train.log holds everything printed, also what was logged before the run dir was
    safe to create (the notes on ignored PBT keys and clamped values)."""
    trainer = tiny_trainer(tiny_cfg(tmp_path, num_epochs=1, data_type="folder", num_warn_up=5))
    log = (trainer.run_dir / "train.log").read_text()
    assert "PBT key data_type: 'folder' is ignored" in log
    assert "warm-up clamped to 1 epochs" in log


def test_the_shuffle_changes_every_epoch_and_depends_only_on_the_seed(tmp_path, tiny_trainer):
    orders = {}

    class OrderRecorder(Callback):
        def __init__(self, name):
            self.name = name

        def on_train_summary(self, inputs, outputs, losses, epoch, batch, logs):
            orders.setdefault((self.name, epoch), []).extend(inputs[0][:, 0].tolist())

    for name in ("a", "b"):
        tiny_trainer(tiny_cfg(tmp_path, run_name=name, num_epochs=2), [OrderRecorder(name)]).run()
    assert orders[("a", 0)] != orders[("a", 1)]  # set_epoch: another order each epoch
    assert orders[("a", 0)] == orders[("b", 0)] and orders[("a", 1)] == orders[("b", 1)]


def test_top5_is_recorded_from_five_classes_on(tmp_path, tiny_trainer):
    from torch import nn

    class FiveClasses(tiny_trainer):
        def build_model(self, cfg):
            self.num_classes, self.class_names = 5, ["a", "b", "c", "d", "e"]
            return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))

    five = FiveClasses(tiny_cfg(tmp_path, run_name="five", num_epochs=1)).run()
    four = tiny_trainer(tiny_cfg(tmp_path, run_name="four", num_epochs=1)).run()
    assert "top5" in five["test"] and five["test"]["top5"] >= five["test"]["top1"]
    assert "top5" not in four["test"]
