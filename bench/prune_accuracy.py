"""Accuracy after pruning: the default digits recipe, then a 50 % L1-pruned resnet18
fine-tuned for the same number of epochs. Target: within 1 point of the unpruned top-1.

    python bench/prune_accuracy.py [--work_dir /tmp/pbt-prune-acc] [extra recipe flags]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> dict:
    command = [sys.executable, str(ROOT / "recipes" / "classification.py"),
               "-c", str(ROOT / "recipes" / "classification.yaml"), "--progress", "false", *args]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    work_dir, run_name = args[args.index("--work_dir") + 1], args[args.index("--run_name") + 1]
    return json.loads((Path(work_dir) / run_name / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work_dir", default="/tmp/pbt-prune-accuracy")
    args, extra = parser.parse_known_args()
    base = run(["--work_dir", args.work_dir, "--run_name", "unpruned", *extra])
    model_file = Path(args.work_dir) / "unpruned" / "best.pth"
    pruned = run(["--work_dir", args.work_dir, "--run_name", "pruned_l1_50", "--use_prune",
                  "true", "--prune_method", "l1", "--prune_ratio", "0.5", "--model_file",
                  str(model_file), *extra])
    report = json.loads((Path(args.work_dir) / "pruned_l1_50" / "prune_report.json").read_text())
    print(f"unpruned resnet18: best top1 {base['best_top1']:.2f}%, last {base['last_top1']:.2f}% "
          f"({base['seconds']:.0f} s)")
    print(f"right after pruning: top1 {report['after_pruning']['top1']:.2f}%, params "
          f"{report['before_pruning']['params']:,} -> {report['after_pruning']['params']:,}")
    print(f"pruned + fine-tuned: best top1 {pruned['best_top1']:.2f}%, "
          f"last {pruned['last_top1']:.2f}% ({pruned['seconds']:.0f} s)")
    print(f"difference (best): {pruned['best_top1'] - base['best_top1']:+.2f} points")


if __name__ == "__main__":
    main()
