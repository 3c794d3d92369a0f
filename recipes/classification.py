"""Image classification on pbt: the example of how to write a trainer.

    accelerate launch recipes/classification.py                   # digits, no download
    accelerate launch recipes/classification.py -c my.yaml --lr 0.05

Without ``-c`` the config is ``classification.yaml`` beside this file.

With no ``train_data`` / ``test_data`` it trains on scikit-learn's bundled digits, written
once as PNG files into an ImageFolder tree and loaded like any user's data.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader

from pbt.config import Config, ConfigError, parse_config
from pbt.engine import EngineTrainer, launch

# train_transform presets: random-resized-crop scale and horizontal flip.
TRAIN_TRANSFORMS = {
    "default": {"crop_scale": (0.08, 1.0), "hflip": True},
    "light": {"crop_scale": (0.6, 1.0), "hflip": False},
    "none": {"crop_scale": (1.0, 1.0), "hflip": False},
}


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
        preset = cfg.train_transform or "default"
        if preset not in TRAIN_TRANSFORMS:
            raise ConfigError(f"key 'train_transform' has value {preset!r}; expected one of "
                              + ", ".join(TRAIN_TRANSFORMS))
        transform = build_transforms(cfg.input_size, cfg.rgb_mean, cfg.rgb_std, train=True,
                                     **TRAIN_TRANSFORMS[preset])
        dataset = build_dataset(train_data, transform, skip_bad_images=cfg.skip_bad_images,
                                key="train_data")
        self.class_names = list(dataset.classes)
        self.num_classes = len(self.class_names)
        self.log(f"train data: {len(dataset)} images, {self.num_classes} classes")
        sampler = None
        if cfg.resample != "none":  # class balancing by the sampler; the dataset is untouched
            sampler = ResampleSampler(dataset.targets, cfg.resample, cfg.seed)
        return self.build_dataloader(dataset, cfg, train=True, sampler=sampler)

    def build_test_loader(self, cfg: Config) -> DataLoader:
        from pbt.data import build_dataset, build_transforms

        _, test_data = self.data_sources(cfg)
        if cfg.test_transform not in (None, "default"):
            raise ConfigError(f"key 'test_transform' has value {cfg.test_transform!r}; "
                              "expected 'default' (resize + center crop)")
        transform = build_transforms(cfg.input_size, cfg.rgb_mean, cfg.rgb_std, train=False)
        dataset = build_dataset(test_data, transform, class_names=self.class_names,
                                skip_bad_images=cfg.skip_bad_images, key="test_data")
        self.log(f"test data: {len(dataset)} images")
        return self.build_dataloader(dataset, cfg, train=False)

    def build_model(self, cfg: Config) -> nn.Module:
        from pbt.models import build_model

        model = build_model(cfg.net_type, self.num_classes, pretrained=cfg.pretrained)
        weights = cfg.finetune if isinstance(cfg.finetune, str) else cfg.model_file
        if weights:
            self.load_weights(model, weights)
        return model


def main(cfg: Config) -> dict:
    return ClassificationTrainer(cfg).run()


if __name__ == "__main__":
    # classification.yaml beside this file is the recipe's default config; -c replaces it
    launch(main, parse_config(default_file=Path(__file__).with_suffix(".yaml")))
