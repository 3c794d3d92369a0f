"""Knowledge distillation for a 50 %-pruned network (``--net_type``, default resnet18):
fine-tuned with and without KD from its unpruned self, on full digits and on low-data
digits (20 training images per class; the full test split), mean over seeds.

Per dataset the teacher is the unpruned network trained from scratch (seed 0). Per seed,
two students start from the teacher's best.pth, 50 % L1-pruned, and fine-tune for the same
epochs with the same flags: ``plain``, and ``kd`` with ``--distill_from`` the teacher (the
defaults ``distill_alpha`` 0.5 and ``distill_temperature`` 4). Every run reads the seed-0
digits trees, so the seed changes only the students' data order and augmentation.

    python bench/distill.py [--work_dir /tmp/pbt-distill] [--seeds 0 1 2] [--net_type NET]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from recipe_run import run_recipe


def run(work_dir: Path, run_name: str, *args: str) -> dict:
    """One recipe run; returns its summary.json."""
    return json.loads((run_recipe(work_dir, run_name, *args) / "summary.json").read_text())


def low_data_tree(train_dir: Path, target: Path, per_class: int) -> Path:
    """An ImageFolder of the first ``per_class`` images of each class (symlinks)."""
    for class_dir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        out = target / class_dir.name
        out.mkdir(parents=True, exist_ok=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            if not (out / image.name).exists():
                os.symlink(image.resolve(), out / image.name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/pbt-distill"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per_class", type=int, default=20)
    parser.add_argument("--net_type", default="resnet18")
    parser.add_argument("--full_epochs", type=int, nargs=2, default=[10, 5],
                        metavar=("TEACHER", "STUDENT"), help="epochs on full digits")
    parser.add_argument("--low_data_epochs", type=int, nargs=2, default=[150, 40],
                        metavar=("TEACHER", "STUDENT"), help="epochs on low-data digits")
    parser.add_argument("--datasets", nargs="+", default=["full", "low-data"],
                        choices=["full", "low-data"])
    args = parser.parse_args()
    epochs = {"full": args.full_epochs, "low-data": args.low_data_epochs}
    from pbt.data import materialise_digits

    train_dir, test_dir = materialise_digits(args.work_dir / "digits", 0)
    low = low_data_tree(train_dir, args.work_dir / f"digits_{args.per_class}" / "train",
                        args.per_class)
    rows = []
    for dataset, train in (("full", train_dir), ("low-data", low)):
        if dataset not in args.datasets:
            continue
        teacher_epochs, student_epochs = epochs[dataset]
        data = ["--train_data", str(train), "--test_data", str(test_dir),
                "--net_type", args.net_type]
        work = args.work_dir / args.net_type / dataset
        teacher = run(work, "teacher", *data, "--num_epochs", str(teacher_epochs))
        teacher_file = str(work / "teacher" / "best.pth")
        print(f"{dataset}: teacher (unpruned {args.net_type}, {teacher_epochs} epochs) best top1 "
              f"{teacher['best']:.2f}%", flush=True)
        results: dict[str, list[dict]] = {"plain": [], "kd": []}
        for seed in args.seeds:
            student = [*data, "--seed", str(seed), "--num_epochs", str(student_epochs),
                       "--model_file", teacher_file, "--use_prune", "true",
                       "--prune_method", "l1", "--prune_ratio", "0.5"]
            results["plain"].append(run(work, f"plain_seed{seed}", *student))
            results["kd"].append(run(work, f"kd_seed{seed}", *student,
                                     "--distill_from", teacher_file))
            print(f"  seed {seed}: plain {results['plain'][-1]['best']:.2f}%  "
                  f"kd {results['kd'][-1]['best']:.2f}%  (seconds: plain "
                  f"{results['plain'][-1]['seconds']:.0f}, kd {results['kd'][-1]['seconds']:.0f})",
                  flush=True)
        means = {name: statistics.mean(s["best"] for s in runs) for name, runs in results.items()}
        seconds = {name: statistics.mean(s["seconds"] for s in runs)
                   for name, runs in results.items()}
        rows.append((dataset, teacher["best"], means, seconds, student_epochs))
    print("\n| data | teacher top-1 | pruned 50 %, fine-tuned | + KD from the teacher | "
          "KD gain | run time KD / plain |\n|---|---|---|---|---|---|")
    for dataset, teacher_top1, means, seconds, epochs in rows:
        print(f"| {dataset} ({epochs} fine-tune epochs, {len(args.seeds)} seeds) | "
              f"{teacher_top1:.2f} | {means['plain']:.2f} | {means['kd']:.2f} | "
              f"{means['kd'] - means['plain']:+.2f} | {seconds['kd'] / seconds['plain']:.2f}x |")


if __name__ == "__main__":
    main()
