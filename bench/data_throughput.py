"""Training input pipeline throughput: pbt's loader vs torchvision ImageFolder + PIL.

Generates JPEGs (default 2,000 at 160x120, 10 classes) in a temporary folder, then times
full epochs of both pipelines at the same batch size and worker count, with the same
train augmentation (RandomResizedCrop + flip + normalise), alternating between them so
machine load hits both alike. Prints images/s of each and the ratio pbt / baseline.

    python bench/data_throughput.py [--images 2000] [--workers N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def make_jpegs(root: Path, count: int, classes: int, size: tuple[int, int]) -> None:
    """Smooth random colour images, so JPEG sizes are like photos', not like noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    width, height = size
    for i in range(count):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
        image.save(folder / f"{i:05d}.jpg", quality=90)


def pbt_loader(root: Path, size: int, batch_size: int, workers: int) -> DataLoader:
    from pbt.data import build_dataset, build_transforms

    transform = build_transforms([size, size], MEAN, STD, train=True)
    dataset = build_dataset(root, transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0)


def baseline_loader(root: Path, size: int, batch_size: int, workers: int) -> DataLoader:
    from torchvision import datasets
    from torchvision import transforms as T

    transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(MEAN, STD)])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0)


def epoch_rate(loader: DataLoader) -> float:
    """Images per second over one full epoch."""
    seen = 0
    start = time.perf_counter()
    for images, _ in loader:
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def main() -> None:
    from pbt.data import default_num_workers, scan_images

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, nargs=2, default=[160, 120], metavar=("W", "H"))
    parser.add_argument("--size", type=int, default=112, help="training crop size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=default_num_workers())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="pbt-bench-") as tmp:
        root = Path(tmp) / "images"
        make_jpegs(root, args.images, args.classes, tuple(args.image_size))
        files = sorted(str(p) for p in root.rglob("*.jpg"))
        start = time.perf_counter()
        bad = scan_images(files)
        scan_s = time.perf_counter() - start
        assert not bad, bad

        loaders = {
            "pbt": pbt_loader(root, args.size, args.batch_size, args.workers),
            "torchvision+PIL": baseline_loader(root, args.size, args.batch_size, args.workers),
        }
        for loader in loaders.values():  # warm-up: worker start, page cache, lazy imports
            epoch_rate(loader)
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(args.repeats):
            for name, loader in loaders.items():
                rates[name].append(epoch_rate(loader))

    print(f"{args.images} JPEGs {args.image_size[0]}x{args.image_size[1]}, crop {args.size}, "
          f"batch {args.batch_size}, workers {args.workers}, torch threads "
          f"{torch.get_num_threads()}, {args.repeats} interleaved repeats (median)")
    print(f"bad-image scan: {scan_s:.2f} s ({len(files) / scan_s:.0f} images/s)")
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"{name:>16}: {median[name]:7.0f} images/s  "
              f"(runs: {', '.join(f'{v:.0f}' for v in values)})")
    print(f"ratio pbt / torchvision+PIL: {median['pbt'] / median['torchvision+PIL']:.2f}x")


if __name__ == "__main__":
    main()
