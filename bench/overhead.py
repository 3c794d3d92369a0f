"""pbt's engine vs a hand-written PyTorch loop: same model, data, seed and steps.

    python bench/overhead.py [--rounds 3] [--epochs 2] [--size 32] [--net resnet18]

Both train on the digits ImageFolder (written once under a temp dir) through the same
Dataset and DataLoader settings; pbt runs with its default callbacks (LR schedule,
recorders, TensorBoard, checkpoints, NaN check), progress bar off, timed through
``trainer.run()`` as recipes call it (so the wait for the last background checkpoint write
counts). Each round runs both; which goes first alternates from round to round
(hand-written first in odd rounds, pbt first in even ones), so cold starts and load drift
hit both alike. The median images/s of each is compared. Target: pbt >= 0.98 x the
hand-written loop.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader


def datasets(root: Path, size: int):
    from pbt.data import build_dataset, build_transforms, materialise_digits

    train_dir, test_dir = materialise_digits(root / "digits")
    mean = std = [0.5, 0.5, 0.5]
    train = build_dataset(str(train_dir), build_transforms([size, size], mean, std, True,
                                                           crop_scale=(0.6, 1.0), hflip=False))
    test = build_dataset(str(test_dir), build_transforms([size, size], mean, std, False),
                         class_names=train.classes)
    return train, test


def hand_written(args, train, test) -> float:
    """The loop people write by hand: shuffle, forward, backward, step, per-step lr, eval."""
    import math

    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.net)(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    test_loader = DataLoader(test, batch_size=args.batch_size)
    total_steps, step = args.epochs * len(loader), 0
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for images, labels in loader:
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in test_loader:
                correct += int((model(images).argmax(1) == labels).sum())
    return args.epochs * len(train) / (time.perf_counter() - start)


def with_pbt(args, train, test, work: Path, round_index: int) -> float:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from pbt.config import Key, load_config
    from pbt.engine import EngineTrainer

    class Trainer(EngineTrainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.class_names, self.num_classes = list(train.classes), 10
            self.build(cfg)

        def build_train_loader(self, cfg):
            return self.build_dataloader(train, train=True)

        def build_test_loader(self, cfg):
            return self.build_dataloader(test, train=False)

        def build_model(self, cfg):
            import torchvision

            return getattr(torchvision.models, args.net)(num_classes=10)

    keys = [Key("net_type", str, "resnet18"), Key("input_size", "int_list", [32, 32])]
    cfg = load_config([], keys=keys, work_dir=str(work), run_name=f"round{round_index}",
                      net_type=args.net,
                      num_epochs=args.epochs, batch_size=args.batch_size, lr=0.05,
                      scheduler="cosine", num_workers=0, progress=False,
                      input_size=[args.size, args.size])
    trainer = Trainer(cfg)
    start = time.perf_counter()
    trainer.run()  # as recipes call it: loop, wait for the checkpoint writer, summary, unlock
    seconds = time.perf_counter() - start
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return args.epochs * len(train) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--net", default="resnet18")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, test = datasets(root, args.size)
        hand: list[float] = []
        pbt_rates: list[float] = []
        for index in range(args.rounds):
            hand_first = index % 2 == 0  # alternate which one absorbs this round's cold start
            if hand_first:
                hand.append(hand_written(args, train, test))
            pbt_rates.append(with_pbt(args, train, test, root / "work", index))
            if not hand_first:
                hand.append(hand_written(args, train, test))
            print(f"round {index + 1} ({'hand-written' if hand_first else 'pbt'} first): "
                  f"hand-written {hand[-1]:.1f} img/s, pbt {pbt_rates[-1]:.1f} img/s",
                  flush=True)
    hand_median, pbt_median = statistics.median(hand), statistics.median(pbt_rates)
    print(f"\n{args.net} {args.size}x{args.size}, batch {args.batch_size}, {args.epochs} epochs "
          f"x {args.rounds} rounds (order alternating, hand-written first in round 1), "
          f"torch threads {torch.get_num_threads()}")
    print(f"hand-written loop: {hand_median:.1f} img/s (median)")
    print(f"pbt engine:        {pbt_median:.1f} img/s (median)")
    print(f"ratio pbt / hand:  {pbt_median / hand_median:.3f}")


if __name__ == "__main__":
    main()
