"""Which regularisation helps on low-data digits: resnet18 at 32x32 trained on ``--per_class``
training images per class (the first ones of each class in the seed-0 digits split, the same
set as bench/distill.py's low-data runs; the full test split of 360 images), every variant for
the same ``--epochs`` with the recipe's warm-up and cosine schedule, mean over ``--seeds``
(the seed changes initialisation, data order and augmentation; the data stays the same).

    python bench/low_data.py [--work_dir /tmp/pbt-low-data] [--per_class 20] [--epochs 20]
                             [--seeds 0 1 2] [--variants plain ema ... best lr_find] [--reuse]
                             [--lr LR]   # every variant at another base lr than the yaml's

Variants (each a change from recipes/classification.yaml; ``plain`` is the yaml itself:
train_transform light, lr 0.05): ``ema`` (ema_decay 0.99), ``mixup`` (alpha 0.2), ``cutmix``
(alpha 1.0), ``mixup+cutmix``, ``labelsmoothing`` (0.1), and each train_transform addition
on the light base. ``best`` (second phase) combines the single variants with a positive mean
gain over plain, best first, at most ``--combine`` of them and one of each kind (one mixing,
one augmentation policy). ``lr_find`` runs ``python -m pbt.lr_find`` on the same data and
config once per seed, then trains with its suggested lr (plain uses the yaml's 0.05).

Top-1 is the test top-1 of the final epoch (the headline: choosing the best epoch on the test
set is optimistic) and of the best epoch. Runs are subprocesses of the recipe with
OMP_NUM_THREADS=1 unless set: on a shared 2-core machine two threads per run were up to 7x
slower under contention. Timings are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from distill import low_data_tree, run
from recipe_run import ROOT

# name: config flags changed from the yaml
SINGLE = {
    "plain": {},
    "ema": {"ema_decay": "0.99"},
    "mixup": {"mixup_alpha": "0.2"},
    "cutmix": {"cutmix_alpha": "1.0"},
    "mixup+cutmix": {"mixup_alpha": "0.2", "cutmix_alpha": "1.0"},
    "labelsmoothing": {"loss_type": "LabelSmoothing", "smoothing": "0.1"},
    **{name: {"train_transform": f"light+{name}"}
       for name in ("randaugment", "trivialaugment", "autoaugment", "colorjitter", "erasing")},
}
# variants of one kind are not combined with each other
KIND = {"mixup": "mix", "cutmix": "mix", "mixup+cutmix": "mix", "randaugment": "policy",
        "trivialaugment": "policy", "autoaugment": "policy"}
PHASE_TWO = ("best", "lr_find")


def combine(names: list[str]) -> dict[str, str]:
    """The flags of several single variants together (transform additions joined by +)."""
    flags: dict[str, str] = {}
    additions = []
    for name in names:
        for key, value in SINGLE[name].items():
            if key == "train_transform":
                additions += value.split("+")[1:]
            else:
                flags[key] = value
    if additions:
        flags["train_transform"] = "+".join(["light", *additions])
    return flags


def as_args(flags: dict[str, str]) -> list[str]:
    return [item for key, value in flags.items() for item in (f"--{key}", value)]


def pick_best(means: dict[str, float], plain: float, most: int) -> list[str]:
    """Single variants with a positive mean gain, best first, one of each kind."""
    chosen: list[str] = []
    kinds: set[str] = set()
    for name in sorted(means, key=means.__getitem__, reverse=True):
        kind = KIND.get(name, name)
        if name == "plain" or means[name] <= plain or kind in kinds or len(chosen) == most:
            continue
        chosen.append(name)
        kinds.add(kind)
    return chosen


def lr_suggestion(work: Path, run_name: str, *args: str) -> dict:
    """``python -m pbt.lr_find`` on the recipe's config with ``args``; its lr_find.json."""
    command = [sys.executable, "-m", "pbt.lr_find", "-c",
               str(ROOT / "recipes" / "classification.yaml"), "--progress", "false",
               "--overwrite", "true", "--work_dir", str(work), "--run_name", run_name, *args]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((work / run_name / "lr_find.json").read_text())


class Bench:
    """Runs variants x seeds on one data set and keeps their summaries."""

    def __init__(self, work: Path, data: list[str], seeds: list[int], reuse: bool) -> None:
        self.work, self.data, self.seeds, self.reuse = work, data, seeds, reuse
        self.results: dict[str, list[dict]] = {}
        self.flags: dict[str, str] = {}

    def train(self, variant: str, seed: int, *args: str) -> dict:
        name = f"{variant.replace('+', '_')}_seed{seed}"
        summary = self.work / name / "summary.json"
        if self.reuse and summary.is_file():
            return json.loads(summary.read_text())
        return run(self.work, name, *self.data, "--seed", str(seed), *args)

    def variant(self, variant: str, flags: dict[str, str], label: str | None = None,
                run_prefix: str | None = None) -> None:
        self.flags[variant] = label if label is not None else (
            ", ".join(f"{k} {v}" for k, v in flags.items()) or "—")
        self.results[variant] = []
        for seed in self.seeds:
            summary = self.train(run_prefix or variant, seed, *as_args(flags))
            self.results[variant].append(summary)
            print(f"{variant:>30} seed {seed}: final {summary['last_top1']:6.2f}%  best "
                  f"{summary['best_top1']:6.2f}% (epoch {summary['best_epoch']})  "
                  f"{summary['seconds']:.0f} s", flush=True)

    def lr_find(self) -> list[float]:
        """Per seed: the LR finder's suggestion, then a run at that lr."""
        suggestions, runs = [], []
        for seed in self.seeds:
            found = lr_suggestion(self.work, f"lr_find_seed{seed}", *self.data, "--seed",
                                  str(seed))
            suggestion = found["suggestion"]
            if suggestion is None:
                print(f"{'lr_find':>30} seed {seed}: no suggestion; seed skipped", flush=True)
                continue
            print(f"{'lr_find':>30} seed {seed}: suggestion {suggestion:.3g} (min_loss_lr "
                  f"{found['min_loss_lr']:.3g}, {found['steps']} steps, "
                  f"{found['seconds']:.0f} s)", flush=True)
            suggestions.append(float(suggestion))
            runs.append(self.train(f"lr_{suggestion:.6g}", seed, "--lr", f"{suggestion:.6g}"))
            print(f"{'lr_find':>30} seed {seed}: final {runs[-1]['last_top1']:6.2f}%  best "
                  f"{runs[-1]['best_top1']:6.2f}%  {runs[-1]['seconds']:.0f} s", flush=True)
        self.results["lr_find"] = runs
        self.flags["lr_find"] = "lr " + " / ".join(f"{lr:.3g}" for lr in suggestions)
        return suggestions

    def mean(self, variant: str, key: str = "last_top1") -> float:
        return statistics.mean(s[key] for s in self.results[variant])

    def table(self) -> str:
        plain = self.results["plain"]
        lines = ["| variant | changes from plain | final top-1 per seed | final mean | "
                 "Δ vs plain | best-epoch top-1 per seed | best mean | Δ best | s / run |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for variant, runs in self.results.items():
            if not runs:
                continue
            final = " / ".join(f"{s['last_top1']:.1f}" for s in runs)
            best = " / ".join(f"{s['best_top1']:.1f}" for s in runs)
            d_final = self.mean(variant) - statistics.mean(s["last_top1"] for s in plain)
            d_best = (self.mean(variant, "best_top1")
                      - statistics.mean(s["best_top1"] for s in plain))
            seconds = statistics.mean(s["seconds"] for s in runs)
            lines.append(f"| {variant} | {self.flags[variant]} | {final} | "
                         f"{self.mean(variant):.2f} | {d_final:+.2f} | {best} | "
                         f"{self.mean(variant, 'best_top1'):.2f} | {d_best:+.2f} | "
                         f"{seconds:.0f} |")
        return "\n".join(lines)

    def clear_win(self, variant: str, margin: float) -> bool:
        """Final top-1 above plain by ``margin`` points in the mean and in every seed."""
        runs, plain = self.results.get(variant, []), self.results["plain"]
        if len(runs) != len(plain):
            return False
        gains = [s["last_top1"] - p["last_top1"] for s, p in zip(runs, plain)]
        return statistics.mean(gains) >= margin and min(gains) >= margin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/pbt-low-data"))
    parser.add_argument("--per_class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=[*SINGLE, *PHASE_TWO],
                        choices=[*SINGLE, *PHASE_TWO], help="plain always runs")
    parser.add_argument("--lr", type=float, default=None,
                        help="base lr of every variant (default: the yaml's 0.05)")
    parser.add_argument("--combine", type=int, default=3,
                        help="single variants combined into 'best' at most")
    parser.add_argument("--margin", type=float, default=2.0,
                        help="points above plain (mean and every seed) that make a clear win")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse runs whose summary.json exists under the same work dir")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = time.time()
    from pbt.data import materialise_digits

    train_dir, test_dir = materialise_digits(args.work_dir / "digits", 0)
    low = low_data_tree(train_dir, args.work_dir / f"digits_{args.per_class}" / "train",
                        args.per_class)
    data = ["--train_data", str(low), "--test_data", str(test_dir), "--num_epochs",
            str(args.epochs), "--num_workers", "0"]
    lr = "the yaml's lr" if args.lr is None else f"lr {args.lr:g}"
    if args.lr is not None:
        data += ["--lr", f"{args.lr:g}"]  # lr_find's runs pass their own --lr after this
    runs = f"runs_{args.per_class}pc_{args.epochs}ep" + ("" if args.lr is None
                                                         else f"_lr{args.lr:g}")
    bench = Bench(args.work_dir / runs, data, args.seeds, args.reuse)
    print(f"low-data digits: {args.per_class} per class, {args.epochs} epochs, {lr}, seeds "
          f"{args.seeds}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}", flush=True)
    for variant in ["plain", *(v for v in SINGLE if v in args.variants and v != "plain")]:
        bench.variant(variant, SINGLE[variant])
    if "best" in args.variants:
        singles = {v: bench.mean(v) for v in bench.results}
        chosen = pick_best(singles, singles["plain"], args.combine)
        if len(chosen) == 1:  # the best single variant itself: no rerun
            bench.results["best"] = bench.results[chosen[0]]
            bench.flags["best"] = f"= {chosen[0]} (the only pick)"
        elif chosen:
            bench.variant("best", combine(chosen), label=" + ".join(chosen) + ": "
                          + ", ".join(f"{k} {v}" for k, v in combine(chosen).items()),
                          run_prefix="best_" + "_".join(chosen))
        else:
            print("best: no single variant beat plain in the mean; nothing to combine")
    if "lr_find" in args.variants:
        bench.lr_find()
    minutes = (time.time() - started) / 60
    print(f"\nlow-data digits ({args.per_class} per class, {10 * args.per_class} training "
          f"images; full test split of 360), resnet18 32x32, {args.epochs} epochs, {lr}, seeds "
          f"{' '.join(map(str, args.seeds))}; headline: final-epoch top-1 (%); "
          f"total {minutes:.1f} min\n")
    print(bench.table())
    winners = [v for v in bench.results if v != "plain" and bench.clear_win(v, args.margin)]
    print(f"\nclear wins (final top-1 >= plain + {args.margin:g} in the mean and every seed): "
          + (", ".join(winners) if winners else "none"))


if __name__ == "__main__":
    main()
