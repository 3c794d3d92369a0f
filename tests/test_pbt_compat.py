"""Moving from PBT: its shipped config runs unchanged, PBT-style callbacks and trainers
(Keras signatures, ``build_*(self, cfg)``, ``self.model`` in ``build_optimizer``) work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_recipe, tiny_cfg
from PIL import Image

from pbt.callbacks import Callback
from pbt.config import load_config

sys.path.insert(0, str(ROOT / "recipes"))
from classification import KEYS  # noqa: E402

# The keys and values of PBT's shipped configs/config.yaml, as shipped.
PBT_CONFIG = """\
train_data: './data/dataset/train'
test_data: './data/dataset/val'
class_file: "data/dataset/class_name.txt"

train_transform: "train"
test_transform: "val"

work_dir: "work_space/test"
net_type: "mobilenet_v2"
width_mult: 1.0
flag: ""

input_size: [ 128,128 ]
rgb_mean: [ 0.5, 0.5, 0.5 ]
rgb_std: [ 0.5, 0.5, 0.5 ]
batch_size: 8
lr: 0.01
optim_type: "SGD"
loss_type: "CrossEntropyLoss"
momentum: 0.9
num_epochs: 50
num_warn_up: 3
num_workers: 2
weight_decay: 0.0005
scheduler: "multi-step"
milestones: [ 20,35 ]
gpu_id: [ 0 ]
start_save: null
log_freq: 50
progress: True

pretrained: False
finetune: False
model_file: ""
"""


def write_images(root: Path, classes: tuple[str, ...], per_class: int) -> None:
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shade = (40 + 150 * index + 7 * i) % 256
            Image.new("RGB", (20, 16), (shade, 255 - shade, 90)).save(root / name / f"{i}.png")


def test_pbt_shipped_config_runs_unchanged(tmp_path):
    write_images(tmp_path / "data" / "dataset" / "train", ("cat", "dog"), 6)
    write_images(tmp_path / "data" / "dataset" / "val", ("cat", "dog"), 3)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "config.yaml").write_text(PBT_CONFIG)
    result = run_recipe(["-c", "configs/config.yaml", "--num_epochs", "1", "--num_workers", "0",
                         "--progress", "false"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "PBT key start_save" in out and "PBT key class_file" in out
    assert "warm-up clamped to 1 epochs" in out
    runs = list((tmp_path / "work_space" / "test").glob("mobilenet_v2_128_128_CrossEntropyLoss_*"))
    assert len(runs) == 1
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["best_top1"] is not None
    assert summary["test"]["count"] == 6


def test_pbt_spellings_are_accepted():
    cfg = load_config(["--optim_type", "sgd", "--loss_type", "celoss", "--net_type",
                       "MobileNet_V2", "--pretrained", "False", "--model_file", "",
                       "--train_transform", "train", "--test_transform", "val",
                       "--flag", "exp1", "--num_epochs", "1", "--num_warn_up", "3"], keys=KEYS)
    assert (cfg.optim_type, cfg.loss_type, cfg.net_type) == ("SGD", "CELoss", "mobilenet_v2")
    assert cfg.pretrained is False and cfg.model_file is None and cfg.num_warn_up == 1


def test_flag_is_the_run_name_suffix(tmp_path, tiny_trainer):
    trainer = tiny_trainer(tiny_cfg(tmp_path, run_name=None, flag="exp1", num_epochs=1))
    assert trainer.run_dir.name.startswith("tiny_exp1_")


def test_pretrained_true_reads_torchvision_weights(tmp_path, monkeypatch):
    import torchvision

    from pbt.models import build_model

    reference = torchvision.models.resnet18(weights=None)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = build_model("resnet18", 10, pretrained=True)
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.weight.shape == (10, 512)  # the 1000-class head does not fit: fresh


class PBTStyleRecorder(Callback):
    """A callback written for PBT: Keras signatures, ``self.model``, no engine argument."""

    def __init__(self):
        self.epochs, self.batches, self.summaries = [], [], []

    def on_train_begin(self, logs={}):  # noqa: B006  (PBT's own style)
        assert self.model is not None and self.trainer.optimizer is not None

    def on_epoch_begin(self, epoch, logs={}):  # noqa: B006
        self.epochs.append(epoch)

    def on_batch_end(self, batch, logs={}):  # noqa: B006
        self.batches.append(batch)

    def on_train_summary(self, inputs, outputs, losses, epoch, batch, logs={}):  # noqa: B006
        self.summaries.append((epoch, batch, tuple(outputs.shape), float(losses.detach())))

    def on_epoch_end(self, epoch, logs={}):  # noqa: B006
        assert isinstance(epoch, int) and "loss" in logs["test"]


def test_pbt_style_callback_gets_epoch_and_batch_numbers(tmp_path, tiny_trainer):
    recorder = PBTStyleRecorder()
    tiny_trainer(tiny_cfg(tmp_path, num_epochs=2, batch_size=20), [recorder]).run()
    assert recorder.epochs == [0, 1] and recorder.batches == [0, 1, 0, 1]
    assert recorder.summaries[0][:3] == (0, 0, (20, 4))


def test_pbt_style_trainer(tmp_path):
    """A trainer in PBT's style: build_*(self, cfg), build_optimizer reading self.model,
    PBT's build_dataloader arguments, build_model_parallel, cfg.num_classes, run(logs)."""
    from conftest import NoisyBlobs
    from torch import nn

    from pbt.engine import EngineTrainer

    class PBTTrainer(EngineTrainer):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.build(cfg)
            self.logger.info(f"num_samples {self.num_samples} on {self.device}")

        def build_train_loader(self, cfg, **kwargs):
            dataset = NoisyBlobs(40, 0)
            cfg.num_classes = len(dataset.classes)
            return self.build_dataloader(dataset, cfg.batch_size, cfg.num_workers,
                                         phase="train", shuffle=True, pin_memory=False,
                                         drop_last=True, distributed=cfg.distributed)

        def build_test_loader(self, cfg, **kwargs):
            return self.build_dataloader(NoisyBlobs(12, 1), cfg.batch_size, cfg.num_workers,
                                         phase="test", shuffle=False, drop_last=False)

        def build_model(self, cfg, **kwargs):
            model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, cfg.num_classes))
            return self.build_model_parallel(model, cfg.gpu_id, distributed=cfg.distributed)

        def build_optimizer(self, cfg, **kwargs):
            return torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum)

        def build_criterion(self, cfg, **kwargs):
            return nn.CrossEntropyLoss()

    trainer = PBTTrainer(tiny_cfg(tmp_path, batch_size=16, num_epochs=2))
    summary = trainer.run({})
    assert summary["global_step"] == 2 * 2  # 40 // 16 with drop_last
    assert "top1" in summary["test"] and summary["monitor"] == "test/top1"
    assert "num_samples 40" in (tmp_path / "work" / "tiny" / "train.log").read_text()


@pytest.mark.parametrize("key", ["data_type", "polyaxon"])
def test_ignored_pbt_keys_are_named_with_the_reason(key):
    cfg = load_config([f"--{key}", "x"])
    assert any(note.startswith(f"PBT key {key}") and "ignored" in note for note in cfg.notes)


def test_launch_takes_pbts_arguments():
    """PBT's ``launch(main, num_gpus_per_machine=..., dist_url=..., args=(cfg,))``: the
    config comes from ``args``, the process count from pbt's keys (here: one, on CPU)."""
    from pbt.launch import launch

    cfg = load_config([], lr=0.3, gpu_id=[0])
    seen = []
    result = launch(lambda c: seen.append(c) or "done", num_gpus_per_machine=1, num_machines=1,
                    machine_rank=0, dist_url="auto", args=(cfg,))
    assert result == "done" and seen == [cfg] and seen[0].lr == 0.3
