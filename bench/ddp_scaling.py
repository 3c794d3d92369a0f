"""Training throughput of pbt's engine with 1 and N DDP processes (or one GPU, fp32 / bf16).

Every run trains the same model on synthetic in-memory images (no decoding, so the numbers
are the training step plus DDP), with the same per-process batch size and the same number
of optimizer steps per process, started through ``pbt.engine.launch`` exactly as
``python recipes/classification.py --num_processes N`` would start them. The first
``--warmup`` steps are not timed. images/s counts the images of all processes. Each
process uses ``cores / N`` threads (as ``launch`` sets them) unless ``--threads`` says
otherwise; the configurations alternate ``--repeats`` times and the best of each is shown,
so load from other programs on the machine hits them alike.

    python bench/ddp_scaling.py                                  # CPU: 1 vs 2 processes (gloo)
    python bench/ddp_scaling.py --device cuda --processes 1 --net_type resnet50 \\
        --input_size 224 224 --batch_size 64 --mixed_precision bf16

On a CPU machine, N processes share the cores (each gets cores / N threads), so no speed-up
is expected; the point is that the DDP overhead shows and is small.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pbt.callbacks import Callback  # noqa: E402
from pbt.config import Config, Key, load_config  # noqa: E402
from pbt.engine import EngineTrainer  # noqa: E402
from pbt.launch import launch  # noqa: E402


class RandomImages(Dataset):
    """``size`` items drawn from a pool of at most 256 fixed random images (decoding and
    augmentation cost nothing; memory stays small at 224x224)."""

    def __init__(self, size: int, input_size: list[int], num_classes: int) -> None:
        generator = torch.Generator().manual_seed(0)
        width, height = input_size
        pool = min(size, 256)
        self.size = size
        self.images = torch.randn(pool, 3, height, width, generator=generator)
        self.targets = torch.randint(0, num_classes, (pool,), generator=generator)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index % len(self.images)], self.targets[index % len(self.images)]


BENCH_KEYS = [Key("net_type", str, "resnet18", "backbone"),
              Key("input_size", "int_list", [32, 32], "[W, H]")]


class StepTimer(Callback):
    """Wall time from the end of optimizer step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    def _sync(self) -> None:
        if self.trainer.accelerator.device.type == "cuda":
            torch.cuda.synchronize()

    def on_batch_end(self, batch: int, logs: dict) -> None:
        step = self.trainer.global_step
        if step == self.warmup:
            self._sync()
            self.start = time.perf_counter()
        elif step > self.warmup:
            self._sync()
            self.end, self.steps = time.perf_counter(), step - self.warmup


class BenchTrainer(EngineTrainer):
    num_classes = 10

    def __init__(self, cfg: Config, warmup: int) -> None:
        self.timer = StepTimer(warmup)
        super().__init__(cfg)
        self.build(cfg)

    def build_train_loader(self, cfg: Config) -> torch.utils.data.DataLoader:
        size = cfg.batch_size * self.accelerator.num_processes * self.total_steps
        return self.build_dataloader(RandomImages(size, cfg.input_size, 10), train=True)

    def build_test_loader(self, cfg: Config) -> torch.utils.data.DataLoader:
        return self.build_dataloader(RandomImages(cfg.batch_size, cfg.input_size, 10),
                                     train=False)

    def build_model(self, cfg: Config) -> torch.nn.Module:
        from pbt.models import build_model

        return build_model(cfg.net_type, self.num_classes)

    def build_callbacks(self, cfg: Config) -> list[Callback]:
        return [self.timer]  # only the timer: no schedule, metrics or files in the way

    @property
    def total_steps(self) -> int:
        return self.cfg.steps_total


def worker(cfg: Config) -> dict:
    """One process: train ``steps_total`` steps, return its timing."""
    if cfg.device_type == "cpu":
        torch.set_num_threads(cfg.threads)
    trainer = BenchTrainer(cfg, warmup=cfg.warmup)
    trainer.loop()
    timer = trainer.timer
    return {"processes": trainer.accelerator.num_processes, "steps": timer.steps,
            "seconds": timer.end - timer.start, "threads": torch.get_num_threads()}


def measure(args: argparse.Namespace, processes: int, work_dir: str) -> dict:
    cfg = load_config(
        [], keys=BENCH_KEYS, work_dir=work_dir, run_name=f"p{processes}_{args.mixed_precision}",
        net_type=args.net_type, input_size=args.input_size, batch_size=args.batch_size,
        num_workers=args.workers, progress=False, num_epochs=1, lr=0.01, num_warn_up=0,
        mixed_precision=args.mixed_precision, main_process_port=0,
        **({"gpu_id": list(range(processes))} if args.device == "cuda"
           else {"num_processes": processes}),
    )
    cfg.steps_total, cfg.warmup = args.warmup + args.steps, args.warmup
    cfg.device_type = args.device
    cfg.threads = args.threads or max(1, (os.cpu_count() or 1) // processes)
    result = launch(worker, cfg)
    images = processes * args.batch_size * result["steps"]
    return dict(result, images_per_s=images / result["seconds"],
                ms_per_step=1000 * result["seconds"] / result["steps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--net_type", default="resnet18")
    parser.add_argument("--input_size", type=int, nargs=2, default=[32, 32])
    parser.add_argument("--batch_size", type=int, default=32, help="per process")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per process (0: cores / processes)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers per process (default: 0 on CPU, 4 on CUDA)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    if args.workers is None:
        args.workers = 4 if args.device == "cuda" else 0
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark even on a GPU machine
    best: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="pbt-ddp-bench-") as work_dir:
        for repeat in range(args.repeats):
            order = args.processes if repeat % 2 == 0 else args.processes[::-1]
            for processes in order:
                row = measure(args, processes, work_dir)
                if row["images_per_s"] > best.get(processes, {}).get("images_per_s", 0.0):
                    best[processes] = row
    rows = [best[processes] for processes in args.processes]
    print(f"\n{args.net_type} {args.input_size[0]}x{args.input_size[1]}, batch "
          f"{args.batch_size} per process, {args.steps} timed steps, {args.device}, "
          f"mixed_precision {args.mixed_precision}, {os.cpu_count()} CPU cores")
    print(f"{'processes':>9} {'threads':>8} {'images/s':>10} {'ms/step':>9} {'vs first':>9}")
    base = rows[0]["images_per_s"]
    for row in rows:
        threads = row["threads"] if args.device == "cpu" else "-"
        print(f"{row['processes']:>9} {threads:>8} {row['images_per_s']:>10.1f} "
              f"{row['ms_per_step']:>9.1f} {row['images_per_s'] / base:>8.2f}x")


if __name__ == "__main__":
    main()
