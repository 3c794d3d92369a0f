"""Accuracy after pruning, against a baseline trained for as many epochs.

Per seed, three runs of the default digits recipe (same flags):

1. ``unpruned``: resnet18 from scratch for ``num_epochs`` (10) epochs;
2. ``unpruned_continued``: ``--model_file`` of run 1's best.pth, no pruning, ``num_epochs``
   more epochs (the equal-epochs baseline);
3. ``pruned_l1_50``: ``--model_file`` of the same best.pth, 50 % L1-pruned, fine-tuned for
   ``num_epochs`` more epochs.

Runs 2 and 3 both train 10 + 10 epochs, so their difference (the headline) is the effect of
pruning, not of extra training. Target: pruned within 1 point of the equal-epochs baseline.
With several ``--seeds`` (each also draws its own digits train/test split) the means are
printed as well.

    python bench/prune_accuracy.py [--work_dir /tmp/pbt-prune-accuracy] [--seeds 0 1 2]
        [extra recipe flags]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("unpruned", "unpruned_continued", "pruned_l1_50")


def run(args: list[str]) -> dict:
    """One recipe run (replacing its run dir if it exists); returns its summary.json."""
    command = [sys.executable, str(ROOT / "recipes" / "classification.py"),
               "-c", str(ROOT / "recipes" / "classification.yaml"), "--progress", "false",
               "--overwrite", "true", *args]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    work_dir, run_name = args[args.index("--work_dir") + 1], args[args.index("--run_name") + 1]
    return json.loads((Path(work_dir) / run_name / "summary.json").read_text())


def one_seed(work_dir: Path, seed: int, extra: list[str]) -> tuple[dict[str, dict], dict]:
    """The three runs of one seed, and the pruned run's prune_report.json."""
    common = ["--work_dir", str(work_dir), "--seed", str(seed)]
    results = {"unpruned": run([*common, "--run_name", "unpruned", *extra])}
    model_file = str(work_dir / "unpruned" / "best.pth")
    results["unpruned_continued"] = run([*common, "--run_name", "unpruned_continued",
                                         "--model_file", model_file, *extra])
    results["pruned_l1_50"] = run([*common, "--run_name", "pruned_l1_50", "--use_prune", "true",
                                   "--prune_method", "l1", "--prune_ratio", "0.5",
                                   "--model_file", model_file, *extra])
    report = json.loads((work_dir / "pruned_l1_50" / "prune_report.json").read_text())
    return results, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/pbt-prune-accuracy")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="recipe seeds (each: 3 runs of about a minute on 2 CPU cores)")
    args, extra = parser.parse_known_args()
    if "--seed" in extra:
        parser.error("give seeds with --seeds")
    labels = {"unpruned": "unpruned, 10 epochs",
              "unpruned_continued": "unpruned, 10 + 10 epochs",
              "pruned_l1_50": "pruned + fine-tuned, 10 + 10"}
    best: dict[str, list[float]] = {name: [] for name in RUNS}
    for seed in args.seeds:
        results, report = one_seed(Path(args.work_dir) / f"seed{seed}", seed, extra)
        print(f"seed {seed}: right after pruning top1 {report['after_pruning']['top1']:.2f}%, "
              f"params {report['before_pruning']['params']:,} -> "
              f"{report['after_pruning']['params']:,}")
        for name in RUNS:
            summary = results[name]
            best[name].append(summary["best_top1"])
            print(f"  {labels[name]:<29} best top1 {summary['best_top1']:6.2f}%, last "
                  f"{summary['last_top1']:6.2f}% ({summary['seconds']:.0f} s)")
        print(f"  pruned vs unpruned 10 + 10 (best): "
              f"{best['pruned_l1_50'][-1] - best['unpruned_continued'][-1]:+.2f} points; "
              f"vs unpruned 10: {best['pruned_l1_50'][-1] - best['unpruned'][-1]:+.2f}",
              flush=True)

    mean = {name: statistics.mean(values) for name, values in best.items()}
    print(f"\nbest test top-1, mean over seeds {args.seeds}:")
    for name in RUNS:
        print(f"  {labels[name]:<29} {mean[name]:6.2f}%")
    gap = [p - c for p, c in zip(best["pruned_l1_50"], best["unpruned_continued"])]
    spread = f" (per seed: {', '.join(f'{g:+.2f}' for g in gap)})" if len(gap) > 1 else ""
    print(f"difference pruned vs equal-epochs baseline (best): {statistics.mean(gap):+.2f} "
          f"points{spread}")
    print(f"(vs the 10-epoch run, which trained half as long: "
          f"{mean['pruned_l1_50'] - mean['unpruned']:+.2f})")


if __name__ == "__main__":
    main()
