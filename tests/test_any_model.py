"""Any model on the engine, used as a user would: a regression script with its own key
(float targets, dict outputs, dict losses), model_file / eval_only for every trainer, two
CPU processes, the monitor check, callback states, and Accelerate's own settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, tiny_cfg

from pbt.callbacks import Callback, TrainingError
from pbt.config import ConfigError, load_config

SCRIPT = ROOT / "tests" / "regression_script.py"


def run_script(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--progress", "false", "--num_workers",
                           "0", "--lr", "0.02", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("regression")
    result = run_script(["--work_dir", str(work), "--run_name", "reg", "--hidden_dim", "8",
                         "--num_epochs", "3", "--log_freq", "1"], work)
    assert result.returncode == 0, result.stderr
    return work, work / "reg", result


def test_regression_trains_with_its_own_key_and_dict_losses(trained):
    _, run_dir, result = trained
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["monitor"] == "test/loss" and summary["mode"] == "min"
    losses = [entry["test"]["loss"] for entry in summary["history"]]
    assert summary["best"] == min(losses) and summary["last"] == losses[-1]
    assert losses[-1] < losses[0]  # it learns
    for key in ("loss", "loss/mse", "loss/l1"):  # each dict-loss key, train and test
        assert key in summary["test"] and key in summary["history"][-1]["train"]
    assert "top1" not in summary["test"] and "best_top1" not in summary
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["hidden_dim"] == 8
    weights = torch.load(run_dir / "best.pth", weights_only=True)
    assert weights["model"]["0.weight"].shape == (8, 4)
    assert weights["epoch"] == summary["best_epoch"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "epoch/test_loss/mse" in tags and "train/loss_step/l1" in tags


def test_eval_only_with_model_file_on_a_custom_trainer(trained):
    work, run_dir, _ = trained
    summary = json.loads((run_dir / "summary.json").read_text())
    best = summary["history"][summary["best_epoch"] - 1]["test"]["loss"]
    result = run_script(["--work_dir", str(work), "--run_name", "eval", "--hidden_dim", "8",
                         "--eval_only", "true", "--model_file", str(run_dir / "best.pth")], work)
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((work / "eval" / "summary.json").read_text())
    assert evaluated["test"]["loss"] == pytest.approx(best, rel=1e-5)
    assert f"loaded weights from {run_dir / 'best.pth'}" in result.stdout
    # without model_file the log says what is evaluated, never silently random weights
    result = run_script(["--work_dir", str(work), "--run_name", "eval2", "--hidden_dim", "8",
                         "--eval_only", "true"], work)
    assert result.returncode == 0 and "eval_only without model_file" in result.stdout


def test_saved_config_reruns_with_the_declared_key(trained):
    work, run_dir, _ = trained
    result = run_script(["-c", str(run_dir / "config.yaml"), "--run_name", "again",
                         "--num_epochs", "1"], work)
    assert result.returncode == 0, result.stderr
    again = torch.load(work / "again" / "last.pth", weights_only=True)
    assert again["model"]["0.weight"].shape == (8, 4)


def test_model_file_that_does_not_fit_is_named(trained):
    work, run_dir, _ = trained
    result = run_script(["--work_dir", str(work), "--run_name", "misfit", "--hidden_dim", "5",
                         "--model_file", str(run_dir / "best.pth")], work)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model_file" in result.stderr and "0.weight" in result.stderr


@pytest.mark.slow
def test_two_cpu_processes_get_the_declared_key(tmp_path):
    """``--num_processes 2`` on a user's script: two ranks really ran, each built the
    declared ``hidden_dim``, and together they train as one process with both batches:
    with 32 of the 64 samples a rank, each epoch's one step follows the mean gradient of all
    64, as one process with batch 64 does. The test loss is the mean over exactly the 33
    test samples, although rank 1's last batch is padded with repeats to even the ranks."""
    from regression_script import KEYS, RegressionTrainer, make_data

    common = ["--hidden_dim", "6", "--num_epochs", "2", "--progress", "false",
              "--num_workers", "0", "--lr", "0.02"]
    result = run_script(["--work_dir", str(tmp_path), "--run_name", "ddp", *common,
                         "--batch_size", "32", "--num_processes", "2", "--main_process_port",
                         "0"], tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr
    ready = re.findall(r"pbt: rank (\d)/2 ready \(pid (\d+)", result.stdout)
    assert sorted(rank for rank, _ in ready) == ["0", "1"], result.stdout
    assert len({pid for _, pid in ready}) == 2  # two processes, not one printing twice
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2  # 64 / (32 x 2) a step
    weights = torch.load(tmp_path / "ddp" / "last.pth", weights_only=True)["model"]
    assert weights["0.weight"].shape == (6, 4)  # each worker built hidden_dim 6

    one = RegressionTrainer(load_config(["--work_dir", str(tmp_path), "--run_name", "one",
                                         *common, "--batch_size", "64"], keys=KEYS)).run()
    single = torch.load(tmp_path / "one" / "last.pth", weights_only=True)["model"]
    # the same mean gradient, summed in another order (per rank, then the all-reduce):
    # float32 rounding, about 1e-8 here, far below the 1e-2 the weights move per step
    assert single.keys() == weights.keys()
    assert all(torch.allclose(single[k], weights[k], rtol=1e-5, atol=1e-6) for k in single)

    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 1))
    model.load_state_dict(weights)
    x, y = make_data(33, 1).tensors
    with torch.no_grad():
        error = model(x) - y
    tested = summary["test"]  # the last epoch's, of the weights in last.pth
    assert tested["loss/mse"] == pytest.approx(float((error ** 2).mean()), rel=1e-5)
    assert tested["loss/l1"] == pytest.approx(float(0.1 * error.abs().mean()), rel=1e-5)
    assert tested["loss"] == pytest.approx(one["test"]["loss"], rel=1e-5)


def test_monitor_naming_no_metric_lists_the_logged_ones(tmp_path):
    result = run_script(["--work_dir", str(tmp_path), "--run_name", "typo", "--num_epochs", "1",
                         "--monitor", "test/los"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "test/los" in result.stderr and "test/loss" in result.stderr
    assert "test/loss/mse" in result.stderr
    assert "test/los" in (tmp_path / "typo" / "train.log").read_text()


def test_unknown_flag_of_a_script_suggests_its_own_key(tmp_path):
    result = run_script(["--hiden_dim", "3"], tmp_path)
    assert result.returncode == 2 and "--hidden_dim" in result.stderr


def test_key_value_form_passes_torchrun(tmp_path):
    """torchrun's parser claims --monitor (--monitor-interval); key=value goes through."""
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(["--nproc_per_node", "2", "s.py", "monitor=test/loss"])
    cfg = load_config(args.training_script_args)
    assert cfg.monitor == "test/loss"
    with pytest.raises(ConfigError, match="num_epochs"):
        load_config(["num_epochs=many"])


class NumpyState(Callback):
    def __init__(self):
        self.best, self.seen = np.float64(0.5), np.arange(3)

    def on_epoch_end(self, epoch, logs):
        self.best = np.float64(logs["test"]["loss"])

    def state_dict(self):
        return {"best": self.best, "seen": self.seen, "epochs": np.int64(2)}

    def load_state_dict(self, state):
        self.best, self.seen = state["best"], state["seen"]


class ObjectState(NumpyState):
    def state_dict(self):
        return {"when": Path("/tmp")}


def test_numpy_callback_state_saves_and_resumes(tmp_path, tiny_trainer):
    tiny_trainer(tiny_cfg(tmp_path, num_epochs=1), [NumpyState()]).run()
    resumed = NumpyState()
    trainer = tiny_trainer(tiny_cfg(tmp_path, num_epochs=2, resume=str(tmp_path / "work" /
                                                                       "tiny")), [resumed])
    assert torch.equal(torch.as_tensor(resumed.seen), torch.arange(3))
    assert resumed.best == pytest.approx(trainer.history[0]["test"]["loss"])
    trainer.run()


def test_callback_state_that_cannot_load_is_refused_at_first_save(tmp_path, tiny_trainer):
    with pytest.raises(TrainingError) as err:
        tiny_trainer(tiny_cfg(tmp_path, num_epochs=1), [ObjectState()]).run()
    message = str(err.value)
    assert "ObjectState#0" in message and "PosixPath" in message and "'when'" in message
    assert not list((tmp_path / "work" / "tiny" / "checkpoints").glob("step-*"))


def test_accelerate_settings_apply_when_pbt_leaves_them_unset(tmp_path, tiny_trainer,
                                                              monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    trainer = tiny_trainer(tiny_cfg(tmp_path, run_name="env", num_epochs=1))
    assert trainer.accelerator.mixed_precision == "bf16"
    assert trainer.accelerator.gradient_accumulation_steps == 2
    assert trainer.run()["global_step"] == 3  # 5 batches, 2 per optimizer step


def test_pbt_config_wins_over_accelerate_with_one_line(tmp_path, tiny_trainer, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    trainer = tiny_trainer(tiny_cfg(tmp_path, run_name="ours", num_epochs=1,
                                    mixed_precision="no"))
    assert trainer.accelerator.mixed_precision == "no"
    log = (tmp_path / "work" / "ours" / "train.log").read_text()
    assert "mixed_precision: pbt's config says no and Accelerate's setting says bf16" in log


def test_engine_imports_no_task_module():
    source = (ROOT / "pbt" / "engine.py").read_text()
    assert "pbt.models" not in source and "torchvision" not in source
    assert len(source.splitlines()) <= 525
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = "import sys, pbt.engine; print(sorted(m for m in sys.modules if m.startswith('pbt')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    # a failed import prints no module list, which would pass the checks below
    assert out.returncode == 0, out.stderr
    loaded = out.stdout.strip()
    assert loaded.startswith("[") and "'pbt.engine'" in loaded, out.stdout
    assert "pbt.models" not in loaded and "pbt.data" not in loaded, loaded
