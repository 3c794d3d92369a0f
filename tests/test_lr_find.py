"""The LR range test (pbt.lr_find): a real sweep on a real trainer, the weights, optimizer
and RNG left exactly as they were, the files read back, and the command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_cfg

from pbt.engine import sum_losses


def _state(trainer) -> tuple[dict, dict]:
    """Deep copies of the model's state_dict (BatchNorm buffers too) and the optimizer's."""
    model = {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()}
    optimizer = trainer.optimizer.state_dict()
    state = {index: {k: v.clone() if torch.is_tensor(v) else v for k, v in values.items()}
             for index, values in optimizer["state"].items()}
    groups = [dict(group) for group in optimizer["param_groups"]]
    return model, {"state": state, "param_groups": groups}


def _assert_unchanged(trainer, model: dict, optimizer: dict) -> None:
    now, now_optimizer = _state(trainer)
    assert now.keys() == model.keys()
    changed = [k for k in model if not torch.equal(model[k], now[k])]
    assert not changed, f"weights or buffers changed by the sweep: {changed}"
    assert now_optimizer["param_groups"] == optimizer["param_groups"]  # the lr is back too
    assert now_optimizer["state"].keys() == optimizer["state"].keys()
    for index, values in optimizer["state"].items():
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(value),
                               torch.as_tensor(now_optimizer["state"][index][key])), (index, key)


def _one_training_step(trainer) -> None:
    """Give the optimizer state to restore (momentum buffers), and BatchNorm new stats."""
    trainer.model.train()
    batch = next(iter(trainer.train_loader))
    trainer.accelerator.backward(sum_losses(trainer.run_step(batch)[1]))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def test_sweep_leaves_the_trainer_exactly_as_it_was(tmp_path, tiny_trainer):
    trainer = tiny_trainer(tiny_cfg(tmp_path, lr_find=True))
    _one_training_step(trainer)
    model, optimizer = _state(trainer)
    assert optimizer["state"], "the optimizer should hold momentum buffers before the sweep"
    rng = torch.get_rng_state()

    summary = trainer.run()

    _assert_unchanged(trainer, model, optimizer)
    assert torch.equal(torch.get_rng_state(), rng)
    assert trainer.global_step == 0 and trainer.history == []
    run_dir = Path(summary["run_dir"])
    result = json.loads((run_dir / "lr_find.json").read_text())
    lrs, losses, smoothed = result["lrs"], result["losses"], result["smoothed"]
    assert lrs[0] == pytest.approx(1e-7) and len(lrs) == len(losses) == len(smoothed)
    assert result["steps"] == len(lrs) and 10 < len(lrs) <= result["num_steps"] == 100
    assert all(a < b for a, b in zip(lrs, lrs[1:]))
    assert all(math.isfinite(value) for value in losses + smoothed)
    assert result["rule"] == summary["rule"] == "steepest descent of the smoothed loss"
    suggestion = result["suggestion"]
    assert summary["suggestion"] == suggestion and lrs[0] < suggestion < lrs[-1]
    # before the minimum of the smoothed loss, so below where the loss climbs again
    assert suggestion < result["lr_at_min_loss"] < lrs[-1]
    assert result["min_loss_lr"] == pytest.approx(result["lr_at_min_loss"] / 10)
    if result["diverged"]:
        assert suggestion < result["diverged_at_lr"]
    assert result["lr"] == 0.05 and summary["lr"] == 0.05

    from PIL import Image

    with Image.open(run_dir / "lr_find.png") as image:
        assert image.format == "PNG" and image.width >= 300 and image.height >= 200
    assert not (run_dir / "last.pth").exists() and not (run_dir / "best.pth").exists()
    assert not (run_dir / "summary.json").exists() and not (run_dir / "checkpoints").exists()
    assert not list(run_dir.glob("*.tmp"))
    log = (run_dir / "train.log").read_text()
    assert f"lr_find: suggested lr {suggestion:.3g} (steepest descent" in log


def test_sweep_puts_back_pythons_and_numpys_global_rngs_too(tmp_path, tiny_trainer):
    """A run_step that draws from Python's ``random`` and NumPy's global RNG at every step
    (as user code and augmentations do): after the sweep both RNGs, and torch's, are
    exactly where they were, so the training that follows draws what it would have."""
    import random

    import numpy as np

    class Drawing(tiny_trainer):
        draws = 0

        def run_step(self, inputs):
            x, y = inputs
            self.draws += 1
            noise = 0.01 * (random.random() + float(np.random.rand()))
            outputs = self.model(x + noise)
            return outputs, self.criterion(outputs, y)

    trainer = Drawing(tiny_cfg(tmp_path, lr_find=True))
    random.seed(7)
    np.random.seed(7)
    python, numpy, torch_rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    trainer.run()
    assert trainer.draws > 10
    assert random.getstate() == python
    now = np.random.get_state()
    assert now[0] == numpy[0] and np.array_equal(now[1], numpy[1]) and now[2:] == numpy[2:]
    assert torch.equal(torch.get_rng_state(), torch_rng)


def test_a_diverging_sweep_stops_early_and_says_so(tmp_path, tiny_trainer):
    from pbt.lr_find import lr_find

    # grad accumulation: a point is one optimizer step (2 batches, or the epoch's last 1)
    trainer = tiny_trainer(tiny_cfg(tmp_path, lr_find=True, grad_accum_steps=2))
    model, optimizer = _state(trainer)

    summary = lr_find(trainer, start_lr=1e-3, end_lr=1e8, num_steps=60)

    _assert_unchanged(trainer, model, optimizer)  # even after NaN weights, if it got there
    result = json.loads((trainer.run_dir / "lr_find.json").read_text())
    assert result["stopped_early"] is True and summary["stopped_early"] is True
    assert result["diverged"] and result["stop_reason"] in (
        "smoothed loss above 4 x its best", "loss not finite")
    assert len(result["lrs"]) == result["steps"] < 60
    assert result["lrs"][0] == pytest.approx(1e-3)
    assert result["lrs"][-1] <= result["diverged_at_lr"] < 1e8
    if result["suggestion"] is not None:
        assert result["suggestion"] < result["diverged_at_lr"]
    assert (trainer.run_dir / "lr_find.png").stat().st_size > 1000
    assert not trainer.accelerator.gradient_state.in_dataloader  # the epoch was ended

    # an lr so large that the weights overflow at once: a loss that is not finite is not
    # recorded, the NaN weights are put back, and the JSON stays valid (no NaN in it)
    summary = lr_find(trainer, start_lr=1e20, end_lr=1e25, num_steps=10)
    _assert_unchanged(trainer, model, optimizer)
    text = (trainer.run_dir / "lr_find.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    result = json.loads(text)
    assert result["stop_reason"] == "loss not finite" and result["stopped_early"]
    assert result["steps"] == len(result["lrs"]) < 10 and result["diverged_at_lr"] > 1e20
    assert not result["rule"].startswith("steepest")  # too short: fastai's rule, named
    assert result["suggestion"] == pytest.approx(result["min_loss_lr"])


def test_bad_sweep_settings_are_refused_before_any_step(tmp_path, tiny_trainer):
    from pbt.config import ConfigError
    from pbt.lr_find import lr_find

    trainer = tiny_trainer(tiny_cfg(tmp_path, lr_find=True))
    with pytest.raises(ConfigError, match="0 < start_lr < end_lr"):
        lr_find(trainer, start_lr=1.0, end_lr=0.1)
    assert not (trainer.run_dir / "lr_find.json").exists()


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pbt.lr_find", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_sweeps_the_classification_recipe(tmp_path):
    work = tmp_path / "work"
    done = _cli(["--input_size", "16", "16", "--steps", "20", "--start_lr", "1e-5",
                 "--batch_size", "32", "--num_workers", "0", "--work_dir", str(work),
                 "--run_name", "lrf", "--progress", "false"], tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "lr_find: suggested lr " in output and "the config's lr is 0.05" in output, output
    run_dir = work / "lrf"
    result = json.loads((run_dir / "lr_find.json").read_text())
    assert result["num_steps"] == 20 and result["lrs"][0] == pytest.approx(1e-5)
    assert result["end_lr"] == 10.0 and result["lr"] == 0.05  # the recipe's yaml
    assert 0 < result["steps"] <= 20 and result["suggestion"] is not None
    assert (run_dir / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run_dir / "best.pth").exists() and not (run_dir / "last.pth").exists()
    assert not (run_dir / "summary.json").exists()
    config = (run_dir / "config.yaml").read_text()
    assert "lr_find: true" in config and "input_size:\n- 16\n- 16" in config
    assert "lr_find_options" not in config  # the sweep's flags are not config keys


def test_cli_names_a_missing_recipe(tmp_path):
    missing = tmp_path / "no_such_recipe.py"
    done = _cli(["--recipe", str(missing), "--work_dir", str(tmp_path / "work")], tmp_path)
    assert done.returncode == 2
    assert "no_such_recipe.py" in done.stderr and "does not exist" in done.stderr
    assert not (tmp_path / "work").exists()


def test_default_recipe_is_the_checkouts():
    from pbt.lr_find import default_recipe

    assert default_recipe() == ROOT / "recipes" / "classification.py"
