"""ONNX export of pbt checkpoints (pruned and unpruned), checked with onnxruntime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require

from pbt.config import ConfigError
from pbt.models import build_model
from pbt.prune import prune_model

require("onnx")
ort = require("onnxruntime")

from pbt.export import export_onnx, load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _save_checkpoint(
    path: Path, net_type: str, pruned: bool, input_size: tuple[int, int] = (40, 32)
) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(net_type, num_classes=3)
    ckpt = {"net_type": net_type, "num_classes": 3, "class_names": ["a", "b", "c"],
            "input_size": list(input_size), "epoch": 2}
    if pruned:
        result = prune_model(model, torch.randn(1, 3, input_size[1], input_size[0]), ratio=0.5)
        ckpt["prune_history"] = result.history
    with torch.no_grad():  # non-trivial BN statistics, as after training
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    ckpt["model"] = model.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return model.eval()


@pytest.mark.parametrize("net_type,pruned", [("resnet18", False), ("resnet18", True),
                                             ("mobilenet_v2", True)])
def test_export_matches_pytorch(tmp_path, net_type, pruned):
    model = _save_checkpoint(tmp_path / "run" / "last.pth", net_type, pruned)
    info = export_onnx(tmp_path / "run", tmp_path / "out" / "model.onnx", runs=5)
    assert info["checkpoint"].endswith("last.pth")  # run dir without best.pth
    assert info["pruned"] is pruned
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["max_abs_diff"] <= 1e-4 and info["ort_latency_ms"] > 0

    # independent check at another batch size: the batch dimension is dynamic
    session = ort.InferenceSession(info["onnx_path"], providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 40)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(out), model(x), atol=1e-4, rtol=0)


def test_cli_prefers_best_and_honours_input_size(tmp_path):
    _save_checkpoint(tmp_path / "run" / "last.pth", "resnet18", pruned=False)
    pruned = _save_checkpoint(tmp_path / "run" / "best.pth", "resnet18", pruned=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pbt.export", str(tmp_path / "run"), "--onnx",
         str(tmp_path / "m.onnx"), "--input-size", "48", "24", "--runs", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "best.pth" in proc.stdout and "pruned" in proc.stdout
    assert "max abs diff" in proc.stdout and "latency" in proc.stdout
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[2:] == [24, 48]
    assert session.get_outputs()[0].shape[1] == 3
    model, ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["epoch"] == 2
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in pruned.parameters())


def test_bad_inputs_say_what_and_where(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        export_onnx(tmp_path / "missing.pth", tmp_path / "m.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither best.pth nor last.pth"):
        export_onnx(tmp_path / "empty", tmp_path / "m.onnx")
    torch.save({"model": {}, "num_classes": 3}, tmp_path / "no_net.pth")
    with pytest.raises(ConfigError, match="no_net.pth.*'net_type'"):
        export_onnx(tmp_path / "no_net.pth", tmp_path / "m.onnx")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth.*weights_only"):
        export_onnx(tmp_path / "junk.pth", tmp_path / "m.onnx")
    _save_checkpoint(tmp_path / "ok.pth", "resnet18", pruned=False)
    with pytest.raises(ConfigError, match="input_size"):
        export_onnx(tmp_path / "ok.pth", tmp_path / "m.onnx", input_size=(0, 32))
    ckpt = torch.load(tmp_path / "ok.pth", weights_only=True)
    ckpt["net_type"] = "resnet34"
    torch.save(ckpt, tmp_path / "wrong_net.pth")
    with pytest.raises(ConfigError, match="wrong_net.pth.*resnet34"):
        export_onnx(tmp_path / "wrong_net.pth", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_missing_extra_prints_install_line(tmp_path):
    code = ("import sys; sys.modules['onnxruntime'] = None; from pbt.export import main; "
            f"sys.exit(main([{str(tmp_path)!r}, '--onnx', 'm.onnx']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert 'pip install -e ".[export]"' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# -- fp16 / int8 and the deploy report on a trained run ------------------------------------

from conftest import run_recipe  # noqa: E402

from pbt.export import deploy_report  # noqa: E402

SMALL_RUN = ["--work_dir", "w", "--input_size", "16", "16", "--num_workers", "0",
             "--progress", "false"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A resnet18 trained for 3 epochs on digits at 16x16, and a 50 %-pruned copy of it
    fine-tuned for 1 epoch (started from the first: its baseline)."""
    cwd = tmp_path_factory.mktemp("deploy")
    base = run_recipe([*SMALL_RUN, "--run_name", "base", "--num_epochs", "3"], cwd)
    assert base.returncode == 0, base.stderr
    pruned = run_recipe([*SMALL_RUN, "--run_name", "pruned", "--num_epochs", "1",
                         "--use_prune", "true", "--model_file",
                         str(cwd / "w" / "base" / "best.pth")], cwd)
    assert pruned.returncode == 0, pruned.stderr
    return cwd / "w"


def test_deploy_report_measures_fp32_fp16_int8(trained_run, tmp_path):
    run_dir = trained_run / "base"
    report = deploy_report(run_dir, tmp_path / "out" / "m.onnx", fp16=True, int8=True,
                           calib_images=100, runs=3)
    assert json.loads((tmp_path / "out" / "deploy_report.json").read_text()) == report
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["torch fp32", "onnx fp32", "onnx fp16", "onnx int8"]
    assert report["opset"] == 17 and report["latency"]["threads"] == 1
    assert report["test_data"]["images"] == 360 and report["calibration"]["images"] == 100
    assert report["calibration"]["source"].endswith("train")
    assert report["calibration"]["activations"] == "uint8"

    # the exporter's torch top-1 is the one training measured for best.pth (another code path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert rows["torch fp32"]["top1"] == pytest.approx(summary["best"])
    assert rows["torch fp32"]["top1"] > 80  # a trained model, or int8's tolerance means little
    assert rows["onnx fp32"]["max_abs_diff"] <= 1e-4
    assert rows["onnx fp32"]["top1"] == rows["torch fp32"]["top1"]
    assert rows["onnx fp16"]["max_abs_diff"] < 0.05
    assert abs(rows["onnx fp16"]["top1_diff"]) <= 0.5
    assert abs(rows["onnx int8"]["top1_diff"]) <= 1.0 and not report["warnings"]
    sizes = [rows[name]["size_bytes"] for name in ("onnx fp32", "onnx fp16", "onnx int8")]
    assert sizes[0] > 1.8 * sizes[1] and sizes[1] > 1.6 * sizes[2]
    for row in report["rows"]:
        assert row["latency_ms"]["batch1"] > 0 and row["latency_ms"]["batch32"] > 0
        if row["format"] == "onnx":  # every file keeps the dynamic batch dimension
            session = ort.InferenceSession(row["file"], providers=["CPUExecutionProvider"])
            assert session.get_inputs()[0].shape[0] == "batch"
            x = torch.randn(3, 3, 16, 16).numpy()
            assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (3, 10)
    int8_ops = {node.op_type for node in __import__("onnx").load(rows["onnx int8"]["file"])
                .graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= int8_ops


def test_pruned_run_is_reported_beside_its_unpruned_start(trained_run, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pbt.export", str(trained_run / "pruned"), "--onnx",
         str(tmp_path / "p.onnx"), "--int8", "--calib-images", "64", "--runs", "3",
         "--int8-tolerance", "-100"],  # an impossible tolerance: int8 must be flagged
        cwd=trained_run.parent, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "WARNING: onnx int8 (pruned)" in proc.stderr and "--calib-images 128" in proc.stderr
    report = json.loads((tmp_path / "deploy_report.json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["torch fp32 (unpruned)", "onnx fp32 (unpruned)", "onnx int8 (unpruned)",
                     "torch fp32 (pruned)", "onnx fp32 (pruned)", "onnx int8 (pruned)"]
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["torch fp32 (pruned)"]["macs"] < rows["torch fp32 (unpruned)"]["macs"] / 3
    assert len(report["warnings"]) == 2
    assert "| onnx int8 (pruned) |" in proc.stdout and "speed-up" in proc.stdout


def test_int8_without_the_runs_data_says_what_to_pass(tmp_path):
    _save_checkpoint(tmp_path / "ckpt.pth", "resnet18", pruned=False)
    with pytest.raises(ConfigError, match="--int8.*config.yaml.*--config"):
        deploy_report(tmp_path / "ckpt.pth", tmp_path / "m.onnx", int8=True)
    with pytest.raises(ConfigError, match="--config.*nowhere.yaml.*does not exist"):
        deploy_report(tmp_path / "ckpt.pth", tmp_path / "m.onnx",
                      config=tmp_path / "nowhere.yaml")
    report = deploy_report(tmp_path / "ckpt.pth", tmp_path / "m.onnx", fp16=True, runs=2)
    assert report["test_data"] is None and [row["top1"] for row in report["rows"]] == [None] * 3

    # the run's data moved: fp32 still exports (no top-1, said why); int8 cannot
    (tmp_path / "config.yaml").write_text("train_data: gone/train\ntest_data: gone/test\n"
                                          "input_size: [40, 32]\n")
    report = deploy_report(tmp_path / "ckpt.pth", tmp_path / "m2.onnx", runs=2)
    assert report["test_data"] is None
    assert "config.yaml" in report["notes"][0] and "gone/test" in report["notes"][0]
    with pytest.raises(ConfigError, match="config.yaml.*gone/test"):
        deploy_report(tmp_path / "ckpt.pth", tmp_path / "m3.onnx", int8=True)


def test_a_failed_export_leaves_the_previous_file_whole(tmp_path):
    from pbt.export import to_onnx

    class Breaks(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot trace this")

    model = _save_checkpoint(tmp_path / "ckpt.pth", "resnet18", pruned=False)
    path = to_onnx(model, torch.randn(1, 3, 32, 40), tmp_path / "out" / "m.onnx")
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot trace"):
        to_onnx(Breaks(), torch.randn(1, 3, 32, 40), path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"]  # no partial file left
