"""Exact resume after SIGKILL / SIGTERM, atomic states, finetune, and bad resume input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_recipe, tiny_cfg

from pbt.callbacks import Callback
from pbt.checkpoint import complete_states
from pbt.config import ConfigError, Key, load_config

SCRIPT = Path(__file__).parent / "train_tiny.py"
BASE = ["--num_epochs", "3", "--batch_size", "8", "--progress", "false", "--lr", "0.05",
        "--milestones", "2", "--num_warn_up", "1"]


def train_tiny(cwd: Path, *args: str, expect: int = 0,
               signal_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PBT_SIGNAL_AT", None)
    if signal_at:
        env["PBT_SIGNAL_AT"] = signal_at
    result = subprocess.run([sys.executable, str(SCRIPT), "--work_dir", "w", *BASE, *args],
                            cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == expect, result.stdout + result.stderr
    return result


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pth", weights_only=True)["model"]


def assert_same_run(run_a: Path, run_b: Path) -> None:
    a, b = final_weights(run_a), final_weights(run_b)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ after resume"
    history_a = json.loads((run_a / "summary.json").read_text())["history"]
    history_b = json.loads((run_b / "summary.json").read_text())["history"]
    assert history_a == history_b


def epoch_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.parametrize("workers", ["0", pytest.param("2", marks=pytest.mark.slow)])
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, workers):
    train_tiny(tmp_path, "--run_name", "straight", "--num_workers", workers)
    crashed = train_tiny(tmp_path, "--run_name", "crashed", "--num_workers", workers,
                         "--save_steps", "2", signal_at="2,4,KILL", expect=-9)
    run_dir = tmp_path / "w" / "crashed"
    steps = [int(p.name.split("-")[1]) for p in complete_states(run_dir)]
    assert steps == [6, 8], crashed.stdout  # a mid-epoch state of epoch 2 exists
    resumed = train_tiny(tmp_path, "--run_name", "crashed", "--num_workers", workers,
                         "--save_steps", "2", "--resume", str(run_dir))
    assert "resumed from" in resumed.stdout and "epoch 2, batch 3" in resumed.stdout
    assert_same_run(tmp_path / "w" / "straight", run_dir)
    for tag in ("epoch/test_top1", "epoch/train_loss"):
        assert epoch_scalars(run_dir, tag) == epoch_scalars(tmp_path / "w" / "straight", tag)


@pytest.mark.slow
def test_sigterm_saves_state_and_resume_is_exact(tmp_path):
    train_tiny(tmp_path, "--run_name", "straight", "--num_workers", "0")
    stopped = train_tiny(tmp_path, "--run_name", "pre", "--num_workers", "0",
                         signal_at="2,2,TERM", expect=128 + signal.SIGTERM)
    run_dir = tmp_path / "w" / "pre"
    assert "SIGTERM" in stopped.stderr and f"--resume {run_dir.relative_to(tmp_path)}" \
        in stopped.stderr.replace(str(tmp_path) + "/", "")
    assert [int(p.name.split("-")[1]) for p in complete_states(run_dir)][-1] == 7
    train_tiny(tmp_path, "--run_name", "pre", "--num_workers", "0", "--resume", "auto")
    assert_same_run(tmp_path / "w" / "straight", run_dir)


def test_resume_auto_starts_fresh_when_nothing_to_resume(tmp_path):
    result = train_tiny(tmp_path, "--run_name", "fresh", "--num_workers", "0",
                        "--num_epochs", "1", "--resume", "auto")
    assert "starting fresh" in result.stdout
    assert json.loads((tmp_path / "w" / "fresh" / "summary.json").read_text())["epochs"] == 1


def test_keep_checkpoints_rotates(tmp_path):
    train_tiny(tmp_path, "--run_name", "rot", "--num_workers", "0", "--save_steps", "1",
               "--keep_checkpoints", "3")
    states = complete_states(tmp_path / "w" / "rot")
    assert [int(p.name.split("-")[1]) for p in states] == [13, 14, 15]
    assert not list((tmp_path / "w" / "rot" / "checkpoints").glob(".tmp-*"))


def snapshot(folder: Path) -> dict:
    """Every file's size and mtime, but the run dir's lock (rewritten by each holder)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.name != ".pbt.lock"}


def test_bad_resume_inputs_change_nothing(tmp_path, tiny_trainer):
    cfg = tiny_cfg(tmp_path, num_epochs=1)
    tiny_trainer(cfg).run()
    run_dir = tmp_path / "work" / "tiny"
    before = snapshot(tmp_path)

    with pytest.raises(ConfigError, match="does not exist"):
        load = tiny_cfg(tmp_path, resume=str(tmp_path / "nowhere"))
        tiny_trainer(load)
    empty = tmp_path / "empty"
    empty.mkdir()
    before[str(empty)] = snapshot(tmp_path)[str(empty)]
    with pytest.raises(ConfigError, match="holds no complete pbt training state"):
        tiny_trainer(tiny_cfg(tmp_path, resume=str(empty)))

    class Wider(tiny_trainer):
        def build_model(self, cfg):
            model = super().build_model(cfg)
            model[4] = torch.nn.Linear(16, 7)
            return model

    with pytest.raises(ConfigError) as err:
        Wider(tiny_cfg(tmp_path, resume=str(run_dir)))
    message = str(err.value)
    assert "key '4.bias' has shape (4,) in the state and (7,) in this model" in message \
        or "key '4.weight' has shape (4, 16) in the state and (7, 16) in this model" in message
    assert snapshot(tmp_path) == before


def test_resume_refuses_pickled_code_in_every_file(tmp_path, tiny_trainer):
    """An attacker who also rewrites the checksums still gets nothing unpickled."""
    import shutil

    from pbt.checkpoint import _write_mark

    tiny_trainer(tiny_cfg(tmp_path, num_epochs=1)).run()
    state = complete_states(tmp_path / "work" / "tiny")[-1]
    pickle_files = sorted(p.name for p in state.iterdir() if p.suffix in (".pt", ".bin", ".pkl"))
    assert {"pbt_state.pt", "optimizer.bin", "pbt_rank_0.pt"} <= set(pickle_files)
    pristine = tmp_path / "pristine"
    shutil.copytree(state, pristine)
    for name in pickle_files:
        shutil.rmtree(state)
        shutil.copytree(pristine, state)
        torch.save({"payload": ConfigError("x")}, state / name)  # needs pickled code
        _write_mark(state, 5)
        with pytest.raises(ConfigError, match="refused") as err:
            tiny_trainer(tiny_cfg(tmp_path, resume=str(tmp_path / "work" / "tiny")))
        assert name in str(err.value)


@pytest.mark.slow
def test_model_file_that_is_not_weights(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    result = run_recipe(["--model_file", str(text), "--work_dir", "w", "--num_epochs", "1"],
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model_file" in result.stderr and str(text) in result.stderr
    pickled = tmp_path / "pickled.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole module: needs pickled code
    result = run_recipe(["--model_file", str(pickled), "--work_dir", "w", "--num_epochs", "1"],
                        cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and "weights_only=True" in result.stderr


def test_finetune_from_pbt_style_file_with_other_classes(tmp_path, tiny_trainer):
    source = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16),
                                 torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 7))
    old_file = tmp_path / "pbt_model.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, old_file)
    cfg = tiny_cfg(tmp_path, finetune=True, model_file=str(old_file), num_epochs=1)

    class Loading(tiny_trainer):  # the engine loads model_file after build_model
        def build_optimizer(self, cfg):
            self.loaded = {k: v.clone() for k, v in self.model.state_dict().items()}
            return super().build_optimizer(cfg)

    trainer = Loading(cfg)
    assert torch.equal(trainer.loaded["0.weight"], source.state_dict()["0.weight"])
    assert not torch.equal(trainer.loaded["4.bias"][:4], source.state_dict()["4.bias"][:4])
    log = (tmp_path / "work" / "tiny" / "train.log").read_text()
    assert "skipped 2 keys" in log and "4.weight" in log and "4.bias" in log
    trainer.run()


# -- what a resume may change ---------------------------------------------------------------
class StepLRs(Callback):
    """The lr each optimizer step used (the schedule sets it before the step)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_batch_end(self, batch, logs):
        self.lrs.append(self.trainer.lr)


def cosine_lr(step: int, total: int, lr: float = 0.05, warm_up: int = 5) -> float:
    """README's cosine with warm-up: from lr / W at step 1 up to lr at step W (= 5, one
    epoch of the tiny trainer), then half a cosine down to min_lr = lr / 100 at the last
    step of the run."""
    if step <= warm_up:
        return lr * step / warm_up
    progress = (step - 1 - warm_up) / (total - 1 - warm_up)
    return lr / 100 + (lr - lr / 100) * (1 + math.cos(math.pi * progress)) / 2


def test_num_epochs_changed_on_resume_reshapes_the_cosine_from_there_on(tmp_path,
                                                                       tiny_trainer):
    """README: a changed num_epochs extends or shortens the run; with a cosine schedule the
    curve follows the new length from that step on. 5 steps an epoch: 2 epochs, resumed for
    4 (steps 11-20 on the 20-step curve), then its mid-epoch state at step 12 resumed for 3
    (steps 13-15 on the 15-step curve, ending at min_lr)."""
    options = dict(scheduler="cosine", num_warn_up=1, save_steps=2, keep_checkpoints=20)
    run_dir = tmp_path / "work" / "tiny"
    first = StepLRs()
    two = tiny_trainer(tiny_cfg(tmp_path, num_epochs=2, **options), [first]).run()
    assert first.lrs == pytest.approx([cosine_lr(s, 10) for s in range(1, 11)], rel=1e-12)

    extended = StepLRs()
    four = tiny_trainer(tiny_cfg(tmp_path, num_epochs=4, resume=str(run_dir), **options),
                        [extended]).run()
    assert extended.lrs == pytest.approx([cosine_lr(s, 20) for s in range(11, 21)], rel=1e-12)
    assert extended.lrs[-1] == pytest.approx(0.05 / 100, rel=1e-12)
    assert four["epochs"] == 4 and four["global_step"] == 20
    assert four["history"][:2] == two["history"]  # the epochs before the resume, as they were
    assert [entry["lr"] for entry in four["history"][2:]] == extended.lrs[4::5]
    log = (run_dir / "train.log").read_text()
    assert "resume: num_epochs 2 → 4 (applied)" in log
    assert "num_epochs: 4" in (run_dir / "config.yaml").read_text().splitlines()

    shortened = StepLRs()
    state = run_dir / "checkpoints" / "step-00000012"
    three = tiny_trainer(tiny_cfg(tmp_path, num_epochs=3, resume=str(state), **options),
                         [shortened]).run()
    assert shortened.lrs == pytest.approx([cosine_lr(s, 15) for s in range(13, 16)], rel=1e-12)
    assert shortened.lrs[-1] == pytest.approx(0.05 / 100, rel=1e-12)
    assert three["epochs"] == 3 and three["global_step"] == 15
    assert three["history"][:2] == two["history"]
    assert "resume: num_epochs 4 → 3 (applied)" in (run_dir / "train.log").read_text()


SCRIPT_KEYS = [Key("noise", float, 0.0, "input noise (changes the data: not safe)"),
               Key("note", str, "", "a remark for the log", safe_on_resume=True)]


def test_a_scripts_own_key_changed_on_resume_is_refused_unless_declared_safe(tmp_path,
                                                                              tiny_trainer):
    """README: a script's own keys are refused when they change on resume, unless declared
    with ``safe_on_resume=True``; a refused resume changes nothing on disk."""
    base = dict(work_dir=str(tmp_path / "work"), run_name="keys", batch_size=8, lr=0.05,
                num_workers=0, progress=False, milestones=[2])

    def cfg(**values):
        return load_config([], keys=SCRIPT_KEYS, **base, **values)

    tiny_trainer(cfg(num_epochs=1, noise=0.25, note="first")).run()
    run_dir = tmp_path / "work" / "keys"
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError) as err:
        tiny_trainer(cfg(num_epochs=2, noise=0.5, note="first", resume=str(run_dir)))
    message = str(err.value)
    assert "noise 0.25 → 0.5" in message and "note" not in message.split("Keys that may")[0]
    assert "note" in message.split("Keys that may change on resume:")[1]  # listed as safe
    assert snapshot(tmp_path) == before

    summary = tiny_trainer(cfg(num_epochs=2, noise=0.25, note="second",
                               resume=str(run_dir))).run()
    assert summary["epochs"] == 2
    assert "resume: note 'first' → 'second' (applied)" in (run_dir / "train.log").read_text()
    assert "note: second" in (run_dir / "config.yaml").read_text().splitlines()
