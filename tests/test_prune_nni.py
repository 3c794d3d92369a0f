"""NNI backend of pbt.prune: NNI's pruners choose the channels, torch-pruning removes them."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import require
from test_prune import assert_weights_only_round_trip
from torch import nn

from pbt.config import ConfigError
from pbt.models import NET_TYPES, build_model
from pbt.prune import PRUNE_METHODS, apply_prune_history, prune_model

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _one_thread():
    """Small CPU ops on a shared machine run much faster on one thread than oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _nni():
    return require("nni.compression.pruning")


def _spread_bn_scales(model: nn.Module, seed: int = 0) -> None:
    """Stand in for BN-sparsity training: give BatchNorm scales distinct magnitudes."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data = torch.rand(module.weight.shape, generator=generator) + 0.01


def _model(net_type: str, method: str, num_classes: int = 7) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(net_type, num_classes=num_classes)
    if method == "slim":
        _spread_bn_scales(model)
    return model


@functools.lru_cache
def _torch_pruning_size(net_type: str) -> tuple[int, int]:
    """(params, MACs) after the default backend's l1 at ratio 0.5: the size to match."""
    result = prune_model(_model(net_type, "l1"), X[:1], method="l1", ratio=0.5)
    return result.params_after, result.macs_after


def _kept(mask: torch.Tensor) -> torch.Tensor:
    """Output channels an NNI weight mask keeps."""
    return mask.reshape(mask.shape[0], -1).ne(0).any(dim=1).nonzero().flatten()


@pytest.mark.slow
@pytest.mark.parametrize("method", PRUNE_METHODS)
@pytest.mark.parametrize("net_type", NET_TYPES)
def test_nni_backend_shrinks_like_torch_pruning_and_reloads(net_type, method, tmp_path):
    _nni()
    model = _model(net_type, method)
    result = prune_model(model, X[:1], method=method, ratio=0.5, backend="nni")
    assert result.backend == "nni"

    model.eval()
    with torch.no_grad():
        out = model(X)
    assert out.shape == (2, 7)
    assert result.params_after == sum(p.numel() for p in model.parameters())
    # both backends keep int(channels * (1 - ratio)) per coupled group, rounded to 8
    reference = _torch_pruning_size(net_type)
    assert abs(result.params_after / reference[0] - 1) < 0.02
    assert abs(result.macs_after / reference[1] - 1) < 0.02
    assert 0.2 < result.params_after / result.params_before < 0.33
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.out_channels % 8 == 0 for c in convs)

    # the same weights_only checkpoint round trip as the default backend
    assert_weights_only_round_trip(model, result, net_type, X, out, tmp_path)


@pytest.mark.parametrize("method", PRUNE_METHODS)
def test_uncoupled_layers_lose_exactly_the_channels_nni_masked(method):
    pruning = _nni()
    pruner_cls = {"l1": pruning.L1NormPruner, "l2": pruning.L2NormPruner,
                  "fpgm": pruning.FPGMPruner, "slim": pruning.L1NormPruner}[method]
    model = _model("resnet18", method)
    # a basic block's first conv (and its BatchNorm) feeds only the block's second conv
    blocks = ["layer1.0", "layer2.1", "layer3.0"]
    layers = [f"{b}.bn1" if method == "slim" else f"{b}.conv1" for b in blocks]
    nni_model = copy.deepcopy(model)
    _, masks = pruner_cls(nni_model, [{"op_names": layers, "sparse_ratio": 0.5}]).compress()

    modules = dict(model.named_modules())
    tags = {}
    for block in blocks:
        bn = modules[f"{block}.bn1"]
        if method != "slim":  # tag channels through the BatchNorm, which l1/l2/fpgm ignore
            bn.weight.data = torch.arange(bn.num_features, dtype=torch.float) + 1
        tags[block] = bn.weight.detach().clone()
    prune_model(model, X[:1], method=method, ratio=0.5, backend="nni")
    for block, name in zip(blocks, layers):
        kept = _kept(masks[name]["weight"])
        assert len(kept) == tags[block].numel() // 2
        assert torch.equal(modules[f"{block}.bn1"].weight.detach(), tags[block][kept])
        assert modules[f"{block}.conv1"].out_channels == len(kept)
        assert modules[f"{block}.conv2"].in_channels == len(kept)


def test_residual_channels_go_together_ranked_by_their_mean_norm():
    _nni()
    model = _model("resnet18", "l1")
    # conv1, layer1.0.conv2 and layer1.1.conv2 all write into the same residual channels
    members = [model.conv1, model.layer1[0].conv2, model.layer1[1].conv2]
    norms = torch.stack([m.weight.detach().abs().flatten(1).sum(1) for m in members]).mean(0)
    expected = torch.sort(norms.topk(32).indices).values
    model.bn1.weight.data = torch.arange(64, dtype=torch.float) + 1  # to identify the survivors
    model.layer1[0].bn2.weight.data = model.bn1.weight.data.clone()

    prune_model(model, X[:1], method="l1", ratio=0.5, backend="nni")
    kept = (model.bn1.weight.detach() - 1).long()
    assert torch.equal(kept, expected)
    assert torch.equal(model.layer1[0].bn2.weight.detach() - 1, kept.float())
    assert model.layer1[1].conv2.out_channels == model.layer1[0].conv1.in_channels == 32


def test_round_to_ignored_layers_and_iterative_steps():
    _nni()
    x = X[:1]
    model = _model("resnet18", "l2", num_classes=5)
    prune_model(model, x, method="l2", ratio=0.3, round_to=None, backend="nni")
    assert model.conv1.out_channels == 44  # int(64 * 0.7), not rounded
    model = _model("resnet18", "l2", num_classes=5)
    prune_model(model, x, method="l2", ratio=0.3, backend="nni")
    assert model.conv1.out_channels == 40  # rounded down to a multiple of 8, as torch-pruning

    mobile = _model("mobilenet_v2", "fpgm", num_classes=5)
    result = prune_model(mobile, x, method="fpgm", ratio=0.5, ignored_layers=["features.0.0"],
                         iterative_steps=2, backend="nni")
    assert mobile.features[0][0].out_channels == 32  # ignored, and so is its coupled dw conv
    assert result.ignored_layers == ["features.0.0", "classifier.1"]
    assert mobile.classifier[1].out_features == 5
    for module in mobile.modules():  # depthwise convs stay depthwise
        if isinstance(module, nn.Conv2d) and module.groups > 1:
            assert module.groups == module.in_channels == module.out_channels
    reference = _model("mobilenet_v2", "fpgm", num_classes=5)
    expected = prune_model(reference, x, method="fpgm", ratio=0.5, ignored_layers=["features.0.0"],
                           iterative_steps=2)
    assert result.params_after == expected.params_after
    rebuilt = apply_prune_history(build_model("mobilenet_v2", num_classes=5), x, result.history)
    rebuilt.load_state_dict(mobile.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(X), mobile.eval()(X))


def test_nni_backend_bad_settings_raise_config_error():
    _nni()
    model = build_model("resnet18", num_classes=3)
    with pytest.raises(ConfigError, match="prune_global.*nni"):
        prune_model(model, X[:1], backend="nni", global_pruning=True)
    with pytest.raises(ConfigError, match="prune_backend.*'nnni'"):
        prune_model(model, X[:1], backend="nnni")
    assert model.conv1.out_channels == 64


def test_missing_nni_is_one_clear_config_error_and_pbt_never_imports_it():
    # runs whether or not nni is installed: a None entry in sys.modules makes import fail
    script = textwrap.dedent("""
        import sys
        import pbt, pbt.prune, pbt.engine, pbt.config
        assert "nni" not in sys.modules, "importing pbt imported nni"
        sys.modules["nni"] = None
        import torch
        from pbt.config import ConfigError
        from pbt.models import build_model
        from pbt.prune import prune_model
        model = build_model("resnet18", num_classes=3)
        try:
            prune_model(model, torch.randn(1, 3, 32, 32), backend="nni")
        except ConfigError as exc:
            print(exc)
        assert model.conv1.out_channels == 64
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    message = proc.stdout.strip()
    assert "\n" not in message
    assert "prune_backend: 'nni'" in message and 'pip install -e ".[nni]"' in message
