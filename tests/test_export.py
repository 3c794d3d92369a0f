"""ONNX export of pbt checkpoints (pruned and unpruned), checked with onnxruntime."""

from __future__ import annotations

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
