"""Nothing lost: a run dir belongs to one run, resume refuses what it cannot honour, a bad
newest state falls back to a good one, a full disk ends with one message. Each test runs
pbt as a user does (a subprocess on real files) and checks what is on disk afterwards."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_recipe, same_weights, tiny_cfg

from pbt.callbacks import Callback, TrainingError
from pbt.checkpoint import complete_states, state_problem

SCRIPT = Path(__file__).parent / "train_tiny.py"
BASE = ["--work_dir", "w", "--batch_size", "8", "--progress", "false", "--num_workers", "0",
        "--lr", "0.05", "--milestones", "2"]


def tiny(cwd: Path, *args: str, expect: int = 0,
         env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PBT_")}
    full_env.update(env or {})
    result = subprocess.run([sys.executable, str(SCRIPT), *BASE, *args], cwd=cwd,
                            capture_output=True, text=True, timeout=300, env=full_env)
    assert result.returncode == expect, result.stdout + result.stderr
    if expect:
        assert "Traceback" not in result.stderr, result.stderr
    return result


def files_of(folder: Path) -> dict:
    """Every file's bytes (the lock file aside: each holder writes its pid there)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".pbt.lock"}


@pytest.mark.slow
def test_rerunning_a_run_name_is_refused_and_overwrite_is_explicit(tmp_path):
    tiny(tmp_path, "--run_name", "A", "--num_epochs", "2")
    run_dir = tmp_path / "w" / "A"
    before = files_of(run_dir)
    again = tiny(tmp_path, "--run_name", "A", "--num_epochs", "1", expect=2)
    assert "already holds a run" in again.stderr and f"--resume {Path('w') / 'A'}" in again.stderr
    assert "--overwrite true" in again.stderr
    assert files_of(run_dir) == before
    tiny(tmp_path, "--run_name", "A", "--num_epochs", "1", "--overwrite", "true")
    assert [p.name for p in complete_states(run_dir)] == ["step-00000005"]  # none of the old
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 1


@pytest.mark.slow
def test_a_run_dir_in_use_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    tiny(tmp_path, "--run_name", "A", "--num_epochs", "1")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pbt.rundir import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(120)",
         str(tmp_path / "w" / "A")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = tiny(tmp_path, "--run_name", "A", "--num_epochs", "2", "--resume", "auto",
                       expect=2)
        assert f"is in use by pid {holder.pid}" in refused.stderr
    finally:
        holder.kill()  # like kill -9: the kernel drops its lock
        holder.wait()
    resumed = tiny(tmp_path, "--run_name", "A", "--num_epochs", "2", "--resume", "auto")
    assert "resumed from" in resumed.stdout


def test_a_lock_whose_dir_was_removed_exits_quietly(tmp_path):
    """A benchmark's temporary work_dir can be gone before the lock is released at exit."""
    script = ("import shutil, sys; from pbt.rundir import RunLock; "
              "RunLock(sys.argv[1]).acquire(); shutil.rmtree(sys.argv[1])")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "gone")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr


class ForkAChild(Callback):
    """Forks a process that outlives the run (as a user's own helper process might); it
    inherits every open file, the lock file's too."""

    def on_train_begin(self, logs):
        self.child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
        self.child.start()


def test_a_child_process_does_not_keep_a_finished_run_locked(tmp_path, tiny_trainer):
    fork = ForkAChild()
    tiny_trainer(tiny_cfg(tmp_path, num_epochs=1), [fork]).run()
    try:
        assert fork.child.is_alive()
        second = tiny_trainer(tiny_cfg(tmp_path, num_epochs=2,
                                       resume=str(tmp_path / "work" / "tiny")))
        assert second.run()["epochs"] == 2
    finally:
        fork.child.kill()
        fork.child.join()


def test_loader_workers_end_with_the_run(tmp_path, tiny_trainer):
    """Persistent workers stop when run() returns, not when the garbage collector finds the
    trainer (which could wait 5 s per worker)."""
    trainer = tiny_trainer(tiny_cfg(tmp_path, num_epochs=1, num_workers=2))
    trainer.run()
    assert not multiprocessing.active_children()


@pytest.mark.slow
def test_resume_refuses_changes_it_cannot_honour_and_applies_safe_ones(tmp_path):
    tiny(tmp_path, "--run_name", "A", "--num_epochs", "2", "--save_steps", "3")
    run_dir = tmp_path / "w" / "A"
    before = files_of(run_dir)
    for flag, old, new in (("--batch_size", "8", "16"), ("--lr", "0.05", "1000000.0"),
                           ("--seed", "0", "3")):
        refused = tiny(tmp_path, "--resume", str(run_dir), "--num_epochs", "3", flag, new,
                       expect=2)
        assert f"{flag[2:]} {old} → {new}" in refused.stderr.replace("'", ""), refused.stderr
        assert "num_epochs" in refused.stderr.split("may change on resume")[1]
    assert files_of(run_dir) == before
    resumed = tiny(tmp_path, "--resume", str(run_dir), "--num_epochs", "3", "--log_freq", "1")
    assert "resume: num_epochs 2 → 3 (applied)" in resumed.stdout
    saved = (run_dir / "config.yaml").read_text()
    assert "num_epochs: 3" in saved and "run_name: A" in saved and "log_freq: 1" in saved
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 3


def test_resume_into_a_bigger_network_is_refused_before_any_write(tmp_path, tiny_trainer):
    from conftest import tiny_cfg

    from pbt.config import ConfigError

    tiny_trainer(tiny_cfg(tmp_path, num_epochs=1)).run()
    run_dir = tmp_path / "work" / "tiny"
    before = files_of(run_dir)

    class Deeper(tiny_trainer):
        def build_model(self, cfg):
            return torch.nn.Sequential(*super().build_model(cfg), torch.nn.Linear(4, 4))

    with pytest.raises(ConfigError, match="key '5.weight' has shape absent in the state"):
        Deeper(tiny_cfg(tmp_path, resume=str(run_dir)))
    assert files_of(run_dir) == before


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
@pytest.mark.parametrize("damaged", ["model.safetensors", "optimizer.bin", "pbt_state.pt"])
def test_a_damaged_newest_state_falls_back_to_the_last_good_one(tmp_path, damaged):
    tiny(tmp_path, "--run_name", "straight", "--num_epochs", "3")
    tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", expect=-9,
         env={"PBT_SIGNAL_AT": "3,2,KILL"})
    run_dir = tmp_path / "w" / "A"
    newest = complete_states(run_dir)[-1]
    truncate(newest / damaged)
    named = tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", "--resume", str(newest),
                 expect=2)
    good = complete_states(run_dir)[-2]
    assert damaged in named.stderr and f"--resume {good}" in named.stderr
    resumed = tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", "--resume", "auto")
    assert f"skipped {newest.name}: {damaged}" in resumed.stdout
    assert f"resumed from {good.relative_to(tmp_path)}" in resumed.stdout
    assert same_weights(tmp_path / "w" / "straight" / "last.pth", run_dir / "last.pth")


@pytest.mark.parametrize("limit,written", [("2000", "confusion_matrix.png"),
                                           ("20000", "events.out.tfevents")])
def test_disk_full_outside_a_save_names_the_file(tmp_path, limit, written):
    """A full disk met by a report or TensorBoard (not a state save) names that file, not
    the run dir, with the free space (and the bytes needed where pbt knows them)."""
    full = tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", expect=75,
                env={"PBT_FSIZE_AT": f"2,1,{limit}"})
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space to write" in lines[0], full.stderr
    path = tmp_path / lines[0].split("'")[1]  # relative to the run's cwd
    assert path.parent.is_dir() and path != tmp_path / "w" / "A" and written in path.name
    assert "free on its filesystem" in lines[0]
    if written.endswith(".png"):
        assert "needed" in lines[0] and not (path.parent / (path.name + ".tmp")).exists()


def test_paths_that_cannot_be_used_are_refused_before_training(tmp_path):
    for name in ("../outside", "/tmp/absolute", ".."):
        result = tiny(tmp_path, "--run_name", name, "--num_epochs", "1", expect=2)
        assert "run_name" in result.stderr and "plain directory name" in result.stderr
    assert not (tmp_path / "outside").exists() and not (tmp_path / "w").exists()
    # /proc/sys: a folder nobody, root included, may create files in
    result = tiny(tmp_path, "--work_dir", "/proc/sys/pbt-work", "--num_epochs", "1", expect=2)
    assert "work_dir" in result.stderr and "'/proc/sys'" in result.stderr


@pytest.mark.slow
def test_messages_for_common_mistakes(tmp_path):
    typo = tiny(tmp_path, "--lerning_rate", "0.1", expect=2)
    assert "did you mean '--lr'?" in typo.stderr
    for alias, key in (("epochs", "num_epochs"), ("batchsize", "batch_size"),
                       ("weight-decay", "weight_decay"), ("learning_rate", "lr")):
        assert f"'{key}'" in tiny(tmp_path, f"{alias}=3", expect=2).stderr
        assert f"'--{key}'" in tiny(tmp_path, f"--{alias}", "3", expect=2).stderr
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    empty = tiny(tmp_path, "-c", "empty.yaml", expect=2)
    assert "empty.yaml" in empty.stderr and "is empty" in empty.stderr
    (tmp_path / "notes.pth").write_text("not weights\n")
    text = tiny(tmp_path, "--model_file", "notes.pth", expect=2)
    assert "is not a PyTorch checkpoint" in text.stderr


def write_images(root: Path, classes: dict[str, int]) -> None:
    """A few 16x16 PNGs per class, each class its own colour (easy to learn)."""
    from PIL import Image

    for name, colour in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            pixel = [(colour * 80 + i * 7) % 256, (colour * 40) % 256, (255 - colour * 60) % 256]
            Image.new("RGB", (16, 16), tuple(pixel)).save(root / name / f"{i}.png")


@pytest.mark.slow
def test_class_names_in_a_checkpoint_map_the_data_by_name(tmp_path):
    data = tmp_path / "data"
    write_images(data, {"cat": 0, "dog": 1, "owl": 2})
    common = ["--net_type", "resnet18", "--input_size", "16", "16", "--batch_size", "6",
              "--num_workers", "0", "--progress", "false", "--work_dir", "w", "--lr", "0.05",
              "--train_transform", "none", "--test_data", str(data)]
    trained = run_recipe([*common, "--train_data", str(data), "--run_name", "A",
                          "--num_epochs", "6"], cwd=tmp_path, timeout=300)
    assert trained.returncode == 0, trained.stderr
    best = tmp_path / "w" / "A" / "best.pth"
    top1 = json.loads((tmp_path / "w" / "A" / "summary.json").read_text())["best"]
    # the same images in a list file whose class_name.txt lists the classes in another order
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "class_name.txt").write_text("owl\ncat\ndog\n")
    (listed / "test.txt").write_text("".join(
        f"{p} {p.parent.name}\n" for p in sorted(data.rglob("*.png"))))
    evaluated = run_recipe([*common, "--train_data", str(listed / "test.txt"), "--test_data",
                            str(listed / "test.txt"), "--run_name", "E", "--eval_only", "true",
                            "--model_file", str(best)], cwd=tmp_path, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "mapped by name" in evaluated.stdout
    assert json.loads((tmp_path / "w" / "E" / "summary.json").read_text())["best"] == top1
    # a class the checkpoint never saw: an error naming it; finetune trains on it instead
    write_images(data, {"yak": 3})
    unseen = run_recipe([*common, "--train_data", str(data), "--run_name", "U",
                         "--eval_only", "true", "--model_file", str(best)], cwd=tmp_path)
    assert unseen.returncode == 2 and "'yak'" in unseen.stderr and "finetune" in unseen.stderr
    finetuned = run_recipe([*common, "--train_data", str(data), "--run_name", "F",
                            "--num_epochs", "1", "--finetune", "true", "--model_file",
                            str(best)], cwd=tmp_path)
    assert finetuned.returncode == 0, finetuned.stderr


def test_a_list_label_without_images_below_it_is_an_error(tmp_path):
    from pbt.config import ConfigError
    from pbt.data import build_dataset

    write_images(tmp_path / "img", {"a": 0, "b": 1, "c": 2})
    paths = sorted((tmp_path / "img").rglob("*.png"))
    labels = [0, 1, 2] * 5 + [7] * 3
    (tmp_path / "train.txt").write_text("".join(
        f"{p.relative_to(tmp_path)} {label}\n" for p, label in zip(paths, labels)))
    with pytest.raises(ConfigError) as err:
        build_dataset(tmp_path / "train.txt", check_images=False)
    message = str(err.value)
    assert "3, 4, 5, 6 have no images" in message and "train.txt:16 uses label 7" in message


def same_checkpoint(a: Path, b: Path) -> bool:
    """Whether two weights files hold the same epoch and bit-identical weights."""
    epoch = [torch.load(path, weights_only=True)["epoch"] for path in (a, b)]
    return epoch[0] == epoch[1] and same_weights(a, b)


def assert_ends_as(straight: Path, run_dir: Path) -> None:
    """A resumed run ends with the uninterrupted run's best.pth, last.pth and best epoch."""
    for name in ("best.pth", "last.pth"):
        assert (run_dir / name).is_file(), f"{name} is missing after the resume"
        assert same_checkpoint(straight / name, run_dir / name), f"{name} differs"
    best = [json.loads((d / "summary.json").read_text())["best_epoch"] for d in (straight, run_dir)]
    assert best[0] == best[1]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> Path:
    """An uninterrupted 3-epoch run (a state at each epoch end: steps 5, 10, 15)."""
    cwd = tmp_path_factory.mktemp("straight")
    tiny(cwd, "--run_name", "straight", "--num_epochs", "3")
    return cwd / "w" / "straight"


@pytest.mark.slow
@pytest.mark.parametrize("after_state", [1, 3])
def test_a_kill_right_after_a_state_on_a_slow_disk_keeps_best_and_last(tmp_path, straight_run,
                                                                      after_state):
    """best.pth / last.pth are written in the background while the state is saved; on a
    slow disk (every .pth rename waits 2 s) a SIGKILL right after the state is complete must
    find the files that state names on disk, and the resumed run ends as the straight one."""
    tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", expect=-9,
         env={"PBT_SLOW_DISK": "2", "PBT_KILL_AFTER_STATE": str(after_state)})
    run_dir = tmp_path / "w" / "A"
    state = complete_states(run_dir)[-1]
    best_epoch = torch.load(state / "pbt_rank_0.pt", weights_only=True)[
        "callbacks"]["ModelCheckpoint#0"]["best_epoch"]
    assert torch.load(run_dir / "best.pth", weights_only=True)["epoch"] == best_epoch
    assert torch.load(run_dir / "last.pth", weights_only=True)["epoch"] == after_state
    tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", "--resume", "auto")
    assert_ends_as(straight_run, run_dir)


KILL_POINTS = ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "pbt_rank_0.pt",
               "pbt_state.pt", "pbt-complete", "rename", "rotate")
QUICK = {(1, "model.safetensors"), (2, "pbt-complete"), (1, "rotate")}


@pytest.mark.parametrize("keep,point", [
    pytest.param(keep, point, marks=[] if (keep, point) in QUICK else pytest.mark.slow)
    for keep in (1, 2) for point in KILL_POINTS])
def test_a_kill_at_each_write_of_a_state_save_loses_nothing(tmp_path, straight_run, keep, point):
    """SIGKILL just before each write of a state save (from inside the save, not timed from
    outside: each file, the completion mark, the move into place, the removal of an older
    state), with keep_checkpoints 1 and 2: a complete state is always left (the save's own
    or the one before it), every state left verifies, and the resumed run ends as the
    straight one (best.pth, last.pth, best epoch)."""
    number = 1 if point == "rotate" else 2  # the first rotation, or the epoch-2 save
    tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", "--keep_checkpoints", str(keep),
         expect=-9, env={"PBT_KILL_AT": f"{point},{number}"})
    run_dir = tmp_path / "w" / "A"
    states = complete_states(run_dir)
    saves_before = keep if point == "rotate" else 1  # complete before the killed save began
    assert states, "no complete state left: an older state was removed before the new one"
    assert int(states[-1].name.removeprefix("step-")) >= 5 * saves_before
    assert [state_problem(s) for s in states] == [None] * len(states)
    tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", "--keep_checkpoints", str(keep),
         "--resume", "auto")
    assert_ends_as(straight_run, run_dir)


@pytest.mark.slow
def test_fault_matrix_smoke(tmp_path):
    """bench/faults.py runs (a few faults here; the README's figures use more)."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "faults.py"), "--kills", "2",
                             "--disk_full", "1", "--corrupt", "1", "--slow_disk", "1",
                             "--no_points", "--work", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "faults tried 5 / resumed to identical best and last 5 / data lost 0" in result.stdout


def test_a_state_changed_at_the_same_size_fails_its_checksum_and_is_skipped(tmp_path):
    """One weight byte flipped (the file keeps its size and still loads): only the SHA-256
    in the completion mark shows it, and resume falls back to the previous state."""
    from safetensors.torch import load_file

    tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", expect=-9,
         env={"PBT_SIGNAL_AT": "3,2,KILL"})
    run_dir = tmp_path / "w" / "A"
    good, newest = complete_states(run_dir)[-2:]
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    load_file(str(weights))  # still a valid file: the size check alone would take it
    resumed = tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", "--resume", "auto")
    assert f"skipped {newest.name}: model.safetensors does not match the checksum" \
        in resumed.stdout, resumed.stdout
    assert f"resumed from {good.relative_to(tmp_path)}" in resumed.stdout


def nan_test_loss_trainer(tiny_trainer, nan_epoch: int, watch: bool = True):
    """The tiny trainer whose test pass gives a NaN loss in epoch ``nan_epoch`` (0-based);
    without ``watch`` its callbacks leave TerminateOnNaN out."""

    class NanTestLoss(tiny_trainer):
        def run_step(self, inputs):
            outputs, loss = super().run_step(inputs)
            if not self.model.training and self.epoch == nan_epoch:
                loss = loss * float("nan")
            return outputs, loss

        def build_callbacks(self, cfg):
            return [c for c in super().build_callbacks(cfg)
                    if watch or type(c).__name__ != "TerminateOnNaN"]

    return NanTestLoss


def test_a_nan_test_loss_stops_before_its_epoch_is_saved(tmp_path, tiny_trainer):
    trainer = nan_test_loss_trainer(tiny_trainer, nan_epoch=1)(tiny_cfg(tmp_path))
    with pytest.raises(TrainingError, match=r"non-finite test loss \(nan\) at epoch 2"):
        trainer.run()
    run_dir = trainer.run_dir
    for name in ("best.pth", "last.pth"):
        assert torch.load(run_dir / name, weights_only=True)["epoch"] == 1
    assert [p.name for p in complete_states(run_dir)] == ["step-00000005"]
    assert "non-finite test loss" in (run_dir / "train.log").read_text()


def test_a_nan_metric_is_never_the_best(tmp_path, tiny_trainer):
    """Without TerminateOnNaN, a NaN monitored metric in epoch 1 is neither saved as
    best.pth nor the bar later epochs must beat."""
    cls = nan_test_loss_trainer(tiny_trainer, nan_epoch=0, watch=False)
    summary = cls(tiny_cfg(tmp_path, monitor="test/loss")).run()
    best = torch.load(Path(summary["run_dir"]) / "best.pth", weights_only=True)
    assert summary["best_epoch"] == best["epoch"] != 1
    assert best["metric"] == min(e["test"]["loss"] for e in summary["history"][1:])


def test_a_pickle_that_is_no_checkpoint_is_one_line_without_torch_warnings(tmp_path):
    import pickle

    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"weights": [1, 2]}, protocol=4))
    refused = tiny(tmp_path, "--run_name", "A", "--model_file", str(path), expect=2)
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "plain.pkl" in lines[0] and "Warning" not in refused.stderr
    assert not (tmp_path / "w" / "A").exists()


@pytest.mark.slow
def test_resume_auto_restarts_a_run_killed_before_its_first_state(tmp_path, straight_run):
    """A kill inside the first state save leaves a run dir with files but nothing to resume:
    the same command with --resume auto starts that run afresh there (it used to refuse
    with "already holds a run" right after saying it starts fresh); a folder that is not
    a pbt run is still never reused."""
    tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", expect=-9,
         env={"PBT_KILL_AT": "pbt_state.pt,1"})
    run_dir = tmp_path / "w" / "A"
    assert (run_dir / "config.yaml").is_file() and not complete_states(run_dir)
    resumed = tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", "--resume", "auto")
    assert "holds no complete state" in resumed.stdout and "already holds" not in resumed.stderr
    assert_ends_as(straight_run, run_dir)
    foreign = tmp_path / "w" / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my own file")
    refused = tiny(tmp_path, "--run_name", "mine", "--resume", "auto", expect=2)
    assert "already holds a run" in refused.stderr
    assert (foreign / "notes.txt").read_text() == "my own file"


def test_every_file_a_run_writes_passes_its_formats_own_reader(straight_run):
    """Each file of a finished run dir is read back by its format's own strict reader."""
    import csv

    import yaml
    from PIL import Image
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    checked = set()
    for path in sorted(p for p in straight_run.rglob("*") if p.is_file()):
        suffix = path.suffix or path.name
        if path.name == ".pbt.lock":
            continue
        if suffix in (".json", "pbt-complete"):
            json.loads(path.read_text())
        elif suffix == ".yaml":
            assert isinstance(yaml.safe_load(path.read_text()), dict)
        elif suffix == ".csv":
            rows = list(csv.reader(path.read_text().splitlines()))
            assert len(rows) > 1 and len({len(row) for row in rows}) == 1, path
        elif suffix == ".png":
            with Image.open(path) as image:
                image.verify()
        elif suffix in (".pth", ".pt", ".bin"):
            torch.load(path, weights_only=True)
        elif suffix == ".safetensors":
            load_file(str(path))
        elif path.name.startswith("events.out.tfevents"):
            events = EventAccumulator(str(path))
            events.Reload()
            assert "epoch/test_loss" in events.Tags()["scalars"]
        elif suffix in (".txt", ".log"):
            assert path.read_text().endswith("\n"), path
        elif suffix == ".pkl":  # Accelerate's RNG file, read as resume reads it
            from pbt.checkpoint import safe_load

            safe_load(path, numpy_arrays=True)
        else:
            raise AssertionError(f"a file of no known format: {path}")
        checked.add(suffix if not path.name.startswith("events") else "tfevents")
    assert {".json", "pbt-complete", ".yaml", ".csv", ".png", ".pth", ".pt", ".safetensors",
            "tfevents", ".txt", ".log"} <= checked


@pytest.mark.slow
def test_disk_full_inside_a_state_save_removes_its_temporary_files(tmp_path):
    """The limit (10 KB from epoch 2, batch 1) lets the reports and weights files through
    and stops the mid-epoch state of step 6 (its RNG files are ~15 KB): exit 75, one line
    naming the state's folder, no temporary folder left, the states before it intact."""
    tiny(tmp_path, "--run_name", "straight", "--num_epochs", "3", "--save_steps", "3")
    full = tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", "--save_steps", "3",
                expect=75, env={"PBT_FSIZE_AT": "2,1,10000"})
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space to write" in lines[0], full.stderr
    assert ".tmp-step-00000006" in lines[0] and "ulimit -f" in lines[0]
    run_dir = tmp_path / "w" / "A"
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert [p.name for p in complete_states(run_dir)] == ["step-00000003", "step-00000005"]
    tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", "--save_steps", "3",
         "--resume", "auto")
    assert same_weights(tmp_path / "w" / "straight" / "last.pth", run_dir / "last.pth")
