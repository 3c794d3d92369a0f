"""Shared test helpers: a tiny real trainer on in-memory data (no mocks of pbt)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
# One BLAS/OpenMP thread per process: test runs start several processes on 2 cores, and
# oversubscribed OpenMP threads spin (a 10 s run took 90 s with another process busy).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


class NoisyBlobs(Dataset):
    """4 Gaussian blobs in 8-d; a random feature mask makes augmentation draw from the RNG."""

    def __init__(self, size: int, seed: int, augment: bool = False) -> None:
        generator = torch.Generator().manual_seed(seed)
        centers = torch.randn(4, 8, generator=torch.Generator().manual_seed(123)) * 3
        self.targets = torch.randint(0, 4, (size,), generator=generator)
        self.data = centers[self.targets] + torch.randn(size, 8, generator=generator)
        self.augment = augment
        self.classes = ["a", "b", "c", "d"]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        x = self.data[index]
        if self.augment:
            x = x + 0.1 * torch.randn(8)
        return x, self.targets[index]


def tiny_trainer_class():
    from pbt.engine import EngineTrainer

    class TinyTrainer(EngineTrainer):
        def __init__(self, cfg, extra_callbacks=(), train_size=40, test_size=23):
            self.extra_callbacks = list(extra_callbacks)
            self.train_size, self.test_size = train_size, test_size
            super().__init__(cfg)
            self.num_classes, self.class_names = 4, ["a", "b", "c", "d"]
            self.build(cfg)

        def build_train_loader(self, cfg):
            return self.build_dataloader(NoisyBlobs(self.train_size, 0, augment=True), train=True)

        def build_test_loader(self, cfg):
            return self.build_dataloader(NoisyBlobs(self.test_size, 1), train=False)

        def build_model(self, cfg):
            return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Dropout(0.3), nn.Linear(16, 4))

        def build_callbacks(self, cfg):
            return super().build_callbacks(cfg) + self.extra_callbacks

    return TinyTrainer


def tiny_cfg(tmp_path: Path, **overrides):
    from pbt.config import load_config

    base = dict(work_dir=str(tmp_path / "work"), run_name="tiny", num_epochs=3, batch_size=8,
                lr=0.05, num_workers=0, progress=False, milestones=[2], log_freq=2)
    base.update(overrides)
    return load_config([], **base)


@pytest.fixture
def tiny_trainer():
    return tiny_trainer_class()


@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them between in-process runs."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def weights(path: Path) -> dict:
    """The model weights of a pbt .pth checkpoint."""
    return torch.load(path, weights_only=True)["model"]


def same_weights(a: Path, b: Path) -> bool:
    """Whether two .pth checkpoints hold bit-identical model weights."""
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def require(module: str):
    """``module`` (an optional extra), else a skip; under ``CI=true`` a missing extra fails,
    so CI cannot go green by skipping what README promises (export, NNI)."""
    import importlib

    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        try:
            return importlib.import_module(module)
        except ImportError as err:
            pytest.fail(f"CI=true: the optional extra providing {module!r} is missing ({err}); "
                        "install with .[test]", pytrace=False)
    return pytest.importorskip(module, exc_type=ImportError)


def run_recipe(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    import subprocess

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "recipes" / "classification.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
