"""Pruning inside the recipe: prune before prepare, fine-tune, report, reload, resume, export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import run_recipe

SMALL = ["--work_dir", "w", "--net_type", "resnet18", "--input_size", "16", "16",
         "--batch_size", "64", "--num_workers", "0", "--progress", "false", "--lr", "0.05",
         "--scheduler", "cosine"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("prune")
    result = run_recipe([*SMALL, "--run_name", "base", "--num_epochs", "2", "--slim_reg", "1e-4"],
                        cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd


def test_prune_finetune_report_reload_and_export(trained):
    cwd = trained
    model_file = cwd / "w" / "base" / "last.pth"
    result = run_recipe([*SMALL, "--run_name", "pruned", "--num_epochs", "1", "--use_prune",
                         "true", "--prune_method", "l1", "--prune_ratio", "0.5",
                         "--model_file", str(model_file), "--save_steps", "5"], cwd=cwd)
    assert result.returncode == 0, result.stderr
    run_dir = cwd / "w" / "pruned"
    report = json.loads((run_dir / "prune_report.json").read_text())
    before, after, tuned = (report[k] for k in ("before_pruning", "after_pruning",
                                                "after_finetuning"))
    assert after["params"] < 0.35 * before["params"] and after["macs"] < 0.35 * before["macs"]
    assert tuned["params"] == after["params"]
    assert before["top1"] is not None and tuned["top1"] is not None
    assert before["latency_ms"] > 0 and after["latency_ms"] > 0

    best = torch.load(run_dir / "best.pth", weights_only=True)
    assert best["prune_history"]
    conv = best["model"]["layer1.0.conv1.weight"]
    assert conv.shape[0] == 32 and conv.shape[0] % 8 == 0  # 64 channels halved, really removed

    # a fresh process rebuilds the pruned net from config + history and evaluates it exactly
    summary = json.loads((run_dir / "summary.json").read_text())
    best_entry = summary["history"][summary["best_epoch"] - 1]
    check = run_recipe([*SMALL, "--run_name", "check", "--eval_only", "true",
                        "--model_file", str(run_dir / "best.pth")], cwd=cwd)
    assert check.returncode == 0, check.stderr
    checked = json.loads((cwd / "w" / "check" / "summary.json").read_text())
    assert checked["history"][0]["test"]["correct"] == best_entry["test"]["correct"]

    # resume of a pruned run rebuilds the structure from the saved history
    resumed = run_recipe([*SMALL, "--run_name", "pruned", "--num_epochs", "2", "--use_prune",
                          "true", "--model_file", str(model_file), "--resume", str(run_dir)],
                         cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "pruned (" not in resumed.stdout
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 2

    pytest.importorskip("onnxruntime")
    export = subprocess.run([sys.executable, "-m", "pbt.export", str(run_dir), "--onnx",
                             str(cwd / "pruned.onnx")], capture_output=True, text=True,
                            timeout=300)
    assert export.returncode == 0, export.stderr
    assert "max abs diff" in export.stdout.lower() or "max_abs_diff" in export.stdout


def test_slim_after_sparsity_training(trained):
    cwd = trained
    result = run_recipe([*SMALL, "--run_name", "slim", "--num_epochs", "1", "--use_prune",
                         "true", "--prune_method", "slim", "--prune_ratio", "0.3",
                         "--prune_global", "true",
                         "--model_file", str(cwd / "w" / "base" / "last.pth")], cwd=cwd)
    assert result.returncode == 0, result.stderr
    report = json.loads((cwd / "w" / "slim" / "prune_report.json").read_text())
    assert report["after_pruning"]["params"] < report["before_pruning"]["params"]
