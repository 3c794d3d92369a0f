"""EMA, mixup / CutMix, augmentation presets, compile fallback, model summary, history.csv
and the confusion matrix image: real runs of the tiny trainer and real files read back."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from conftest import ROOT, NoisyBlobs, tiny_cfg
from test_resume import assert_same_run, train_tiny

from pbt.callbacks import Callback, ModelEMA
from pbt.config import ConfigError
from pbt.data import BatchMixer, build_transforms
from pbt.losses import LabelSmoothing


def recipe_module():
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import classification
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    return classification


# -- mixup / CutMix ------------------------------------------------------------------------
def read_mix(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(share of each row's own image, index of its partner) from the targets of a batch
    whose label i is sample i (so every class is one sample)."""
    own = targets.diagonal()
    partner = torch.where(own < 1, (targets - torch.diag(own)).argmax(1), torch.arange(len(own)))
    return own, partner


def test_mixup_mixes_images_and_targets_alike():
    images, labels = torch.rand(6, 3, 8, 8), torch.arange(6)
    mixer = BatchMixer(6, mixup_alpha=0.4, seed=3)
    mixed, targets = mixer((images, labels), 0, 5)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    share, partner = read_mix(targets)
    expected = share[:, None, None, None] * images + (1 - share[:, None, None, None]) * \
        images[partner]
    assert torch.allclose(mixed, expected, atol=1e-6)
    assert (share < 1).any()
    # the same (seed, epoch, batch, process) mixes the same; another batch or rank does not
    assert torch.equal(mixer((images, labels), 0, 5)[0], mixed)
    assert not torch.equal(mixer((images, labels), 0, 6)[0], mixed)
    other_rank = BatchMixer(6, mixup_alpha=0.4, seed=3, process_index=1)
    assert not torch.equal(other_rank((images, labels), 0, 5)[0], mixed)


def test_cutmix_pastes_a_box_whose_area_is_the_target_share():
    images, labels = torch.rand(6, 3, 16, 16) + torch.arange(6)[:, None, None, None], \
        torch.arange(6)
    mixer = BatchMixer(6, cutmix_alpha=1.0, seed=0)
    for batch in range(4):
        mixed, targets = mixer((images, labels), 0, batch)
        share, partner = read_mix(targets)
        for i in range(6):
            from_partner = (mixed[i] == images[partner[i]]).all(0) & (partner[i] != i)
            from_own = (mixed[i] == images[i]).all(0)
            assert (from_partner | from_own).all()
            assert float(from_own.float().mean()) == pytest.approx(float(share[i]), abs=1e-6)


def test_mixing_switches_off_in_the_last_epochs_and_by_probability():
    batch = (torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    late = BatchMixer(4, mixup_alpha=1.0, stop_epoch=2)
    assert late(batch, 1, 0) is not batch and late(batch, 2, 0) is batch
    assert BatchMixer(4, mixup_alpha=1.0, mix_prob=0.0)(batch, 0, 0) is batch
    with pytest.raises(TypeError, match="integer labels"):
        late((batch[0], batch[1].float()), 0, 0)


def test_soft_targets_work_with_label_smoothing():
    logits = torch.randn(5, 4)
    a, b, share = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([1, 1, 0, 2, 3]), 0.3
    one_hot = torch.nn.functional.one_hot
    soft = share * one_hot(a, 4).float() + (1 - share) * one_hot(b, 4).float()
    for smoothing in (0.0, 0.1):
        loss = LabelSmoothing(smoothing)
        expected = share * loss(logits, a) + (1 - share) * loss(logits, b)
        assert torch.allclose(loss(logits, soft), expected, atol=1e-6)
    ce = torch.nn.CrossEntropyLoss()
    assert torch.allclose(ce(logits, soft), share * ce(logits, a) + (1 - share) * ce(logits, b))


def test_mixup_needs_a_loss_of_class_probabilities(tmp_path, tiny_trainer):
    with pytest.raises(ConfigError, match="FocalLoss"):
        tiny_trainer(tiny_cfg(tmp_path, mixup_alpha=0.2, loss_type="FocalLoss"))
    run_dir = tmp_path / "work" / "tiny"  # at most the lock of the refused run
    assert not [p for p in run_dir.glob("*") if p.name != ".pbt.lock"]


def mix_kinds(folder) -> list[tuple[int, int, str]]:
    """``(epoch, batch, kind)`` per training batch, as tests/train_tiny.py's PBT_MIX_LOG
    recorded them (rank 0)."""
    lines = (folder / "mix_rank0.txt").read_text().split("\n")
    return [(int(e), int(b), kind) for e, b, kind in (line.split() for line in lines if line)]


@pytest.mark.slow
def test_ema_and_mixup_resume_exactly_after_sigkill(tmp_path, monkeypatch):
    """EMA with mixup and CutMix both on (each mixed batch picks one), on 2x4x4 images so
    CutMix has boxes to paste; killed mid-epoch, resumed bit-identically."""
    args = ["--num_workers", "0", "--ema_decay", "0.9", "--mixup_alpha", "0.4",
            "--cutmix_alpha", "1.0", "--mix_off_epochs", "1"]
    monkeypatch.setenv("PBT_TINY_IMAGES", "1")
    logs = {name: tmp_path / f"mix_{name}" for name in ("straight", "crashed", "resumed")}
    for folder in logs.values():
        folder.mkdir()
    monkeypatch.setenv("PBT_MIX_LOG", str(logs["straight"]))
    train_tiny(tmp_path, "--run_name", "straight", *args)
    monkeypatch.setenv("PBT_MIX_LOG", str(logs["crashed"]))
    train_tiny(tmp_path, "--run_name", "crashed", "--save_steps", "2", *args,
               signal_at="2,3,KILL", expect=-9)
    run_dir = tmp_path / "w" / "crashed"
    monkeypatch.setenv("PBT_MIX_LOG", str(logs["resumed"]))
    train_tiny(tmp_path, "--run_name", "crashed", "--save_steps", "2", "--resume",
               str(run_dir), *args)
    assert_same_run(tmp_path / "w" / "straight", run_dir)
    # the resumed run went on from the state of step 6 (epoch 2, batch 1) and mixed its
    # batches as the uninterrupted run did; both kinds really happened after the resume
    straight, resumed = mix_kinds(logs["straight"]), mix_kinds(logs["resumed"])
    assert [(e, b) for e, b, _ in straight] == [(e, b) for e in range(3) for b in range(5)]
    assert resumed == straight[6:]
    assert {"mixup", "cutmix"} <= {kind for _, _, kind in resumed}
    assert {kind for e, _, kind in straight if e == 2} == {"none"}  # mix_off_epochs 1
    assert torch.load(run_dir / "last.pth", weights_only=True)["weights"] == "ema"
    history = json.loads((run_dir / "summary.json").read_text())["history"]
    # train accuracy only where the targets were labels: the last (unmixed) epoch
    assert ["top1" in entry["train"] for entry in history] == [False, False, True]


# -- EMA -----------------------------------------------------------------------------------
class RecordWeights(Callback):
    def on_train_begin(self, logs):
        self.steps = [self.copy()]

    def on_batch_end(self, batch, logs):
        self.steps.append(self.copy())

    def copy(self):
        return {k: v.detach().clone() for k, v in self.trainer.unwrapped_model.state_dict().items()}


def accuracy_of(weights: dict, trainer) -> float:
    model = trainer.build_model(trainer.cfg)
    model.load_state_dict(weights)
    model.eval()
    data = NoisyBlobs(23, 1)
    with torch.no_grad():
        return float((model(data.data).argmax(1) == data.targets).float().mean() * 100)


def test_ema_follows_its_warm_up_rule_and_is_what_the_test_measured(tmp_path, tiny_trainer):
    recorder = RecordWeights()
    trainer = tiny_trainer(tiny_cfg(tmp_path, ema_decay=0.8, num_epochs=2), [recorder])
    trainer.run()
    expected = recorder.steps[0]
    for step, weights in enumerate(recorder.steps[1:], start=1):
        decay = min(0.8, (1 + step) / (10 + step))
        expected = {k: (decay * expected[k] + (1 - decay) * v if v.is_floating_point() else v)
                    for k, v in weights.items()}
    ema = next(c for c in trainer.callbacks if isinstance(c, ModelEMA))
    assert all(torch.allclose(ema.weights[k].float(), expected[k].float(), atol=1e-6)
               for k in expected)
    saved = torch.load(trainer.run_dir / "last.pth", weights_only=True)
    assert saved["weights"] == "ema" and "model_ema" not in saved
    assert all(torch.equal(saved["model"][k], ema.weights[k]) for k in expected)
    assert not all(torch.equal(saved["model"][k], recorder.steps[-1][k]) for k in expected)
    # the logged top-1 is that of the EMA weights, and training went on with its own
    assert trainer.history[-1]["test"]["top1"] == pytest.approx(accuracy_of(saved["model"],
                                                                             trainer))
    live = trainer.unwrapped_model.state_dict()
    assert all(torch.equal(live[k], recorder.steps[-1][k]) for k in live)


def test_ema_without_ema_eval_tests_the_trained_weights(tmp_path, tiny_trainer):
    trainer = tiny_trainer(tiny_cfg(tmp_path, ema_decay=0.8, ema_eval=False, num_epochs=1))
    trainer.run()
    saved = torch.load(trainer.run_dir / "last.pth", weights_only=True)
    assert saved["weights"] == "trained" and saved["model_ema"].keys() == saved["model"].keys()
    live = trainer.unwrapped_model.state_dict()
    assert all(torch.equal(saved["model"][k], live[k]) for k in live)
    assert trainer.history[-1]["test"]["top1"] == pytest.approx(accuracy_of(live, trainer))


# -- compile, summary, files people look at ------------------------------------------------
def test_a_model_that_fails_to_compile_falls_back_in_one_line(tmp_path, tiny_trainer,
                                                              monkeypatch):
    import torch._inductor.config

    # as on a machine without a C++ compiler: inductor cannot build its CPU kernels
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, str(tmp_path / "no-g++")))
    trainer = tiny_trainer(tiny_cfg(tmp_path, compile=True, num_epochs=1))
    trainer.run()
    log = (trainer.run_dir / "train.log").read_text()
    lines = [line for line in log.splitlines() if "compile:" in line]
    assert len(lines) == 1 and "torch.compile failed" in lines[0], log
    assert "the model runs without it" in lines[0] and "no-g++" in lines[0]
    saved = torch.load(trainer.run_dir / "last.pth", weights_only=True)["model"]
    assert not any("_orig_mod" in key for key in saved)
    fresh = trainer.build_model(trainer.cfg)
    fresh.load_state_dict(saved)  # loads without compile


def test_summary_history_csv_and_confusion_matrix_image(tmp_path, tiny_trainer):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = tiny_trainer(tiny_cfg(tmp_path, summary_layers=True, num_epochs=2))
    trainer.run()
    run_dir = trainer.run_dir
    log = (run_dir / "train.log").read_text()
    total = sum(p.numel() for p in trainer.unwrapped_model.parameters())
    assert f"{total:,} trainable of {total:,} parameters" in log
    assert "MACs at input (1, 8)" in log
    assert any(line.split()[-4:-2] == ["0", "Linear"] for line in log.splitlines())
    with open(run_dir / "history.csv") as file:
        rows = list(csv.DictReader(file))
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    for row, entry in zip(rows, trainer.history):
        assert float(row["test_top1"]) == entry["test"]["top1"]
        assert float(row["train_loss"]) == entry["train"]["loss"]
        assert float(row["lr"]) == entry["lr"]
    image = Image.open(run_dir / "confusion_matrix.png")
    assert image.format == "PNG" and min(image.size) > 100
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [event.step for event in events.Images("test/confusion_matrix")] == [1, 2]
    assert len(events.Scalars("train/lr")) >= 2  # the LR curve


# -- augmentation presets ------------------------------------------------------------------
# preset -> (its base, the op the addition puts in the pipeline)
PRESET_OPS = {
    "randaugment": ("default", "RandAugment"),
    "light+trivialaugment": ("light", "TrivialAugmentWide"),
    "none+autoaugment": ("none", "AutoAugment"),
    "train+colorjitter": ("train", "ColorJitter"),
    "light+erasing": ("light", "RandomErasing"),
}
PRESET_SAMPLES = 16


@pytest.fixture(scope="module")
def preset_images(tmp_path_factory):
    """An ImageFolder of 16 40x40 RGB PNGs (gradients plus noise), two classes."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("presets")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:40, 0:40]
    for i in range(PRESET_SAMPLES):
        pixels = np.stack([(x * 6 + i * 10) % 256, (y * 6) % 256, ((x + y) * 3) % 256], -1)
        pixels = np.clip(pixels + rng.integers(0, 40, pixels.shape), 0, 255)
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(root / f"c{i % 2}" / f"{i:02d}.png")
    return root


def preset_transform(preset: str):
    options = recipe_module().transform_options(preset)
    return build_transforms([24, 20], [0.5] * 3, [0.5] * 3, train=True, **options)


def op_names(transform) -> list[str]:
    """The class names of a pipeline's steps, nested Compose included."""
    steps = getattr(transform, "transforms", None)
    if steps is None:
        return [type(transform).__name__]
    return [name for step in steps for name in op_names(step)]


def load_epoch(preset: str, root, seed: int = 3, epoch: int = 0, shuffle: bool = False,
               workers: int = 0) -> torch.Tensor:
    """Every sample of one epoch, in sample order, through the recipe's path: its preset,
    build_dataset and pbt's loader, whose SeededDataset seeds each sample's draws from
    (seed, epoch, index)."""
    from pbt.data import build_dataloader, build_dataset

    dataset = build_dataset(str(root), preset_transform(preset))
    loader = build_dataloader(dataset, 4, workers, seed, shuffle)
    loader.sampler.set_epoch(epoch)
    order = list(loader.sampler.sampler)  # the sample order of this epoch
    loaded = torch.cat([images for images, _ in loader])
    by_sample = torch.empty_like(loaded)
    by_sample[torch.tensor(order)] = loaded
    return by_sample


@pytest.mark.parametrize("preset", list(PRESET_OPS))
def test_each_augmentation_preset_runs_its_op(preset, preset_images):
    """The named op is in the pipeline, after the base's own steps, and changes the image:
    the same sample, seed and epoch through the base preset alone (same crop and flip
    draws, which come first) gives another output."""
    base, op = PRESET_OPS[preset]
    names = op_names(preset_transform(preset))
    assert names.count(op) == 1, names
    names.remove(op)
    assert names == op_names(preset_transform(base))
    out, ref = load_epoch(preset, preset_images), load_epoch(base, preset_images)
    assert out.shape == (PRESET_SAMPLES, 3, 20, 24) and out.dtype == torch.float32
    changed = [i for i in range(PRESET_SAMPLES) if not torch.equal(out[i], ref[i])]
    if op == "ColorJitter":  # brightness, contrast, saturation 0.4 always act
        assert len(changed) == PRESET_SAMPLES
    elif op == "RandomErasing":  # p 0.25: some samples, each a box of the mean colour (0)
        assert 1 <= len(changed) < PRESET_SAMPLES
        for i in changed:
            rows, cols = (out[i] != ref[i]).any(0).nonzero(as_tuple=True)
            box = out[i][:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert torch.equal(box, torch.zeros_like(box))
            outside = torch.ones(20, 24, dtype=torch.bool)
            outside[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = False
            assert torch.equal(out[i][:, outside], ref[i][:, outside])
    else:  # a policy may draw an identity op now and then, not for most samples
        assert len(changed) >= PRESET_SAMPLES * 3 // 4, changed


@pytest.mark.parametrize("preset", [*PRESET_OPS, "light+trivialaugment+erasing"])
def test_augmentation_presets_are_seeded_per_sample(preset, preset_images):
    """A sample's draws follow from (seed, epoch, index) alone, as pbt's loader seeds them:
    not from torch's global seed, nor the order samples are loaded in, nor the process
    (worker) that loads them; another seed or epoch draws anew."""
    torch.manual_seed(1)
    first = load_epoch(preset, preset_images)
    torch.manual_seed(2)
    assert torch.equal(load_epoch(preset, preset_images), first)
    assert torch.equal(load_epoch(preset, preset_images, shuffle=True, workers=2), first)
    assert not torch.equal(load_epoch(preset, preset_images, seed=4), first)
    assert not torch.equal(load_epoch(preset, preset_images, epoch=1), first)


def test_augmentation_preset_names_are_checked():
    recipe = recipe_module()
    assert recipe.transform_options("train") == {"crop_scale": (0.08, 1.0), "hflip": True}
    assert recipe.transform_options("erasing")["crop_scale"] == (0.08, 1.0)  # default base
    from pbt.config import load_config

    for bad, message in (("light+randaugmnt", r"light\+trivialaugment\+erasing"),
                         ("randaugment+autoaugment", "two augmentation policies")):
        with pytest.raises(ConfigError, match=message) as err:
            load_config([], keys=recipe.KEYS, train_transform=bad)
        assert "train_transform" in str(err.value)


@pytest.mark.slow
def test_compiled_model_trains_saves_plain_names_and_resumes_exactly(tmp_path, tiny_trainer):
    """A real torch.compile (inductor, C++ kernels on CPU) on the tiny trainer."""
    trainer = tiny_trainer(tiny_cfg(tmp_path, compile=True, num_epochs=2))
    trainer.run()
    log = (trainer.run_dir / "train.log").read_text()
    assert "compile:" not in log, log  # compiled, no fallback
    assert trainer.unwrapped_model._compiled_call_impl is not None
    straight = torch.load(trainer.run_dir / "last.pth", weights_only=True)
    assert not any("_orig_mod" in key for key in straight["model"])
    first_epoch = sorted((trainer.run_dir / "checkpoints").glob("step-*"))[0]
    resumed = tiny_trainer(tiny_cfg(tmp_path, compile=True, num_epochs=2,
                                    resume=str(first_epoch)))
    resumed.run()
    again = torch.load(resumed.run_dir / "last.pth", weights_only=True)
    assert all(torch.equal(straight["model"][k], again["model"][k]) for k in straight["model"])
    assert resumed.history == trainer.history
