"""Pruning inside the recipe: prune before prepare, fine-tune, report, reload, resume, export."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import require, run_recipe, same_weights, tiny_cfg

from pbt.callbacks import Callback
from pbt.models import build_model
from pbt.prune import apply_prune_history

SMALL = ["--work_dir", "w", "--net_type", "resnet18", "--input_size", "16", "16",
         "--batch_size", "64", "--num_workers", "0", "--progress", "false", "--lr", "0.05",
         "--scheduler", "cosine"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("prune")
    result = run_recipe([*SMALL, "--run_name", "base", "--num_epochs", "2", "--slim_reg", "1e-4"],
                        cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd


def assert_finetuning_trained_the_pruned_net(model_file, prune_history, run_dir) -> None:
    """The pruned net as it was right after pruning (the base weights with the run's pruning
    history replayed) differs from the fine-tuned one in every parameter, and the optimizer
    that trained it holds one momentum buffer per pruned parameter, of its pruned shape (an
    optimizer built before pruning would hold the unpruned parameters and train nothing)."""
    base = torch.load(model_file, weights_only=True)
    model = build_model("resnet18", base["num_classes"])
    model.load_state_dict(base["model"])
    apply_prune_history(model, torch.randn(1, 3, 16, 16), prune_history)
    start = {name: p.detach() for name, p in model.named_parameters()}
    report = json.loads((run_dir / "prune_report.json").read_text())
    assert sum(p.numel() for p in start.values()) == report["after_pruning"]["params"]
    tuned = torch.load(run_dir / "last.pth", weights_only=True)["model"]
    assert {k: tuned[k].shape for k in start} == {k: v.shape for k, v in start.items()}
    unchanged = [name for name, value in start.items() if torch.equal(tuned[name], value)]
    assert not unchanged, f"fine-tuning left these pruned parameters as they were: {unchanged}"

    state = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    optimizer = torch.load(state / "optimizer.bin", weights_only=True)
    assert sum(len(group["params"]) for group in optimizer["param_groups"]) == len(start)
    buffers = [entry["momentum_buffer"].shape for entry in optimizer["state"].values()]
    assert sorted(buffers) == sorted(p.shape for p in start.values())


class PrunedStart(Callback):
    """At ``on_train_begin`` (pruning done, optimizer built): the model's parameters, their
    values, and the parameters the optimizer updates."""

    def on_train_begin(self, logs):
        model = self.trainer.unwrapped_model
        self.params = list(model.parameters())
        self.values = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.optimized = [p for group in self.trainer.optimizer.param_groups
                          for p in group["params"]]


def test_optimizer_is_built_on_the_pruned_model(tmp_path, tiny_trainer):
    """In-process, on the engine's own build(): the optimizer's parameters are the pruned
    model's parameter objects, and fine-tuning changes them."""
    probe = PrunedStart()
    trainer = tiny_trainer(tiny_cfg(tmp_path, use_prune=True, prune_ratio=0.5, num_epochs=1),
                           [probe])
    assert trainer.prune_history
    trainer.run()
    assert probe.values["0.weight"].shape == (8, 8)  # hidden layer 16 -> 8 (round_to 8)
    assert len(probe.optimized) == len(probe.params)
    assert {id(p) for p in probe.optimized} == {id(p) for p in probe.params}
    final = dict(trainer.unwrapped_model.named_parameters())
    assert all(final[name] is p for name, p in zip(probe.values, probe.params))
    unchanged = {name for name, value in probe.values.items() if torch.equal(final[name], value)}
    # all but the bias of the Linear before BatchNorm, whose gradient is 0 (BN removes means)
    assert unchanged <= {"0.bias"}
    report = json.loads((tmp_path / "work" / "tiny" / "prune_report.json").read_text())
    assert report["after_finetuning"]["params"] == sum(v.numel() for v in probe.values.values())


@pytest.mark.slow
def test_prune_finetune_report_reload_and_export(trained):
    cwd = trained
    model_file = cwd / "w" / "base" / "last.pth"
    # multi-step: the lr is a function of the step alone, so the 1-epoch run resumed for a
    # second epoch below is step for step the uninterrupted 2-epoch run (a cosine's curve
    # would follow the new length)
    prune = ["--use_prune", "true", "--prune_method", "l1", "--prune_ratio", "0.5",
             "--model_file", str(model_file), "--scheduler", "multi-step"]
    result = run_recipe([*SMALL, "--run_name", "pruned", "--num_epochs", "1", *prune,
                         "--save_steps", "5"], cwd=cwd)
    assert result.returncode == 0, result.stderr
    run_dir = cwd / "w" / "pruned"
    report = json.loads((run_dir / "prune_report.json").read_text())
    before, after, tuned = (report[k] for k in ("before_pruning", "after_pruning",
                                                "after_finetuning"))
    assert after["params"] < 0.35 * before["params"] and after["macs"] < 0.35 * before["macs"]
    assert tuned["params"] == after["params"]
    assert before["top1"] is not None and tuned["top1"] is not None
    assert before["latency_ms"] > 0 and after["latency_ms"] > 0

    best = torch.load(run_dir / "best.pth", weights_only=True)
    assert best["prune_history"]
    conv = best["model"]["layer1.0.conv1.weight"]
    assert conv.shape[0] == 32 and conv.shape[0] % 8 == 0  # 64 channels halved, really removed
    assert_finetuning_trained_the_pruned_net(model_file, best["prune_history"], run_dir)

    # a fresh process rebuilds the pruned net from config + history and evaluates it exactly
    summary = json.loads((run_dir / "summary.json").read_text())
    best_entry = summary["history"][summary["best_epoch"] - 1]
    check = run_recipe([*SMALL, "--run_name", "check", "--eval_only", "true",
                        "--model_file", str(run_dir / "best.pth")], cwd=cwd)
    assert check.returncode == 0, check.stderr
    checked = json.loads((cwd / "w" / "check" / "summary.json").read_text())
    assert checked["history"][0]["test"]["correct"] == best_entry["test"]["correct"]

    # resume of a pruned run rebuilds the structure from the saved history and ends with
    # exactly the weights of the same pruned run trained for 2 epochs without a stop
    resumed = run_recipe([*SMALL, "--run_name", "pruned", "--num_epochs", "2", *prune,
                          "--resume", str(run_dir)], cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "pruned (" not in resumed.stdout
    straight = run_recipe([*SMALL, "--run_name", "pruned_straight", "--num_epochs", "2",
                           *prune], cwd=cwd)
    assert straight.returncode == 0, straight.stderr
    assert same_weights(cwd / "w" / "pruned_straight" / "last.pth", run_dir / "last.pth")
    history = json.loads((run_dir / "summary.json").read_text())["history"]
    assert len(history) == 2
    assert history == json.loads((cwd / "w" / "pruned_straight" / "summary.json")
                                 .read_text())["history"]

    assert_export_holds_the_pruned_net(run_dir, model_file, cwd / "w" / "digits" / "test",
                                       cwd / "export")


def _conv_shapes(model: torch.nn.Module) -> list[list[int]]:
    return sorted(list(m.weight.shape) for m in model.modules()
                  if isinstance(m, torch.nn.Conv2d))


def assert_export_holds_the_pruned_net(run_dir, model_file, test_dir, out) -> None:
    """``python -m pbt.export`` of a pruned run: its ONNX file has the pruned channel counts
    (the initializer shapes), gives the pruned PyTorch net's logits on the run's own test
    images (1e-4), and its report holds the unpruned start beside it, bigger."""
    onnx = require("onnx")
    ort = require("onnxruntime")
    import yaml

    from pbt.data import build_dataset, build_transforms

    export = subprocess.run([sys.executable, "-m", "pbt.export", str(run_dir), "--onnx",
                             str(out / "pruned.onnx"), "--runs", "3"], capture_output=True,
                            text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    report = json.loads((out / "deploy_report.json").read_text())
    assert report["checkpoint"] == str(run_dir / "best.pth") and report["pruned"] is True

    # the pruned net, rebuilt here from its checkpoint (not by pbt.export)
    saved = torch.load(run_dir / "best.pth", weights_only=True)
    pruned = build_model("resnet18", saved["num_classes"])
    apply_prune_history(pruned, torch.randn(1, 3, 16, 16), saved["prune_history"])
    pruned.load_state_dict(saved["model"])
    pruned.eval()
    unpruned = build_model("resnet18", saved["num_classes"])
    unpruned.load_state_dict(torch.load(model_file, weights_only=True)["model"])

    graph = onnx.load(str(out / "pruned.onnx")).graph
    dims = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
    onnx_convs = sorted(dims[node.input[1]] for node in graph.node if node.op_type == "Conv")
    assert onnx_convs == _conv_shapes(pruned)
    assert onnx_convs != _conv_shapes(unpruned) and [32, 32, 3, 3] in onnx_convs  # 64 -> 32
    (head,) = [dims[node.input[1]] for node in graph.node if node.op_type == "Gemm"]
    assert head == list(pruned.fc.weight.shape)

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    test = build_dataset(str(test_dir), build_transforms([16, 16], cfg["rgb_mean"],
                                                         cfg["rgb_std"], train=False))
    images = torch.stack([test[index][0] for index in range(len(test))])
    session = ort.InferenceSession(str(out / "pruned.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = pruned(images)
    got = torch.from_numpy(session.run(None, {"input": images.numpy()})[0])
    assert len(images) == report["test_data"]["images"] and expected.abs().max() > 1
    assert torch.allclose(got, expected, atol=1e-4, rtol=0), (got - expected).abs().max()

    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["torch fp32 (unpruned)", "onnx fp32 (unpruned)",
                          "torch fp32 (pruned)", "onnx fp32 (pruned)"]
    assert rows["torch fp32 (unpruned)"]["file"] == str(model_file)
    assert rows["onnx fp32 (pruned)"]["file"] == str(out / "pruned.onnx")
    for form in ("torch", "onnx"):
        small, big = rows[f"{form} fp32 (pruned)"], rows[f"{form} fp32 (unpruned)"]
        assert small["params"] == sum(p.numel() for p in pruned.parameters())
        assert big["params"] == sum(p.numel() for p in unpruned.parameters())
        assert big["params"] > 2 * small["params"] and big["macs"] > 2 * small["macs"] > 0
    accuracy = 100 * float((expected.argmax(1) == torch.tensor(test.targets)).float().mean())
    assert rows["onnx fp32 (pruned)"]["top1"] == pytest.approx(accuracy)


class StartWeights(Callback):
    """The model's state_dict at ``on_train_begin``: what the run starts training from."""

    def on_train_begin(self, logs):
        self.values = {k: v.detach().clone()
                       for k, v in self.trainer.unwrapped_model.state_dict().items()}


def test_a_pruned_runs_best_pth_starts_a_new_run(tmp_path, tiny_trainer):
    """``model_file`` of a pruned run's best.pth, with and without ``finetune: true``: the
    new run rebuilds the pruned net from the file's history, starts from exactly the file's
    weights (every parameter and buffer, at its pruned shape), trains them, and its own
    files carry the history on."""
    tiny_trainer(tiny_cfg(tmp_path, run_name="pruned", use_prune=True, prune_ratio=0.5,
                          num_epochs=1)).run()
    best = tmp_path / "work" / "pruned" / "best.pth"
    saved = torch.load(best, weights_only=True)
    assert saved["prune_history"] and saved["model"]["0.weight"].shape == (8, 8)  # 16 -> 8
    for name, finetune in (("from_file", False), ("finetuned", True)):
        start = StartWeights()
        tiny_trainer(tiny_cfg(tmp_path, run_name=name, model_file=str(best), finetune=finetune,
                              num_epochs=1), [start]).run()
        run_dir = tmp_path / "work" / name
        shapes = {k: v.shape for k, v in saved["model"].items()}
        assert {k: v.shape for k, v in start.values.items()} == shapes, name
        assert all(torch.equal(start.values[k], saved["model"][k]) for k in shapes), name
        log = (run_dir / "train.log").read_text()
        assert f"loaded weights from {best}" in log and "skipped" not in log, name
        assert not (run_dir / "prune_report.json").exists()  # rebuilt, not pruned again
        final = torch.load(run_dir / "last.pth", weights_only=True)
        assert final["prune_history"] == saved["prune_history"], name
        assert {k: v.shape for k, v in final["model"].items()} == shapes
        assert not torch.equal(final["model"]["0.weight"], saved["model"]["0.weight"]), name


@pytest.mark.slow
def test_slim_after_sparsity_training(trained):
    cwd = trained
    result = run_recipe([*SMALL, "--run_name", "slim", "--num_epochs", "1", "--use_prune",
                         "true", "--prune_method", "slim", "--prune_ratio", "0.3",
                         "--prune_global", "true",
                         "--model_file", str(cwd / "w" / "base" / "last.pth")], cwd=cwd)
    assert result.returncode == 0, result.stderr
    report = json.loads((cwd / "w" / "slim" / "prune_report.json").read_text())
    assert report["after_pruning"]["params"] < report["before_pruning"]["params"]
