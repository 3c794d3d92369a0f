"""README promises checked the way a user meets them: a shell command (``python
tests/train_tiny.py ...``, ``python recipes/classification.py ...``, ``torchrun ...``) in a
subprocess, then its exit code, its output and the files it left.

Covered here: ``--help``, Ctrl-C (once, twice, and with two workers), a NaN loss, bad
``--resume`` input, ``--resume auto``, ``finetune: path.pth`` and bare state_dicts, top-5 and
the classification report, optimizers and losses from the config, ``torchrun`` on CPU, and
``on_after_backward``'s place in the hook order.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, NoisyBlobs, same_weights, tiny_trainer_class, weights

from pbt.callbacks import Callback
from pbt.checkpoint import complete_states, state_problem
from pbt.config import CORE_KEYS

TESTS = ROOT / "tests"
TINY = TESTS / "train_tiny.py"
RECIPE = ROOT / "recipes" / "classification.py"
# the tiny trainer: 40 training samples, 23 test samples, 4 classes; 5 steps per epoch here
BASE = ["--work_dir", "w", "--batch_size", "8", "--progress", "false", "--num_workers", "0",
        "--lr", "0.05", "--milestones", "2"]
LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "GROUP_RANK", "ROLE_RANK")


def clean_env(**extra: str) -> dict:
    """This environment without test hooks (PBT_*) or a launcher's variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PBT_") and k not in LAUNCHER_VARIABLES}
    env.update(extra)
    return env


def run(command: list[str], cwd: Path, expect: int | None = 0, timeout: int = 240,
        env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True,
                            text=True, timeout=timeout, env=env or clean_env())
    if expect is not None:
        assert result.returncode == expect, result.stdout[-4000:] + result.stderr[-4000:]
    if expect in (1, 2, 130):  # bad input or a stop: one message, never a traceback
        assert "Traceback" not in result.stderr, result.stderr
    return result


def tiny(cwd: Path, *args: str, expect: int | None = 0, env: dict | None = None,
         timeout: int = 240) -> subprocess.CompletedProcess:
    return run([sys.executable, TINY, *BASE, *args], cwd, expect, timeout, env)


def write_script(folder: Path, name: str, text: str) -> Path:
    script = folder / name
    script.write_text(text.replace("TESTS_DIR", repr(str(TESTS))))
    return script


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def step_numbers(run_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in complete_states(run_dir)]


def files_of(folder: Path) -> dict:
    """Every file's size and mtime (but the run dirs' locks, which each holder rewrites)."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.name != ".pbt.lock"}


def run_dirs(work: Path) -> set[str]:
    return {p.name for p in work.iterdir() if p.is_dir()} if work.is_dir() else set()


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch tiny run: what every interrupted-and-resumed run must equal."""
    cwd = tmp_path_factory.mktemp("straight")
    tiny(cwd, "--run_name", "straight", "--num_epochs", "3")
    return cwd / "w" / "straight"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A trained 2-epoch tiny run whose weights other runs load."""
    cwd = tmp_path_factory.mktemp("source")
    tiny(cwd, "--run_name", "src", "--num_epochs", "2")
    return cwd / "w" / "src"


# -- a. --help ---------------------------------------------------------------------------------
def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def help_entries(text: str) -> dict[str, str]:
    """``--flag`` -> its help text (wrapped lines joined, whitespace collapsed)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"  (?:-\w(?: \S+)?, )?(--\w+)", line)
        if match:
            current = match[1]
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line
        else:
            current = None
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


@pytest.fixture(scope="module")
def helps(tmp_path_factory) -> dict[str, str]:
    cwd = tmp_path_factory.mktemp("help")
    texts = {}
    for name, script in (("tiny", TINY), ("recipe", RECIPE)):
        result = run([sys.executable, script, "--help"], cwd, timeout=120)
        texts[name] = result.stdout
    assert list(cwd.iterdir()) == [], "--help must not start a run or write anything"
    return texts


def recipe_keys() -> list:
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        from classification import KEYS
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    return KEYS


def test_help_lists_every_key_with_its_default(helps):
    """The default shown is what a run without the flag uses: for the recipe, its YAML."""
    import yaml

    recipe_yaml = yaml.safe_load((ROOT / "recipes" / "classification.yaml").read_text())
    for name, keys, from_file in (("tiny", list(CORE_KEYS), {}),
                                  ("recipe", [*CORE_KEYS, *recipe_keys()], recipe_yaml)):
        entries = help_entries(helps[name])
        assert "--config_file" in entries and "YAML" in entries["--config_file"]
        for key in keys:
            entry = entries.get(f"--{key.name}")
            assert entry is not None, f"{name} --help lacks --{key.name}:\n{helps[name]}"
            # argparse wraps at spaces and hyphens ("multi-\n step"): compare without them
            default = from_file.get(key.name, key.default)
            assert squash(f"(default {default})") in squash(entry), entry
            assert squash(key.help) in squash(entry), entry  # the key's own help text


def test_recipe_help_shows_the_defaults_a_plain_run_uses(helps):
    import yaml

    entries = help_entries(helps["recipe"])
    used = yaml.safe_load((ROOT / "recipes" / "classification.yaml").read_text())
    for key in ("lr", "batch_size", "scheduler", "train_transform", "num_warn_up"):
        assert squash(f"(default {used[key]})") in squash(entries[f"--{key}"]), key


# -- b. Ctrl-C -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_saves_a_state_exits_130_and_the_printed_resume_is_exact(tmp_path, straight):
    stopped = tiny(tmp_path, "--run_name", "pre", "--num_epochs", "3", expect=130,
                   env=clean_env(PBT_SIGNAL_AT="2,2,INT"))  # SIGINT after epoch 2, batch 2
    assert "SIGINT received" in stopped.stderr
    run_dir = tmp_path / "w" / "pre"
    assert step_numbers(run_dir)[-1] == 7  # 5 steps of epoch 1 + the step it was on
    assert state_problem(complete_states(run_dir)[-1]) is None
    assert "SIGINT: saving a resumable state" in (run_dir / "train.log").read_text()
    # the user copies the printed flag onto the same command
    resume = re.search(r"--resume (\S+)", stopped.stderr)
    assert resume and Path(tmp_path, resume[1]).resolve() == run_dir.resolve(), stopped.stderr
    resumed = tiny(tmp_path, "--run_name", "pre", "--num_epochs", "3", "--resume", resume[1])
    assert "epoch 2, batch 2, global step 7" in resumed.stdout
    assert same_weights(straight / "last.pth", run_dir / "last.pth")
    assert summary_of(straight)["history"] == summary_of(run_dir)["history"]


CTRL_C_TWICE = '''
import os
import signal
import sys

sys.path.insert(0, TESTS_DIR)
import torch
from conftest import tiny_trainer_class

from pbt.callbacks import Callback
from pbt.config import parse_config
from pbt.launch import launch


class FirstCtrlC(Callback):
    def on_batch_end(self, batch, logs):
        if (self.trainer.epoch, batch) == (1, 1):  # epoch 2, batch 2
            os.kill(os.getpid(), signal.SIGINT)


def main(cfg):
    trainer = tiny_trainer_class()(cfg, [FirstCtrlC()])
    save = torch.save

    def second_ctrl_c_inside_the_save(obj, path, *args, **kwargs):
        if trainer.stop_signal is not None and ".tmp-step" in str(path):
            print(f"second Ctrl-C while writing {os.path.basename(str(path))}", flush=True)
            os.kill(os.getpid(), signal.SIGINT)
        return save(obj, path, *args, **kwargs)

    torch.save = second_ctrl_c_inside_the_save
    return trainer.run()


if __name__ == "__main__":
    launch(main, parse_config())
'''


@pytest.mark.slow
def test_a_second_ctrl_c_during_the_final_save_stops_at_once(tmp_path, straight):
    script = write_script(tmp_path, "ctrl_c_twice.py", CTRL_C_TWICE)
    started = time.monotonic()
    result = run([sys.executable, script, *BASE, "--run_name", "twice", "--num_epochs", "3"],
                 tmp_path, expect=None)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 128 + signal.SIGINT, output
    assert "second Ctrl-C while writing" in result.stdout, output
    assert "Traceback" not in output and "stopped at once" in result.stderr, output
    assert f"--resume {Path('w', 'twice')}" in result.stderr, output
    assert "a resumable state was saved" not in output  # the save was abandoned, not finished
    assert elapsed < 60
    run_dir = tmp_path / "w" / "twice"
    # the interrupted save left nothing half-written; the state before it is whole
    assert step_numbers(run_dir) == [5]
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert state_problem(complete_states(run_dir)[-1]) is None
    assert "epoch 3/3" not in (run_dir / "train.log").read_text()  # it did not train on
    tiny(tmp_path, "--run_name", "twice", "--num_epochs", "3", "--resume", "auto")
    assert same_weights(straight / "last.pth", run_dir / "last.pth")


@pytest.mark.slow
def test_ctrl_c_stops_both_workers_after_each_saves_its_state(tmp_path):
    """Ctrl-C in a terminal reaches the whole process group: the launcher and its 2 workers.
    Both workers save a resumable state, the command exits 130, and the state resumes."""
    command = [sys.executable, TINY, *BASE, "--run_name", "ddp", "--num_processes", "2",
               "--main_process_port", "0", "--batch_size", "4", "--num_epochs", "1000"]
    env = clean_env(CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([str(c) for c in command], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    seen = []
    # a deadline for the whole job, also while reading its output blocks
    watchdog = threading.Timer(240, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        for line in proc.stdout:  # stderr is merged in: nothing blocks on a full pipe
            seen.append(line)
            if "epoch 2/1000  train_loss" in line:
                break
        assert any("epoch 2/1000  train_loss" in line for line in seen), "".join(seen)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        output = "".join(seen) + proc.communicate(timeout=120)[0]
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, output
    assert "Traceback" not in output, output
    assert "pbt: rank 0/2 ready" in output and "pbt: rank 1/2 ready" in output
    for rank in (0, 1):
        assert f"pbt: stopped (rank {rank}): SIGINT received" in output, output
    run_dir = tmp_path / "w" / "ddp"
    state = complete_states(run_dir)[-1]
    assert state_problem(state) is None
    assert {"pbt_rank_0.pt", "pbt_rank_1.pt"} <= {p.name for p in state.iterdir()}
    saved = torch.load(state / "pbt_state.pt", weights_only=True)
    assert saved["world_size"] == 2 and saved["epoch"] >= 2
    epochs = str(saved["epoch"] + 1)  # finish quickly: at most one more epoch
    resumed = run([sys.executable, TINY, *BASE, "--run_name", "ddp", "--num_processes", "2",
                   "--main_process_port", "0", "--batch_size", "4", "--num_epochs", epochs,
                   "--resume", str(run_dir)], tmp_path, env=env)
    assert "resumed from" in resumed.stdout
    summary = summary_of(run_dir)
    assert summary["world_size"] == 2 and summary["epochs"] == int(epochs)
    # the same 2 workers without a stop, for as many epochs: bit-identical (the schedule is
    # multi-step, a function of the step alone, so the num_epochs it was started with is moot)
    run([sys.executable, TINY, *BASE, "--run_name", "ddp_straight", "--num_processes", "2",
         "--main_process_port", "0", "--batch_size", "4", "--num_epochs", epochs], tmp_path,
        env=env)
    straight = tmp_path / "w" / "ddp_straight"
    assert same_weights(straight / "last.pth", run_dir / "last.pth")
    assert summary_of(straight)["history"] == summary["history"]


# -- c. a NaN loss -------------------------------------------------------------------------------
def test_nan_loss_from_a_huge_lr_exits_1_with_one_message(tmp_path):
    result = tiny(tmp_path, "--run_name", "nan", "--num_epochs", "2", "--lr", "1e30",
                  expect=1)
    messages = [line for line in result.stderr.splitlines() if line.startswith("pbt:")]
    assert len(messages) == 1, result.stderr
    assert messages[0].startswith("pbt: stopped: non-finite training loss")
    assert re.search(r"at epoch \d+, batch \d+", messages[0]), messages[0]
    log = (tmp_path / "w" / "nan" / "train.log").read_text()
    assert "non-finite training loss" in log


# -- d. bad resume input -----------------------------------------------------------------------
@pytest.mark.slow
def test_bad_resume_input_exits_2_without_a_traceback_and_changes_nothing(tmp_path):
    tiny(tmp_path, "--run_name", "A", "--num_epochs", "1")
    run_dir = tmp_path / "w" / "A"
    (tmp_path / "notes.txt").write_text("not a state\n")
    (tmp_path / "empty").mkdir()
    cases = [
        ("nowhere", "does not exist"),
        ("notes.txt", "holds no complete pbt training state"),  # a file, not a state
        ("w/A/last.pth", "holds no complete pbt training state"),  # weights, not a state
        ("empty", "holds no complete pbt training state"),
    ]
    before = files_of(tmp_path)
    for resume, needle in cases:
        result = tiny(tmp_path, "--num_epochs", "2", "--resume", resume, expect=2)
        assert needle in result.stderr and resume in result.stderr, result.stderr
        assert result.stderr.count("pbt: error") == 1, result.stderr
        assert files_of(tmp_path) == before, f"--resume {resume} changed files"
    # the run's only state damaged (one byte flipped): named, refused, nothing changed
    state = complete_states(run_dir)[-1]
    data = bytearray((state / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (state / "model.safetensors").write_bytes(bytes(data))
    before = files_of(tmp_path)
    for resume in ("w/A", str(state.relative_to(tmp_path))):
        result = tiny(tmp_path, "--num_epochs", "2", "--resume", resume, expect=2)
        assert "model.safetensors" in result.stderr, result.stderr
        assert files_of(tmp_path) == before, f"--resume {resume} changed files"


# -- e. --resume auto ----------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_auto_continues_the_newest_run_that_has_a_complete_state(tmp_path):
    work = tmp_path / "w"
    made = []
    for _ in range(2):  # no run_name: PBT-style names tiny_<timestamp>
        known = run_dirs(work)
        tiny(tmp_path, "--num_epochs", "1")
        made += sorted(run_dirs(work) - known)
    known = run_dirs(work)
    # a newer run killed before its first state: it has no complete state to continue
    tiny(tmp_path, "--num_epochs", "1", expect=-signal.SIGKILL,
         env=clean_env(PBT_SIGNAL_AT="1,2,KILL"))
    (killed,) = run_dirs(work) - known
    assert len(made) == 2 and complete_states(work / killed) == []
    older, newest = made
    before = {name: files_of(work / name) for name in (older, killed)}

    result = tiny(tmp_path, "--num_epochs", "2", "--resume", "auto")
    assert f"resumed from {Path('w', newest, 'checkpoints', 'step-00000005')}" in result.stdout
    assert run_dirs(work) == {older, newest, killed}  # no fresh run dir
    assert summary_of(work / newest)["epochs"] == 2
    assert {name: files_of(work / name) for name in (older, killed)} == before


@pytest.mark.slow
def test_resume_auto_with_a_run_name_continues_only_that_run(tmp_path):
    tiny(tmp_path, "--run_name", "exp_b", "--num_epochs", "1")
    result = tiny(tmp_path, "--run_name", "exp", "--num_epochs", "1", "--resume", "auto")
    assert "starting fresh" in result.stdout, result.stdout
    assert summary_of(tmp_path / "w" / "exp_b")["epochs"] == 1


@pytest.mark.slow
def test_resume_auto_leaves_runs_of_another_flag_alone(tmp_path):
    tiny(tmp_path, "--flag", "x", "--num_epochs", "1")
    (flagged,) = run_dirs(tmp_path / "w")
    result = tiny(tmp_path, "--num_epochs", "1", "--resume", "auto")
    assert "starting fresh" in result.stdout, result.stdout
    assert summary_of(tmp_path / "w" / flagged)["epochs"] == 1


# -- f. finetune: path.pth, bare state_dicts -----------------------------------------------------
@pytest.mark.slow
def test_finetune_path_and_a_bare_state_dict_load_the_file(tmp_path, source):
    """Evaluated with the loaded weights, the test loss is the source run's last one
    exactly: the weights came from the file."""
    trained = weights(source / "last.pth")
    expected = summary_of(source)["test"]
    bare = tmp_path / "bare.pth"
    torch.save(trained, bare)  # torch.save(model.state_dict())
    prefixed = tmp_path / "data_parallel.pth"
    torch.save({f"module.{k}": v for k, v in trained.items()}, prefixed)  # PBT's nn.DataParallel
    (tmp_path / "finetune.yaml").write_text(f"finetune: {prefixed}\n")
    for name, args, path in (
            ("ft", ["-c", "finetune.yaml"], prefixed),
            ("mf", ["--model_file", str(bare)], bare)):
        result = tiny(tmp_path, "--run_name", name, "--eval_only", "true", *args)
        assert f"loaded weights from {path}" in result.stdout, result.stdout
        tested = summary_of(tmp_path / "w" / name)["test"]
        assert tested["correct"] == expected["correct"]
        assert tested["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    # and a fine-tuning run from the file trains on from there
    result = tiny(tmp_path, "--run_name", "train", "--finetune", str(bare), "--num_epochs", "1")
    assert f"loaded weights from {bare}" in result.stdout


# -- g. top-5 and the classification report ------------------------------------------------------
def write_images(root: Path, per_class: dict[str, int]) -> None:
    """16x16 PNGs, one colour family per class."""
    from PIL import Image

    for c, (name, count) in enumerate(per_class.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixel = ((c * 45 + i * 3) % 256, (c * 90 + 20) % 256, (255 - c * 40) % 256)
            Image.new("RGB", (16, 16), pixel).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def six_classes(tmp_path_factory) -> tuple[Path, Path]:
    """6 classes (enough for top-5); 31 test images (an odd count: 2 ranks get 16 + 15)."""
    root = tmp_path_factory.mktemp("images")
    names = [f"c{i}" for i in range(6)]
    write_images(root / "train", dict.fromkeys(names, 8))
    write_images(root / "test", {name: 6 if name == "c0" else 5 for name in names})
    return root / "train", root / "test"


RECIPE_SMALL = ["--work_dir", "w", "--input_size", "16", "16", "--batch_size", "8",
                "--num_workers", "0", "--progress", "false", "--num_epochs", "1"]


def check_reports(run_dir: Path, count: int) -> dict:
    """summary, classification_report.txt and confusion_matrix.csv agree; top-5 logged."""
    summary = summary_of(run_dir)
    tested = summary["test"]
    assert tested["count"] == count
    assert 0 <= tested["top1"] <= tested["top5"] <= 100
    report = (run_dir / "classification_report.txt").read_text().splitlines()
    assert report[0].split() == ["class", "precision", "recall", "f1", "support"]
    rows = {line.split()[0]: line.split()[1:] for line in report[1:]}
    assert set(rows) == {f"c{i}" for i in range(6)} | {"accuracy"}
    assert sum(int(rows[f"c{i}"][-1]) for i in range(6)) == count  # each sample once
    assert float(rows["accuracy"][0]) == pytest.approx(tested["top1"] / 100, abs=1e-4)
    matrix = (run_dir / "confusion_matrix.csv").read_text().splitlines()
    diagonal = sum(int(line.split(",")[1 + i]) for i, line in enumerate(matrix[1:]))
    assert diagonal == tested["correct"]
    assert "test_top5" in (run_dir / "train.log").read_text()
    return summary


def test_top5_and_the_classification_report(tmp_path, six_classes, source):
    result = run([sys.executable, RECIPE, *RECIPE_SMALL, "--run_name", "six", "--train_data",
                  six_classes[0], "--test_data", six_classes[1]], tmp_path, timeout=300)
    run_dir = tmp_path / "w" / "six"
    summary = check_reports(run_dir, 31)
    assert "top5" in summary["history"][0]["test"]
    assert re.search(r"test_top5 [\d.]+", result.stdout)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("epoch/test_top5")] == [1]
    # fewer than 5 classes (the tiny trainer's 4): top-1 only, the report all the same
    assert "top5" not in summary_of(source)["test"]
    assert (source / "classification_report.txt").is_file()


# -- h. optimizers and losses chosen in the config -----------------------------------------------
OPTIMIZERS = {
    "Adam": (["--optim_type", "Adam"], {"decoupled_weight_decay": False}, "exp_avg_sq"),
    "AdamW": (["--optim_type", "adamw"], {"decoupled_weight_decay": True}, "exp_avg_sq"),
    "SGD nesterov": (["--optim_type", "SGD", "--nesterov", "true", "--momentum", "0.8"],
                     {"nesterov": True, "momentum": 0.8}, "momentum_buffer"),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_from_the_command_line_is_the_one_that_trained(tmp_path, name):
    """The optimizer's own state, saved in the resumable state, shows which one ran."""
    args, group_values, state_key = OPTIMIZERS[name]
    tiny(tmp_path, "--run_name", "opt", "--num_epochs", "1", "--weight_decay", "0.01", *args)
    state = complete_states(tmp_path / "w" / "opt")[-1]
    saved = torch.load(state / "optimizer.bin", weights_only=True)
    groups = saved["param_groups"]
    for key, value in group_values.items():
        assert all(group[key] == value for group in groups), (key, groups)
    assert ("betas" in groups[0]) == name.startswith("Adam")
    assert all(state_key in entry for entry in saved["state"].values())
    assert [group["weight_decay"] for group in groups] == [0.01, 0.0]  # none on BN / bias
    assert f"optim_type: {name.split()[0]}" in (tmp_path / "w" / "opt" / "config.yaml").read_text()


@pytest.mark.slow
def test_loss_type_from_the_command_line_is_the_criterion(tmp_path, source):
    """The test loss of the same weights under each ``loss_type`` is that loss, by hand."""
    model = tiny_trainer_class().build_model(None, None)
    model.load_state_dict(weights(source / "last.pth"))
    model.eval()
    data = NoisyBlobs(23, 1)  # the tiny trainer's test set
    with torch.no_grad():
        log_probs = torch.log_softmax(model(data.data), dim=1)
    log_pt = log_probs.gather(1, data.targets[:, None]).squeeze(1)
    expected = {
        "CrossEntropyLoss": float(-log_pt.mean()),
        "LabelSmoothing": float((0.8 * -log_pt + 0.2 * -log_probs.mean(dim=1)).mean()),
        "FocalLoss": float((-((1 - log_pt.exp()) ** 3) * log_pt).mean()),
    }
    assert summary_of(source)["test"]["loss"] == pytest.approx(expected["CrossEntropyLoss"],
                                                              rel=1e-5)
    for loss_type, extra in (("LabelSmoothing", ["--smoothing", "0.2"]),
                             ("FocalLoss", ["--focal_gamma", "3"])):
        tiny(tmp_path, "--run_name", loss_type, "--eval_only", "true", "--model_file",
             str(source / "last.pth"), "--loss_type", loss_type, *extra)
        tested = summary_of(tmp_path / "w" / loss_type)["test"]
        assert tested["loss"] == pytest.approx(expected[loss_type], rel=1e-5), loss_type
    assert len({round(v, 4) for v in expected.values()}) == 3  # the three really differ


# -- i. torchrun on CPU ----------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_standalone_two_cpu_processes(tmp_path, six_classes):
    """README: ``ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2
    recipes/classification.py`` (--standalone: the launcher picks a free port)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [torchrun] if torchrun.exists() else [sys.executable, "-m",
                                                     "torch.distributed.run"]
    result = run([*launcher, "--standalone", "--nproc_per_node", "2", RECIPE, *RECIPE_SMALL,
                  "--run_name", "tr", "--train_data", six_classes[0], "--test_data",
                  six_classes[1]], tmp_path, timeout=300, env=clean_env(ACCELERATE_USE_CPU="1"))
    ready = re.findall(r"pbt: rank (\d)/2 ready \(pid (\d+)", result.stdout)
    assert sorted(rank for rank, _ in ready) == ["0", "1"], result.stdout
    assert len({pid for _, pid in ready}) == 2
    run_dir = tmp_path / "w" / "tr"
    summary = check_reports(run_dir, 31)  # gathered from both ranks, padding dropped
    assert summary["world_size"] == 2
    assert summary["global_step"] == 3  # 48 images / (8 x 2 processes)
    assert run_dirs(tmp_path / "w") == {"tr"}


@pytest.mark.slow
def test_a_preset_under_two_torchrun_processes_resumes_exactly(tmp_path, six_classes):
    """An augmentation preset with 2 DDP processes: a 1-epoch run resumed to 2 epochs ends
    with the weights of a 2-epoch run (constant lr after warm-up, so both follow one
    schedule); each sample's augmentation is seeded by index, not by a process's stream."""
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [torchrun] if torchrun.exists() else [sys.executable, "-m",
                                                     "torch.distributed.run"]
    args = [*RECIPE_SMALL, "--train_data", six_classes[0], "--test_data", six_classes[1],
            "--train_transform", "light+randaugment", "--scheduler", "multi-step",
            "--milestones", "100", "--num_warn_up", "1"]

    def torchrun_recipe(*extra: str) -> subprocess.CompletedProcess:
        result = run([*launcher, "--standalone", "--nproc_per_node", "2", RECIPE, *args,
                      *extra], tmp_path, timeout=300, env=clean_env(ACCELERATE_USE_CPU="1"))
        ranks = re.findall(r"pbt: rank (\d)/2 ready", result.stdout)
        assert sorted(ranks) == ["0", "1"], result.stdout
        return result

    torchrun_recipe("--run_name", "straight", "--num_epochs", "2")
    torchrun_recipe("--run_name", "resumed", "--num_epochs", "1")
    torchrun_recipe("--run_name", "resumed", "--num_epochs", "2", "--resume", "auto")
    work = tmp_path / "w"
    assert summary_of(work / "resumed")["world_size"] == 2
    assert same_weights(work / "straight" / "last.pth", work / "resumed" / "last.pth")


# -- j. on_after_backward in the hook order --------------------------------------------------------
HOOKS_SCRIPT = '''
import json
import sys

sys.path.insert(0, TESTS_DIR)
import torch
from conftest import tiny_trainer_class

from pbt.callbacks import Callback
from pbt.config import parse_config
from pbt.launch import launch

HOOKS = ("on_train_begin", "on_epoch_begin", "on_batch_begin", "on_after_backward",
         "on_train_summary", "on_batch_end", "on_test_begin", "on_test_summary", "on_test_end",
         "on_epoch_end", "on_train_end")


class Recorder(Callback):
    """Each hook's name and batch; around the step: gradients there, weights moved yet."""

    def __init__(self):
        self.calls, self.before = [], None
        for hook in HOOKS:
            setattr(self, hook, self.recorder(hook))

    def weights(self):
        return torch.cat([p.detach().flatten() for p in self.model.parameters()]).clone()

    def recorder(self, hook):
        def record(*args):
            entry = {"hook": hook}
            if hook in ("on_batch_begin", "on_after_backward", "on_batch_end"):
                entry["batch"] = args[0]
            if hook == "on_batch_begin":
                self.before = self.weights()
            if hook in ("on_after_backward", "on_train_summary"):
                grads = [p.grad for p in self.model.parameters()]
                entry["grads"] = all(g is not None and bool(g.abs().sum() > 0) for g in grads)
                entry["stepped"] = not torch.equal(self.before, self.weights())
            self.calls.append(entry)
        return record


def main(cfg):
    recorder = Recorder()
    summary = tiny_trainer_class()(cfg, [recorder]).run()
    with open("hooks.json", "w") as out:
        json.dump(recorder.calls, out)
    return summary


if __name__ == "__main__":
    launch(main, parse_config())
'''


def readme_hook_order() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```\n(on_train_begin\(logs\).*?)```", text, re.S)
    assert block, "README's hook order block not found"
    names = re.findall(r"\b(on_\w+)\(", block[1])
    return list(dict.fromkeys(names))


def test_on_after_backward_runs_where_readme_places_it(tmp_path):
    order = readme_hook_order()
    assert order.index("on_batch_begin") < order.index("on_after_backward") \
        < order.index("on_train_summary")
    script = write_script(tmp_path, "hooks.py", HOOKS_SCRIPT)
    # 40 samples / 20: 2 train batches; 23 / 20: 2 test batches; 2 epochs
    run([sys.executable, script, *BASE, "--run_name", "hooks", "--num_epochs", "2",
         "--batch_size", "20"], tmp_path)
    calls = json.loads((tmp_path / "hooks.json").read_text())
    names = [call["hook"] for call in calls]
    assert list(dict.fromkeys(names)) == order  # first calls in README's order
    train = ["on_batch_begin", "on_after_backward", "on_train_summary", "on_batch_end"] * 2
    test = ["on_test_begin", "on_test_summary", "on_test_summary", "on_test_end"]
    epoch = ["on_epoch_begin", *train, *test, "on_epoch_end"]
    assert names == ["on_train_begin", *epoch, *epoch, "on_train_end"]
    # between backward and the optimizer step: gradients present, weights not yet updated;
    # on_train_summary comes after the step
    backward = [call for call in calls if call["hook"] == "on_after_backward"]
    assert [call["batch"] for call in backward] == [0, 1, 0, 1]
    assert all(call["grads"] and not call["stepped"] for call in backward)
    summaries = [call for call in calls if call["hook"] == "on_train_summary"]
    assert all(call["stepped"] for call in summaries)


RANK_LOGS_SCRIPT = '''
import json
import sys

sys.path.insert(0, TESTS_DIR)
from conftest import tiny_trainer_class

from pbt.callbacks import Callback
from pbt.config import parse_config
from pbt.launch import launch


class RankLogs(Callback):
    """Each process's epoch metrics, as its own hooks see them."""

    def on_epoch_end(self, epoch, logs):
        rank = self.trainer.accelerator.process_index
        with open(f"rank{rank}.jsonl", "a") as out:
            out.write(json.dumps({"train": logs["train"], "test": logs["test"]}) + "\\n")


def main(cfg):
    return tiny_trainer_class()(cfg, [RankLogs()]).run()


if __name__ == "__main__":
    launch(main, parse_config())
'''


@pytest.mark.slow
def test_two_processes_log_the_same_reduced_metrics(tmp_path):
    """README: every process runs the hooks; losses are reduced across processes and test
    metrics count each of the 23 test images once (the sampler pads 23 to 24 for 2 ranks)."""
    script = write_script(tmp_path, "rank_logs.py", RANK_LOGS_SCRIPT)
    run([sys.executable, script, *BASE, "--run_name", "ddp", "--num_epochs", "2",
         "--num_processes", "2", "--main_process_port", "0"], tmp_path, timeout=300)
    ranks = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    for mine, theirs in zip(*ranks):
        assert mine == theirs  # one value per metric for the whole job, on every process
        assert mine["test"]["count"] == 23 and "loss" in mine["train"]
    assert summary_of(tmp_path / "w" / "ddp")["history"][-1]["test"] == ranks[0][-1]["test"]


# -- bad inputs in config and data, as a user types them -----------------------------------------
def test_an_absurd_batch_size_exits_2_naming_the_range_before_writing_anything(tmp_path):
    result = run([sys.executable, RECIPE, "--work_dir", "w", "--run_name", "r",
                  "--batch_size", "99999999999999999999"], tmp_path, expect=2, timeout=120)
    messages = [line for line in result.stderr.splitlines() if line.startswith("pbt:")]
    assert len(messages) == 1, result.stderr
    assert "'batch_size'" in messages[0] and "99999999999999999999" in messages[0]
    assert "from 1 to 1000000" in messages[0], messages[0]
    assert list(tmp_path.iterdir()) == [], "a refused config must not make a run dir"


def test_a_config_file_over_1_mib_exits_2_with_a_short_message(tmp_path):
    big = tmp_path / "big.yaml"  # 2.4 MB: a data dump given as -c
    big.write_text("rgb_mean: [" + ", ".join(["0.5"] * 800_000) + "]\n")
    before = files_of(tmp_path)
    result = run([sys.executable, RECIPE, "-c", big, "--work_dir", "w"], tmp_path, expect=2,
                 timeout=120)
    assert result.stderr.count("pbt: error") == 1 and len(result.stderr) < 500, \
        result.stderr[:2000]
    assert "big.yaml" in result.stderr and "at most 1048576 bytes" in result.stderr
    assert files_of(tmp_path) == before


def test_a_directory_as_config_file_or_model_file_is_named_a_directory(tmp_path):
    from torch import nn

    from pbt.checkpoint import load_weights
    from pbt.config import ConfigError

    (tmp_path / "weights").mkdir()
    before = files_of(tmp_path)
    for flag in ("-c", "--model_file"):
        result = tiny(tmp_path, "--run_name", "d", "--num_epochs", "1", flag, "weights",
                      expect=2)
        assert result.stderr.count("pbt: error") == 1, result.stderr
        assert "'weights' is a directory" in result.stderr, result.stderr
        assert "does not exist" not in result.stderr, result.stderr
        assert files_of(tmp_path) == before, f"{flag} weights changed files"
    with pytest.raises(ConfigError, match="'pretrained'.*is a directory; a file is expected"):
        load_weights(nn.Linear(2, 2), tmp_path / "weights", key="pretrained")


def test_recipe_data_with_a_bom_repeats_a_symlink_loop_and_a_huge_image(tmp_path):
    """What PIL, a Windows editor or a stray ``ln -s`` leave in a user's data: training runs,
    each surprise is one line, PIL's own warning (which names no file) is not shown."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def image(path: Path, size=(8, 8)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        return path

    for label in range(3):
        for i in range(3):
            image(tmp_path / "train" / str(label) / f"{i}.png")
            image(tmp_path / "test" / str(label) / f"{i}.png")
    lines = [f"train/{label}/{i}.png {label}" for label in range(3) for i in range(3)]
    lines.append("train/1/0.png 1")  # a repeat
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    os.symlink(".", tmp_path / "test" / "0" / "loop")  # test/0/loop -> test/0
    big = image(tmp_path / "test" / "2" / "big.bmp", size=(40, 30))  # over the limit below
    wrapper = tmp_path / "run_recipe.py"  # PIL's limit lowered, then the recipe as a user runs it
    wrapper.write_text("import runpy, sys\nfrom PIL import Image\nImage.MAX_IMAGE_PIXELS = 1000\n"
                       f"sys.argv[0] = {str(RECIPE)!r}\n"
                       f"runpy.run_path({str(RECIPE)!r}, run_name='__main__')\n")
    result = run([sys.executable, wrapper, "--train_data", "train.txt", "--test_data", "test",
                  "--work_dir", "w", "--run_name", "r", "--num_epochs", "1", "--batch_size",
                  "5", "--num_workers", "0", "--progress", "false", "--input_size", "16",
                  "16"],
                 tmp_path, timeout=300)
    err = result.stderr
    assert "DecompressionBombWarning" not in err and "decompression bomb DOS" not in err, err
    assert err.count("1 line(s) repeat an image") == 1 and "train.txt" in err, err
    assert err.count("symlinked folder(s) not followed") == 1, err
    assert str(tmp_path / "test" / "0" / "loop") in err or "test/0/loop" in err, err
    assert err.count("over PIL's decompression-bomb limit") == 1 and big.name in err, err
    log = (tmp_path / "w" / "r" / "train.log").read_text()
    assert "train data: 10 images, 3 classes" in log, log  # the BOM line read, the repeat kept
    assert "test data: 10 images" in log, log  # 9 + big.bmp, the loop not followed


# -- channels_last on CPU --------------------------------------------------------------------------
class MemoryFormat(Callback):
    """Per training step: whether every conv weight is channels-last, and the loss; per
    forward: whether layer1's output (an activation) is channels-last."""

    def on_train_begin(self, logs):
        self.weights, self.activations, self.losses = [], [], []
        self.hook = self.trainer.unwrapped_model.layer1.register_forward_hook(
            lambda module, args, out: self.activations.append(
                out.is_contiguous(memory_format=torch.channels_last)))

    def on_batch_end(self, batch, logs):
        convs = [m.weight for m in self.trainer.unwrapped_model.modules()
                 if isinstance(m, torch.nn.Conv2d)]
        self.weights.append(all(w.is_contiguous(memory_format=torch.channels_last)
                                for w in convs))
        self.losses.append(float(self.trainer.loss.detach()))

    def on_train_end(self, logs):
        self.hook.remove()


def test_channels_last_trains_on_cpu_in_that_format_and_as_without(tmp_path, monkeypatch):
    """README: ``channels_last: true`` works on CPU. The recipe's resnet18 trains 2 steps
    on 48 digits with its weights and activations channels-last; the run matches the one
    without to float32 rounding (the kernels of the two layouts sum in other orders)."""
    import shutil

    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        from classification import KEYS, ClassificationTrainer
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    from pbt.config import load_config
    from pbt.data import materialise_digits
    from pbt.models import build_model

    # real digits: images of one flat colour (six_classes) leave BatchNorm next to no
    # variance to divide by, which blows rounding up to per-cent differences in one step
    trees = materialise_digits(tmp_path / "digits")
    data = [tmp_path / "small" / split for split in ("train", "test")]
    for tree, small, count in zip(trees, data, (8, 4)):
        for folder in sorted(tree.iterdir())[:6]:
            (small / folder.name).mkdir(parents=True)
            for file in sorted(folder.iterdir())[:count]:
                shutil.copy(file, small / folder.name / file.name)

    class Probed(ClassificationTrainer):
        def build_callbacks(self, cfg):
            return super().build_callbacks(cfg) + [probes[-1]]

    monkeypatch.chdir(tmp_path)
    probes, summaries = [], {}
    for flag in ("false", "true"):
        probes.append(MemoryFormat())
        cfg = load_config([*RECIPE_SMALL, "--batch_size", "24", "--run_name", flag,
                           "--channels_last", flag, "--train_data", str(data[0]),
                           "--test_data", str(data[1])], keys=KEYS,
                          default_file=ROOT / "recipes" / "classification.yaml")
        summaries[flag] = Probed(cfg).run()
    plain, last = probes
    assert len(last.weights) == len(last.losses) == 2  # 48 images, 24 a step
    assert last.weights == [True, True] and last.activations and all(last.activations)
    assert plain.weights == [False, False] and not any(plain.activations)
    # float32 rounding only: measured here, the step losses differ by 1e-6 (relative), the
    # test loss by 5e-6 and the weights by 8e-6 at most; the bounds leave 10-30x room for
    # other CPUs' kernels
    assert last.losses == pytest.approx(plain.losses, rel=1e-4)
    tested = [summaries[flag]["test"] for flag in ("false", "true")]
    assert tested[1]["loss"] == pytest.approx(tested[0]["loss"], rel=1e-3)
    a, b = (torch.load(tmp_path / "w" / flag / "last.pth", weights_only=True)["model"]
            for flag in ("false", "true"))
    assert a.keys() == b.keys()
    far = [k for k in a if not torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4)]
    assert not far, far
    # the weights file loads into a model built without channels_last
    build_model("resnet18", 6).load_state_dict(b)
