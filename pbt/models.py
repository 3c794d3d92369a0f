"""Backbones by ``net_type``: torchvision classifiers with the head sized to the classes.

Shared by the classification recipe, pruning and export, so a checkpoint's ``net_type``,
``num_classes`` and ``width_mult`` are enough to rebuild its network in a new process.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from pbt.config import ConfigError

NET_TYPES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2")


def build_model(net_type: str, num_classes: int, pretrained: str | bool | None = None,
                width_mult: float = 1.0) -> nn.Module:
    """Build a torchvision ``net_type`` with a ``num_classes`` head.

    ``pretrained`` is a local torchvision weight file, or ``True`` for torchvision's
    ImageNet weights (from its cache, else downloaded). Head weights whose shape does not
    fit ``num_classes`` are left freshly initialised. ``width_mult`` is mobilenet_v2's.
    """
    import torchvision

    if net_type not in NET_TYPES:
        raise ConfigError(f"key 'net_type': unknown network {net_type!r}; valid ones are "
                          f"{', '.join(NET_TYPES)}")
    options = {"width_mult": width_mult} if net_type == "mobilenet_v2" else {}
    if width_mult != 1.0 and not options:
        raise ConfigError(f"key 'width_mult' has value {width_mult!r}, but only mobilenet_v2 "
                          f"has a width multiplier (net_type is {net_type!r})")
    model = getattr(torchvision.models, net_type)(weights=None, num_classes=num_classes,
                                                 **options)
    if pretrained is True:
        _load_torchvision_weights(model, net_type)
    elif pretrained:
        from pbt.checkpoint import load_weights

        load_weights(model, pretrained, key="pretrained")
    return model


def _load_torchvision_weights(model: nn.Module, net_type: str) -> None:
    """torchvision's ImageNet weights (its cache first); a clear error when unreachable."""
    import torchvision

    from pbt.checkpoint import load_weights

    weights = torchvision.models.get_model_weights(net_type).DEFAULT
    try:
        state = weights.get_state_dict(progress=False)
    except Exception as err:
        file = Path(weights.url).name
        raise ConfigError(
            f"key 'pretrained' is true, but torchvision's {net_type} ImageNet weights could not "
            f"be loaded or downloaded ({type(err).__name__}: {err}). Without network access, "
            f"download {weights.url} elsewhere and give the file: --pretrained path/to/{file} "
            "(or put it in torch's cache, ~/.cache/torch/hub/checkpoints/)") from None
    load_weights(model, net_type, key="pretrained", loaded=state)
