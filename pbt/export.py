"""Export a pbt checkpoint (pruned or not) to ONNX and check it against PyTorch.

    python -m pbt.export runs/exp1 --onnx model.onnx [--input-size W H]

A run directory means its ``best.pth`` (else ``last.pth``). The checkpoint loads with
``torch.load(weights_only=True)``; the network is rebuilt from ``net_type`` and
``num_classes`` (and ``prune_history`` for pruned models), exported with a dynamic batch
dimension, compared with onnxruntime, and timed. Needs the optional extra:
``pip install -e ".[export]"``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pbt.config import ConfigError

INSTALL_HINT = 'ONNX export needs the optional extra: pip install -e ".[export]"'
REQUIRED_KEYS = ("model", "net_type", "num_classes")


def require_onnx() -> None:
    """Raise ImportError with the install line when onnx / onnxruntime are missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint file for ``path``: itself, or a run dir's best.pth, else last.pth."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pth", "last.pth"):
            if (path / name).is_file():
                return path / name
        raise ConfigError(f"checkpoint: run dir {str(path)!r} has neither best.pth nor last.pth")
    if not path.is_file():
        raise ConfigError(f"checkpoint: {str(path)!r} does not exist")
    return path


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the network of a pbt weights checkpoint (file or run dir), in eval mode.

    Returns ``(model, checkpoint_dict)``; nothing pickled is executed.
    """
    from pbt.checkpoint import safe_load, strip_module_prefix
    from pbt.models import build_model
    from pbt.prune import apply_prune_history

    path = resolve_checkpoint(path)
    ckpt = safe_load(path, key="checkpoint")
    if not isinstance(ckpt, dict):
        raise ConfigError(f"checkpoint: {str(path)!r} holds a {type(ckpt).__name__}, not a dict")
    for key in REQUIRED_KEYS:
        if key not in ckpt:
            raise ConfigError(f"checkpoint: {str(path)!r} has no {key!r} entry")
    num_classes = ckpt["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(
            f"checkpoint: {str(path)!r} has num_classes {num_classes!r}, not a positive integer"
        )
    if not isinstance(ckpt["model"], dict):
        raise ConfigError(f"checkpoint: {str(path)!r} 'model' entry is not a state_dict")
    model = build_model(ckpt["net_type"], num_classes, width_mult=ckpt.get("width_mult", 1.0))
    if ckpt.get("prune_history"):
        apply_prune_history(model, example_input(ckpt), ckpt["prune_history"])
    state = strip_module_prefix(ckpt["model"])
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(
            f"checkpoint: {str(path)!r} weights do not fit {ckpt['net_type']}: "
            f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}"
        ) from None
    return model.eval(), ckpt


def example_input(
    ckpt: dict, input_size: tuple[int, int] | list[int] | None = None, batch: int = 1
) -> torch.Tensor:
    """A reproducible random batch of size ``[W, H]`` (given, else the checkpoint's)."""
    size = input_size if input_size is not None else ckpt.get("input_size", (224, 224))
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ConfigError(f"input_size: {size!r} must be two positive integers [W, H]")
    width, height = size
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, height, width, generator=generator)


def to_onnx(
    model: nn.Module, example_inputs: torch.Tensor, onnx_path: str | Path, opset: int = 17
) -> Path:
    """Export ``model`` (CPU, eval) to ``onnx_path`` with a dynamic batch dimension."""
    import onnx

    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated but, unlike the dynamo one, exports
            # these CNNs in about a second with no extra dependencies.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example_inputs,),
                str(onnx_path),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
    finally:
        model.train(training)
    onnx.checker.check_model(str(onnx_path))
    return onnx_path


def _session(onnx_path: str | Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def onnx_max_abs_diff(onnx_path: str | Path, model: nn.Module, inputs: torch.Tensor) -> float:
    """Largest |onnxruntime - PyTorch| over the outputs for ``inputs``."""
    session = _session(onnx_path)
    ort_out = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            torch_out = model(inputs)
    finally:
        model.train(training)
    return float((torch.from_numpy(ort_out) - torch_out).abs().max())


def onnx_latency_ms(
    onnx_path: str | Path, example_inputs: torch.Tensor, runs: int = 30, threads: int = 1
) -> float:
    """onnxruntime CPU latency at batch 1: median of ``runs`` after warm-up, in ms."""
    session = _session(onnx_path, threads)
    feed = {session.get_inputs()[0].name: example_inputs[:1].numpy()}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def export_onnx(
    checkpoint: str | Path,
    onnx_path: str | Path,
    input_size: tuple[int, int] | list[int] | None = None,
    runs: int = 30,
    atol: float = 1e-4,
) -> dict:
    """Export a checkpoint (file or run dir) to ONNX, verify it, and time it.

    Returns ``{"onnx_path", "checkpoint", "net_type", "pruned", "params", "max_abs_diff",
    "ort_latency_ms"}``. Raises RuntimeError when onnxruntime differs from PyTorch by more
    than ``atol``, ConfigError for bad inputs, ImportError (with the install line) when
    onnx / onnxruntime are missing.
    """
    require_onnx()
    if runs < 1:
        raise ConfigError(f"runs: {runs!r} must be >= 1")
    ckpt_path = resolve_checkpoint(checkpoint)
    model, ckpt = load_checkpoint(ckpt_path)
    x = example_input(ckpt, input_size)
    onnx_path = to_onnx(model, x, onnx_path)
    # batch 3 (export used batch 1) also proves the batch dimension is dynamic
    diff = onnx_max_abs_diff(onnx_path, model, example_input(ckpt, input_size, batch=3))
    if not diff <= atol:
        raise RuntimeError(
            f"ONNX check failed for {str(onnx_path)!r}: onnxruntime differs from PyTorch "
            f"by {diff:.3g} (limit {atol:g})"
        )
    return {
        "onnx_path": str(onnx_path),
        "checkpoint": str(ckpt_path),
        "net_type": ckpt["net_type"],
        "pruned": bool(ckpt.get("prune_history")),
        "params": sum(p.numel() for p in model.parameters()),
        "max_abs_diff": diff,
        "ort_latency_ms": onnx_latency_ms(onnx_path, x, runs),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m pbt.export", description="Export a pbt checkpoint to ONNX."
    )
    parser.add_argument("checkpoint", help="a .pth weights checkpoint or a run directory")
    parser.add_argument("--onnx", required=True, help="output .onnx file")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("W", "H"))
    parser.add_argument("--runs", type=int, default=30, help="timed runs for the latency")
    args = parser.parse_args(argv)
    try:
        require_onnx()
    except ImportError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        info = export_onnx(args.checkpoint, args.onnx, args.input_size, args.runs)
    except (ConfigError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"exported {info['checkpoint']} ({info['net_type']}, "
        f"{'pruned' if info['pruned'] else 'unpruned'}, {info['params']:,} params) "
        f"-> {info['onnx_path']}"
    )
    print(f"onnxruntime vs PyTorch max abs diff: {info['max_abs_diff']:.3g} (limit 1e-4)")
    print(
        f"onnxruntime CPU latency (batch 1, 1 thread, median of {args.runs}): "
        f"{info['ort_latency_ms']:.2f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
