"""Does pruning make models really faster? Pruned vs unpruned, measured in the same run.

    python bench/prune_speed.py [--runs 50] [--repeats 3] [--nets resnet18 mobilenet_v2]

For each net and input size: prune a copy (method l1, ratio 0.5, round_to 8 by default),
then compare parameters, MACs, and CPU latency at batch 1 on one thread in PyTorch and in
onnxruntime. Timings alternate between the two models ``--repeats`` times and keep each
one's best median, so a burst of load from other processes hits both alike.
Prints a markdown table; targets: resnet18 >= 3.5x fewer MACs, >= 2.5x faster in torch,
>= 3.5x faster in onnxruntime; mobilenet_v2 >= 2.5x faster in onnxruntime.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

from pbt.export import onnx_latency_ms, require_onnx, to_onnx
from pbt.models import build_model
from pbt.prune import measure_model, prune_model

# (fewer MACs, faster in torch, faster in onnxruntime); None = no target
TARGETS = {"resnet18": (3.5, 2.5, 3.5), "mobilenet_v2": (None, None, 2.5)}


def bench_one(net_type: str, size: int, args: argparse.Namespace, workdir: Path) -> dict:
    torch.manual_seed(0)
    base = build_model(net_type, num_classes=1000).eval()
    pruned = copy.deepcopy(base)
    x = torch.randn(1, 3, size, size)
    result = prune_model(pruned, x, method=args.method, ratio=args.ratio, round_to=args.round_to)
    pruned.eval()
    paths = {
        name: to_onnx(model, x, workdir / f"{net_type}_{size}_{name}.onnx")
        for name, model in (("base", base), ("pruned", pruned))
    }
    torch_ms = {"base": float("inf"), "pruned": float("inf")}
    ort_ms = dict(torch_ms)
    for _ in range(args.repeats):
        for name, model in (("base", base), ("pruned", pruned)):
            stats = measure_model(model, x, runs=args.runs)
            torch_ms[name] = min(torch_ms[name], stats["latency_ms"])
            ort_ms[name] = min(ort_ms[name], onnx_latency_ms(paths[name], x, runs=args.runs))
    return {
        "net": net_type,
        "size": size,
        "params": result.params_ratio,
        "macs": result.macs_ratio,
        "torch": (torch_ms["base"], torch_ms["pruned"]),
        "ort": (ort_ms["base"], ort_ms["pruned"]),
        "channels": sorted({m.out_channels for m in pruned.modules()
                            if isinstance(m, torch.nn.Conv2d)}),
    }


def _verdict(row: dict) -> str:
    targets = TARGETS.get(row["net"], (None, None, None))
    measured = (row["macs"], row["torch"][0] / row["torch"][1], row["ort"][0] / row["ort"][1])
    missed = [
        f"{label} {value:.2f}x < {target}x"
        for label, value, target in zip(("MACs", "torch", "ort"), measured, targets, strict=True)
        if target is not None and value < target
    ]
    return "missed: " + ", ".join(missed) if missed else "ok"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[112, 224])
    parser.add_argument("--method", default="l1")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        require_onnx()
    except ImportError as err:
        print(err, file=sys.stderr)
        return 2

    print(f"method {args.method}, ratio {args.ratio}, round_to {args.round_to}; latency: "
          f"batch 1, 1 thread, best of {args.repeats} medians of {args.runs} runs\n")
    print("| net | input | params | MACs | torch ms (base -> pruned) | torch speed-up "
          "| onnxruntime ms (base -> pruned) | ort speed-up | targets |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for net_type in args.nets:
            for size in args.sizes:
                row = bench_one(net_type, size, args, Path(tmp))
                rows.append(row)
                (tb, tp), (ob, op) = row["torch"], row["ort"]
                print(f"| {net_type} | {size}x{size} | {row['params']:.2f}x fewer "
                      f"| {row['macs']:.2f}x fewer | {tb:.2f} -> {tp:.2f} | {tb / tp:.2f}x "
                      f"| {ob:.2f} -> {op:.2f} | {ob / op:.2f}x | {_verdict(row)} |",
                      flush=True)
    print()
    for row in rows:
        print(f"{row['net']} {row['size']}: pruned conv widths {row['channels']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
