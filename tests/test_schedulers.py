"""LR schedules: warm-up, each decay, param groups, accumulation, processes, resume, CLI."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg

from pbt.callbacks import Callback
from pbt.config import ConfigError
from pbt.schedulers import (
    SCHEDULER_NAMES,
    LambdaSchedule,
    build_scheduler,
    lr_curve,
    scheduler_name,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TrainState:
    """The engine attributes a schedule reads; the test advances ``global_step`` itself."""

    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    num_epochs: int
    global_step: int = 0
    logs: dict = field(default_factory=lambda: {"train": {}, "test": {}, "lr": None})


def make_optimizer(base_lrs: tuple[float, ...] = (0.1, 0.01)) -> torch.optim.SGD:
    groups = [{"params": [torch.nn.Parameter(torch.ones(3))], "lr": lr} for lr in base_lrs]
    return torch.optim.SGD(groups, lr=base_lrs[0], momentum=0.9)


def train_step(optimizer: torch.optim.Optimizer) -> None:
    loss = sum((p ** 2).sum() for g in optimizer.param_groups for p in g["params"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def drive(schedule, state: TrainState, steps: int, begin: bool = True) -> list[list[float]]:
    """Run ``steps`` optimizer steps through the hooks; return each step's per-group LRs.
    (Gradient accumulation is tested on the real engine:
    ``test_gradient_accumulation_gives_the_same_per_step_curve``.)"""
    schedule.trainer = state
    if begin:
        schedule.on_train_begin(state.logs)
    lrs = []
    for _ in range(steps):
        schedule.on_batch_begin(state.global_step, state.logs)
        lrs.append([g["lr"] for g in state.optimizer.param_groups])
        assert state.logs["lr"] == lrs[-1][0]
        train_step(state.optimizer)
        state.global_step += 1
    return lrs


def cfg_for(name: str, **over) -> dict:
    cfg = {"scheduler": name, "lr": 0.1, "num_epochs": 6, "num_warn_up": 2,
           "milestones": [3, 5], "gamma": None, "min_lr": None, "lr_power": 0.9}
    cfg.update(over)
    return cfg


def first_group(cfg: dict, steps_per_epoch: int) -> list[float]:
    state = TrainState(make_optimizer((cfg["lr"], cfg["lr"] / 10)), steps_per_epoch,
                       cfg["num_epochs"])
    lrs = drive(build_scheduler(cfg), state, cfg["num_epochs"] * steps_per_epoch)
    return [lr[0] for lr in lrs]


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_warmup_rises_to_base_without_spike_zero_or_jump(name: str) -> None:
    spe, cfg = 5, cfg_for(name)
    lrs = first_group(cfg, spe)
    warmup = cfg["num_warn_up"] * spe
    assert lrs[0] == pytest.approx(0.1 / warmup)
    assert 0 < lrs[0] < 0.1 / 5
    assert lrs[warmup - 1] == 0.1
    ramp = lrs[:warmup]
    # Strictly rising through the epoch boundary at step 5 -> 6 (PBT jumped back there).
    assert all(b > a for a, b in pairwise(ramp))
    assert max(lrs) == 0.1, "warm-up overshoots the base LR"
    assert min(lrs) > 0


@pytest.mark.parametrize("name", ["multi-step", "cosine", "ExpLR"])
def test_no_warmup_starts_at_base(name: str) -> None:
    lrs = first_group(cfg_for(name, num_warn_up=0), 4)
    assert lrs[0] == 0.1


def test_multistep_drops_by_gamma_on_first_step_of_milestone_epoch() -> None:
    spe = 4
    lrs = first_group(cfg_for("multi-step", gamma=0.5, num_warn_up=1), spe)
    by_step = dict(enumerate(lrs, start=1))
    assert by_step[3 * spe] == 0.1
    assert by_step[3 * spe + 1] == pytest.approx(0.05)
    assert by_step[5 * spe] == pytest.approx(0.05)
    assert by_step[5 * spe + 1] == pytest.approx(0.025)
    assert lrs[-1] == pytest.approx(0.025)
    assert len(set(lrs[spe:])) == 3, "LR changes other than at the milestones"


def test_cosine_reaches_its_floor_at_the_last_step() -> None:
    spe, cfg = 5, cfg_for("cosine", min_lr=0.002)
    lrs = first_group(cfg, spe)
    warmup = cfg["num_warn_up"] * spe
    after = lrs[warmup:]
    assert after[0] == 0.1
    assert all(b < a for a, b in pairwise(after))
    assert lrs[-1] == pytest.approx(0.002)
    assert min(lrs[warmup:-1]) > 0.002


def test_cosine_default_floor_is_positive() -> None:
    lrs = first_group(cfg_for("cosine", num_warn_up=0), 3)
    assert lrs[-1] == pytest.approx(0.1 * 0.01)


def test_explr_decays_by_gamma_per_epoch() -> None:
    spe, cfg = 4, cfg_for("ExpLR", gamma=0.8)
    lrs = first_group(cfg, spe)
    warmup = cfg["num_warn_up"] * spe
    assert lrs[warmup] == 0.1
    for i in range(warmup, len(lrs) - spe):
        assert lrs[i + spe] == pytest.approx(0.8 * lrs[i])
    assert lrs[warmup + 1] < lrs[warmup], "ExpLR should fall every step, not once per epoch"


def test_lambda_schedule_follows_its_function() -> None:
    spe, warm = 4, 1
    schedule = LambdaSchedule(lambda t: 1.0 / (1.0 + t), num_warn_up=warm)
    state = TrainState(make_optimizer(), spe, 5)
    lrs = [lr[0] for lr in drive(schedule, state, 5 * spe)]
    for step in range(warm * spe + 1, 5 * spe + 1):
        assert lrs[step - 1] == pytest.approx(0.1 / (1.0 + (step - 1) / spe))


def test_lambda_schedule_rejects_a_non_positive_factor() -> None:
    schedule = LambdaSchedule(lambda t: 1.0 - t)
    state = TrainState(make_optimizer(), 2, 3)
    with pytest.raises(ConfigError, match="positive"):
        drive(schedule, state, 6)


def test_lambdalr_from_config_is_polynomial_down_to_min_lr() -> None:
    spe = 4
    cfg = cfg_for("LambdaLR", num_warn_up=1, num_epochs=3, lr_power=1.0, min_lr=0.01)
    lrs = first_group(cfg, spe)
    warmup, total = spe, 3 * spe
    assert lrs[warmup] == 0.1
    assert lrs[-1] == pytest.approx(0.01)
    # power 1: a straight line from 0.1 (step W+1) to 0.01 (step N).
    mid = (warmup + 1 + total) // 2
    p = (mid - 1 - warmup) / (total - 1 - warmup)
    assert lrs[mid - 1] == pytest.approx(0.1 - 0.09 * p)
    steep = first_group({**cfg, "lr_power": 2.0}, spe)
    assert steep[mid - 1] < lrs[mid - 1]


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_each_param_group_follows_its_own_base(name: str) -> None:
    spe, cfg = 3, cfg_for(name)
    state = TrainState(make_optimizer((0.1, 0.004)), spe, cfg["num_epochs"])
    lrs = drive(build_scheduler(cfg), state, cfg["num_epochs"] * spe)
    assert [g["initial_lr"] for g in state.optimizer.param_groups] == [0.1, 0.004]
    for first, second in lrs:
        assert second == pytest.approx(first * 0.04)
    assert [lr[0] for lr in lrs] == lr_curve(cfg, spe)


class LRSpy(Callback):
    """What the real engine's optimizer holds: each micro-batch's LR (after the schedule's
    ``on_batch_begin``) and, on the micro-batch whose ``optimizer.step()`` really steps
    (Accelerate's ``sync_gradients``), the step's LRs just before that step."""

    def __init__(self) -> None:
        self.micro: list[tuple[int, float]] = []
        self.steps: list[tuple[int, list[float]]] = []

    def on_batch_begin(self, batch, logs):
        trainer = self.trainer
        assert logs["lr"] == trainer.lr
        self.micro.append((trainer.global_step, trainer.lr))

    def on_after_backward(self, batch, logs):
        trainer = self.trainer
        if trainer.accelerator.sync_gradients:
            self.steps.append((trainer.global_step,
                               [g["lr"] for g in trainer.optimizer.param_groups]))


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_gradient_accumulation_gives_the_same_per_step_curve(name, tmp_path, tiny_trainer):
    """The engine with Accelerate's gradient accumulation (10 batches, 4 per step: steps of
    4, 4 and 2 micro-batches) sets the LR of ``lr_curve`` at every optimizer step, the same
    on every micro-batch of the step."""
    cfg = tiny_cfg(tmp_path, scheduler=name, num_epochs=4, num_warn_up=1, milestones=[2, 3],
                   grad_accum_steps=4, batch_size=2)
    spy = LRSpy()
    trainer = tiny_trainer(cfg, [spy], train_size=20, test_size=4)
    assert trainer.steps_per_epoch == 3
    trainer.run()
    curve = lr_curve(cfg, 3)
    assert trainer.global_step == len(curve) == 12
    assert [step for step, _ in spy.steps] == list(range(12))
    for step, group_lrs in spy.steps:
        assert group_lrs == [curve[step]] * len(group_lrs)
    micro_batches_per_step = (4, 4, 2)
    assert [step for step, _ in spy.micro] == [s for s in range(12)
                                               for _ in range(micro_batches_per_step[s % 3])]
    assert all(lr == curve[step] for step, lr in spy.micro)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_warmup_and_decay_in_epochs_do_not_depend_on_process_count(name: str) -> None:
    # One process steps 12 times an epoch; four processes 3 times each.
    cfg = cfg_for(name)
    one, four = lr_curve(cfg, 12), lr_curve(cfg, 3)
    warm = cfg["num_warn_up"]
    for epoch in range(1, warm + 1):
        assert one[12 * epoch - 1] == pytest.approx(four[3 * epoch - 1]) == 0.1 * epoch / warm
    assert one[12 * warm] == four[3 * warm] == 0.1
    if name != "ExpLR":
        assert one[-1] == pytest.approx(four[-1])
    if name in ("multi-step", "ExpLR"):
        for epoch in range(warm, cfg["num_epochs"]):
            assert one[12 * epoch] == pytest.approx(four[3 * epoch])


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_resume_continues_the_same_curve(name: str) -> None:
    spe, cfg = 4, cfg_for(name)
    total, cut = cfg["num_epochs"] * spe, 7
    straight = drive(build_scheduler(cfg), TrainState(make_optimizer(), spe, 6), total)

    state = TrainState(make_optimizer(), spe, 6)
    before = drive(build_scheduler(cfg), state, cut)
    saved = state.optimizer.state_dict()
    # A new process: fresh optimizer from the config, then the checkpoint's state.
    fresh = make_optimizer()
    fresh.load_state_dict(saved)
    schedule = build_scheduler(cfg)
    assert schedule.state_dict() == {}
    after = drive(schedule, TrainState(fresh, spe, 6, global_step=cut), total - cut)
    assert before + after == straight


@pytest.mark.parametrize("name,over", [
    ("ExpLR", {"gamma": 0.3, "num_epochs": 800}),
    ("multi-step", {"gamma": 1e-3, "milestones": list(range(1, 200)), "num_epochs": 200}),
    ("cosine", {"num_warn_up": 0, "num_epochs": 1}),
    ("LambdaLR", {"num_warn_up": 1, "num_epochs": 1}),
])
def test_lr_is_never_zero_or_negative(name: str, over: dict) -> None:
    lrs = lr_curve(cfg_for(name, **over), 2)
    assert min(lrs) > 0


def test_lr_is_written_to_logs() -> None:
    state = TrainState(make_optimizer(), 2, 2)
    schedule = build_scheduler(cfg_for("cosine", num_epochs=2, num_warn_up=1))
    schedule.trainer = state
    schedule.on_train_begin(state.logs)
    assert state.logs["lr"] == pytest.approx(0.05)


def test_aliases_resolve_to_pbt_names() -> None:
    assert scheduler_name("multi_step") == "multi-step"
    assert scheduler_name("MultiStepLR") == "multi-step"
    assert scheduler_name("CosineAnnealingLR") == "cosine"
    assert scheduler_name("exp") == "ExpLR"
    assert scheduler_name("ExponentialLR") == "ExpLR"
    assert scheduler_name("lambda") == "LambdaLR"


def test_unknown_scheduler_names_it_and_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        build_scheduler(cfg_for("cosin"))
    message = str(err.value)
    assert "'cosin'" in message and "scheduler" in message
    for name in SCHEDULER_NAMES:
        assert name in message


@pytest.mark.parametrize("over,key", [
    ({"gamma": 0.0}, "gamma"),
    ({"gamma": 1.5}, "gamma"),
    ({"min_lr": 0.5}, "min_lr"),
    ({"min_lr": 0}, "min_lr"),
    ({"num_warn_up": -1}, "num_warn_up"),
    ({"lr": 0}, "lr"),
    ({"lr": "fast"}, "lr"),
    ({"num_epochs": 0}, "num_epochs"),
    ({"milestones": [3, "x"]}, "milestones"),
    ({"milestones": [-1]}, "milestones"),
])
def test_bad_values_name_the_key(over: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"'{key}'"):
        build_scheduler(cfg_for("multi-step", **over))


def test_missing_keys_take_config_defaults_and_yaml_strings_parse() -> None:
    curve = lr_curve({"scheduler": "cosine", "lr": "1e-3", "num_epochs": 2}, 2)
    assert curve[0] == pytest.approx(1e-3)
    assert len(curve) == 4


def test_plot_cli_writes_a_png(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "scheduler: [multi-step, cosine, ExpLR, LambdaLR]\n"
        "lr: 0.1\nnum_epochs: 8\nnum_warn_up: 2\nmilestones: [4, 6]\n"
    )
    out = tmp_path / "plots" / "lr.png"
    run = subprocess.run(
        [sys.executable, "-m", "pbt.schedulers", "-c", str(config), "--plot", str(out),
         "--steps-per-epoch", "10"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_plot_cli_reports_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "cfg.yaml"
    config.write_text("scheduler: cosine\nnum_warmup: 2\n")
    run = subprocess.run(
        [sys.executable, "-m", "pbt.schedulers", "-c", str(config), "--plot",
         str(tmp_path / "lr.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    assert "num_warmup" in run.stderr and "num_warn_up" in run.stderr
    assert str(config) in run.stderr
    assert not (tmp_path / "lr.png").exists()


def test_warmup_longer_than_training_is_clamped() -> None:
    """PBT's shipped config warms up 3 epochs; a 1-epoch run warms up over that epoch."""
    clamped = first_group(cfg_for("cosine", num_warn_up=7, num_epochs=2), 4)
    assert clamped == first_group(cfg_for("cosine", num_warn_up=2, num_epochs=2), 4)
    assert clamped[-1] == pytest.approx(0.1)
