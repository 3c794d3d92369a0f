"""Structural (filter) pruning on torch-pruning: channels are physically removed.

Four ways to rank channels: ``l1`` / ``l2`` (group weight norm), ``fpgm`` (geometric
median) and ``slim`` (Network Slimming: BatchNorm scale |gamma|, after BN-sparsity training
with :class:`SlimRegularizer`). torch-pruning's dependency graph keeps coupled layers
(residual adds, depthwise convs, BatchNorms) consistent.

``backend="nni"`` (optional extra ``pip install -e ".[nni]"``) lets NNI 3.0's pruners choose
the channels; torch-pruning still removes them, so the result and its history are the same
kind as with the default backend (see :func:`_nni_prune`).

Parameters and MACs are counted here too, for the pruning report and for the model
summary every run logs at start (:func:`summarize_model`).

Typical use, before ``accelerator.prepare`` and before the optimizer is built::

    result = prune_model(model, torch.randn(1, 3, 224, 224), method="l1", ratio=0.5)
    ckpt["prune_history"] = result.history          # plain lists: weights_only-safe

and in a new process::

    model = build_model(net_type, num_classes)
    apply_prune_history(model, torch.randn(1, 3, 224, 224), ckpt["prune_history"])
    model.load_state_dict(ckpt["model"])
"""

from __future__ import annotations

import copy
import difflib
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from pbt.callbacks import Callback
from pbt.config import ConfigError

PRUNE_METHODS = ("l1", "l2", "fpgm", "slim")
PRUNE_BACKENDS = ("torch-pruning", "nni")

# BN scales whose relative spread (std / mean of |gamma|) is below this were never pushed
# apart by sparsity training, so ranking channels by them is arbitrary.
_SLIM_MIN_SPREAD = 0.05


@dataclass
class PruneResult:
    """What :func:`prune_model` did: settings, size before/after, and the replayable history.

    Every field is a plain python value, so ``to_dict()`` (or ``history`` alone) can be
    stored inside a checkpoint that loads with ``torch.load(weights_only=True)``.
    """

    method: str
    ratio: float
    round_to: int | None
    global_pruning: bool
    iterative_steps: int
    ignored_layers: list[str]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    history: list[list] = field(default_factory=list)
    backend: str = "torch-pruning"

    @property
    def params_ratio(self) -> float:
        """How many times fewer parameters the pruned model has."""
        return self.params_before / max(self.params_after, 1)

    @property
    def macs_ratio(self) -> float:
        """How many times fewer multiply-accumulates (batch 1) the pruned model needs."""
        return self.macs_before / max(self.macs_after, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"pruned ({self.method}, ratio {self.ratio}): params {self.params_before:,} -> "
            f"{self.params_after:,} ({self.params_ratio:.2f}x fewer), MACs "
            f"{self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.2f}x fewer)"
        )


def find_classifier(model: nn.Module) -> str | None:
    """Name of the last ``nn.Linear`` in ``model`` (the classifier head), or None."""
    name = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    return name


def _importance(method: str) -> Any:
    import torch_pruning as tp

    if method == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if method == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if method == "fpgm":
        return tp.importance.FPGMImportance(p=2)
    # Raw |gamma| (no per-layer normalisation): Network Slimming's global threshold
    # compares scales across layers, which sparsity training made comparable.
    return tp.importance.BNScaleImportance(normalizer=None)


def _check_args(
    method: str, ratio: float, round_to: int | None, iterative_steps: int
) -> None:
    if method not in PRUNE_METHODS:
        raise ConfigError(
            f"prune_method: unknown method {method!r}; valid ones are {', '.join(PRUNE_METHODS)}"
        )
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ConfigError(
            f"prune_ratio: {ratio!r} is not a fraction of channels to remove in [0, 1)"
        )
    if round_to is not None and (
        isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1
    ):
        raise ConfigError(f"round_to: {round_to!r} must be a positive integer or None")
    if isinstance(iterative_steps, bool) or not isinstance(iterative_steps, int) or (
        iterative_steps < 1
    ):
        raise ConfigError(f"iterative_steps: {iterative_steps!r} must be an integer >= 1")


def _resolve_layers(model: nn.Module, layers: Sequence[str | nn.Module] | None) -> list[str]:
    """Turn names or modules into module names, with a clear error for unknown ones."""
    names = dict(model.named_modules())
    by_module = {id(m): n for n, m in names.items()}
    resolved = []
    for layer in layers or ():
        if isinstance(layer, nn.Module):
            if id(layer) not in by_module:
                raise ConfigError(
                    f"ignored_layers: module {type(layer).__name__} is not part of the model"
                )
            resolved.append(by_module[id(layer)])
        elif isinstance(layer, str) and layer in names and layer:
            resolved.append(layer)
        else:
            close = difflib.get_close_matches(str(layer), [n for n in names if n], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"ignored_layers: no module named {layer!r} in the model{hint}")
    return resolved


def _on_device(example_inputs: Any, model: nn.Module) -> Any:
    param = next(model.parameters(), None)
    if param is None or not torch.is_tensor(example_inputs):
        return example_inputs
    return example_inputs.to(param.device)


def _forward(model: nn.Module, example_inputs: Any) -> Any:
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return model(*example_inputs)
    return model(example_inputs)


def _output_shapes(model: nn.Module, example_inputs: Any) -> list[tuple[int, ...]]:
    with torch.no_grad():
        out = _forward(model, example_inputs)
    outs = out if isinstance(out, (list, tuple)) else [out]
    return [tuple(o.shape) for o in outs if torch.is_tensor(o)]


def count_params_and_macs(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """(parameters, multiply-accumulates) of one forward pass on ``example_inputs``."""
    import torch_pruning as tp

    training = model.training
    try:
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    finally:
        model.train(training)
    return int(params), int(macs)


def _count(number: int) -> str:
    for limit, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if number >= limit:
            return f"{number / limit:.2f}{unit}"
    return str(number)


def summarize_model(model: nn.Module, example_inputs: Any, layers: bool = False) -> str:
    """Keras's ``model.summary()`` in a few lines: parameters (trainable / total) and MACs of
    one forward on ``example_inputs`` (counted by torch-pruning on a copy, in eval mode);
    with ``layers`` a table of each leaf module's type, parameters and MACs."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = tuple(example_inputs.shape) if hasattr(example_inputs, "shape") else "?"
    lines = [f"model {type(model).__name__}: {trainable:,} trainable of {total:,} parameters"]
    try:
        if layers:
            import torch_pruning as tp

            macs, _, layer_macs, layer_params = tp.utils.count_ops_and_params(
                model, example_inputs, layer_wise=True)
        else:
            _, macs = count_params_and_macs(model, example_inputs)
        lines[0] += f", {_count(int(macs))} MACs at input {shape}"
    except Exception as err:  # an unusual model: the summary must not stop the run
        lines[0] += f" (MACs not counted: {type(err).__name__}: {err})"
        layers = False
    if layers:
        lines.append(f"  {'layer':<40} {'type':<20} {'params':>12} {'MACs':>10}")
        for name, module in model.named_modules():
            if next(module.children(), None) is None and name:
                lines.append(f"  {name:<40} {type(module).__name__:<20} "
                             f"{int(layer_params.get(module) or 0):>12,} "
                             f"{_count(int(layer_macs.get(module) or 0)):>10}")
    return "\n".join(lines)


def bn_scale_spread(model: nn.Module, ignored: Sequence[str] = ()) -> float:
    """Relative spread (std / mean) of all BatchNorm |gamma| values; 0.0 if none."""
    scales = [
        module.weight.detach().abs().flatten().float().cpu()
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.weight is not None
        and name not in ignored
    ]
    if not scales:
        return 0.0
    gammas = torch.cat(scales)
    mean = gammas.mean().item()
    if gammas.numel() < 2 or mean == 0:
        return 0.0
    return gammas.std().item() / mean


def prune_model(
    model: nn.Module,
    example_inputs: Any,
    method: str = "l1",
    ratio: float = 0.5,
    round_to: int | None = 8,
    global_pruning: bool = False,
    ignored_layers: Sequence[str | nn.Module] | None = None,
    iterative_steps: int = 1,
    backend: str = "torch-pruning",
) -> PruneResult:
    """Prune ``model`` in place and report what changed.

    ``ratio`` is the fraction of channels removed from each prunable layer (of the whole
    network with ``global_pruning``), so parameters and MACs shrink by roughly
    ``(1 - ratio) ** 2``. The classifier (last ``nn.Linear``) is never pruned;
    ``ignored_layers`` (module names) protects more. ``round_to`` keeps channel counts at
    multiples of it, which fast kernels prefer. Build the optimizer after this call.
    ``backend="nni"`` has NNI's pruner of the same name choose the channels (see
    :func:`_nni_prune`); it needs the ``nni`` extra and does not do ``global_pruning``.
    """
    import torch_pruning as tp

    _check_args(method, ratio, round_to, iterative_steps)
    if backend not in PRUNE_BACKENDS:
        raise ConfigError(
            f"prune_backend: unknown backend {backend!r}; valid ones are "
            f"{', '.join(PRUNE_BACKENDS)}"
        )
    if backend == "nni":
        if global_pruning:
            raise ConfigError(
                "prune_global: true is not supported with prune_backend 'nni' (NNI cannot rank "
                "channels shared by coupled layers across the whole network); use "
                "prune_backend 'torch-pruning' or prune_global: false"
            )
        nni_pruner = _nni_pruner(method)  # fails here, before the model is touched
    ignored = _resolve_layers(model, ignored_layers)
    classifier = find_classifier(model)
    if classifier is not None and classifier not in ignored:
        ignored.append(classifier)
    modules = dict(model.named_modules())
    example_inputs = _on_device(example_inputs, model)

    if method == "slim":
        spread = bn_scale_spread(model, ignored)
        if spread < _SLIM_MIN_SPREAD:
            warnings.warn(
                f"slim pruning: BatchNorm scales show no spread (std/mean of |gamma| = "
                f"{spread:.3g}); without BN-sparsity training (SlimRegularizer) the channel "
                "ranking is arbitrary",
                UserWarning,
                stacklevel=2,
            )

    training = model.training
    try:
        params_before, macs_before = count_params_and_macs(model, example_inputs)
        model.eval()  # tracing runs a forward pass: keep BatchNorm running stats untouched
        shapes_before = _output_shapes(model, example_inputs)
        with torch.enable_grad():  # the dependency graph is traced through autograd
            if backend == "nni":
                history = _nni_prune(
                    model,
                    example_inputs,
                    nni_pruner,
                    on_bn=method == "slim",
                    ratio=float(ratio),
                    round_to=round_to,
                    iterative_steps=iterative_steps,
                    ignored=[modules[name] for name in ignored],
                )
            else:
                pruner = tp.pruner.MetaPruner(
                    model,
                    example_inputs,
                    importance=_importance(method),
                    pruning_ratio=float(ratio),
                    global_pruning=global_pruning,
                    iterative_steps=iterative_steps,
                    ignored_layers=[modules[name] for name in ignored],
                    round_to=round_to,
                )
                # torch-pruning skips a group whose every channel is selected (global
                # ranking), so no layer is ever removed entirely.
                for _ in range(iterative_steps):
                    pruner.step()
                history = pruner.pruning_history()
        shapes_after = _output_shapes(model, example_inputs)
        params_after, macs_after = count_params_and_macs(model, example_inputs)
    finally:
        model.train(training)
    if shapes_after != shapes_before:
        raise ConfigError(
            f"prune_model: pruning changed the output shape {shapes_before} -> {shapes_after}; "
            "add the output layer to ignored_layers"
        )
    return PruneResult(
        method=method,
        ratio=float(ratio),
        round_to=round_to,
        global_pruning=bool(global_pruning),
        iterative_steps=iterative_steps,
        ignored_layers=ignored,
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        history=_plain_history(history),
        backend=backend,
    )


def _nni_pruner(method: str) -> type:
    """NNI 3.0's pruner class for ``method``, or a ConfigError saying how to install it."""
    try:
        from nni.compression.pruning import FPGMPruner, L1NormPruner, L2NormPruner
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] == "nni":
            raise ConfigError(
                "prune_backend: 'nni' needs NNI, which is not installed; install the extra "
                "with: pip install -e \".[nni]\"  (or: pip install \"pbt[nni]\")"
            ) from None
        raise ConfigError(
            f"prune_backend: 'nni' is installed but fails to import: {exc}"
        ) from exc
    # slim: NNI's SlimPruner trains its own scale factors inside NNI's training loop; pbt
    # trains the BatchNorm scales themselves (SlimRegularizer), so rank those by |gamma|,
    # which is NNI's L1-norm pruner applied to the BatchNorm weights.
    return {"l1": L1NormPruner, "l2": L2NormPruner, "fpgm": FPGMPruner, "slim": L1NormPruner}[
        method
    ]


def _nni_masks(pruner_cls: type, model: nn.Module, config_list: list[dict]) -> dict:
    """NNI's masks ``{module_name: {"weight": mask}}``, computed on a copy of ``model``."""
    shadow = copy.deepcopy(model)  # NNI wraps modules in place; never leave ``model`` wrapped
    pruner = pruner_cls(shadow, config_list)
    _, masks = pruner.compress()
    pruner.unwrap_model()
    return masks


def _nni_prune(
    model: nn.Module,
    example_inputs: Any,
    pruner_cls: type,
    on_bn: bool,
    ratio: float,
    round_to: int | None,
    iterative_steps: int,
    ignored: list[nn.Module],
) -> list:
    """NNI chooses the channels (masks); torch-pruning's dependency graph removes them.

    NNI 3.0's own ``ModelSpeedup`` fails in its tracer on current PyTorch; given an fx graph
    it runs, but drops a residual channel only where every coupled layer's mask agrees (so
    little goes) and leaves no replayable history. So every group of coupled channels
    found by torch-pruning (a conv with its BatchNorm, the depthwise conv after it, all
    convs feeding one residual add) becomes one NNI ``dependency_group_id``: NNI ranks the
    group's channels once, by its members' mean metric (conv filters, or BatchNorm |gamma|
    when ``on_bn``). A channel is kept if any member's mask keeps it, and torch-pruning
    removes the rest from every coupled layer, recording the usual replayable history.
    Each group keeps ``int(channels * (1 - ratio))`` rounded down to ``round_to``, as with
    torch-pruning.
    """
    import torch_pruning as tp

    target_type = nn.modules.batchnorm._BatchNorm if on_bn else nn.Conv2d
    names = {module: name for name, module in model.named_modules()}
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    initial: dict[str, int] = {}  # group root -> channels before the first step
    for step in range(1, iterative_steps + 1):
        config_list, plans = [], []
        for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d,)):
            root = group[0].dep.target.module
            channels = graph.get_out_channels(root)
            members: dict[str, list[int]] = {}  # member -> its channel for each root channel
            for dep, idxs in group:
                module = dep.target.module
                if (
                    isinstance(module, target_type)
                    and module in names
                    and graph.is_out_channel_pruning_fn(dep.handler)
                ):
                    members.setdefault(names[module], [int(i) for i in idxs])
            if not members:
                continue
            start = initial.setdefault(names[root], channels)
            keep = int(start * (1 - ratio * step / iterative_steps))
            if round_to:
                keep -= keep % round_to
            keep = max(keep, min(round_to or 1, channels))
            if keep >= channels:
                continue
            # NNI masks int(n * sparse_ratio) channels; the half keeps float error off the count
            setting = {
                "target_names": ["weight"],
                "sparse_ratio": (channels - keep + 0.5) / channels,
            }
            if all(idxs == list(range(channels)) for idxs in members.values()):
                group_id = {"dependency_group_id": names[root]} if len(members) > 1 else {}
                config_list.append({"op_names": sorted(members), **setting, **group_id})
            else:  # members index the channels differently: NNI cannot share one ranking
                config_list.extend({"op_names": [name], **setting} for name in members)
            plans.append((root, channels, members))
        if not plans:
            break
        masks = _nni_masks(pruner_cls, model, config_list)
        for root, channels, members in plans:
            kept = torch.zeros(channels, dtype=torch.bool)
            for name, idxs in members.items():
                mask = masks[name]["weight"]
                member_kept = mask.reshape(mask.shape[0], -1).ne(0).any(dim=1).cpu()
                kept |= member_kept[idxs]
            remove = (~kept).nonzero().flatten().tolist()
            if remove:
                pruner = graph.get_pruner_of_module(root)
                graph.get_pruning_group(root, pruner.prune_out_channels, remove).prune()
    return graph.pruning_history()


def _plain_history(history: Sequence) -> list[list]:
    """torch-pruning's history as [module_name, is_out_channels, [indices]] plain lists."""
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


def apply_prune_history(
    model: nn.Module, example_inputs: Any, history: list | dict
) -> nn.Module:
    """Rebuild a pruned structure on a freshly built, unpruned ``model`` (in place).

    ``history`` is ``PruneResult.history`` (or ``PruneResult.to_dict()``) as saved in a
    checkpoint's ``prune_history``. Afterwards ``model.load_state_dict(saved_state)``
    reproduces the pruned model exactly, without pickled code.
    """
    import torch_pruning as tp

    if isinstance(history, dict):
        if "history" not in history:
            raise ConfigError("prune_history: dict has no 'history' entry")
        history = history["history"]
    if not isinstance(history, (list, tuple)):
        raise ConfigError(
            f"prune_history: expected a list of [module_name, is_out, indices], "
            f"got {type(history).__name__}"
        )
    modules = dict(model.named_modules())
    for i, entry in enumerate(history):
        ok = (
            isinstance(entry, (list, tuple))
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], bool)
            and isinstance(entry[2], (list, tuple))
            and all(isinstance(j, int) and not isinstance(j, bool) for j in entry[2])
        )
        if not ok:
            raise ConfigError(
                f"prune_history[{i}]: {str(entry)[:80]!r} is not [module_name, is_out, indices]"
            )
        if entry[0] not in modules:
            raise ConfigError(
                f"prune_history[{i}]: the model has no module {entry[0]!r} "
                "(was the checkpoint made from another net_type?)"
            )
    training = model.training
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=_on_device(example_inputs, model)
            )
            # one entry at a time, so each entry's indices are checked against the channel
            # count it will see (torch-pruning silently ignores out-of-range ones)
            for i, (name, is_out, idxs) in enumerate(history):
                module = modules[name]
                count = graph.get_out_channels if is_out else graph.get_in_channels
                channels = count(module)
                if channels is None or len(set(idxs)) != len(idxs) or not all(
                    0 <= j < channels for j in idxs
                ) or len(idxs) >= channels:
                    raise ConfigError(
                        f"prune_history[{i}]: indices for {name!r} do not fit its {channels} "
                        "channels (was it saved from another net_type or num_classes?)"
                    )
                graph.load_pruning_history([[name, is_out, list(idxs)]])
    finally:
        model.train(training)
    return model


def measure_model(model: nn.Module, example_inputs: torch.Tensor, runs: int = 30) -> dict:
    """Parameters, MACs and CPU latency (ms, batch 1, one thread, median of ``runs``).

    The model is measured on a CPU copy in eval mode; the caller's model, its mode and
    torch's thread count are left as they were.
    """
    if runs < 1:
        raise ConfigError(f"measure_model: runs must be >= 1, got {runs!r}")
    from accelerate.utils import extract_model_from_parallel

    # without Accelerate's mixed-precision forward: every measurement times float32
    cpu_model = extract_model_from_parallel(copy.deepcopy(model), keep_fp32_wrapper=False)
    cpu_model = cpu_model.cpu().eval()
    x = example_inputs[:1].detach().cpu()
    params, macs = count_params_and_macs(cpu_model, x)
    threads = torch.get_num_threads()
    times = []
    try:
        torch.set_num_threads(1)
        with torch.inference_mode():
            for _ in range(5):
                cpu_model(x)
            for _ in range(runs):
                start = time.perf_counter()
                cpu_model(x)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {"params": params, "macs": macs, "latency_ms": 1000 * statistics.median(times)}


def prune_for_training(trainer: Any, model: nn.Module) -> tuple[nn.Module, Callback]:
    """The whole pruning flow of a training run, in one place: measure ``model``, prune it
    (``prune_method``, ``prune_ratio``, ...), measure again, and return the pruned model
    with a :class:`PruneReport` callback that measures the fine-tuned model at the end.

    Called once by the engine on the plain model, before the optimizer is built and before
    ``accelerator.prepare``. ``trainer.example_inputs()`` traces the model and
    ``trainer.evaluate_model(model)`` gives the test metrics (top-1 for classifiers).
    """
    cfg, example = trainer.cfg, trainer.example_inputs()
    before = {**measure_model(model, example), **trainer.evaluate_model(model)}
    result = prune_model(model, example, method=cfg.prune_method, ratio=cfg.prune_ratio,
                         round_to=cfg.round_to or None, global_pruning=cfg.prune_global,
                         ignored_layers=cfg.prune_ignore or None,
                         iterative_steps=cfg.prune_steps, backend=cfg.prune_backend)
    after = {**measure_model(model, example), **trainer.evaluate_model(model)}
    trainer.prune_history = (trainer.prune_history or []) + result.history
    report = {"method": cfg.prune_method, "backend": cfg.prune_backend,
              "ratio": cfg.prune_ratio, "round_to": cfg.round_to, "global": cfg.prune_global,
              "input_shape": list(getattr(example, "shape", [])),
              "before_pruning": before, "after_pruning": after}
    metrics = ", ".join(f"test {k} {before[k]:.2f} -> {after[k]:.2f}" for k in before
                        if k not in ("params", "macs", "latency_ms"))
    trainer.log(f"pruned ({cfg.prune_method}, ratio {cfg.prune_ratio}): params "
                f"{before['params']:,} -> {after['params']:,}, MACs {before['macs']:,} -> "
                f"{after['macs']:,}, CPU latency {before['latency_ms']:.2f} -> "
                f"{after['latency_ms']:.2f} ms" + (f", {metrics}" if metrics else ""))
    return model, PruneReport(report, example)


class PruneReport(Callback):
    """After training: measures the fine-tuned model, adds the last and best test values of
    the metrics measured before pruning, and writes ``prune_report.json`` (main process)."""

    def __init__(self, report: dict, example_inputs: Any) -> None:
        self.report, self.example_inputs = report, example_inputs

    def on_train_end(self, logs: dict) -> None:
        import json

        from pbt.checkpoint import write_json_atomic

        trainer = self.trainer
        if not trainer.is_main_process:
            return
        final = measure_model(trainer.unwrapped_model, self.example_inputs)
        for name in self.report["before_pruning"]:
            if name in final:
                continue
            values = [e["test"][name] for e in trainer.history if name in e.get("test", {})]
            final[name] = values[-1] if values else None
            final[f"best_{name}"] = max(values) if values else None
        self.report["after_finetuning"] = final
        write_json_atomic(trainer.run_dir / "prune_report.json", self.report)
        trainer.log("prune report: " + json.dumps(self.report))


class SlimRegularizer(Callback):
    """Network Slimming's BN-sparsity term: adds ``slim_reg * sign(gamma)`` to BN grads.

    That is the gradient of ``slim_reg * sum(|gamma|)``; it drives unneeded channels'
    BatchNorm scales towards zero so ``method="slim"`` can remove them. It is added once
    per optimizer step (on the micro-batch where Accelerate synchronises gradients), and
    multiplied by the fp16 loss scale when one is active, since gradients are still scaled
    right after backward.
    """

    def __init__(self, slim_reg: float = 1e-4) -> None:
        if isinstance(slim_reg, bool) or not isinstance(slim_reg, (int, float)) or slim_reg < 0:
            raise ConfigError(f"slim_reg: {slim_reg!r} must be a number >= 0")
        self.slim_reg = float(slim_reg)

    def on_after_backward(self, batch: int, logs: dict) -> None:
        accelerator = getattr(self.trainer, "accelerator", None)
        if accelerator is not None and not getattr(accelerator, "sync_gradients", True):
            return
        scale = 1.0
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            scale = float(scaler.get_scale())
        step = self.slim_reg * scale
        with torch.no_grad():
            for module in self.trainer.unwrapped_model.modules():
                if (
                    isinstance(module, nn.modules.batchnorm._BatchNorm)
                    and module.weight is not None
                    and module.weight.grad is not None
                ):
                    module.weight.grad.add_(torch.sign(module.weight), alpha=step)
