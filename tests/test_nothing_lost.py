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

from pbt.callbacks import Callback
from pbt.checkpoint import complete_states

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


def test_disk_full_in_a_save_is_one_message_and_resumes_exactly(tmp_path):
    tiny(tmp_path, "--run_name", "straight", "--num_epochs", "3")
    # from epoch 2, batch 1, no file may grow past 3000 bytes: the state's optimizer.bin
    # (about 4 KB) fails in the middle of the epoch-2 save
    full = tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", expect=75,
                env={"PBT_FSIZE_AT": "2,1,3000"})
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and "no space to write" in lines[0] and "ulimit -f" in lines[0]
    run_dir = tmp_path / "w" / "A"
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert [p.name for p in complete_states(run_dir)] == ["step-00000005"]
    assert "no space to write" in (run_dir / "train.log").read_text()
    tiny(tmp_path, "--run_name", "A", "--num_epochs", "3", "--resume", "auto")
    assert same_weights(tmp_path / "w" / "straight" / "last.pth", run_dir / "last.pth")


def test_paths_that_cannot_be_used_are_refused_before_training(tmp_path):
    for name in ("../outside", "/tmp/absolute", ".."):
        result = tiny(tmp_path, "--run_name", name, "--num_epochs", "1", expect=2)
        assert "run_name" in result.stderr and "plain directory name" in result.stderr
    assert not (tmp_path / "outside").exists() and not (tmp_path / "w").exists()
    # /proc/sys: a folder nobody, root included, may create files in
    result = tiny(tmp_path, "--work_dir", "/proc/sys/pbt-work", "--num_epochs", "1", expect=2)
    assert "work_dir" in result.stderr and "'/proc/sys'" in result.stderr


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


def test_kill_at_every_write_of_a_save_resumes_exactly(tmp_path):
    """SIGKILL just before each file of the epoch-2 save (from inside the save, not timed
    from outside): the previous state is intact and the resumed run ends identical."""
    tiny(tmp_path, "--run_name", "straight", "--num_epochs", "3")
    # per epoch: a state (model.safetensors, optimizer.bin, random_states, pbt_rank_0,
    # pbt_state) after the last.pth of ModelCheckpoint: writes 7..12 are epoch 2's
    for write in (7, 9, 11):
        name = f"k{write}"
        tiny(tmp_path, "--run_name", name, "--num_epochs", "3", expect=-9,
             env={"PBT_KILL_AT_WRITE": str(write)})
        run_dir = tmp_path / "w" / name
        assert [p.name for p in complete_states(run_dir)] == ["step-00000005"]
        tiny(tmp_path, "--run_name", name, "--num_epochs", "3", "--resume", "auto")
        assert same_weights(tmp_path / "w" / "straight" / "last.pth", run_dir / "last.pth")


def test_fault_matrix_smoke(tmp_path):
    """bench/faults.py runs (a few faults here; the README's figures use more)."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "faults.py"), "--kills", "2",
                             "--disk_full", "1", "--corrupt", "1", "--work", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "faults tried 4 / resumed to identical weights 4 / data lost 0" in result.stdout
