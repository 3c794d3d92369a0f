"""Time to 95 % and 98 % test top-1 on full digits: a hand-written loop on in-memory
tensors vs the classification recipe on pbt's engine, with the decoded-image cache, the
loader's worker count, EMA, torch.compile and channels_last each on and off.

    python bench/time_to_accuracy.py                                  # raw, pbt, cache_off
    python bench/time_to_accuracy.py --variants all --rounds 3 [--epochs 10] [--stop_early]

Every run follows ``recipes/classification.yaml`` (resnet18 at 32x32, batch 64, SGD lr 0.05
momentum 0.9, weight decay 5e-4 but not on BatchNorm / bias, cosine with one warm-up epoch,
10 epochs, seed 0, ``light`` augmentation) on the digits split the recipe writes (1,437
train and 360 test PNGs of 8x8), in this process, with torch's default thread count.

- ``raw``: a hand-written loop. The images are decoded once into one uint8 tensor; each
  batch applies the recipe's train transform (RandomResizedCrop scale 0.6-1 to 32x32,
  normalise) to each of its images in the loop, without a DataLoader, with torch's RNG
  seeded per image as pbt seeds it (``pbt.data.SeededDataset``: seed, epoch, index) and
  the batch order of pbt's sampler (a permutation from seed + epoch); the test images are
  transformed once into one float tensor. Same initial weights (seed), optimizer groups
  (no weight decay on BatchNorm / bias), per-step LR (``pbt.schedulers.lr_curve``) and
  cross-entropy, so it trains the same weights as the ``pbt`` run and reaches each
  threshold at the same epoch: the ratios are speed alone. Top-1 on the test set after
  every epoch. No EMA, compile or channels_last.
- ``raw_noaug``: the same loop without augmentation (the training images resized and
  centre-cropped once, as the test images are): the fastest a loop can be on these tensors.
- ``pbt`` and the other variants: ``ClassificationTrainer`` with the yaml's config, the
  progress bar off, and the variant's keys set (see ``VARIANTS``); every default callback
  runs (schedule, metrics, TensorBoard, best.pth / last.pth, a resumable state per epoch).

Time to X %: from the start of training (the raw loop's first step; the engine's
``on_train_begin``, just before it fetches its first batch) to the end of the first test
pass at or above X %, read by a callback appended after the default ones. "build" is
construction (raw: decoding and the model; pbt: ``ClassificationTrainer(cfg)``: data scan
and decode, model, ``accelerator.prepare``, run dir). Each round runs every variant; the
order alternates (as listed in odd rounds, reversed in even ones) and the table shows
medians over rounds, with ratios to the ``--baseline`` run measured in the same process.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "recipes")]  # pbt, the recipe

from classification import KEYS, ClassificationTrainer, transform_options  # noqa: E402

from pbt.callbacks import Callback  # noqa: E402
from pbt.config import Config, load_config  # noqa: E402

YAML = ROOT / "recipes" / "classification.yaml"
RAW = ("raw", "raw_noaug")
# pbt variants: the keys each sets on top of the yaml ("pbt" is the yaml as it is, where
# cache_images is null: on for digits, and then the loader works in the main process)
VARIANTS: dict[str, dict] = {
    "pbt": {},
    "cache_off": {"cache_images": False},
    "cache_on": {"cache_images": True},
    "cache_off_w0": {"cache_images": False, "num_workers": 0},
    "cache_on_w1": {"cache_images": True, "num_workers": 1},
    "ema": {"ema_decay": 0.999},
    "compile": {"compile": True},
    "channels_last": {"channels_last": True},
}
ALL = [*RAW, *VARIANTS]


@dataclass
class Run:
    """One training run: build seconds, and per epoch the time since the start of
    training at the end of its test pass, and the test top-1 there."""

    build_s: float = 0.0
    start: float = 0.0
    cpu_start: float = 0.0
    cpu_s: float = 0.0  # this process's CPU seconds in training (not its loader workers')
    ends: list[float] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    note: str = ""

    def begin(self) -> None:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def record(self, top1: float) -> None:
        self.ends.append(time.perf_counter() - self.start)
        self.cpu_s = time.process_time() - self.cpu_start
        self.top1.append(float(top1))

    def reached(self, threshold: float) -> tuple[int, float] | None:
        """(1-based epoch, seconds) of the first test pass at or above ``threshold``."""
        for epoch, (seconds, top1) in enumerate(zip(self.ends, self.top1), start=1):
            if top1 >= threshold:
                return epoch, seconds
        return None

    def epoch_seconds(self) -> list[float]:
        return [b - a for a, b in zip([0.0, *self.ends], self.ends)]


def recipe_config(work: Path, run_name: str, epochs: int, **keys) -> Config:
    return load_config([], default_file=YAML, keys=KEYS, work_dir=str(work), run_name=run_name,
                       overwrite=True, progress=False, num_epochs=epochs, **keys)


# -- the hand-written loop -----------------------------------------------------------------
def raw_run(cfg: Config, augment: bool, stop_at: float | None) -> Run:
    """The loop people write by hand on tensors already in memory (see the docstring)."""
    from accelerate.utils import set_seed

    from pbt.data import SeededDataset, build_transforms, load_image, materialise_digits
    from pbt.models import build_model
    from pbt.schedulers import lr_curve

    run = Run()
    train_dir, test_dir = materialise_digits(Path(cfg.work_dir) / "digits", cfg.seed)
    began = time.perf_counter()  # the files exist (written once before the rounds)

    def decoded(root: Path) -> tuple[list[torch.Tensor], torch.Tensor]:
        files = sorted(root.glob("*/*.png"))  # class folders "0".."9": label = folder name
        return ([load_image(f) for f in files],
                torch.tensor([int(f.parent.name) for f in files]))

    train_list, train_y = decoded(train_dir)
    test_list, test_y = decoded(test_dir)
    images = torch.stack(train_list)
    test_transform = build_transforms(cfg.input_size, cfg.rgb_mean, cfg.rgb_std, train=False)
    train_transform = build_transforms(cfg.input_size, cfg.rgb_mean, cfg.rgb_std, train=True,
                                       **transform_options(cfg.train_transform))
    test_x = torch.stack([test_transform(image) for image in test_list])
    fixed_x = None if augment else torch.stack([test_transform(image) for image in images])

    class Augmented(torch.utils.data.Dataset):
        def __getitem__(self, index: int) -> torch.Tensor:
            return train_transform(images[index])

    augmented = SeededDataset(Augmented(), cfg.seed)  # item (epoch, i): seeded per image

    set_seed(cfg.seed)
    model = build_model(cfg.net_type, 10)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, momentum=cfg.momentum)
    size, batch = len(images), cfg.batch_size
    steps = math.ceil(size / batch)
    lrs = lr_curve(cfg, steps)
    run.build_s = time.perf_counter() - began

    run.begin()
    step = 0
    for epoch in range(cfg.num_epochs):
        model.train()
        order = torch.randperm(size, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        for first in range(0, size, batch):
            index = order[first:first + batch]
            if fixed_x is None:
                x = torch.stack([augmented[(epoch, i)] for i in index.tolist()])
            else:
                x = fixed_x[index]
            for group in optimizer.param_groups:
                group["lr"] = lrs[step]
            loss = nn.functional.cross_entropy(model(x), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        model.eval()
        correct = 0
        with torch.no_grad():
            for first in range(0, len(test_x), batch):
                logits = model(test_x[first:first + batch])
                correct += int((logits.argmax(1) == test_y[first:first + batch]).sum())
        run.record(100.0 * correct / len(test_x))
        if stop_at is not None and run.top1[-1] >= stop_at:
            break
    return run


# -- the recipe on pbt's engine ------------------------------------------------------------
class EpochTimer(Callback):
    """Records when each test pass ends and its top-1; appended after the default
    callbacks, so their epoch-end work (best.pth, logs) is inside the time."""

    def __init__(self, run: Run, stop_at: float | None) -> None:
        self.run, self.stop_at = run, stop_at

    def on_train_begin(self, logs: dict) -> None:
        self.run.begin()

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        self.run.record(logs["test"]["top1"])
        if self.stop_at is not None and self.run.top1[-1] >= self.stop_at:
            self.trainer.stop_training = True


class TimedTrainer(ClassificationTrainer):
    timer: EpochTimer

    def build_callbacks(self, cfg: Config) -> list[Callback]:
        return [*super().build_callbacks(cfg), self.timer]


def pbt_run(cfg: Config, stop_at: float | None) -> Run:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    run = Run()
    TimedTrainer.timer = EpochTimer(run, stop_at)
    began = time.perf_counter()
    try:
        trainer = TimedTrainer(cfg)
        run.build_s = time.perf_counter() - began
        trainer.run()
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
        if cfg.get("compile"):
            torch._dynamo.reset()  # no compiled code carried into the next run
    return run


def run_variant(name: str, work: Path, args: argparse.Namespace, round_index: int) -> Run:
    stop_at = max(args.thresholds) if args.stop_early else None
    if name in RAW:
        cfg = recipe_config(work, f"{name}-{round_index}", args.epochs)
        return raw_run(cfg, augment=name == "raw", stop_at=stop_at)
    try:
        cfg = recipe_config(work, f"{name}-{round_index}", args.epochs, **VARIANTS[name])
    except Exception as err:  # a key this checkout does not have yet
        return Run(note=f"not run: {err}")
    return pbt_run(cfg, stop_at)


# -- report --------------------------------------------------------------------------------
def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _cell(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "—" if value is None else f"{value:.{digits}f}{suffix}"


def _epochs(runs: list[Run], threshold: float) -> str:
    epochs = sorted({hit[0] for run in runs if (hit := run.reached(threshold))})
    missed = sum(run.reached(threshold) is None for run in runs)
    text = "—" if not epochs else (str(epochs[0]) if len(epochs) == 1
                                   else f"{epochs[0]}–{epochs[-1]}")
    return text + (f" ({missed} missed)" if missed and epochs else "")


def table(results: dict[str, list[Run]], args: argparse.Namespace) -> str:
    base = results.get(args.baseline, [])
    base_time = {t: _median([hit[1] for run in base if (hit := run.reached(t))])
                 for t in args.thresholds}
    base_epoch = _median([statistics.median(run.epoch_seconds()[1:] or run.epoch_seconds())
                          for run in base if run.ends])
    head = ["variant", "build s", "epoch 1 s", "later epochs s", f"× {args.baseline}"]
    for t in args.thresholds:
        head += [f"{t:g} %: epoch", f"{t:g} %: s", f"× {args.baseline}"]
    head.append("best top-1")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, runs in results.items():
        done = [run for run in runs if run.ends]
        if not done:
            note = next((run.note for run in runs if run.note), "no result")
            lines.append(f"| {name} | {note} |" + " |" * (len(head) - 2))
            continue
        later = _median([statistics.median(run.epoch_seconds()[1:] or run.epoch_seconds())
                         for run in done])
        row = [name, _cell(_median([run.build_s for run in done]), 2),
               _cell(_median([run.epoch_seconds()[0] for run in done]), 2), _cell(later, 2),
               _cell(later / base_epoch if later and base_epoch else None, 2, "×")]
        for t in args.thresholds:
            seconds = _median([hit[1] for run in done if (hit := run.reached(t))])
            ratio = seconds / base_time[t] if seconds and base_time[t] else None
            row += [_epochs(done, t), _cell(seconds), _cell(ratio, 2, "×")]
        row.append(_cell(_median([max(run.top1) for run in done]), 2, " %"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="raw,pbt,cache_off",
                        help=f"comma-separated, or all: {', '.join(ALL)}")
    parser.add_argument("--epochs", type=int, default=None,
                        help="num_epochs (default: the yaml's); the schedule follows it")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[95.0, 98.0])
    parser.add_argument("--baseline", default="raw", help="the variant ratios are taken to")
    parser.add_argument("--stop_early", action="store_true",
                        help="end each run at its first test pass >= the highest threshold")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's, the CPU count)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = ALL if args.variants == "all" else [v.strip() for v in args.variants.split(",")]
    unknown = [name for name in names if name not in ALL]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(ALL)}")
    if args.epochs is None:
        args.epochs = int(load_config([], default_file=YAML, keys=KEYS).num_epochs)

    results: dict[str, list[Run]] = {name: [] for name in names}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pbt-tta-") as tmp:
        work = Path(tmp) / "work"
        from pbt.data import materialise_digits

        materialise_digits(work / "digits", recipe_config(work, "x", args.epochs).seed)
        for round_index in range(args.rounds):
            order = names if round_index % 2 == 0 else names[::-1]
            for name in order:
                run = run_variant(name, work, args, round_index)
                results[name].append(run)
                hits = ", ".join(f"{t:g} % at {_cell(h[1])} s (epoch {h[0]})"
                                 if (h := run.reached(t)) else f"{t:g} % not reached"
                                 for t in args.thresholds)
                print(f"round {round_index + 1} {name}: build {run.build_s:.2f} s, "
                      f"{len(run.ends)} epochs in {_cell(run.ends[-1] if run.ends else None)} "
                      f"s ({run.cpu_s:.1f} CPU s in this process); {hits}; top-1 "
                      f"{' '.join(f'{v:.1f}' for v in run.top1)} {run.note}".rstrip(), flush=True)
    print(f"\nresnet18 32x32 on digits, {args.epochs} epochs, {args.rounds} round(s), order "
          f"alternating; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load "
          f"average {load:.2f} at start / {os.getloadavg()[0]:.2f} at end; medians over rounds\n")
    print(table(results, args))


if __name__ == "__main__":
    main()
