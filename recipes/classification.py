"""Image classification on pbt: the example of how to write a trainer.

    accelerate launch recipes/classification.py                   # digits, no download
    accelerate launch recipes/classification.py -c my.yaml --lr 0.05

Without ``-c`` the config is ``classification.yaml`` beside this file.

With no ``train_data`` / ``test_data`` it trains on scikit-learn's bundled digits, written
once as PNG files into an ImageFolder tree and loaded like any user's data.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from pbt.config import Config, Key, parse_config
from pbt.engine import EngineTrainer
from pbt.launch import launch
from pbt.models import NET_TYPES

# train_transform presets: a base (random-resized-crop scale and horizontal flip), then
# optional additions joined by "+", e.g. "light+trivialaugment+erasing". PBT's names:
# "train" is the default augmentation, "val" (test_transform) the resize + center crop.
TRAIN_TRANSFORMS = {
    "default": {"crop_scale": (0.08, 1.0), "hflip": True},
    "train": {"crop_scale": (0.08, 1.0), "hflip": True},
    "light": {"crop_scale": (0.6, 1.0), "hflip": False},
    "none": {"crop_scale": (1.0, 1.0), "hflip": False},
}
TRANSFORM_ADDITIONS = {
    "randaugment": {"policy": "randaugment"},
    "trivialaugment": {"policy": "trivialaugment"},
    "autoaugment": {"policy": "autoaugment"},
    "colorjitter": {"color_jitter": 0.4},
    "erasing": {"erasing": 0.25},
}


def transform_options(preset: str) -> dict:
    """``build_transforms`` arguments of a ``train_transform`` preset; a preset that starts
    with an addition uses the ``default`` base."""
    names = preset.lower().split("+")
    base = names.pop(0) if names[0] in TRAIN_TRANSFORMS else "default"
    options = dict(TRAIN_TRANSFORMS[base])
    for name in names:
        if "policy" in options and "policy" in TRANSFORM_ADDITIONS.get(name, {}):
            raise ValueError(f"{preset!r} names two augmentation policies; pick one")
        options.update(TRANSFORM_ADDITIONS[name])
    return options


def _check_transform(preset: str) -> str | None:
    names = preset.lower().split("+")
    unknown = [n for n in names[1 if names[0] in TRAIN_TRANSFORMS else 0:]
               if n not in TRANSFORM_ADDITIONS]
    if unknown or not names[0]:
        return (f"a base ({', '.join(TRAIN_TRANSFORMS)}) optionally followed by +additions "
                f"({', '.join(TRANSFORM_ADDITIONS)}), e.g. light+trivialaugment+erasing")
    try:
        transform_options(preset)
    except ValueError as err:
        return str(err)
    return None

# The recipe's own config keys (the engine's are in pbt.config.CORE_KEYS).
MAX_SIDE = 8192  # input_size: a float batch of 8192 x 8192 images is already 0.8 GB each
KEYS = [
    Key("train_data", "paths", None, "ImageFolder dirs or list files (null: digits)", path=True),
    Key("test_data", "paths", None, "ImageFolder dirs or list files (null: digits)", path=True),
    Key("net_type", str, "resnet18", "backbone", choices=NET_TYPES),
    Key("width_mult", float, 1.0, "mobilenet_v2 width multiplier"),
    Key("pretrained", "bool_or_str", False, "true: torchvision's ImageNet weights; or a file",
        check=lambda v: None if not isinstance(v, str) or Path(v).is_file()
        else "true, false or an existing weight file"),
    Key("input_size", "int_list", [32, 32], "[W, H]",
        check=lambda v: None if len(v) == 2 and all(1 <= side <= MAX_SIDE for side in v)
        else f"[W, H], each an integer from 1 to {MAX_SIDE}"),
    Key("rgb_mean", "float_list", [0.5, 0.5, 0.5], "normalisation mean (0..1 scale)",
        check=lambda v: None if len(v) == 3 else "3 numbers"),
    Key("rgb_std", "float_list", [0.5, 0.5, 0.5], "normalisation std (0..1 scale)",
        check=lambda v: None if len(v) == 3 else "3 numbers"),
    Key("train_transform", str, "default", "augmentation preset: base[+additions]",
        check=_check_transform),
    Key("test_transform", str, "default", "resize + center crop (PBT: val)",
        choices=("default", "val")),
    Key("resample", str, "none", "class balancing", choices=("none", "mean", "sqrt", "log")),
    Key("skip_bad_images", bool, False, "skip unreadable images with one warning"),
    Key("cache_images", bool, None, "keep the decoded images in shared memory (null: when "
        "they take at most 256 MB per process)", nullable=True, safe_on_resume=True),
]


class ClassificationTrainer(EngineTrainer):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.build(cfg)

    def data_sources(self, cfg: Config) -> tuple:
        """The user's train/test data, or the embedded digits dataset."""
        if cfg.train_data and cfg.test_data:
            return cfg.train_data, cfg.test_data
        from pbt.data import materialise_digits

        with self.accelerator.main_process_first():
            train_dir, test_dir = materialise_digits(Path(cfg.work_dir) / "digits", cfg.seed)
        return cfg.train_data or str(train_dir), cfg.test_data or str(test_dir)

    def build_train_loader(self, cfg: Config) -> DataLoader:
        from pbt.data import ResampleSampler, build_dataset, build_transforms

        train_data, _ = self.data_sources(cfg)
        transform = build_transforms(cfg.input_size, cfg.rgb_mean, cfg.rgb_std, train=True,
                                     **transform_options(cfg.train_transform))
        dataset = build_dataset(train_data, transform, skip_bad_images=cfg.skip_bad_images,
                                key="train_data", **self.cache_options(cfg))
        self.class_names = list(dataset.classes)
        self.num_classes = len(self.class_names)
        workers, why = self.loader_workers(cfg, dataset)
        self.log(f"train data: {len(dataset)} images, {self.num_classes} classes, "
                 f"{dataset.cache_note}{why}")
        sampler = None
        if cfg.resample != "none":  # class balancing by the sampler; the dataset is untouched
            sampler = ResampleSampler(dataset.targets, cfg.resample, cfg.seed)
        return self.build_dataloader(dataset, train=True, sampler=sampler, num_workers=workers)

    def build_test_loader(self, cfg: Config) -> DataLoader:
        from pbt.data import build_dataset, build_transforms

        _, test_data = self.data_sources(cfg)
        transform = build_transforms(cfg.input_size, cfg.rgb_mean, cfg.rgb_std, train=False)
        dataset = build_dataset(test_data, transform, class_names=self.class_names,
                                skip_bad_images=cfg.skip_bad_images, key="test_data",
                                **self.cache_options(cfg))
        workers, why = self.loader_workers(cfg, dataset)
        self.log(f"test data: {len(dataset)} images, {dataset.cache_note}{why}")
        return self.build_dataloader(dataset, train=False, num_workers=workers)

    def cache_options(self, cfg: Config) -> dict:
        """``build_dataset``'s cache arguments: ``cache_images``, and for auto the limit
        shared among this machine's training processes (each holds its own cache)."""
        from pbt.data import CACHE_AUTO_MAX_BYTES

        return {"cache_images": cfg.cache_images,
                "cache_limit": CACHE_AUTO_MAX_BYTES // self.local_processes()}

    def loader_workers(self, cfg: Config, dataset) -> tuple[int | None, str]:
        """Loader workers for ``dataset`` (None: the engine's choice, ``num_workers`` or
        the CPU count) and a note for the log. Cached images on the CPU with
        ``num_workers: null`` get workers only for CPUs torch's threads leave free."""
        from pbt.data import free_cpu_workers

        if (cfg.num_workers is not None or getattr(dataset, "cache", None) is None
                or self.accelerator.device.type != "cpu"):
            return None, ""
        workers = free_cpu_workers(self.local_processes())
        threads = f"torch's {torch.get_num_threads()} thread(s)"
        if workers == 0:
            return 0, f"; loaded in the main process ({threads} use the CPUs)"
        return workers, f"; {workers} loader worker(s) on the CPUs {threads} leave free"

    def build_model(self, cfg: Config) -> nn.Module:
        from pbt.models import build_model

        return build_model(cfg.net_type, self.num_classes, pretrained=cfg.pretrained,
                           width_mult=cfg.width_mult)

    def build_teacher(self, cfg: Config, saved: dict) -> nn.Module:
        """The teacher's own backbone (it may be larger than the student's)."""
        from pbt.models import build_model

        if "net_type" not in saved:  # a bare state_dict: the student's architecture
            return self.build_model(cfg)
        return build_model(saved["net_type"], self.num_classes,
                           width_mult=saved.get("width_mult", 1.0))

    # -- what the engine asks of a task ---------------------------------------------------
    def run_name_parts(self, cfg: Config) -> list[str]:
        width, height = cfg.input_size
        return [cfg.net_type, str(width), str(height), cfg.loss_type]

    def example_inputs(self) -> torch.Tensor:
        width, height = self.cfg.input_size
        return torch.randn(1, 3, height, width)

    @torch.no_grad()
    def evaluate_model(self, model: nn.Module) -> dict[str, float]:
        """Test top-1 of a plain model (the pruning report's before / after)."""
        was_training = model.training
        model.eval()
        correct = total = 0
        for images, labels in self.test_loader:
            correct += int((model(images).argmax(1) == labels).sum())
            total += int(labels.numel())
        model.train(was_training)
        return {"top1": 100.0 * correct / max(total, 1)}

    def checkpoint_meta(self) -> dict:
        cfg = self.cfg
        return {"net_type": cfg.net_type, "num_classes": self.num_classes,
                "class_names": self.class_names, "input_size": list(cfg.input_size),
                "width_mult": cfg.width_mult}


def main(cfg: Config) -> dict:
    return ClassificationTrainer(cfg).run()


if __name__ == "__main__":
    # classification.yaml beside this file is the recipe's default config; -c replaces it
    launch(main, parse_config(default_file=Path(__file__).with_suffix(".yaml"), keys=KEYS))
