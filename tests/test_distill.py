"""Knowledge distillation (``distill_from``): the loss by hand, a frozen teacher that is
never saved, exact resume and DDP with a teacher, and the prune-then-distill recipe run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_recipe, tiny_cfg, weights
from test_distributed import ready_ranks, train_tiny_2p
from test_resume import assert_same_run, train_tiny

from pbt.config import ConfigError
from pbt.losses import Distiller, distillation_loss


def test_kd_loss_matches_hand_computation():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, -2.0, 4.0]])
    temperature = 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        s_exp = [math.exp(v / temperature) for v in s_row]
        t_exp = [math.exp(v / temperature) for v in t_row]
        p_s = [v / sum(s_exp) for v in s_exp]
        p_t = [v / sum(t_exp) for v in t_exp]
        expected += sum(t * math.log(t / s) for t, s in zip(p_t, p_s))
    expected = expected / 2 * temperature**2
    assert distillation_loss(student, teacher, temperature).item() == pytest.approx(expected,
                                                                                   rel=1e-6)
    assert distillation_loss(teacher, teacher, temperature).item() == pytest.approx(0, abs=1e-7)

    # the step's losses: (1 - alpha) * task + alpha * KD, from a real (linear) teacher
    net = torch.nn.Linear(4, 3)
    data, targets = torch.randn(2, 4), torch.tensor([0, 2])
    distiller = Distiller(net, alpha=0.25, temperature=temperature)
    outputs = student.clone().requires_grad_(True)
    task = torch.nn.functional.cross_entropy(outputs, targets)
    losses = distiller((data, targets), outputs, task)
    assert set(losses) == {"task", "distill"}
    assert losses["task"].item() == pytest.approx(0.75 * task.item())
    kd = distillation_loss(student, net(data), temperature)
    assert losses["distill"].item() == pytest.approx(0.25 * kd.item(), rel=1e-6)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    sum(losses.values()).backward()
    assert outputs.grad is not None and net.weight.grad is None  # the teacher learns nothing


def test_teacher_is_frozen_and_never_saved(tmp_path, tiny_trainer):
    tiny_trainer(tiny_cfg(tmp_path, run_name="teacher", num_epochs=2)).run()
    teacher_file = tmp_path / "work" / "teacher" / "best.pth"
    teacher_before = weights(teacher_file)

    plain = tiny_trainer(tiny_cfg(tmp_path, run_name="plain")).run()
    trainer = tiny_trainer(tiny_cfg(tmp_path, run_name="kd", distill_from=str(teacher_file),
                                    distill_alpha=0.7, distill_temperature=3.0))
    summary = trainer.run()
    teacher = trainer.distiller.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    run_dir = tmp_path / "work" / "kd"
    student_keys = set(trainer.unwrapped_model.state_dict())
    assert set(weights(run_dir / "last.pth")) == student_keys == set(teacher_before)
    train_logs = summary["history"][-1]["train"]
    assert {"loss/task", "loss/distill"} <= set(train_logs)
    assert train_logs["loss"] == pytest.approx(train_logs["loss/task"] + train_logs["loss/distill"])
    assert "loss/distill" not in summary["history"][-1]["test"]  # the test loss is the task's
    assert "distilling from" in (run_dir / "train.log").read_text()
    assert not all(torch.equal(a, b) for a, b in zip(weights(run_dir / "last.pth").values(),
                                                      weights(Path(plain["run_dir"]) /
                                                              "last.pth").values()))

    # alpha 0: the teacher runs but changes nothing, not even the RNG stream
    tiny_trainer(tiny_cfg(tmp_path, run_name="kd0", distill_from=str(teacher_file),
                          distill_alpha=0.0)).run()
    a, b = weights(tmp_path / "work" / "kd0" / "last.pth"), weights(Path(plain["run_dir"]) /
                                                                    "last.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_teacher_says_what_and_where(tmp_path, tiny_trainer):
    with pytest.raises(ConfigError, match="'distill_from'.*nowhere.pth.*does not exist"):
        tiny_trainer(tiny_cfg(tmp_path, run_name="a", distill_from=str(tmp_path / "nowhere.pth")))
    wrong = {"model": {"0.weight": torch.zeros(5, 8)}, "class_names": ["a", "b", "c", "d"]}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match="'distill_from'.*wrong.pth.*0.weight"):
        tiny_trainer(tiny_cfg(tmp_path, run_name="b", distill_from=str(tmp_path / "wrong.pth")))
    torch.save({"model": {}, "class_names": ["d", "c", "b", "a"]}, tmp_path / "order.pth")
    with pytest.raises(ConfigError, match="'distill_from'.*order.pth.*same order"):
        tiny_trainer(tiny_cfg(tmp_path, run_name="c", distill_from=str(tmp_path / "order.pth")))
    with pytest.raises(ConfigError, match="distill_alpha"):
        tiny_cfg(tmp_path, distill_alpha=1.5)
    written = [p for p in (tmp_path / "work").rglob("*") if p.is_file()]
    assert [p.name for p in written] in ([], [".pbt.lock"], [".pbt.lock", ".pbt.lock"])


@pytest.mark.slow
def test_distillation_resumes_exactly_after_sigkill(tmp_path):
    train_tiny(tmp_path, "--run_name", "teacher", "--num_workers", "0")
    teacher = str(tmp_path / "w" / "teacher" / "best.pth")
    kd = ["--num_workers", "0", "--distill_from", teacher, "--save_steps", "2"]
    train_tiny(tmp_path, "--run_name", "straight", *kd)
    train_tiny(tmp_path, "--run_name", "crashed", *kd, signal_at="2,4,KILL", expect=-9)
    resumed = train_tiny(tmp_path, "--run_name", "crashed", *kd, "--resume", "auto")
    assert "resumed from" in resumed.stdout
    assert_same_run(tmp_path / "w" / "straight", tmp_path / "w" / "crashed")


@pytest.mark.slow
def test_distillation_with_two_processes_resumes_exactly(tmp_path):
    teacher_run = train_tiny_2p(tmp_path, "teacher")
    assert teacher_run.returncode == 0, teacher_run.stderr
    kd = ["--distill_from", str(tmp_path / "w" / "teacher" / "best.pth"), "--save_steps", "2"]
    straight = train_tiny_2p(tmp_path, "straight", *kd)
    assert straight.returncode == 0, straight.stderr
    assert ready_ranks(straight.stdout) == {"0", "1"}
    crashed = train_tiny_2p(tmp_path, "crashed", *kd, signal_at="2,3,KILL,1")
    assert crashed.returncode != 0
    resumed = train_tiny_2p(tmp_path, "crashed", *kd, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert ready_ranks(resumed.stdout) == {"0", "1"} and "resumed from" in resumed.stdout
    assert_same_run(tmp_path / "w" / "straight", tmp_path / "w" / "crashed")
    summary = json.loads((tmp_path / "w" / "crashed" / "summary.json").read_text())
    assert summary["world_size"] == 2 and "loss/distill" in summary["history"][-1]["train"]


@pytest.mark.slow
def test_recipe_prunes_and_distills_from_its_unpruned_self(tmp_path):
    common = ["--work_dir", "w", "--num_epochs", "1", "--progress", "false",
              "--num_workers", "0", "--input_size", "16", "16"]
    base = run_recipe([*common, "--run_name", "base"], tmp_path)
    assert base.returncode == 0, base.stderr
    trained = str(tmp_path / "w" / "base" / "best.pth")
    pruned = run_recipe([*common, "--run_name", "student", "--model_file", trained,
                         "--use_prune", "true", "--distill_from", trained], tmp_path)
    assert pruned.returncode == 0, pruned.stderr
    run_dir = tmp_path / "w" / "student"
    log = (run_dir / "train.log").read_text()
    assert "distilling from" in log and "ms/batch" in log
    student = torch.load(run_dir / "best.pth", weights_only=True)
    assert student["prune_history"]  # the student is pruned, the teacher was not
    teacher_params = sum(v.numel() for v in weights(Path(trained)).values())
    assert sum(v.numel() for v in student["model"].values()) < teacher_params / 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "loss/distill" in summary["history"][0]["train"]
