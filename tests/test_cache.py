"""The decoded-image cache (``cache_images``): the same items as decoding each file, one
shared-memory tensor that DataLoader workers map, the auto rule, bad images, exact resume."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, same_weights
from PIL import Image
from test_data import _bad_tree
from torch.utils.data import DataLoader, Dataset

from pbt.config import ConfigError
from pbt.data import (
    CACHE_AUTO_MAX_BYTES,
    ImageCache,
    SeededDataset,
    build_dataloader,
    build_dataset,
    build_transforms,
    default_num_workers,
    estimate_decoded_bytes,
    free_cpu_workers,
    load_image,
    stop_workers,
)


def _image_tree(root: Path) -> Path:
    """Two classes of images in several formats, modes and sizes (PNG, JPEG, grey, RGBA,
    palette, WebP) — what decoding and the cache must agree on."""
    rng = np.random.default_rng(0)
    kinds = [("RGB", ".png"), ("L", ".png"), ("RGBA", ".png"), ("P", ".png"),
             ("RGB", ".jpg"), ("L", ".jpg"), ("RGB", ".webp")]
    for number in range(14):
        mode, ext = kinds[number % len(kinds)]
        width, height = 9 + number, 7 + 2 * (number % 3)
        image = Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))
        image = image.convert(mode) if mode != "P" else image.convert(
            "P", palette=Image.Palette.ADAPTIVE)
        path = root / "ab"[number % 2] / f"{number:02d}{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _image_tree(tmp_path_factory.mktemp("images"))


def _train_transform():
    return build_transforms([12, 10], [0.5] * 3, [0.5] * 3, train=True, crop_scale=(0.3, 1.0))


def test_cached_images_equal_decoded_files(tree):
    dataset = build_dataset(tree, cache_images=True)
    assert dataset.cache is not None and len(dataset.cache) == len(dataset) == 14
    for index, (path, label) in enumerate(dataset.samples):
        image, item_label = dataset[index]
        assert torch.equal(image, load_image(path)) and item_label == label
    images = [load_image(path) for path, _ in dataset.samples]
    private = ImageCache(images, shared=False)  # where /dev/shm is too small for the cache
    assert not private.data.is_shared()
    assert all(torch.equal(private.image(i), image) for i, image in enumerate(images))
    # the header estimate is exact: 3 bytes a pixel, whatever the file's mode
    assert estimate_decoded_bytes([path for path, _ in dataset.samples]) == dataset.cache.nbytes


def test_a_transform_working_in_place_leaves_the_cache_alone(tree):
    dataset = build_dataset(tree, transform=lambda image: image.zero_(), cache_images=True)
    assert int(dataset[0][0].sum()) == 0
    assert torch.equal(dataset.cache.image(0), load_image(dataset.samples[0][0]))


@pytest.mark.parametrize("workers", [0, 2])
def test_cached_batches_are_bit_identical_to_uncached(tree, workers):
    """Same seed, same batches: through SeededDataset and pbt's loader, over two epochs."""
    batches = {}
    for cache in (False, True):
        dataset = build_dataset(tree, _train_transform(), cache_images=cache)
        loader = build_dataloader(dataset, batch_size=4, num_workers=workers, seed=3,
                                  shuffle=True)
        batches[cache] = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            batches[cache].extend(loader)
        stop_workers(loader)
    assert len(batches[True]) == len(batches[False]) == 8
    for (images, labels), (cached_images, cached_labels) in zip(batches[False], batches[True]):
        assert torch.equal(images, cached_images) and torch.equal(labels, cached_labels)


class _SharedProbe(Dataset):
    """Per item: whether the worker sees the cache in shared memory, and the item."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.dataset.dataset.cache.data.is_shared(), self.dataset[key][0]


def test_cache_is_one_shared_tensor_that_spawned_workers_map(tree):
    dataset = build_dataset(tree, _train_transform(), cache_images=True)
    cache = dataset.cache
    assert isinstance(cache, ImageCache) and cache.data.is_shared()
    assert cache.data.dtype == torch.uint8 and cache.data.dim() == 1
    seeded = SeededDataset(dataset, seed=5)
    keys = [(1, index) for index in range(len(dataset))]
    # a spawned worker unpickles the dataset: a copy would not be shared
    loader = DataLoader(_SharedProbe(seeded), batch_size=None, sampler=keys, num_workers=1,
                        multiprocessing_context="spawn")
    items = list(loader)
    assert all(bool(shared) for shared, _ in items)
    assert all(torch.equal(image, seeded[key][0]) for (_, image), key in zip(items, keys))


def test_auto_caches_below_the_limit_only(tree):
    cached = build_dataset(tree, cache_images=None)
    size = cached.cache.nbytes
    assert cached.cache_note == (
        f"cached 14 decoded images ({size / 1e6:.1f} MB) in shared memory (cache_images "
        f"auto: {size / 1e6:.1f} MB decoded, at most {CACHE_AUTO_MAX_BYTES / 1e6:.0f} MB)")
    over = build_dataset(tree, cache_images=None, cache_limit=size - 1)
    assert over.cache is None
    assert over.cache_note == f"not cached (cache_images auto: over {(size - 1) / 1e6:.0f} MB " \
                              "decoded)"
    assert build_dataset(tree, cache_images=None, cache_limit=size).cache is not None
    off = build_dataset(tree, cache_images=False)
    assert off.cache is None and off.cache_note == "not cached (cache_images false)"


def test_free_cpu_workers_leave_torch_its_threads():
    cpus, threads = len(os.sched_getaffinity(0)), torch.get_num_threads()
    try:
        torch.set_num_threads(cpus)
        assert free_cpu_workers(1) == 0
        torch.set_num_threads(1)
        assert free_cpu_workers(1) == default_num_workers(1) == min(8, cpus - 1)
    finally:
        torch.set_num_threads(threads)


def test_bad_images_with_the_cache(tmp_path):
    bad = _bad_tree(tmp_path / "data")
    with pytest.raises(ConfigError) as err:
        build_dataset(tmp_path / "data", cache_images=True)
    message = str(err.value)
    assert "3 bad image(s)" in message and all(str(path) in message for path in bad.values())
    assert "empty file" in message and "truncated" in message and "not an image" in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cached = build_dataset(tmp_path / "data", skip_bad_images=True, cache_images=True)
        plain = build_dataset(tmp_path / "data", skip_bad_images=True, cache_images=False)
    assert [str(w.message).count("skipped 3 bad image(s) out of 7") for w in caught] == [1, 1]
    assert cached.samples == plain.samples and len(cached.cache) == len(cached) == 4
    assert all(torch.equal(cached[i][0], plain[i][0]) for i in range(len(plain)))


# -- the recipe ----------------------------------------------------------------------------
def _recipe():
    spec = importlib.util.spec_from_file_location(
        "classification_recipe", ROOT / "recipes" / "classification.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.mark.slow
def test_recipe_resumes_exactly_across_cache_modes(tmp_path):
    """Digits, uncached straight through == cached (auto) stopped mid-epoch, resumed with
    cache_images true: the cache changes no batch, so it may change on resume. With an
    augmentation preset (light+randaugment): README promises presets exact under resume,
    and its draws are seeded per sample whichever process or worker loads it."""
    from pbt.callbacks import Callback
    from pbt.config import load_config
    from pbt.launch import Preempted

    recipe = _recipe()

    class StopAt(Callback):  # what SIGTERM does: save a state after this step and stop
        def on_batch_end(self, batch, logs):
            if (self.trainer.epoch, batch) == (1, 4):
                self.trainer.stop_signal = 15

    class Trainer(recipe.ClassificationTrainer):
        def build_callbacks(self, cfg):
            return super().build_callbacks(cfg) + self.extra

    def train(run_name: str, extra=(), **overrides):
        cfg = load_config([], keys=recipe.KEYS, work_dir=str(tmp_path / "w"),
                          run_name=run_name, num_epochs=2, input_size=[16, 16], batch_size=96,
                          lr=0.05, scheduler="cosine",
                          train_transform="light+randaugment",
                          progress=False, **{"num_workers": 0, **overrides})
        Trainer.extra = list(extra)
        try:
            return Trainer(cfg).run()
        finally:
            _reset_accelerate()

    train("straight", cache_images=False)
    with pytest.raises(Preempted):  # cache_images: null (auto), num_workers: null
        train("cut", [StopAt()], num_workers=None)
    log = (tmp_path / "w" / "cut" / "train.log").read_text()
    workers = free_cpu_workers(1)
    where = (f"; {workers} loader worker(s) on the CPUs torch's 1 thread(s) leave free"
             if workers else "; loaded in the main process (torch's 1 thread(s) use the CPUs)")
    assert "train data: 1437 images, 10 classes, cached 1437 decoded images (0.3 MB) in " \
        "shared memory (cache_images auto: 0.3 MB decoded, at most 256 MB)" + where in log
    assert "test data: 360 images, cached 360 decoded images (0.1 MB)" in log
    straight_log = (tmp_path / "w" / "straight" / "train.log").read_text()
    assert "1437 images, 10 classes, not cached (cache_images false)" in straight_log
    summary = train("cut", resume=str(tmp_path / "w" / "cut"), cache_images=True)
    assert summary["epochs"] == 2
    log = (tmp_path / "w" / "cut" / "train.log").read_text()
    assert "epoch 2, batch 5" in log and "cached 1437 decoded images (0.3 MB) in shared " \
        "memory (cache_images true)" in log
    assert same_weights(tmp_path / "w" / "straight" / "last.pth", tmp_path / "w" / "cut" /
                        "last.pth")
