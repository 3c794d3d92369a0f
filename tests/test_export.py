"""ONNX export of pbt checkpoints (pruned and unpruned), checked with onnxruntime."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import require

from pbt.config import ConfigError
from pbt.models import build_model
from pbt.prune import prune_model

require("onnx")
ort = require("onnxruntime")

from pbt.export import export_onnx, load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _save_checkpoint(
    path: Path, net_type: str, pruned: bool, input_size: tuple[int, int] = (40, 32)
) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(net_type, num_classes=3)
    ckpt = {"net_type": net_type, "num_classes": 3, "class_names": ["a", "b", "c"],
            "input_size": list(input_size), "epoch": 2}
    if pruned:
        result = prune_model(model, torch.randn(1, 3, input_size[1], input_size[0]), ratio=0.5)
        ckpt["prune_history"] = result.history
    with torch.no_grad():  # non-trivial BN statistics, as after training
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    ckpt["model"] = model.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return model.eval()


@pytest.mark.parametrize("net_type,pruned", [("resnet18", False), ("resnet18", True),
                                             ("mobilenet_v2", True)])
def test_export_matches_pytorch(tmp_path, net_type, pruned):
    model = _save_checkpoint(tmp_path / "run" / "last.pth", net_type, pruned)
    info = export_onnx(tmp_path / "run", tmp_path / "out" / "model.onnx", runs=5)
    assert info["checkpoint"].endswith("last.pth")  # run dir without best.pth
    assert info["pruned"] is pruned
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["max_abs_diff"] <= 1e-4
    assert math.isfinite(info["ort_latency_ms"]) and info["ort_latency_ms"] > 0

    # independent check at another batch size: the batch dimension is dynamic
    session = ort.InferenceSession(info["onnx_path"], providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 40)
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(out), model(x), atol=1e-4, rtol=0)


def test_cli_prefers_best_and_honours_input_size(tmp_path):
    _save_checkpoint(tmp_path / "run" / "last.pth", "resnet18", pruned=False)
    pruned = _save_checkpoint(tmp_path / "run" / "best.pth", "resnet18", pruned=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pbt.export", str(tmp_path / "run"), "--onnx",
         str(tmp_path / "m.onnx"), "--input-size", "48", "24", "--runs", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "best.pth" in proc.stdout and "pruned" in proc.stdout
    assert "max abs diff" in proc.stdout and "latency" in proc.stdout
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[2:] == [24, 48]
    assert session.get_outputs()[0].shape[1] == 3
    model, ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt["epoch"] == 2
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in pruned.parameters())


def test_bad_inputs_say_what_and_where(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        export_onnx(tmp_path / "missing.pth", tmp_path / "m.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither best.pth nor last.pth"):
        export_onnx(tmp_path / "empty", tmp_path / "m.onnx")
    torch.save({"model": {}, "num_classes": 3}, tmp_path / "no_net.pth")
    with pytest.raises(ConfigError, match="no_net.pth.*'net_type'"):
        export_onnx(tmp_path / "no_net.pth", tmp_path / "m.onnx")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pth' is not a PyTorch checkpoint"):
        export_onnx(tmp_path / "junk.pth", tmp_path / "m.onnx")
    _save_checkpoint(tmp_path / "ok.pth", "resnet18", pruned=False)
    with pytest.raises(ConfigError, match="input_size"):
        export_onnx(tmp_path / "ok.pth", tmp_path / "m.onnx", input_size=(0, 32))
    ckpt = torch.load(tmp_path / "ok.pth", weights_only=True)
    ckpt["net_type"] = "resnet34"
    torch.save(ckpt, tmp_path / "wrong_net.pth")
    with pytest.raises(ConfigError, match="wrong_net.pth.*resnet34"):
        export_onnx(tmp_path / "wrong_net.pth", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_missing_extra_prints_install_line(tmp_path):
    code = ("import sys; sys.modules['onnxruntime'] = None; from pbt.export import main; "
            f"sys.exit(main([{str(tmp_path)!r}, '--onnx', 'm.onnx']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("pbt: error: ") and 'pip install -e ".[export]"' in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _differs_from_pytorch(path: Path) -> torch.nn.Module:
    """A checkpoint whose fp32 ONNX file genuinely differs from PyTorch by more than 1e-4:
    a head scaled by 1e6 gives logits near 1e6, where onnxruntime's kernels (its conv + BN
    fusion, another summation order) and PyTorch's round apart by far more than 1e-4."""
    model = _save_checkpoint(path, "resnet18", pruned=False)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["fc.weight"] *= 1e6
    torch.save(ckpt, path)
    model.load_state_dict(ckpt["model"])
    return model


def _onnx_vs_torch(model: torch.nn.Module, folder: Path) -> float:
    """max |onnxruntime - PyTorch| of ``model``, measured here (not by pbt's checks)."""
    from pbt.export import to_onnx

    x = torch.randn(3, 3, 32, 40, generator=torch.Generator().manual_seed(1))
    path = to_onnx(model, x[:1], folder / "premise.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        return float(abs(session.run(None, {"input": x.numpy()})[0] - model(x).numpy()).max())


def test_export_onnx_refuses_a_file_that_differs_from_pytorch(tmp_path):
    model = _differs_from_pytorch(tmp_path / "big.pth")
    assert _onnx_vs_torch(model, tmp_path) > 1e-2  # the premise: the difference is real
    with pytest.raises(RuntimeError, match=r"ONNX check failed for '.*/out/m.onnx': onnxruntime "
                       r"differs from PyTorch by \S+ \(limit 0.0001\); the file was not"):
        export_onnx(tmp_path / "big.pth", tmp_path / "out" / "m.onnx", runs=1)
    assert not (tmp_path / "out" / "m.onnx").exists()


def test_deploy_cli_refuses_a_file_that_differs_from_pytorch(tmp_path):
    """The deploy report's own fp32 check (another code path than export_onnx's): exit 1,
    the message, and neither the file nor a report that would vouch for it."""
    model = _differs_from_pytorch(tmp_path / "big.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx").write_bytes(b"the previous file")
    proc = subprocess.run(
        [sys.executable, "-m", "pbt.export", str(tmp_path / "big.pth"), "--onnx",
         str(out / "m.onnx"), "--fp16", "--runs", "1"], cwd=ROOT, capture_output=True,
        text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.fullmatch(rf"pbt: error: ONNX check failed for '{out}/m.onnx': onnxruntime "
                        r"differs from PyTorch by \S+ \(limit 0.0001\); the file was not "
                        r"written\n", proc.stderr), proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx"]  # no fp16, no report
    assert (out / "m.onnx").read_bytes() == b"the previous file"
    assert _onnx_vs_torch(model, tmp_path) > 1e-2


def _files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")}


@pytest.mark.slow
def test_cli_bad_input_exits_2_names_it_and_writes_nothing(tmp_path, capsys):
    """As a user runs it: each bad input is one ``pbt: error:`` line naming what was wrong
    and where, exit 2, and no file or folder appears."""
    _save_checkpoint(tmp_path / "run" / "last.pth", "resnet18", pruned=False)
    torch.save(build_model("resnet18", num_classes=3).state_dict(), tmp_path / "plain.pth")
    (tmp_path / "a_file").write_text("")
    run = str(tmp_path / "run")
    cases = {  # argv -> what the message must say
        (str(tmp_path / "nowhere"),): rf"checkpoint: '{tmp_path}/nowhere' does not exist",
        (str(tmp_path / "plain.pth"),): r"plain.pth' is not a pbt checkpoint: it has no 'model'",
        (run, "--int8"): rf"--int8: no calibration images: '{tmp_path}/run/config.yaml' does "
                         r"not exist; pass the training config with --config",
    }
    before = _files_under(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {argv: subprocess.Popen([sys.executable, "-m", "pbt.export", *argv], cwd=tmp_path,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for argv in cases}
    for argv, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (argv, out, err)
        assert err.startswith("pbt: error: ") and len(err.strip().splitlines()) == 1, (argv, err)
        assert re.search(cases[argv], err), (argv, err)
        assert "Traceback" not in err and out == ""
    assert _files_under(tmp_path) == before

    # the same entry point in-process, for the rest of the flags
    more = {
        (run, "--runs", "0"): r"runs \(--runs\) has value 0; it must be an integer >= 1",
        (run, "--threads", "-1"): r"threads \(--threads\) has value -1",
        (run, "--calib-images", "0", "--int8"): r"calib_images \(--calib-images\) has value 0",
        (run, "--int8-tolerance", "nan"): r"int8_tolerance \(--int8-tolerance\) has value nan",
        (run, "--input-size", "0", "32"): r"input_size: \[0, 32\] must be two positive",
        (run, "--baseline", str(tmp_path / "gone.pth")):
            rf"--baseline: checkpoint: '{tmp_path}/gone.pth' does not exist",
        (run, "--config", str(tmp_path / "gone.yaml")): r"--config: '.*gone.yaml' does not exist",
        (run, "--onnx", run): rf"--onnx: '{run}' is a folder",
        (run, "--onnx", str(tmp_path / "a_file" / "m.onnx")):
            rf"key '--onnx': '{tmp_path}/a_file' is a file, so '{tmp_path}/a_file' cannot be "
            r"made",
        (run, "--runs", "abc"): r"argument --runs: invalid int value: 'abc'",
    }
    from pbt.export import main

    for argv, message in more.items():
        try:
            code = main(list(argv))
        except SystemExit as exit_:  # argparse's errors
            code = exit_.code
        assert code == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("pbt: error: ") and re.search(message, err), (argv, err)
    assert _files_under(tmp_path) == before


# -- fp16 / int8 and the deploy report on a trained run ------------------------------------

from conftest import run_recipe  # noqa: E402

from pbt.export import deploy_report  # noqa: E402

SMALL_RUN = ["--work_dir", "w", "--input_size", "16", "16", "--num_workers", "0",
             "--progress", "false"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A resnet18 trained for 3 epochs on digits at 16x16, and a 50 %-pruned copy of it
    fine-tuned for 1 epoch (started from the first: its baseline)."""
    cwd = tmp_path_factory.mktemp("deploy")
    base = run_recipe([*SMALL_RUN, "--run_name", "base", "--num_epochs", "3"], cwd)
    assert base.returncode == 0, base.stderr
    pruned = run_recipe([*SMALL_RUN, "--run_name", "pruned", "--num_epochs", "1",
                         "--use_prune", "true", "--model_file",
                         str(cwd / "w" / "base" / "best.pth")], cwd)
    assert pruned.returncode == 0, pruned.stderr
    return cwd / "w"


@pytest.mark.slow
def test_deploy_report_measures_fp32_fp16_int8(trained_run, tmp_path):
    run_dir = trained_run / "base"
    report = deploy_report(run_dir, tmp_path / "out" / "m.onnx", fp16=True, int8=True,
                           calib_images=100, runs=3)
    assert json.loads((tmp_path / "out" / "deploy_report.json").read_text()) == report
    rows = {row["name"]: row for row in report["rows"]}
    assert list(rows) == ["torch fp32", "onnx fp32", "onnx fp16", "onnx int8"]
    assert report["opset"] == 17 and report["latency"]["threads"] == 1
    assert report["test_data"]["images"] == 360 and report["calibration"]["images"] == 100
    assert report["calibration"]["source"].endswith("train")
    assert report["calibration"]["activations"] == "uint8"

    # the exporter's torch top-1 is the one training measured for best.pth (another code path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert rows["torch fp32"]["top1"] == pytest.approx(summary["best"])
    assert rows["torch fp32"]["top1"] > 80  # a trained model, or int8's tolerance means little
    assert rows["onnx fp32"]["max_abs_diff"] <= 1e-4
    assert rows["onnx fp32"]["top1"] == rows["torch fp32"]["top1"]
    assert rows["onnx fp16"]["max_abs_diff"] < 0.05
    assert abs(rows["onnx fp16"]["top1_diff"]) <= 0.5
    assert abs(rows["onnx int8"]["top1_diff"]) <= 1.0 and not report["warnings"]
    sizes = [rows[name]["size_bytes"] for name in ("onnx fp32", "onnx fp16", "onnx int8")]
    assert sizes[0] > 1.8 * sizes[1] and sizes[1] > 1.6 * sizes[2]
    for row in report["rows"]:
        assert row["latency_ms"]["batch1"] > 0 and row["latency_ms"]["batch32"] > 0
        if row["format"] == "onnx":  # every file keeps the dynamic batch dimension
            _check_full(row["file"])
            session = ort.InferenceSession(row["file"], providers=["CPUExecutionProvider"])
            assert session.get_inputs()[0].shape[0] == "batch"
            x = torch.randn(3, 3, 16, 16).numpy()
            assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (3, 10)
    int8_ops = {node.op_type for node in __import__("onnx").load(rows["onnx int8"]["file"])
                .graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= int8_ops


@pytest.mark.slow
def test_pruned_run_is_reported_beside_its_unpruned_start(trained_run, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pbt.export", str(trained_run / "pruned"), "--onnx",
         str(tmp_path / "p.onnx"), "--int8", "--calib-images", "64", "--runs", "3",
         "--int8-tolerance", "-100"],  # an impossible tolerance: int8 must be flagged
        cwd=trained_run.parent, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "WARNING: onnx int8 (pruned)" in proc.stderr and "--calib-images 128" in proc.stderr
    report = json.loads((tmp_path / "deploy_report.json").read_text())
    names = [row["name"] for row in report["rows"]]
    assert names == ["torch fp32 (unpruned)", "onnx fp32 (unpruned)", "onnx int8 (unpruned)",
                     "torch fp32 (pruned)", "onnx fp32 (pruned)", "onnx int8 (pruned)"]
    rows = {row["name"]: row for row in report["rows"]}
    assert rows["torch fp32 (pruned)"]["macs"] < rows["torch fp32 (unpruned)"]["macs"] / 3
    assert len(report["warnings"]) == 2
    assert "| onnx int8 (pruned) |" in proc.stdout and "speed-up" in proc.stdout


def test_int8_without_the_runs_data_says_what_to_pass(tmp_path):
    _save_checkpoint(tmp_path / "ckpt.pth", "resnet18", pruned=False)
    with pytest.raises(ConfigError, match="--int8.*config.yaml.*--config"):
        deploy_report(tmp_path / "ckpt.pth", tmp_path / "m.onnx", int8=True)
    with pytest.raises(ConfigError, match="--config.*nowhere.yaml.*does not exist"):
        deploy_report(tmp_path / "ckpt.pth", tmp_path / "m.onnx",
                      config=tmp_path / "nowhere.yaml")
    report = deploy_report(tmp_path / "ckpt.pth", tmp_path / "m.onnx", fp16=True, runs=2)
    assert report["test_data"] is None and [row["top1"] for row in report["rows"]] == [None] * 3

    # the run's data moved: fp32 still exports (no top-1, said why); int8 cannot
    (tmp_path / "config.yaml").write_text("train_data: gone/train\ntest_data: gone/test\n"
                                          "input_size: [40, 32]\n")
    report = deploy_report(tmp_path / "ckpt.pth", tmp_path / "m2.onnx", runs=2)
    assert report["test_data"] is None
    assert "config.yaml" in report["notes"][0] and "gone/test" in report["notes"][0]
    with pytest.raises(ConfigError, match="config.yaml.*gone/test"):
        deploy_report(tmp_path / "ckpt.pth", tmp_path / "m3.onnx", int8=True)


def test_a_failed_export_leaves_the_previous_file_whole(tmp_path):
    from pbt.export import to_onnx

    class Breaks(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot trace this")

    model = _save_checkpoint(tmp_path / "ckpt.pth", "resnet18", pruned=False)
    path = to_onnx(model, torch.randn(1, 3, 32, 40), tmp_path / "out" / "m.onnx")
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot trace"):
        to_onnx(Breaks(), torch.randn(1, 3, 32, 40), path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["m.onnx"]  # no partial file left


def _check_full(path: str | Path) -> None:
    import onnx

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def test_every_onnx_file_written_passes_the_full_checker(tmp_path):
    """fp32, fp16 (whose converter appends its input casts after their readers) and int8,
    each checked as a strict consumer would: ``onnx.checker`` with ``full_check``."""
    import numpy as np

    from pbt.export import to_int8

    _save_checkpoint(tmp_path / "run" / "last.pth", "resnet18", pruned=True)
    export_onnx(tmp_path / "run", tmp_path / "single" / "model.onnx", runs=1)
    deploy_report(tmp_path / "run", tmp_path / "out" / "model.onnx", fp16=True, runs=1)
    calibration = [np.random.default_rng(0).standard_normal((4, 3, 32, 40), np.float32)]
    to_int8(tmp_path / "out" / "model.onnx", tmp_path / "out" / "model.int8.onnx", calibration)
    written = sorted(tmp_path.rglob("*.onnx"))
    assert [str(p.relative_to(tmp_path)) for p in written] == [
        "out/model.fp16.onnx", "out/model.int8.onnx", "out/model.onnx", "single/model.onnx"]
    for path in written:
        _check_full(path)


def test_sort_topologically_orders_nodes_or_names_what_is_missing():
    import onnx
    from onnx import TensorProto, helper

    from pbt.export import sort_topologically

    def graph(nodes):
        return helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])])

    first = helper.make_node("Neg", ["x"], ["y"], name="first")
    second = helper.make_node("Relu", ["y"], ["z"], name="second")
    model = helper.make_model(graph([second, first]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model, full_check=True)
    sort_topologically(model.graph)
    assert [node.name for node in model.graph.node] == ["first", "second"]
    onnx.checker.check_model(model, full_check=True)

    orphan = helper.make_node("Relu", ["nobody"], ["z"], name="orphan")
    with pytest.raises(RuntimeError, match=r"node 'orphan' reads \['nobody'\]"):
        sort_topologically(graph([orphan]))


@pytest.mark.slow
def test_report_rows_and_latencies_are_consistent(tmp_path):
    """For every file and both batch sizes: a latency row, finite and positive; each
    speed-up is the ratio of the stored latencies to the first row's; the threads and runs
    asked for and the CPU are named; the printed table shows the stored numbers."""
    from pbt.export import format_report

    _save_checkpoint(tmp_path / "base.pth", "resnet18", pruned=False, input_size=(16, 16))
    _save_checkpoint(tmp_path / "pruned.pth", "resnet18", pruned=True, input_size=(16, 16))
    report = deploy_report(tmp_path / "pruned.pth", tmp_path / "out" / "m.onnx", fp16=True,
                           baseline=tmp_path / "base.pth", threads=2, runs=2)
    rows = report["rows"]
    assert [row["name"] for row in rows] == [
        "torch fp32 (unpruned)", "onnx fp32 (unpruned)", "onnx fp16 (unpruned)",
        "torch fp32 (pruned)", "onnx fp32 (pruned)", "onnx fp16 (pruned)"]
    assert [Path(row["file"]).name for row in rows] == [
        "base.pth", "m.unpruned.onnx", "m.unpruned.fp16.onnx", "pruned.pth", "m.onnx",
        "m.fp16.onnx"]
    latency = report["latency"]
    assert latency["threads"] == 2 and latency["runs"] == 2
    assert isinstance(latency["device"], str) and latency["device"].strip()
    first = rows[0]["latency_ms"]
    for row in rows:
        assert Path(row["file"]).stat().st_size == row["size_bytes"]
        assert set(row["latency_ms"]) == set(row["speedup"]) == {"batch1", "batch32"}
        for key, ms in row["latency_ms"].items():
            assert isinstance(ms, float) and math.isfinite(ms) and ms > 0, (row["name"], key)
            assert row["speedup"][key] == round(first[key] / ms, 2), (row["name"], key)
    assert rows[0]["speedup"] == {"batch1": 1.0, "batch32": 1.0}
    for variant in (rows[:3], rows[3:]):  # one model's params and MACs, whatever the file
        assert len({(row["params"], row["macs"]) for row in variant}) == 1
    assert rows[3]["params"] < rows[0]["params"] and rows[3]["macs"] < rows[0]["macs"]

    table = format_report(report).splitlines()
    assert f"{latency['device']}, 2 thread(s), median of 2" in table[0]
    body = [line.split(" | ") for line in table[4:]]
    assert len(body) == len(rows)
    for cells, row in zip(body, rows):
        assert cells[0] == f"| {row['name']}"
        assert cells[4:7] == [f"{row['latency_ms']['batch1']:.2f}",
                              f"{row['latency_ms']['batch32']:.2f}",
                              f"{row['speedup']['batch1']:.2f}x"]
