"""Training input pipeline throughput: the loader pbt trains with vs plain torchvision.

Generates JPEGs (default 2,000 at 160x120, 10 classes) in a temporary folder, then times
full epochs of three pipelines over the same file list, at the same batch size, worker
count and pin_memory, with the same train augmentation (RandomResizedCrop scale 0.08-1 with
antialias, horizontal flip, to float, normalise):

- ``pbt``: what training runs: ``pbt.data.build_dataloader`` (the function
  ``EngineTrainer.build_dataloader(dataset, train=True)`` calls: per-sample reseeding,
  epoch sampler, shuffle) over ``build_dataset`` + ``build_transforms(train=True)``, with
  ``set_epoch`` each epoch as the engine does (Accelerate's ``prepare`` wrapper is not
  included);
- ``decode_image+v2`` (the baseline): a Dataset reading each file with
  ``torchvision.io.read_file`` and ``decode_image`` to uint8, then ``transforms.v2`` on the
  tensor, in a plain shuffling DataLoader;
- ``ImageFolder+PIL``: torchvision ImageFolder, PIL decode, v1 transforms with ToTensor.

One warm-up epoch each, then ``--repeats`` rounds; the order of the pipelines alternates
(forward, then reversed) from round to round so machine load hits them alike. Prints the
median images/s of each and the ratio pbt / decode_image+v2.

    python bench/data_throughput.py [--images 2000] [--workers N] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file

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


class DecodeV2Dataset(Dataset):
    """(transform(uint8 CHW RGB tensor), label) read with torchvision.io, no pbt code."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(decode_image(read_file(path), mode=ImageReadMode.RGB)), label


def plain_loader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    """The DataLoader settings of the baselines (pin_memory as pbt sets it)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())


def pbt_loader(root: Path, size: int, batch_size: int, workers: int,
               seed: int = 0) -> DataLoader:
    """The training loader of ``EngineTrainer.build_dataloader(dataset, train=True)`` on
    one process: ``pbt.data.build_dataloader`` with ``shuffle=True``."""
    from pbt.data import build_dataloader, build_dataset, build_transforms

    transform = build_transforms([size, size], MEAN, STD, train=True)
    dataset = build_dataset(root, transform=transform, check_images=False)  # scanned above
    return build_dataloader(dataset, batch_size, workers, seed, shuffle=True, processes_here=1)


def decode_v2_loader(samples: list[tuple[str, int]], size: int, batch_size: int,
                     workers: int) -> DataLoader:
    from torchvision.transforms import v2

    transform = v2.Compose([v2.RandomResizedCrop(size, antialias=True),
                            v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize(MEAN, STD)])
    return plain_loader(DecodeV2Dataset(samples, transform), batch_size, workers)


def imagefolder_loader(root: Path, size: int, batch_size: int, workers: int) -> DataLoader:
    from torchvision import datasets
    from torchvision import transforms as T

    transform = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(MEAN, STD)])
    return plain_loader(datasets.ImageFolder(str(root), transform=transform), batch_size,
                        workers)


def epoch_rate(loader: DataLoader, epoch: int) -> float:
    """Images per second over one full epoch (``set_epoch`` first where the sampler has it,
    as pbt's engine does)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
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

        classes = sorted(folder.name for folder in root.iterdir())
        samples = [(file, classes.index(Path(file).parent.name)) for file in files]
        loaders = {
            "pbt": pbt_loader(root, args.size, args.batch_size, args.workers),
            "decode_image+v2": decode_v2_loader(samples, args.size, args.batch_size,
                                                args.workers),
            "ImageFolder+PIL": imagefolder_loader(root, args.size, args.batch_size,
                                                  args.workers),
        }
        for loader in loaders.values():  # warm-up: worker start, page cache, lazy imports
            epoch_rate(loader, 0)
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        orders: list[str] = []
        for repeat in range(args.repeats):
            names = list(loaders) if repeat % 2 == 0 else list(loaders)[::-1]
            orders.append(" > ".join(names))
            for name in names:
                rates[name].append(epoch_rate(loaders[name], repeat + 1))

    print(f"{args.images} JPEGs {args.image_size[0]}x{args.image_size[1]}, crop {args.size}, "
          f"batch {args.batch_size}, workers {args.workers}, torch threads "
          f"{torch.get_num_threads()}, {args.repeats} repeats (median), order alternating:")
    for repeat, order in enumerate(orders, start=1):
        print(f"  repeat {repeat}: {order}")
    print(f"bad-image scan: {scan_s:.2f} s ({len(files) / scan_s:.0f} images/s)")
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"{name:>16}: {median[name]:7.0f} images/s  "
              f"(runs: {', '.join(f'{v:.0f}' for v in values)})")
    base = median["decode_image+v2"]
    print(f"ratio pbt / decode_image+v2: {median['pbt'] / base:.2f}x")
    print(f"(pbt / ImageFolder+PIL: {median['pbt'] / median['ImageFolder+PIL']:.2f}x; "
          f"decode_image+v2 / ImageFolder+PIL: {base / median['ImageFolder+PIL']:.2f}x)")


if __name__ == "__main__":
    main()
