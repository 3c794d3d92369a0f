"""The classification recipe end to end on real image files (digits PNGs, list files)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_recipe

FAST = ["--input_size", "16", "16", "--batch_size", "32", "--num_workers", "0",
        "--progress", "false", "--scheduler", "cosine", "--lr", "0.05"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("recipe")
    result = run_recipe(["--work_dir", "w", "--run_name", "digits", "--num_epochs", "3",
                         "--train_transform", "light", *FAST], cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd, result


@pytest.mark.slow
def test_digits_end_to_end_learns(digits_run):
    cwd, result = digits_run
    run_dir = cwd / "w" / "digits"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_top1"] >= 80.0, summary  # 3 short epochs at 16x16
    assert summary["epochs"] == 3 and summary["world_size"] == 1
    assert f"best test top1 {summary['best_top1']:.2f}% at epoch {summary['best_epoch']}" \
        in result.stdout and str(run_dir.relative_to(cwd)) in result.stdout
    digits = cwd / "w" / "digits"
    images = [p for p in digits.rglob("*.png") if p.name != "confusion_matrix.png"]
    assert len(images) == 1797  # decoded through ImageFolder for real
    assert (run_dir / "class_names.txt").read_text().split() == [str(i) for i in range(10)]
    config = (run_dir / "config.yaml").read_text()
    assert "num_epochs: 3" in config and "input_size:\n- 16\n- 16" in config


def test_eval_only_matches_best_epoch(digits_run):
    cwd, _ = digits_run
    run_dir = cwd / "w" / "digits"
    summary = json.loads((run_dir / "summary.json").read_text())
    result = run_recipe(["--work_dir", "w", "--run_name", "eval", "--eval_only", "true",
                         "--model_file", str(run_dir / "best.pth"), *FAST], cwd=cwd)
    assert result.returncode == 0, result.stderr
    evaluated = json.loads((cwd / "w" / "eval" / "summary.json").read_text())
    best = summary["history"][summary["best_epoch"] - 1]["test"]
    assert evaluated["history"][0]["test"]["correct"] == best["correct"]
    assert evaluated["history"][0]["test"]["count"] == 360


@pytest.mark.slow
def test_rerun_from_saved_config(digits_run):
    """``-c config.yaml`` resolves to the same experiment (same seed: same run, see the
    determinism test); only what is typed on top differs."""
    import yaml

    cwd, _ = digits_run
    config = cwd / "w" / "digits" / "config.yaml"
    result = run_recipe(["-c", str(config), "--run_name", "again", "--num_epochs", "1"], cwd=cwd)
    assert result.returncode == 0, result.stderr
    first = yaml.safe_load(config.read_text())
    again = yaml.safe_load((cwd / "w" / "again" / "config.yaml").read_text())
    assert {k: v for k, v in again.items() if k not in ("run_name", "num_epochs")} == \
        {k: v for k, v in first.items() if k not in ("run_name", "num_epochs")}


def test_list_file_dataset_end_to_end(digits_run, tmp_path):
    """PBT list files with a class order that is not alphabetical, and a mixed source list."""
    cwd, _ = digits_run
    source = cwd / "w" / "digits"
    data = tmp_path / "data"
    order = ["9", "8", "7", "6", "5", "4", "3", "2", "1", "0"]
    for split in ("train", "test"):
        lines = []
        for name in order:
            for png in sorted((source / split / name).glob("*.png"))[:12]:
                target = data / split / name / png.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(png, target)
                lines.append(f"{split}/{name}/{png.name}")
        (data / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (data / "class_name.txt").write_text("\n".join(order) + "\n")
    result = run_recipe(["--work_dir", "w", "--run_name", "lists", "--num_epochs", "1",
                         "--train_data", str(data / "train.txt"),
                         "--test_data", str(data / "test.txt"), *FAST], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "w" / "lists"
    assert (run_dir / "class_names.txt").read_text().split() == order
    assert torch.load(run_dir / "best.pth", weights_only=True)["class_names"] == order
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["history"][0]["test"]["count"] == 120


def test_unknown_net_type_lists_valid_ones(tmp_path):
    result = run_recipe(["--work_dir", "w", "--net_type", "resnet19", "--num_epochs", "1",
                         *FAST], cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "resnet19" in result.stderr and "mobilenet_v2" in result.stderr


def test_pretrained_local_file(tmp_path):
    import torchvision

    imagenet_like = torchvision.models.resnet18(num_classes=1000).state_dict()
    weights = tmp_path / "resnet18_local.pth"
    torch.save(imagenet_like, weights)
    from pbt.models import build_model

    model = build_model("resnet18", 10, pretrained=str(weights))
    assert torch.equal(model.state_dict()["conv1.weight"], imagenet_like["conv1.weight"])
    assert model.fc.out_features == 10


def test_import_pbt_is_quiet_cheap_and_side_effect_free():
    code = (
        "import sys, torch\n"
        "threads, dtype = torch.get_num_threads(), torch.get_default_dtype()\n"
        "det = torch.are_deterministic_algorithms_enabled()\n"
        "import pbt, pbt.engine, pbt.callbacks, pbt.config, pbt.schedulers, pbt.data, "
        "pbt.prune, pbt.models, pbt.checkpoint, pbt.export\n"
        "assert (threads, dtype, det) == (torch.get_num_threads(), torch.get_default_dtype(), "
        "torch.are_deterministic_algorithms_enabled())\n"
        "heavy = {'tensorboard', 'torchvision', 'torch_pruning', 'onnx', 'onnxruntime', "
        "'accelerate', 'nni', 'matplotlib', 'sklearn'}\n"
        "print(sorted(heavy & set(sys.modules)), end='')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]" and result.stderr == ""


def test_best_pth_holds_what_readme_lists(digits_run):
    """README, "The run directory": a plain dict that loads with weights_only=True, the
    unwrapped model's weights and what rebuilds the network."""
    cwd, _ = digits_run
    run_dir = cwd / "w" / "digits"
    summary = json.loads((run_dir / "summary.json").read_text())
    best = torch.load(run_dir / "best.pth", weights_only=True)
    assert not any(key.startswith("module.") for key in best["model"])
    assert best["net_type"] == "resnet18" and best["num_classes"] == 10
    assert best["class_names"] == [str(i) for i in range(10)]
    assert best["input_size"] == [16, 16] and best["width_mult"] == 1.0
    assert best["epoch"] == summary["best_epoch"] and best["metric"] == summary["best"]
    assert best["global_step"] == summary["history"][summary["best_epoch"] - 1]["global_step"]
    assert best["weights"] == "trained" and "prune_history" not in best
    from pbt.models import build_model

    build_model(best["net_type"], best["num_classes"]).load_state_dict(best["model"])


def test_generated_run_name_is_net_w_h_loss_flag_time(tmp_path):
    """README: ``<net_type>_<W>_<H>_<loss_type>[_<flag>]_<timestamp>`` (input_size is [W, H])."""
    import re

    sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
    try:
        from classification import KEYS, ClassificationTrainer
    finally:
        sys.path.pop(0)
    from pbt.config import load_config

    cfg = load_config(["--input_size", "48", "32", "--loss_type", "focalloss", "--flag", "x",
                       "--net_type", "mobilenet_v2"], keys=KEYS)
    assert ClassificationTrainer.run_name_parts(None, cfg) == ["mobilenet_v2", "48", "32",
                                                               "FocalLoss"]
    from pbt.engine import EngineTrainer

    class Named(EngineTrainer):  # the engine joins the recipe's parts, flag and time
        def run_name_parts(self, cfg):
            return ClassificationTrainer.run_name_parts(self, cfg)

    cfg.work_dir = str(tmp_path / "w")
    trainer = Named(cfg)
    assert re.fullmatch(r"mobilenet_v2_48_32_FocalLoss_x_\d{8}-\d{6}", trainer.run_dir.name)
    trainer.run_lock.release()
