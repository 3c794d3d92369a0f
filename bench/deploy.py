"""From an unpruned fp32 model in PyTorch to a 50 %-pruned int8 ONNX model: latency and
test top-1 on digits, for resnet18 and mobilenet_v2 (``python -m pbt.export`` measures).

Per backbone: the default digits recipe trains it (``--epochs``), then a second run prunes
50 % of its filters (L1) and fine-tunes as many epochs; ``deploy_report`` then exports the
pruned run and the unpruned weights it started from to ONNX fp32 / fp16 / int8 and measures
every form in one process (batch 1 and 32, one thread, the run's test split).

    python bench/deploy.py [--work_dir /tmp/pbt-deploy] [--epochs 10] [--threads 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from recipe_run import run_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/pbt-deploy"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nets", nargs="+", default=["resnet18", "mobilenet_v2"])
    args = parser.parse_args()
    from pbt.export import deploy_report, format_report

    summary = []
    for net in args.nets:
        flags = ["--net_type", net, "--num_epochs", str(args.epochs)]
        base = run_recipe(args.work_dir, f"{net}_base", *flags)
        pruned = run_recipe(args.work_dir, f"{net}_pruned", *flags, "--use_prune", "true",
                       "--prune_method", "l1", "--prune_ratio", "0.5",
                       "--model_file", str(base / "best.pth"))
        report = deploy_report(pruned, pruned / "deploy" / "model.onnx", fp16=True, int8=True,
                               threads=args.threads)
        print(format_report(report) + "\n", flush=True)
        rows = {row["name"]: row for row in report["rows"]}
        start, end = rows["torch fp32 (unpruned)"], rows["onnx int8 (pruned)"]
        summary.append(
            f"| {net} | torch fp32 unpruned → onnx int8 pruned | "
            f"{start['latency_ms']['batch1'] / end['latency_ms']['batch1']:.2f}x | "
            f"{start['latency_ms']['batch32'] / end['latency_ms']['batch32']:.2f}x | "
            f"{start['top1']:.2f} → {end['top1']:.2f} ({end['top1'] - start['top1']:+.2f}) |")
        start = rows["onnx fp32 (unpruned)"]
        summary.append(
            f"| {net} | onnx fp32 unpruned → onnx int8 pruned | "
            f"{start['latency_ms']['batch1'] / end['latency_ms']['batch1']:.2f}x | "
            f"{start['latency_ms']['batch32'] / end['latency_ms']['batch32']:.2f}x | "
            f"{start['top1']:.2f} → {end['top1']:.2f} ({end['top1'] - start['top1']:+.2f}) |")
        for variant in ("unpruned", "pruned"):
            fp32, int8 = rows[f"onnx fp32 ({variant})"], rows[f"onnx int8 ({variant})"]
            summary.append(
                f"| {net} | onnx fp32 → int8, {variant} | "
                f"{fp32['latency_ms']['batch1'] / int8['latency_ms']['batch1']:.2f}x | "
                f"{fp32['latency_ms']['batch32'] / int8['latency_ms']['batch32']:.2f}x | "
                f"{fp32['top1']:.2f} → {int8['top1']:.2f} ({int8['top1'] - fp32['top1']:+.2f}) |")
    print(f"| net | from → to | latency ratio batch 1 | batch 32 | test top-1 % |\n"
          f"|---|---|---|---|---|  ({args.threads} thread(s))")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
