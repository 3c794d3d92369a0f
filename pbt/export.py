"""Export a pbt checkpoint (pruned or not) to ONNX fp32, fp16 and int8, and measure each.

    python -m pbt.export runs/exp1 [--onnx model.onnx] [--fp16] [--int8] [--input-size W H]

A run directory means its ``best.pth`` (else ``last.pth``). The checkpoint loads with
``torch.load(weights_only=True)``; the network is rebuilt from ``net_type`` and
``num_classes`` (and ``prune_history`` for pruned models), exported with a dynamic batch
dimension and compared with onnxruntime. int8 is onnxruntime's static quantization,
calibrated on the run's training images. Every file is timed and evaluated on the run's
test set; ``deploy_report.json`` holds it all. Needs the optional extra:
``pip install -e ".[export]"``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pbt.config import ConfigError

OPSET = 17  # recorded in deploy_report.json; 17 is what mobile runtimes widely accept
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
            raise ConfigError(f"checkpoint: {str(path)!r} is not a pbt checkpoint: it has no "
                              f"{key!r} entry (pbt's hold {', '.join(REQUIRED_KEYS)})")
    num_classes = ckpt["num_classes"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(
            f"checkpoint: {str(path)!r} has num_classes {num_classes!r}, not a positive integer"
        )
    if not isinstance(ckpt["model"], dict):
        raise ConfigError(f"checkpoint: {str(path)!r} 'model' entry is not a state_dict")
    try:
        model = build_model(ckpt["net_type"], num_classes,
                            width_mult=ckpt.get("width_mult", 1.0))
    except ConfigError as err:
        raise ConfigError(f"checkpoint: {str(path)!r}: {err}") from None
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
    model: nn.Module, example_inputs: torch.Tensor, onnx_path: str | Path, opset: int = OPSET,
    *, check: Callable[[Path], None] | None = None,
) -> Path:
    """Export ``model`` (CPU, eval) to ``onnx_path`` with a dynamic batch dimension.

    The file passes ``onnx.checker`` (full check). ``check(path)`` (say, a parity test)
    runs on the written file before it takes the name ``onnx_path``: when it raises, the
    previous file at ``onnx_path`` stays as it was.
    """
    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), _written_whole(onnx_path) as partial:
            # The TorchScript exporter is deprecated but, unlike the dynamo one, exports
            # these CNNs in about a second with no extra dependencies.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example_inputs,),
                str(partial),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
            check_onnx(partial, onnx_path)
            if check is not None:
                check(partial)
    finally:
        model.train(training)
    return onnx_path


def check_onnx(path: str | Path, name: str | Path | None = None) -> None:
    """``onnx.checker.check_model(full_check=True)`` on the file ``path``; a RuntimeError
    naming ``name`` (the file's final name, default ``path``) when it fails."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"{str(name or path)!r} fails onnx.checker: {first}") from None


def sort_topologically(graph: Any) -> None:
    """Reorder ``graph.node`` (an onnx GraphProto, in place) so that every node comes after
    the nodes that make its inputs, keeping the given order where it already is one."""
    made = {name for name in [*(v.name for v in graph.input),
                              *(t.name for t in graph.initializer),
                              *(t.values.name for t in graph.sparse_initializer)]}
    made.add("")  # an omitted optional input
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if _node_inputs(node) <= made:
                ordered.append(node)
                made.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            missing = sorted(_node_inputs(waiting[0]) - made)
            raise RuntimeError(f"ONNX graph {graph.name!r}: node {waiting[0].name!r} reads "
                               f"{missing}, which no node, input or initializer makes")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)


def _node_inputs(node: Any) -> set[str]:
    """The names ``node`` reads: its inputs and what its subgraphs (If, Loop) read from
    the enclosing graph."""
    names = set(node.input)
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            inner = {v.name for v in sub.input} | {t.name for t in sub.initializer}
            for sub_node in sub.node:
                inner.update(sub_node.output)
            for sub_node in sub.node:
                names |= _node_inputs(sub_node) - inner
    return names


@contextmanager
def _written_whole(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to, renamed onto ``path`` when the block
    succeeds: a failed or killed export leaves the previous file whole, never half of one."""
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


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


def _median_ms(call: Callable[[], Any], runs: int) -> float:
    """Median wall time of ``call`` over ``runs`` runs after 3 warm-up runs, in ms."""
    for _ in range(3):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def onnx_latency_ms(
    onnx_path: str | Path, example_inputs: torch.Tensor, runs: int = 30, threads: int = 1
) -> float:
    """onnxruntime CPU latency at batch 1: median of ``runs`` after warm-up, in ms."""
    session = _session(onnx_path, threads)
    feed = {session.get_inputs()[0].name: example_inputs[:1].numpy()}
    return _median_ms(lambda: session.run(None, feed), runs)


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
    than ``atol`` (the file is then not written), ConfigError for bad inputs (before
    anything is written), ImportError (with the install line) when onnx / onnxruntime are
    missing.
    """
    require_onnx()
    if runs < 1:
        raise ConfigError(f"runs: {runs!r} must be >= 1")
    onnx_path = _output_path(onnx_path)
    ckpt_path = resolve_checkpoint(checkpoint)
    model, ckpt = load_checkpoint(ckpt_path)
    x = example_input(ckpt, input_size)
    # batch 3 (export used batch 1) also proves the batch dimension is dynamic
    batch3 = example_input(ckpt, input_size, batch=3)
    diffs = []

    def parity(written: Path) -> None:
        diffs.append(onnx_max_abs_diff(written, model, batch3))
        if not diffs[-1] <= atol:
            raise parity_error(onnx_path, diffs[-1], atol)

    to_onnx(model, x, onnx_path, check=parity)
    diff = diffs[-1]
    return {
        "onnx_path": str(onnx_path),
        "checkpoint": str(ckpt_path),
        "net_type": ckpt["net_type"],
        "pruned": bool(ckpt.get("prune_history")),
        "params": sum(p.numel() for p in model.parameters()),
        "max_abs_diff": diff,
        "ort_latency_ms": onnx_latency_ms(onnx_path, x, runs),
    }


def parity_error(onnx_path: str | Path, diff: float, atol: float) -> RuntimeError:
    """The error of an fp32 ONNX file that onnxruntime runs differently from PyTorch."""
    return RuntimeError(f"ONNX check failed for {str(onnx_path)!r}: onnxruntime differs from "
                        f"PyTorch by {diff:.3g} (limit {atol:g}); the file was not written")


# -- fp16 and int8 ------------------------------------------------------------------------


def to_fp16(onnx_path: str | Path, fp16_path: str | Path) -> Path:
    """A float16 copy of an fp32 ONNX model (for GPUs and mobile GPUs). Input and output
    stay float32, so it is fed and read exactly like the fp32 file."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    fp16_path = Path(fp16_path)
    with warnings.catch_warnings():
        # it warns for every constant it clamps into float16's range
        warnings.simplefilter("ignore", UserWarning)
        model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    # the converter appends its input casts after the nodes that read them: onnxruntime
    # sorts the graph itself, onnx.checker and stricter consumers refuse it unsorted
    sort_topologically(model.graph)
    with _written_whole(fp16_path) as partial:
        onnx.save(model, str(partial))
        check_onnx(partial, fp16_path)
    return fp16_path


def edge_nodes(onnx_path: str | Path) -> list[str]:
    """Names of the first Conv and the last Gemm / MatMul: the layers int8 hurts most."""
    import onnx

    nodes = onnx.load(str(onnx_path)).graph.node
    convs = [node.name for node in nodes if node.op_type == "Conv"]
    heads = [node.name for node in nodes if node.op_type in ("Gemm", "MatMul")]
    return convs[:1] + heads[-1:]


def to_int8(onnx_path: str | Path, int8_path: str | Path, calibration: Iterable[np.ndarray],
            per_channel: bool = True, exclude_first_last: bool = False) -> list[str]:
    """Static int8 quantization with onnxruntime: QDQ format, int8 weights (per output
    channel unless ``per_channel=False``), uint8 activations whose ranges are the min / max
    seen on the ``calibration`` batches. Returns the names of the nodes left in float."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    int8_path = Path(int8_path)
    prepared = int8_path.with_name(int8_path.stem + ".prepared.onnx")
    try:
        # shape inference and graph fusions first, as onnxruntime's docs advise
        quant_pre_process(str(onnx_path), str(prepared))
        excluded = edge_nodes(prepared) if exclude_first_last else []
        feeds = iter([{"input": batch} for batch in calibration])

        class Feeds(CalibrationDataReader):
            def get_next(self) -> dict | None:
                return next(feeds, None)

        with _written_whole(int8_path) as partial:
            quantize_static(str(prepared), str(partial), Feeds(),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax)
            check_onnx(partial, int8_path)
    finally:
        prepared.unlink(missing_ok=True)
        for leftover in int8_path.parent.glob("augmented_model*.onnx"):
            leftover.unlink(missing_ok=True)
    return excluded


# -- the run's data -------------------------------------------------------------------------


@dataclass
class RunData:
    """A run's test set and training set, both read through its test transform."""

    test: Any
    train: Any
    config_file: Path
    test_source: str
    train_source: str
    model_file: str | None  # what a pruned run started from (its unpruned weights)


def run_data(ckpt_path: Path, ckpt: dict, config_file: str | Path | None = None,
             input_size: Sequence[int] | None = None) -> RunData | None:
    """The data of the run a checkpoint came from: its ``config.yaml`` (beside it, or
    ``config_file``) names train / test data (none: the digits under its work_dir) and
    the normalisation. None when there is no config to read."""
    from pbt.config import read_yaml
    from pbt.data import build_dataset, build_transforms, materialise_digits

    config_file = Path(config_file) if config_file else ckpt_path.parent / "config.yaml"
    if not config_file.is_file():
        if config_file != ckpt_path.parent / "config.yaml":
            raise ConfigError(f"--config: {str(config_file)!r} does not exist")
        return None
    cfg = read_yaml(config_file)
    train_data, test_data = cfg.get("train_data"), cfg.get("test_data")
    try:
        if not (train_data and test_data):  # the recipe's default: digits under work_dir
            in_run = config_file.parent.parent / "digits"
            root = in_run if in_run.is_dir() else Path(cfg.get("work_dir") or ".") / "digits"
            train_dir, test_dir = materialise_digits(root, int(cfg.get("seed") or 0))
            train_data, test_data = train_data or str(train_dir), test_data or str(test_dir)
        transform = build_transforms(list(input_size or ckpt.get("input_size") or
                                          cfg["input_size"]),
                                     cfg.get("rgb_mean", [0.5] * 3), cfg.get("rgb_std", [0.5] * 3),
                                     train=False)
        names = ckpt.get("class_names")
        test = build_dataset(test_data, transform, class_names=names, key="test_data")
        train = build_dataset(train_data, transform, class_names=names, check_images=False,
                              key="train_data")
    except (ConfigError, KeyError) as err:
        raise ConfigError(f"{str(config_file)!r}: {err}") from None
    return RunData(test, train, config_file, str(test_data), str(train_data),
                   cfg.get("model_file"))


def calibration_batches(dataset: Any, images: int, batch_size: int = 32,
                        seed: int = 0) -> list[np.ndarray]:
    """``images`` training images (a seeded random choice), in batches, as float32 arrays."""
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(dataset), generator=generator)[:images].tolist()
    batches = []
    for start in range(0, len(chosen), batch_size):
        batch = [dataset[index][0] for index in chosen[start:start + batch_size]]
        batches.append(torch.stack(batch).numpy())
    return batches


def top1(predicts: Sequence[Callable[[np.ndarray], np.ndarray]], dataset: Any) -> list[float]:
    """Test top-1 (%) of each predictor (float32 batch -> logits) over ``dataset``, read
    once for all of them."""
    from torch.utils.data import DataLoader

    correct, total = [0] * len(predicts), 0
    for images, labels in DataLoader(dataset, batch_size=64, num_workers=0):
        batch = images.numpy()
        for index, predict in enumerate(predicts):
            correct[index] += int((np.asarray(predict(batch)).argmax(1) == labels.numpy()).sum())
        total += int(labels.numel())
    return [100.0 * count / max(total, 1) for count in correct]


# -- the deploy report ----------------------------------------------------------------------


def _torch_predict(model: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    return predict


def _onnx_predict(session: Any) -> Callable[[np.ndarray], np.ndarray]:
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _measure(predict: Callable[[np.ndarray], np.ndarray], example: torch.Tensor,
             runs: int) -> dict[str, float]:
    one, many = example[:1].numpy(), example.numpy()
    return {"batch1": round(_median_ms(lambda: predict(one), runs), 3),
            "batch32": round(_median_ms(lambda: predict(many), max(3, runs // 3)), 3)}


def _variant_rows(label: str, model: nn.Module, source: Path, onnx_path: Path,
                  example: torch.Tensor, options: dict) -> tuple[list[dict], list[Callable]]:
    """torch fp32, then ONNX fp32 (checked against torch), fp16 and int8 of one model:
    the rows without top-1, and the predictor of each row (the caller evaluates them all
    in one pass over the test set)."""
    from pbt.prune import count_params_and_macs

    params, macs = count_params_and_macs(model, example[:1])
    suffix = f" ({label})" if label else ""
    predicts = [_torch_predict(model)]
    threads = torch.get_num_threads()
    torch.set_num_threads(options["threads"])
    try:
        torch_latency = _measure(predicts[0], example, options["runs"])
    finally:
        torch.set_num_threads(threads)
    rows = [{"name": f"torch fp32{suffix}", "variant": label, "format": "torch",
             "precision": "fp32", "file": str(source), "size_bytes": source.stat().st_size,
             "params": params, "macs": macs, "latency_ms": torch_latency}]
    reference = predicts[0](example.numpy())
    diffs: dict[str, float] = {}

    def max_abs_diff(path: Path) -> float:
        return float(np.abs(_onnx_predict(_session(path))(example.numpy()) - reference).max())

    def parity(written: Path) -> None:
        diffs["fp32"] = max_abs_diff(written)
        if not diffs["fp32"] <= options["atol"]:
            raise parity_error(onnx_path, diffs["fp32"], options["atol"])

    to_onnx(model, example[:1], onnx_path, opset=OPSET, check=parity)
    files = [("fp32", onnx_path, {})]
    if options["fp16"]:
        files.append(("fp16", to_fp16(onnx_path, onnx_path.with_suffix(".fp16.onnx")), {}))
    if options["int8"]:
        int8_path = onnx_path.with_suffix(".int8.onnx")
        excluded = to_int8(onnx_path, int8_path, options["calibration"],
                           per_channel=options["per_channel"],
                           exclude_first_last=options["exclude_first_last"])
        files.append(("int8", int8_path, {"excluded_nodes": excluded}))
    for precision, path, extra in files:
        predict = _onnx_predict(_session(path, options["threads"]))
        diff = diffs[precision] if precision in diffs else max_abs_diff(path)
        predicts.append(predict)
        rows.append({"name": f"onnx {precision}{suffix}", "variant": label, "format": "onnx",
                     "precision": precision, "file": str(path),
                     "size_bytes": path.stat().st_size, "params": params, "macs": macs,
                     "latency_ms": _measure(predict, example, options["runs"]),
                     "max_abs_diff": diff, **extra})
    return rows, predicts


def deploy_report(checkpoint: str | Path, onnx_path: str | Path, *, fp16: bool = False,
                  int8: bool = False, calib_images: int = 300, int8_tolerance: float = 1.0,
                  per_channel: bool = True, exclude_first_last: bool = False,
                  baseline: str | Path | None = None, config: str | Path | None = None,
                  input_size: Sequence[int] | None = None, threads: int = 1, runs: int = 30,
                  atol: float = 1e-4) -> dict:
    """Export a checkpoint to ONNX fp32 (and fp16 / int8) and measure every form of it.

    Each row (torch fp32, then each ONNX file) has file size, params, MACs, latency at
    batch 1 and 32 (``threads`` CPU threads, median of ``runs``) and test top-1 through
    the run's own test transform. A pruned run is measured beside the unpruned weights it
    started from (its ``model_file``, or ``baseline``). The report is also written as
    ``deploy_report.json`` beside ``onnx_path``; ``report["warnings"]`` flags every int8
    model that loses more than ``int8_tolerance`` points of top-1. Bad input raises
    ConfigError before anything is written; an fp32 file that differs from PyTorch by more
    than ``atol``, or one ``onnx.checker`` refuses, raises RuntimeError.
    """
    from pbt.checkpoint import write_json_atomic

    require_onnx()
    # every input is checked before anything is written
    for name, value in (("runs", runs), ("threads", threads), ("calib_images", calib_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} (--{name.replace('_', '-')}) has value {value!r}; "
                              "it must be an integer >= 1")
    if not math.isfinite(int8_tolerance):
        raise ConfigError(f"int8_tolerance (--int8-tolerance) has value {int8_tolerance!r}; "
                          "it must be a finite number of top-1 points")
    onnx_path = _output_path(onnx_path)
    ckpt_path = resolve_checkpoint(checkpoint)
    model, ckpt = load_checkpoint(ckpt_path)
    example = example_input(ckpt, input_size, batch=32)
    baseline_model = None if baseline is None else _load_baseline(baseline)
    notes = []
    try:
        data = run_data(ckpt_path, ckpt, config, input_size)
    except ConfigError as err:
        if int8 or config is not None:
            raise
        data = None  # the run's data moved or lies elsewhere: export, without top-1
        notes.append(f"no top-1: {err}")
    if int8 and data is None:
        raise ConfigError(
            f"--int8: no calibration images: {str(ckpt_path.parent / 'config.yaml')!r} does not "
            "exist; pass the training config with --config cfg.yaml")
    pruned = bool(ckpt.get("prune_history"))
    if baseline is None and pruned and data is not None and data.model_file:
        if Path(data.model_file).is_file():
            try:
                baseline_model = load_checkpoint(data.model_file)[0]
                baseline = data.model_file
            except ConfigError as err:  # say so, but export what was asked for
                notes.append(f"the unpruned model_file the run started from is not measured: "
                             f"{err}")
        else:
            notes.append(f"the unpruned model_file {data.model_file!r} the run started from is "
                         "not found from here; --baseline path/to/it measures it too")
    report: dict[str, Any] = {
        "checkpoint": str(ckpt_path), "net_type": ckpt["net_type"], "pruned": pruned,
        "input_size": list(example.shape[3:1:-1]), "opset": OPSET,
        "latency": {"device": _cpu_name(), "threads": threads, "runs": runs,
                    "statistic": "median ms of `runs` runs at batch 1 and runs // 3 (at "
                                 "least 3) at batch 32, after 3 warm-up runs"},
        "versions": {"torch": torch.__version__, "onnxruntime": _version("onnxruntime")},
        "test_data": None if data is None else {"source": data.test_source,
                                                "images": len(data.test),
                                                "config": str(data.config_file)},
        "calibration": None, "int8_tolerance": int8_tolerance, "rows": [], "warnings": [],
        "notes": notes}
    if fp16:
        report["latency"]["fp16_note"] = (
            "onnxruntime's CPU provider casts an fp16 model's input back to fp32 and runs it "
            "in fp32 (only the weights are rounded), so its CPU latency is no guide to a GPU's")
    options = {"fp16": fp16, "int8": int8, "threads": threads, "runs": runs, "atol": atol,
               "per_channel": per_channel, "exclude_first_last": exclude_first_last}
    if int8:
        options["calibration"] = calibration_batches(data.train, calib_images)
        report["calibration"] = {
            "source": data.train_source, "images": min(calib_images, len(data.train)),
            "chosen": "random, seed 0", "transform": "the run's test transform",
            "method": "MinMax", "format": "QDQ", "weights": "int8, per channel" if per_channel
            else "int8, per tensor", "activations": "uint8"}
    variants = [("pruned" if pruned else ("" if baseline is None else "model"), model,
                 ckpt_path, onnx_path)]
    if baseline is not None:
        variants.insert(0, ("unpruned", baseline_model, resolve_checkpoint(baseline),
                            onnx_path.with_name(onnx_path.stem + ".unpruned.onnx")))
    predicts = []
    for label, net, source, path in variants:
        rows, row_predicts = _variant_rows(label, net, source, path, example, options)
        report["rows"] += rows
        predicts += row_predicts
    accuracies = top1(predicts, data.test) if data is not None else [None] * len(predicts)
    first = report["rows"][0]["latency_ms"]
    torch_top1 = None  # of the variant's torch row, which comes first in each variant
    for row, accuracy in zip(report["rows"], accuracies):
        row["speedup"] = {k: round(first[k] / row["latency_ms"][k], 2) for k in first}
        if row["format"] == "torch":
            torch_top1 = accuracy
        row["top1"] = accuracy
        row["top1_diff"] = None if accuracy is None else accuracy - torch_top1
        if row["precision"] == "int8" and row["top1_diff"] is not None \
                and row["top1_diff"] < -int8_tolerance:
            report["warnings"].append(
                f"{row['name']} loses {-row['top1_diff']:.2f} points of top-1, more than the "
                f"tolerance of {int8_tolerance:g}: calibrate on more images (--calib-images "
                f"{2 * calib_images}), leave the first and last layer in float "
                "(--exclude-first-last)" + ("" if per_channel else
                                            ", or quantize weights per channel (drop "
                                            "--per-tensor)"))
    write_json_atomic(onnx_path.parent / "deploy_report.json", report)
    return report


def _load_baseline(baseline: str | Path) -> nn.Module:
    try:
        return load_checkpoint(baseline)[0]
    except ConfigError as err:
        raise ConfigError(f"--baseline: {err}") from None


def _output_path(onnx_path: str | Path) -> Path:
    """``onnx_path`` as a Path, when it can be written: not a folder, under a folder (or
    where one can be made) that is writable."""
    from pbt.rundir import check_writable

    onnx_path = Path(onnx_path)
    if onnx_path.is_dir():
        raise ConfigError(f"--onnx: {str(onnx_path)!r} is a folder; name the .onnx file "
                          "(the other files go beside it)")
    check_writable(onnx_path.parent, "--onnx")
    return onnx_path


def _version(module: str) -> str:
    import importlib

    return str(getattr(importlib.import_module(module), "__version__", "?"))


def format_report(report: dict) -> str:
    """The report as a Markdown table, with what was measured how above it."""
    latency, test = report["latency"], report["test_data"]
    width, height = report["input_size"]
    lines = [
        f"{report['checkpoint']} ({report['net_type']}, input {width}x{height}, opset "
        f"{report['opset']}); latency: {latency['device']}, {latency['threads']} thread(s), "
        f"median of {latency['runs']}; top-1: "
        + (f"{test['images']} test images of {test['source']}" if test else
           "no test data (no config.yaml beside the checkpoint: pass --config)"),
        "",
        "| model | file | params | MACs | ms batch 1 | ms batch 32 | speed-up (b1) | top-1 % "
        "| Δ top-1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        top = "n/a" if row["top1"] is None else f"{row['top1']:.2f}"
        diff = "" if row["top1_diff"] is None or row["format"] == "torch" \
            else f"{row['top1_diff']:+.2f}"
        lines.append(
            f"| {row['name']} | {row['size_bytes'] / 1e6:.2f} MB | {row['params'] / 1e6:.2f} M "
            f"| {row['macs'] / 1e6:.1f} M | {row['latency_ms']['batch1']:.2f} "
            f"| {row['latency_ms']['batch32']:.2f} | {row['speedup']['batch1']:.2f}x | {top} "
            f"| {diff} |")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse, reporting a bad flag the way the rest of pbt reports bad input."""

    def error(self, message: str) -> Any:
        print(f"pbt: error: {message} ({self.prog} --help lists the flags)", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status: 0 done, 1 the export failed (an
    fp32 file that differs from PyTorch, one onnx.checker refuses), 2 bad input (before
    anything is written), 3 an int8 model was flagged."""
    parser = _Parser(
        prog="python -m pbt.export",
        description="Export a pbt checkpoint to ONNX (fp32, and fp16 / int8 on request), "
                    "measure each form and write deploy_report.json beside the ONNX files.")
    parser.add_argument("checkpoint", help="a .pth weights checkpoint or a run directory")
    parser.add_argument("--onnx", help="the fp32 .onnx file; .fp16.onnx / .int8.onnx and "
                        "deploy_report.json go beside it (default: <checkpoint dir>/deploy/"
                        "model.onnx)")
    parser.add_argument("--fp16", action="store_true", help="also a float16 ONNX file")
    parser.add_argument("--int8", action="store_true",
                        help="also an int8 ONNX file (static QDQ, calibrated on training images)")
    parser.add_argument("--calib-images", type=int, default=300,
                        help="training images that calibrate int8 (default 300)")
    parser.add_argument("--int8-tolerance", type=float, default=1.0,
                        help="top-1 points int8 may lose before it is flagged (default 1)")
    parser.add_argument("--per-tensor", action="store_true",
                        help="int8 weights per tensor instead of per channel")
    parser.add_argument("--exclude-first-last", action="store_true",
                        help="keep the first conv and the classifier in float")
    parser.add_argument("--baseline", help="also measure these weights (default for a pruned "
                        "run: the unpruned model_file it started from)")
    parser.add_argument("--config", help="the training config (default: config.yaml beside "
                        "the checkpoint): where the test and calibration images are")
    parser.add_argument("--input-size", nargs=2, type=int, metavar=("W", "H"))
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for latency")
    parser.add_argument("--runs", type=int, default=30, help="timed runs for the latency")
    args = parser.parse_args(argv)
    try:
        require_onnx()
    except ImportError as err:
        print(f"pbt: error: {err}", file=sys.stderr)
        return 2
    try:
        ckpt_path = resolve_checkpoint(args.checkpoint)
        onnx_path = Path(args.onnx) if args.onnx else ckpt_path.parent / "deploy" / "model.onnx"
        report = deploy_report(
            ckpt_path, onnx_path, fp16=args.fp16, int8=args.int8,
            calib_images=args.calib_images, int8_tolerance=args.int8_tolerance,
            per_channel=not args.per_tensor, exclude_first_last=args.exclude_first_last,
            baseline=args.baseline, config=args.config, input_size=args.input_size,
            threads=args.threads, runs=args.runs)
    except ConfigError as err:
        print(f"pbt: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"pbt: error: {err}", file=sys.stderr)
        return 1
    main_fp32 = [row for row in report["rows"] if row["format"] == "onnx"
                 and row["precision"] == "fp32"][-1]
    print(f"exported {report['checkpoint']} ({report['net_type']}, "
          f"{'pruned' if report['pruned'] else 'unpruned'}, {main_fp32['params']:,} params) "
          f"-> {main_fp32['file']}")
    print(f"onnxruntime vs PyTorch max abs diff: {main_fp32['max_abs_diff']:.3g} (limit 1e-4)")
    print(format_report(report))
    for note in report["notes"]:
        print(f"note: {note}")
    if "fp16_note" in report["latency"]:
        print(f"fp16: {report['latency']['fp16_note']}")
    print(f"report: {onnx_path.parent / 'deploy_report.json'}")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    return 3 if report["warnings"] else 0


if __name__ == "__main__":
    sys.exit(main())
