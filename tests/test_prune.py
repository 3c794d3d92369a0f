"""Structural pruning: real torchvision backbones, channels physically removed, exact reload."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg, tiny_trainer_class
from torch import nn

from pbt.callbacks import Callback
from pbt.config import ConfigError
from pbt.models import NET_TYPES, build_model
from pbt.prune import (
    PRUNE_METHODS,
    SlimRegularizer,
    apply_prune_history,
    measure_model,
    prune_model,
)

ROOT = Path(__file__).resolve().parents[1]


def _spread_bn_scales(model: nn.Module, seed: int = 0) -> None:
    """Stand in for BN-sparsity training: give BatchNorm scales distinct magnitudes."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data = torch.rand(module.weight.shape, generator=generator) + 0.01


def _conv_out_channels(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("method", PRUNE_METHODS)
@pytest.mark.parametrize("net_type", NET_TYPES)
def test_prune_every_backbone_and_method(net_type, method, tmp_path):
    torch.manual_seed(0)
    model = build_model(net_type, num_classes=7)
    if method == "slim":
        _spread_bn_scales(model)
    x = torch.randn(2, 3, 32, 32)
    before = _conv_out_channels(model)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scales have spread: slim must not warn here
        result = prune_model(model, x, method=method, ratio=0.5)

    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7)
    assert result.params_after == sum(p.numel() for p in model.parameters())
    # half the channels on both sides of most weights: about a quarter of the parameters
    assert 0.2 < result.params_after / result.params_before < 0.33
    assert result.macs_after < result.macs_before / 3.3
    after = _conv_out_channels(model)
    assert sum(after.values()) < 0.55 * sum(before.values())
    assert all(c % 8 == 0 for c in after.values())

    assert_weights_only_round_trip(model, result, net_type, x, out, tmp_path)


def assert_weights_only_round_trip(model, result, net_type, x, out, tmp_path) -> None:
    """Round trip through a weights_only file onto a freshly built, unpruned network."""
    path = tmp_path / "pruned.pth"
    torch.save({"model": model.state_dict(), "prune_history": result.history}, path)
    saved = torch.load(path, weights_only=True)
    rebuilt = build_model(net_type, num_classes=7)
    apply_prune_history(rebuilt, torch.randn(1, 3, 32, 32), saved["prune_history"])
    rebuilt.load_state_dict(saved["model"])
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), out)


def test_channels_removed_and_round_to():
    x = torch.randn(1, 3, 32, 32)
    for round_to, check in ((8, lambda c: c % 8 == 0), (None, lambda c: True)):
        torch.manual_seed(0)
        model = build_model("resnet18", num_classes=5)
        prune_model(model, x, method="l1", ratio=0.3, round_to=round_to)
        # 64 * 0.7 = 44.8 channels left: 44 unrounded, 40 with round_to=8
        assert model.conv1.out_channels == (40 if round_to else 44)
        assert model.layer1[0].conv1.in_channels == model.conv1.out_channels
        assert all(check(c) for c in _conv_out_channels(model).values())
    # the classifier keeps its classes; its inputs follow the pruned last stage
    assert model.fc.out_features == 5 and model.fc.in_features == model.layer4[1].bn2.num_features
    assert model.fc.in_features < 512

    torch.manual_seed(0)
    mobile = build_model("mobilenet_v2", num_classes=5)
    result = prune_model(mobile, x, method="l2", ratio=0.5, ignored_layers=["features.0.0"])
    convs = _conv_out_channels(mobile)
    assert convs["features.0.0"] == 32  # ignored
    assert all(c % 8 == 0 for c in convs.values())
    assert result.ignored_layers == ["features.0.0", "classifier.1"]
    for module in mobile.modules():  # depthwise convs stay depthwise
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            assert module.groups == module.in_channels == module.out_channels


def test_prune_keeps_training_mode_and_bn_stats():
    model = build_model("resnet18", num_classes=3).train()
    prune_model(model, torch.randn(4, 3, 32, 32) * 10, ratio=0.5)
    assert model.training
    # tracing ran forward passes, but in eval mode: running stats are still at init
    assert torch.equal(model.bn1.running_mean, torch.zeros_like(model.bn1.running_mean))
    assert torch.equal(model.bn1.running_var, torch.ones_like(model.bn1.running_var))


def test_slim_removes_smallest_bn_scales_and_warns_without_sparsity():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3)
    _spread_bn_scales(model, seed=1)
    # layer1.0.bn1 is coupled only to its own conv, so its ranking is its own |gamma|
    gammas = model.layer1[0].bn1.weight.detach().clone()
    prune_model(model, torch.randn(1, 3, 32, 32), method="slim", ratio=0.5)
    kept = torch.sort(gammas.abs().topk(32).indices).values
    assert torch.equal(model.layer1[0].bn1.weight.detach(), gammas[kept])

    fresh = build_model("resnet18", num_classes=3)  # all gammas are 1
    with pytest.warns(UserWarning, match="no spread"):
        prune_model(fresh, torch.randn(1, 3, 32, 32), method="slim", ratio=0.5)


def test_global_pruning_and_iterative_steps_round_trip():
    x = torch.randn(1, 3, 32, 32)
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", num_classes=4)
    result = prune_model(model, x, method="l1", ratio=0.5, global_pruning=True, iterative_steps=3)
    assert result.global_pruning and result.iterative_steps == 3
    assert result.params_ratio > 2
    rebuilt = apply_prune_history(build_model("mobilenet_v2", num_classes=4), x, result.to_dict())
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_bad_arguments_raise_config_error():
    model = build_model("resnet18", num_classes=3)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ConfigError, match="prune_method.*'l3'"):
        prune_model(model, x, method="l3")
    with pytest.raises(ConfigError, match="prune_ratio"):
        prune_model(model, x, ratio=1.0)
    with pytest.raises(ConfigError, match="round_to"):
        prune_model(model, x, round_to=0)
    with pytest.raises(ConfigError, match="layer1.0.conv"):  # suggests the close name
        prune_model(model, x, ignored_layers=["layer1.0.convv1"])
    assert model.conv1.out_channels == 64  # nothing was pruned by the failed calls
    with pytest.raises(ConfigError, match=r"prune_history\[0\]"):
        apply_prune_history(model, x, [["conv1", "yes", [0]]])
    with pytest.raises(ConfigError, match="no module 'backbone.conv1'"):
        apply_prune_history(model, x, [["backbone.conv1", True, [0]]])
    with pytest.raises(ConfigError, match=r"prune_history\[1\].*'conv1'.*60 channels"):
        apply_prune_history(model, x, [["conv1", True, [0, 1, 2, 3]], ["conv1", True, [60]]])


def test_measure_model_restores_torch_state():
    threads = torch.get_num_threads()
    model = build_model("resnet18", num_classes=3).train()
    stats = measure_model(model, torch.randn(4, 3, 32, 32), runs=30)
    assert torch.get_num_threads() == threads and model.training
    assert stats["params"] == sum(p.numel() for p in model.parameters())
    assert stats["macs"] > 0 and stats["latency_ms"] > 0


class BNGrads(Callback):
    """Every gradient of the tiny model at ``on_after_backward`` (``1.weight`` is the BatchNorm
    scale gamma), with gamma itself, Accelerate's gradient sync flag and the loss scale."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def on_after_backward(self, batch, logs):
        accelerator = self.trainer.accelerator
        model = self.trainer.unwrapped_model
        scaler = accelerator.scaler
        self.calls.append({
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
            "gamma": model[1].weight.detach().clone(),
            "sync": accelerator.sync_gradients,
            "scale": float(scaler.get_scale()) if scaler is not None else 1.0,
        })


class SetGammas(Callback):
    """BN scales of both signs and exact zeros, so sign(gamma) is -1, 0 and +1."""

    def on_train_begin(self, logs):
        with torch.no_grad():
            self.trainer.unwrapped_model[1].weight.copy_(
                torch.tensor([0.5, -0.25, 0.0, 2.0]).repeat(4))


class CPUGradScaler(tiny_trainer_class()):
    """A real torch GradScaler (init scale 1024) handed to the real Accelerator before
    ``prepare``: Accelerate's fp16 path (scaled backward, ``scaler.step``) on CPU, where
    Accelerate makes no scaler of its own. On a GPU, ``test_slim_regularizer_with_fp16_on_gpu``
    uses Accelerate's own."""

    def build(self, cfg):
        self.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        super().build(cfg)


def _slim_run(trainer_class, cfg, train_size=40):
    """A real run with ``slim_reg``: gradients just before and just after the engine's
    SlimRegularizer (it comes after the default callbacks, extra callbacks after it)."""
    before, after = BNGrads(), BNGrads()
    trainer = trainer_class(cfg, [after], train_size=train_size)
    regularizer = [c for c in trainer.callbacks if isinstance(c, SlimRegularizer)]
    assert len(regularizer) == 1 and regularizer[0].slim_reg == cfg.slim_reg
    trainer.callbacks.insert(0, before)
    trainer.callbacks.insert(0, SetGammas())
    trainer.run()
    assert len(before.calls) == len(after.calls) == len(trainer.train_loader) * cfg.num_epochs
    return trainer, list(zip(before.calls, after.calls))


def _assert_slim_term(calls, slim_reg, atol=1e-7):
    """Each synced micro-batch adds slim_reg * loss scale * sign(gamma) to the BN scale
    gradient and nothing to any other gradient; other micro-batches add nothing."""
    for pre, post in calls:
        added = slim_reg * pre["scale"] * torch.sign(pre["gamma"]) if pre["sync"] else 0.0
        torch.testing.assert_close(post["grads"]["1.weight"], pre["grads"]["1.weight"] + added,
                                   rtol=1e-6, atol=atol)
        assert all(torch.equal(post["grads"][n], g) for n, g in pre["grads"].items()
                   if n != "1.weight")


def test_slim_regularizer_adds_sign_of_bn_scale(tmp_path):
    cfg = tiny_cfg(tmp_path, slim_reg=0.01, num_epochs=1)
    _, calls = _slim_run(tiny_trainer_class(), cfg)
    assert all(pre["sync"] and pre["scale"] == 1.0 for pre, _ in calls)
    _assert_slim_term(calls, 0.01)
    # first step: gamma 0 gets no L1 term (sign(0) = 0), the others +-0.01 exactly
    pre, post = calls[0]
    assert set(pre["gamma"].tolist()) == {0.5, -0.25, 0.0, 2.0}
    added = post["grads"]["1.weight"] - pre["grads"]["1.weight"]
    assert torch.equal(added[pre["gamma"] == 0], torch.zeros(4))
    assert torch.allclose(added[pre["gamma"] != 0].abs(), torch.tensor(0.01), atol=1e-7, rtol=0)


def test_slim_regularizer_follows_accumulation_and_loss_scale(tmp_path):
    """With ``grad_accum_steps: 2`` the term is added once per optimizer step (5 batches:
    micro-batches 1 and 3 of each epoch only accumulate); under a loss scale it is scaled
    like the gradients it joins, so the run trains the same weights as without one."""
    runs = {}
    for name, trainer_class in (("plain", tiny_trainer_class()), ("scaled", CPUGradScaler)):
        cfg = tiny_cfg(tmp_path, run_name=name, slim_reg=0.01, num_epochs=2, grad_accum_steps=2)
        trainer, calls = _slim_run(trainer_class, cfg)
        assert [pre["sync"] for pre, _ in calls] == [False, True, False, True, True] * 2
        assert trainer.global_step == 6
        scale = 1024.0 if name == "scaled" else 1.0
        assert {pre["scale"] for pre, _ in calls} == {scale}
        _assert_slim_term(calls, 0.01, atol=1e-7 * scale)
        runs[name] = calls, trainer.unwrapped_model.state_dict()
    (plain_calls, plain_weights), (scaled_calls, scaled_weights) = runs["plain"], runs["scaled"]
    # the loss scale is really in effect: the first backward's gradients are 1024x
    for name, grad in plain_calls[0][0]["grads"].items():
        torch.testing.assert_close(scaled_calls[0][0]["grads"][name], 1024 * grad)
    for name, value in plain_weights.items():
        torch.testing.assert_close(scaled_weights[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_slim_regularizer_with_fp16_on_gpu(tmp_path):
    """Accelerate's own fp16 GradScaler (init scale 65536) on a GPU."""
    cfg = tiny_cfg(tmp_path, slim_reg=0.01, num_epochs=2, grad_accum_steps=2,
                   mixed_precision="fp16")
    trainer, calls = _slim_run(tiny_trainer_class(), cfg)
    assert trainer.accelerator.scaler is not None
    finite = [(pre, post) for pre, post in calls if pre["grads"]["1.weight"].isfinite().all()]
    assert finite and all(pre["scale"] > 1000 for pre, _ in finite)
    _assert_slim_term(finite, 0.01, atol=1e-1)


def test_fresh_process_loads_pruned_checkpoint_with_weights_only(tmp_path):
    x = torch.randn(2, 3, 48, 48)
    expected = {}
    for net_type in ("resnet50", "mobilenet_v2"):
        torch.manual_seed(0)
        model = build_model(net_type, num_classes=6)
        result = prune_model(model, x[:1], method="fpgm", ratio=0.4)
        model.eval()
        with torch.no_grad():
            expected[net_type] = model(x)
        torch.save({"model": model.state_dict(), "net_type": net_type, "num_classes": 6,
                    "prune_history": result.history}, tmp_path / f"{net_type}.pth")
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch
        from pbt.models import build_model
        from pbt.prune import apply_prune_history
        x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
        for net_type in ("resnet50", "mobilenet_v2"):
            ckpt = torch.load({str(tmp_path)!r} + f"/{{net_type}}.pth", weights_only=True)
            model = build_model(ckpt["net_type"], ckpt["num_classes"])
            apply_prune_history(model, torch.randn(1, 3, 32, 32), ckpt["prune_history"])
            model.load_state_dict(ckpt["model"])
            with torch.no_grad():
                torch.save(model.eval()(x), {str(tmp_path)!r} + f"/{{net_type}}_out.pt")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    for net_type, out in expected.items():
        assert torch.equal(torch.load(tmp_path / f"{net_type}_out.pt", weights_only=True), out)


class LatencyDtypes(Callback):
    """At on_train_end (before PruneReport, the last callback) hooks the model: the report's
    measurement runs under inference_mode on a deep copy, which keeps the hook."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()

    def on_train_end(self, logs):
        def record(module, inputs, output):
            if torch.is_inference_mode_enabled():
                self.dtypes.add(output.dtype)

        self.trainer.unwrapped_model[0].register_forward_hook(record)


def test_prune_report_times_float32_after_mixed_precision_training(tmp_path, tiny_trainer):
    """'after_finetuning' latency must compare with 'before_pruning' (float32), not bf16."""
    probe = LatencyDtypes()
    cfg = tiny_cfg(tmp_path, use_prune=True, prune_ratio=0.5, num_epochs=1,
                   mixed_precision="bf16")
    tiny_trainer(cfg, [probe]).run()
    assert probe.dtypes == {torch.float32}


def test_the_classifier_keeps_its_outputs_whatever_round_to():
    """README: the classifier is never pruned. 16 classes at ratio 0.5 with round_to 8
    would otherwise lose 8 of them (7 classes, as above, are saved by the rounding)."""
    model = build_model("resnet18", num_classes=16)
    result = prune_model(model, torch.randn(1, 3, 32, 32), method="l1", ratio=0.5)
    assert model.fc.out_features == 16 and model.fc.in_features < 512
    assert "fc" in result.ignored_layers
