"""LR schedules: warm-up, each decay, param groups, accumulation, processes, resume, CLI."""

from __future__ import annotations

import json
import math
import os
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


# Expected LRs below are written from the formulas in pbt/schedulers.py's docstring (and
# README), by hand: never from pbt's own lr_curve, so a formula bug there cannot hide.
# Steps are 1-based optimizer steps; S = steps per epoch, W = warm-up steps, N = all steps.

@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_warmup_rises_linearly_every_step_across_epoch_boundaries(name: str) -> None:
    # S = 4, num_warn_up 2 epochs: W = 8, LR = 0.1 * s / 8 at step s. Step 4 ends epoch 0
    # (0.05) and step 5 starts epoch 1 (0.0625): no jump back (PBT restarted there).
    lrs = first_group(cfg_for(name), 4)
    assert lrs[:8] == pytest.approx([0.0125, 0.025, 0.0375, 0.05,
                                     0.0625, 0.075, 0.0875, 0.1], rel=1e-12)
    assert lrs[7] == 0.1  # exactly the base at the warm-up's end
    assert lrs[8] == pytest.approx(0.1)  # every decay starts from the base (p = 0)
    assert max(lrs) == 0.1, "warm-up overshoots the base LR"
    assert min(lrs) > 0


@pytest.mark.parametrize("name", ["multi-step", "cosine", "ExpLR"])
def test_no_warmup_starts_at_base(name: str) -> None:
    lrs = first_group(cfg_for(name, num_warn_up=0), 4)
    assert lrs[0] == 0.1


def test_multistep_drops_by_gamma_on_first_step_of_milestone_epoch() -> None:
    # S = 4, 6 epochs, warm-up 1 epoch, milestones [3, 5], gamma 0.5: epoch 3 (0-based)
    # starts at step 13, epoch 5 at step 21.
    lrs = first_group(cfg_for("multi-step", gamma=0.5, num_warn_up=1), 4)
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1] + [0.1] * 8 + [0.05] * 8
                                + [0.025] * 4, rel=1e-12)


def test_multistep_milestones_inside_the_warm_up_apply_when_it_ends() -> None:
    # S = 2, warm-up 2 epochs (steps 1-4), milestones [1, 3], gamma 0.5: milestone 1 is
    # inside the warm-up, which still rises to the base; from step 5 (epoch 2) one drop,
    # from step 7 (epoch 3) two.
    lrs = first_group(cfg_for("multi-step", gamma=0.5, num_epochs=4, milestones=[1, 3]), 2)
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.05, 0.05, 0.025, 0.025],
                                rel=1e-12)


def test_cosine_reaches_its_floor_at_the_last_step() -> None:
    # S = 5, 6 epochs, warm-up 1: W = 5, N = 30, p = (s - 6) / 24; min_lr 0.002 (m = 0.02):
    # LR = 0.1 * (0.02 + 0.98 * (1 + cos(pi p)) / 2).
    lrs = first_group(cfg_for("cosine", min_lr=0.002, num_warn_up=1), 5)
    half = math.sqrt(2) / 2  # cos(pi / 4)
    by_step = dict(enumerate(lrs, start=1))
    assert by_step[5] == 0.1 and by_step[6] == pytest.approx(0.1, rel=1e-12)
    assert by_step[12] == pytest.approx(0.1 * (0.02 + 0.98 * (1 + half) / 2), rel=1e-12)
    assert by_step[18] == pytest.approx(0.051, rel=1e-12)  # the midpoint: halfway down
    assert by_step[24] == pytest.approx(0.1 * (0.02 + 0.98 * (1 - half) / 2), rel=1e-12)
    assert by_step[30] == pytest.approx(0.002, rel=1e-12)
    assert all(b < a for a, b in pairwise(lrs[5:]))
    assert min(lrs[5:-1]) > 0.002


def test_cosine_default_floor_is_positive() -> None:
    # no warm-up, S = 3, 6 epochs: p = (s - 1) / 17; the floor is lr / 100
    lrs = first_group(cfg_for("cosine", num_warn_up=0), 3)
    assert lrs[0] == 0.1 and lrs[-1] == pytest.approx(0.001, rel=1e-12)


def test_explr_decays_by_gamma_per_epoch() -> None:
    # S = 4, warm-up 2 (W = 8), gamma 0.8: LR = 0.1 * 0.8 ** ((s - 9) / 4), smooth per step
    by_step = dict(enumerate(first_group(cfg_for("ExpLR", gamma=0.8), 4), start=1))
    assert by_step[8] == 0.1 and by_step[9] == pytest.approx(0.1, rel=1e-12)
    assert by_step[10] == pytest.approx(0.1 * 0.8 ** 0.25, rel=1e-12)
    assert by_step[11] == pytest.approx(0.1 * math.sqrt(0.8), rel=1e-12)
    assert by_step[13] == pytest.approx(0.08, rel=1e-12)
    assert by_step[17] == pytest.approx(0.064, rel=1e-12)
    assert by_step[21] == pytest.approx(0.0512, rel=1e-12)
    assert by_step[24] == pytest.approx(0.1 * 0.8 ** 3.75, rel=1e-12)


def test_lambda_schedule_follows_its_function() -> None:
    # fn(t) = 1 / (1 + t), t = (s - 1) / 4 the step's epoch; warm-up 1 epoch (steps 1-4)
    schedule = LambdaSchedule(lambda t: 1.0 / (1.0 + t), num_warn_up=1)
    state = TrainState(make_optimizer(), 4, 5)
    by_step = dict(enumerate((lr[0] for lr in drive(schedule, state, 20)), start=1))
    assert [by_step[s] for s in (1, 2, 3, 4)] == pytest.approx([0.025, 0.05, 0.075, 0.1],
                                                               rel=1e-12)
    assert by_step[5] == pytest.approx(0.05, rel=1e-12)  # t = 1
    assert by_step[7] == pytest.approx(0.1 / 2.5, rel=1e-12)  # t = 1.5
    assert by_step[9] == pytest.approx(0.1 / 3, rel=1e-12)  # t = 2
    assert by_step[20] == pytest.approx(0.1 / 5.75, rel=1e-12)  # t = 4.75


def test_lambda_schedule_rejects_a_non_positive_factor() -> None:
    schedule = LambdaSchedule(lambda t: 1.0 - t)
    state = TrainState(make_optimizer(), 2, 3)
    with pytest.raises(ConfigError, match="positive"):
        drive(schedule, state, 6)


def test_lambdalr_from_config_is_polynomial_down_to_min_lr() -> None:
    # S = 4, 3 epochs, warm-up 1: W = 4, N = 12, p = (s - 5) / 7; min_lr 0.01 (m = 0.1):
    # LR = 0.1 * (0.1 + 0.9 * (1 - p) ** power).
    cfg = cfg_for("LambdaLR", num_warn_up=1, num_epochs=3, lr_power=1.0, min_lr=0.01)
    line = dict(enumerate(first_group(cfg, 4), start=1))
    assert line[5] == pytest.approx(0.1, rel=1e-12)
    assert line[8] == pytest.approx(0.1 * (0.1 + 0.9 * 4 / 7), rel=1e-12)
    assert line[12] == pytest.approx(0.01, rel=1e-12)
    steep = dict(enumerate(first_group({**cfg, "lr_power": 2.0}, 4), start=1))
    assert steep[5] == pytest.approx(0.1, rel=1e-12)
    assert steep[8] == pytest.approx(0.1 * (0.1 + 0.9 * 16 / 49), rel=1e-12)
    assert steep[11] == pytest.approx(0.1 * (0.1 + 0.9 / 49), rel=1e-12)
    assert steep[12] == pytest.approx(0.01, rel=1e-12)


# cfg_for's defaults with S = 3: 6 epochs, warm-up 2 (W = 6, N = 18), p = (s - 7) / 11,
# milestones [3, 5] with gamma 0.1, ExpLR gamma 0.95, floor lr / 100, lr_power 0.9. The
# factor on each group's base LR at steps 1, 6, 10 and 18:
GROUP_FACTORS = {
    "multi-step": [1 / 6, 1.0, 0.1, 0.01],
    "cosine": [1 / 6, 1.0, 0.01 + 0.99 * (1 + math.cos(3 * math.pi / 11)) / 2, 0.01],
    "ExpLR": [1 / 6, 1.0, 0.95, 0.95 ** (11 / 3)],
    "LambdaLR": [1 / 6, 1.0, 0.01 + 0.99 * (8 / 11) ** 0.9, 0.01],
}


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_each_param_group_follows_its_own_base(name: str) -> None:
    cfg = cfg_for(name)
    state = TrainState(make_optimizer((0.1, 0.004)), 3, cfg["num_epochs"])
    lrs = drive(build_scheduler(cfg), state, 18)
    assert [g["initial_lr"] for g in state.optimizer.param_groups] == [0.1, 0.004]
    for step, factor in zip((1, 6, 10, 18), GROUP_FACTORS[name]):
        assert lrs[step - 1] == pytest.approx([0.1 * factor, 0.004 * factor], rel=1e-12)
    for first, second in lrs:
        assert second == pytest.approx(first * 0.04)


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
    # S = 3, 4 epochs, warm-up 1 (W = 3, N = 12), k = s - 4 steps after it, p = k / 8:
    # the spec's factors, written out (gamma 0.1 / 0.95, floor 0.01, lr_power 0.9)
    decay = {"multi-step": [1.0] * 3 + [0.1] * 3 + [0.01] * 3,
             "cosine": [0.01 + 0.99 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(9)],
             "ExpLR": [0.95 ** (k / 3) for k in range(9)],
             "LambdaLR": [0.01 + 0.99 * (1 - k / 8) ** 0.9 for k in range(9)]}[name]
    assert curve == pytest.approx([0.05 * f for f in [1 / 3, 2 / 3, 1.0, *decay]], rel=1e-12)
    assert trainer.global_step == len(curve) == 12
    assert [step for step, _ in spy.steps] == list(range(12))
    for step, group_lrs in spy.steps:
        assert group_lrs == [curve[step]] * len(group_lrs)
    micro_batches_per_step = (4, 4, 2)
    assert [step for step, _ in spy.micro] == [s for s in range(12)
                                               for _ in range(micro_batches_per_step[s % 3])]
    assert all(lr == curve[step] for step, lr in spy.micro)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_warmup_and_milestones_are_counted_in_epochs_not_steps(name: str) -> None:
    # 12 or 3 steps an epoch (what 1 and 4 processes take), warm-up 2 epochs: LR 0.05 at
    # the end of epoch 0 and 0.1 at the end of epoch 1 either way.
    cfg = cfg_for(name)
    many, few = first_group(cfg, 12), first_group(cfg, 3)
    assert [many[11], many[23]] == pytest.approx([0.05, 0.1], rel=1e-12)
    assert [few[2], few[5]] == pytest.approx([0.05, 0.1], rel=1e-12)
    assert many[23] == few[5] == 0.1
    floor = {"multi-step": 0.001, "cosine": 0.001, "LambdaLR": 0.001}
    if name in floor:  # two milestones passed, or the floor lr / 100 at the last step
        assert many[-1] == pytest.approx(floor[name], rel=1e-12)
        assert few[-1] == pytest.approx(floor[name], rel=1e-12)
    if name == "multi-step":  # the first step of milestone epochs 3 and 5
        assert [many[36], many[60], few[9], few[15]] == pytest.approx([0.01, 0.001] * 2)
    if name == "ExpLR":  # a factor 0.95 per epoch after the warm-up, at epoch starts
        for epoch in range(2, 6):
            expected = 0.1 * 0.95 ** (epoch - 2)
            assert many[12 * epoch] == pytest.approx(expected, rel=1e-12)
            assert few[3 * epoch] == pytest.approx(expected, rel=1e-12)


def tensorboard_lrs(run_dir: Path) -> list[tuple[int, float]]:
    """(step, lr) of every optimizer step, as the run logged them (log_freq 1)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars("train/lr")]


@pytest.mark.slow
def test_warmup_and_milestones_in_epochs_with_two_real_processes(tmp_path, tiny_trainer):
    """README: with N processes an epoch has 1/N as many steps, and warm-up and milestones
    are counted in epochs. A real 2-process run (gloo, 40 samples, batch 4 per process: 5
    steps an epoch) and one process (10 steps an epoch): warm-up 1 epoch, milestone 2."""
    schedule = {"num_epochs": "3", "batch_size": "4", "lr": "0.05", "num_warn_up": "1",
                "scheduler": "multi-step", "milestones": "2", "log_freq": "1"}
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PBT_SIGNAL_AT")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, str(ROOT / "tests" / "train_tiny.py"), "--work_dir", "w",
               "--run_name", "two", "--num_processes", "2", "--main_process_port", "0",
               "--num_workers", "0", "--progress", "false",
               *(token for key, value in schedule.items() for token in (f"--{key}", value))]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "pbt: rank 0/2 ready" in output and "pbt: rank 1/2 ready" in output
    two_dir = tmp_path / "w" / "two"
    summary = json.loads((two_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 15
    two = tensorboard_lrs(two_dir)
    assert [step for step, _ in two] == list(range(1, 16))
    assert [lr for _, lr in two] == pytest.approx(
        [0.01, 0.02, 0.03, 0.04, 0.05] + [0.05] * 5 + [0.005] * 5, rel=1e-6)

    one = tiny_trainer(tiny_cfg(tmp_path, work_dir=str(tmp_path / "w"), run_name="one",
                                num_epochs=3, batch_size=4, lr=0.05, num_warn_up=1,
                                scheduler="multi-step", milestones=[2], log_freq=1))
    one_summary = one.run()
    assert one.steps_per_epoch == 10
    assert [lr for _, lr in tensorboard_lrs(one.run_dir)] == pytest.approx(
        [0.005 * s for s in range(1, 11)] + [0.05] * 10 + [0.005] * 10, rel=1e-6)
    # the same LR at the end of every epoch, whatever the process count
    assert [h["lr"] for h in summary["history"]] == pytest.approx([0.05, 0.05, 0.005])
    assert [h["lr"] for h in one_summary["history"]] == [h["lr"] for h in summary["history"]]


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
