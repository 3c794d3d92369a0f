"""One-GPU checks: mixed precision, the recipe with pinned memory, exact resume, pruning and
ONNX export of a CUDA-trained model. Skipped without CUDA; ``bash bench/gpu_check.sh`` runs
them on a GPU machine and prints the facts each one reports (``PBT_GPU_REPORT``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, require, run_recipe, tiny_cfg

from pbt.callbacks import Callback

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = ["--work_dir", "w", "--net_type", "resnet18", "--input_size", "32", "32",
         "--batch_size", "64", "--num_workers", "2", "--progress", "false", "--lr", "0.05",
         "--gpu_id", "0"]
# warm-up, then a constant lr: a 2-epoch run resumed to 3 follows the schedule of a 3-epoch run
CONSTANT_LR = ["--scheduler", "multi-step", "--milestones", "100", "--num_warn_up", "1"]


def report(line: str) -> None:
    """A fact for gpu_check.sh's summary (and the test log)."""
    print(line)
    if os.environ.get("PBT_GPU_REPORT"):
        with open(os.environ["PBT_GPU_REPORT"], "a") as file:
            file.write(line + "\n")


class OutputDtypes(Callback):
    """The dtype of the first Linear layer's output in training steps, and the grad scaler."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()
        self.scales: list[float] = []

    def on_train_begin(self, logs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        if module.training:
            self.dtypes.add(output.dtype)

    def on_batch_end(self, batch, logs):
        scaler = self.trainer.accelerator.scaler
        if scaler is not None:
            self.scales.append(float(scaler.get_scale()))


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                             ("no", torch.float32)])
def test_mixed_precision_training_on_gpu(tmp_path, tiny_trainer, precision, dtype):
    probe = OutputDtypes()
    trainer = tiny_trainer(tiny_cfg(tmp_path, mixed_precision=precision, num_epochs=2), [probe])
    start = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.run()
    model = trainer.accelerator.unwrap_model(trainer.model)
    assert next(model.parameters()).device.type == "cuda"
    assert probe.dtypes == {dtype}
    assert (trainer.accelerator.scaler is not None) == (precision == "fp16")
    changed = [k for k, v in model.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, start[k])]
    losses = [epoch["train"]["loss"] for epoch in summary["history"]]
    assert changed and all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    scale = f", grad scale {probe.scales[-1]:g}" if probe.scales else ""
    report(f"{precision}: forward in {str(dtype).removeprefix('torch.')}, "
           f"{len(changed)} tensors trained, last loss "
           f"{summary['history'][-1]['train']['loss']:.3f}{scale}")


def test_data_loaders_pin_memory_on_gpu(tmp_path, tiny_trainer):
    trainer = tiny_trainer(tiny_cfg(tmp_path, num_epochs=1))
    assert trainer.train_loader.pin_memory and trainer.test_loader.pin_memory
    images, _ = next(iter(trainer.train_loader))
    assert images.device.type == "cuda"


def recipe_in_process(cwd: Path, *args: str) -> dict:
    """The recipe in this process (no start-up cost; the CUDA context is reused)."""
    import importlib.util

    from pbt.config import load_config

    path = ROOT / "recipes" / "classification.py"
    spec = importlib.util.spec_from_file_location("classification_recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    argv = [a if a != "w" else str(cwd / "w") for a in args if a not in ("--gpu_id", "0")]
    summary = recipe.main(load_config(argv, default_file=path.with_suffix(".yaml"),
                                      keys=recipe.KEYS))
    _reset_accelerate()
    return summary


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory):
    """Two uninterrupted 3-epoch runs of the recipe on the GPU (the first as a user starts
    it, ``--gpu_id 0``; the two give the GPU's own run-to-run difference) and one run of
    2 epochs, resumed to 3."""
    cwd = tmp_path_factory.mktemp("gpu")
    result = run_recipe([*SMALL, *CONSTANT_LR, "--run_name", "full_a", "--num_epochs", "3"],
                        cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    # full_b and resumed with cuDNN's deterministic kernels: a resume must then be bit-exact
    flags = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        recipe_in_process(cwd, *SMALL, *CONSTANT_LR, "--run_name", "full_b", "--num_epochs", "3")
        recipe_in_process(cwd, *SMALL, *CONSTANT_LR, "--run_name", "resumed", "--num_epochs", "2")
        summary = recipe_in_process(cwd, *SMALL, *CONSTANT_LR, "--run_name", "resumed",
                                    "--num_epochs", "3", "--resume", str(cwd / "w" / "resumed"))
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags
    assert summary["epochs"] == 3 and len(summary["history"]) == 3
    return cwd


def _max_diff(a: Path, b: Path) -> float:
    first = torch.load(a, weights_only=True, map_location="cpu")["model"]
    second = torch.load(b, weights_only=True, map_location="cpu")["model"]
    return max(float((first[k].double() - second[k].double()).abs().max()) for k in first
               if first[k].dtype.is_floating_point)


def test_recipe_on_gpu_learns(gpu_runs):
    summary = json.loads((gpu_runs / "w" / "full_a" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["best_top1"] >= 80.0, summary
    log = (gpu_runs / "w" / "full_a" / "train.log").read_text()
    report(f"recipe on --gpu_id 0: resnet18 32x32, 3 epochs, test top1 "
           f"{summary['best_top1']:.2f}%, {summary['seconds']:.1f} s")
    assert "device cuda" in log, log[:2000]


def test_resume_on_gpu_is_bit_exact_with_deterministic_cudnn(gpu_runs):
    """With cuDNN's deterministic kernels the resumed run equals the uninterrupted one bit
    for bit; how far cuDNN's default kernels move a rerun is reported beside it."""
    work = gpu_runs / "w"
    default_vs_deterministic = _max_diff(work / "full_a" / "last.pth",
                                         work / "full_b" / "last.pth")
    resumed = _max_diff(work / "full_b" / "last.pth", work / "resumed" / "last.pth")
    report(f"resume on GPU (resnet18, deterministic cuDNN): max |w| diff resumed vs "
           f"uninterrupted {resumed:.3g}; a run with cuDNN's defaults differs by "
           f"{default_vs_deterministic:.3g}")
    assert resumed == 0


def test_tiny_resume_on_gpu_after_sigkill(tmp_path, tiny_trainer):
    """No convolutions: an MLP with BatchNorm1d. Killed mid-epoch, resumed; compared with an
    uninterrupted run in this process: bit-identical."""
    from pbt.config import load_config

    argv = ["--work_dir", str(tmp_path / "w"), "--num_epochs", "3", "--batch_size", "8",
            "--progress", "false", "--lr", "0.05", "--milestones", "2", "--num_workers", "0",
            "--save_steps", "2"]
    tiny_trainer(load_config([*argv, "--run_name", "straight"])).run()
    _reset_accelerate()
    script = Path(__file__).parent / "train_tiny.py"
    killed = subprocess.run([sys.executable, str(script), *argv, "--run_name", "killed",
                             "--gpu_id", "0"], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PBT_SIGNAL_AT="2,3,KILL"))
    assert killed.returncode == -9, killed.stdout + killed.stderr
    tiny_trainer(load_config([*argv, "--run_name", "killed", "--resume",
                              str(tmp_path / "w" / "killed")])).run()
    diff = _max_diff(tmp_path / "w" / "straight" / "last.pth",
                     tmp_path / "w" / "killed" / "last.pth")
    report(f"resume on GPU after SIGKILL (MLP): max |w| diff {diff:.3g}; bit-identical: "
           f"{'yes' if diff == 0 else 'no'}")
    assert diff == 0  # no convolutions: every kernel of this run is deterministic


def test_prune_and_export_a_cuda_trained_model(gpu_runs, tmp_path):
    """Prune and fine-tune on GPU, then export on a machine without CUDA (hidden here)."""
    model_file = gpu_runs / "w" / "full_a" / "best.pth"
    recipe_in_process(gpu_runs, *SMALL, "--run_name", "pruned", "--num_epochs", "1",
                      "--use_prune", "true", "--prune_method", "l1", "--prune_ratio", "0.5",
                      "--model_file", str(model_file))
    run_dir = gpu_runs / "w" / "pruned"
    prune_report = json.loads((run_dir / "prune_report.json").read_text())
    before, after = prune_report["before_pruning"], prune_report["after_pruning"]
    assert after["macs"] < 0.35 * before["macs"]
    require("onnxruntime")
    export = subprocess.run(
        [sys.executable, "-m", "pbt.export", str(run_dir), "--onnx", str(tmp_path / "p.onnx")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert export.returncode == 0, export.stdout + export.stderr
    report(f"pruned on GPU (l1 50 %): MACs {before['macs'] / after['macs']:.2f}x fewer, "
           f"top1 {prune_report['after_finetuning']['top1']:.2f}%; exported with CUDA hidden: "
           + "; ".join(line.strip() for line in export.stdout.splitlines()
                       if "diff" in line or "latency" in line))


def test_distillation_on_gpu_in_bf16(gpu_runs):
    """A pruned student distilled from its unpruned self, teacher under bf16 autocast."""
    import math
    import re

    teacher = gpu_runs / "w" / "full_a" / "best.pth"
    summary = recipe_in_process(gpu_runs, *SMALL, "--run_name", "kd", "--num_epochs", "1",
                                "--mixed_precision", "bf16", "--use_prune", "true",
                                "--model_file", str(teacher), "--distill_from", str(teacher))
    train = summary["history"][0]["train"]
    assert math.isfinite(train["loss/distill"]) and train["loss/distill"] > 0
    log = (gpu_runs / "w" / "kd" / "train.log").read_text()
    step = re.findall(r"(\d+) ms/batch", log)
    report(f"KD on GPU, bf16, pruned student / unpruned teacher: 1 epoch, test top1 "
           f"{summary['history'][0]['test']['top1']:.2f}%, {step[-1] if step else '?'} ms/batch")


def test_ema_mixup_channels_last_and_compile_on_gpu(gpu_runs):
    """The issue's training features together on a GPU, bf16: nothing falls back."""
    import re

    summary = recipe_in_process(gpu_runs, *SMALL, "--run_name", "better", "--num_epochs", "2",
                                "--mixed_precision", "bf16", "--channels_last", "true",
                                "--compile", "true", "--ema_decay", "0.999",
                                "--mixup_alpha", "0.2", "--cutmix_alpha", "1.0",
                                "--train_transform", "light+trivialaugment+erasing")
    run_dir = gpu_runs / "w" / "better"
    log = (run_dir / "train.log").read_text()
    assert "torch.compile failed" not in log, log
    saved = torch.load(run_dir / "best.pth", weights_only=True)
    assert saved["weights"] == "ema" and not any("_orig_mod" in k for k in saved["model"])
    step = re.findall(r"(\d+) ms/batch", log)
    report(f"EMA + mixup/CutMix + channels_last + compile, bf16: 2 epochs, test top1 "
           f"{summary['history'][-1]['test']['top1']:.2f}%, ms/batch by epoch {step}")
