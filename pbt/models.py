"""Backbones by ``net_type``: torchvision classifiers with the head sized to the classes.

Shared by the classification recipe, pruning and export, so a checkpoint's ``net_type``
and ``num_classes`` are enough to rebuild its network in a new process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pbt.config import ConfigError

NET_TYPES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")


def build_model(net_type: str, num_classes: int, pretrained: str | None = None) -> nn.Module:
    """Build a torchvision ``net_type`` with a ``num_classes`` head.

    ``pretrained`` is a local torchvision weight file (ImageNet head or not); nothing is
    downloaded. Head weights whose shape does not fit ``num_classes`` are left freshly
    initialised.
    """
    import torchvision

    if net_type not in NET_TYPES:
        raise ConfigError(
            f"net_type: unknown network {net_type!r}; valid ones are {', '.join(NET_TYPES)}"
        )
    model = getattr(torchvision.models, net_type)(weights=None, num_classes=num_classes)
    if pretrained:
        load_weights(model, pretrained, key="pretrained")
    return model


def load_weights(model: nn.Module, path: str | Path, strict: bool = False,
                 key: str = "model_file", loaded: Any = None) -> list[str]:
    """Load a weights file into ``model`` by name and shape; return the keys skipped.

    Accepts pbt checkpoints, a bare state_dict, ``{"model": ...}`` / ``{"state_dict": ...}``
    and ``module.``-prefixed keys (PBT's DataParallel files). Only plain tensors are read
    (``weights_only=True``). ``strict`` turns a missing key or a shape mismatch into an
    error naming the first such key and both shapes. ``loaded`` is the file's content
    when the caller has already read it.
    """
    from pbt.checkpoint import safe_load

    path = Path(path)
    if loaded is None:
        if not path.is_file():
            raise ConfigError(f"{key}: weight file {str(path)!r} does not exist")
        loaded = safe_load(path, key=key)
    state = loaded
    if isinstance(state, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"{key}: {str(path)!r} holds no state_dict of tensors")
    own = model.state_dict()
    usable, skipped = {}, []
    for name, value in state.items():
        name = name.removeprefix("module.")
        if name in own and own[name].shape == value.shape:
            usable[name] = value
        else:
            if strict:
                theirs = tuple(value.shape)
                ours = tuple(own[name].shape) if name in own else "absent"
                raise ConfigError(
                    f"{key}: {str(path)!r} does not fit this network: key {name!r} has shape "
                    f"{theirs} in the file and {ours} in the model (another net_type or "
                    "number of classes?)"
                )
            skipped.append(name)
    missing = [name for name in own if name not in usable]
    if strict and missing:
        raise ConfigError(f"{key}: {str(path)!r} lacks key {missing[0]!r} of this network")
    model.load_state_dict(usable, strict=False)
    return skipped
