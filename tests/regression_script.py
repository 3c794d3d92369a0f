"""A user's regression script, written from README alone: its own config key, float
targets, dict outputs and a dict of losses; trains with the default callbacks.

    python tests/regression_script.py --hidden_dim 8 [pbt flags]
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from pbt.config import Key, parse_config
from pbt.engine import EngineTrainer
from pbt.launch import launch

KEYS = [Key("hidden_dim", int, 16, "width of the hidden layer")]


def make_data(size: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 4, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(size, generator=generator)
    return TensorDataset(x, y[:, None])


class RegressionTrainer(EngineTrainer):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.build(cfg)

    def build_train_loader(self, cfg):
        return self.build_dataloader(make_data(64, 0), train=True)

    def build_test_loader(self, cfg):
        return self.build_dataloader(make_data(33, 1), train=False)

    def build_model(self, cfg):
        return nn.Sequential(nn.Linear(4, cfg.hidden_dim), nn.ReLU(), nn.Linear(cfg.hidden_dim, 1))

    def build_criterion(self, cfg):
        return nn.MSELoss()

    def run_step(self, inputs):
        x, y = inputs
        prediction = self.model(x)
        losses = {"mse": self.criterion(prediction, y),
                  "l1": 0.1 * (prediction - y).abs().mean()}
        return {"prediction": prediction}, losses


def main(cfg):
    return RegressionTrainer(cfg).run()


if __name__ == "__main__":
    launch(main, parse_config(keys=KEYS))
