"""Fault matrix: crash, fill the disk and damage states at random points, resume, compare.

    python bench/faults.py [--kills 20] [--disk_full 5] [--corrupt 3] [--slow_disk 4]
                           [--seed 0] [--no_points]

Runs the tiny real trainer of the tests (``tests/train_tiny.py``: real engine, real
Accelerate, 3 epochs, a state every 2 steps: 9 state saves) once without faults, then, for
each fault, a run that meets it and a ``--resume auto`` run, and compares the resumed run's
``best.pth`` and ``last.pth`` (epoch and weights) and best epoch with the uninterrupted
run's. Faults:

- every point of a state save, with ``keep_checkpoints`` 1 and 2: SIGKILL just before each
  file it writes, its completion mark, its move into place and the removal of an older
  state, in a save chosen at random (so 16 kills; ``--no_points`` leaves them out);
- kill: SIGKILL at a random point: after a random batch, or just before a random one of
  the files saves write (so inside a save);
- slow disk: every ``.pth`` rename waits 1 s (``best.pth`` / ``last.pth`` are written in
  the background), SIGKILL right after a random state is complete;
- disk full: from a random batch on, the kernel limits each file to a random size
  (``ulimit -f``, as a full disk: writes fail with EFBIG);
- corrupt: after a kill, a random file of the newest state is truncated or has a byte
  flipped; resume must skip that state and take the one before.

After each fault, "data lost" counts a state that was complete before and no longer
verifies (other than the one damaged on purpose), a fault that left no complete state
though one was complete before it, or a ``best.pth`` / ``last.pth`` that no longer loads.
Prints one line per fault and ``faults tried N / resumed to identical best and last M /
data lost L``; exits 1 unless M == N and L == 0.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "train_tiny.py"
ARGS = ["--work_dir", "w", "--batch_size", "8", "--progress", "false", "--num_workers", "0",
        "--num_epochs", "3", "--save_steps", "2"]
EPOCHS, BATCHES = 3, 5  # train_tiny: 40 samples / batch 8


def run(work: Path, name: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PBT_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--run_name", name, *extra],
                          cwd=work, capture_output=True, text=True, timeout=600, env=full_env)


def same_checkpoint(a: Path, b: Path) -> bool:
    """The same epoch and bit-identical weights."""
    try:
        ca, cb = (torch.load(path, weights_only=True) for path in (a, b))
    except Exception:
        return False
    wa, wb = ca["model"], cb["model"]
    return ca["epoch"] == cb["epoch"] and wa.keys() == wb.keys() and all(
        torch.equal(wa[k], wb[k]) for k in wa)


def ends_as(straight: Path, run_dir: Path) -> bool:
    """best.pth, last.pth and the best epoch of the summary are the uninterrupted run's."""
    import json

    try:
        best = [json.loads((d / "summary.json").read_text())["best_epoch"]
                for d in (straight, run_dir)]
    except (OSError, ValueError, KeyError):
        return False
    return best[0] == best[1] and all(same_checkpoint(straight / name, run_dir / name)
                                      for name in ("best.pth", "last.pth"))


def intact(run_dir: Path, before: list[Path], damaged: Path | None,
           had_state: bool) -> list[str]:
    """What a fault destroyed: states complete before it that no longer verify, all states
    gone though one was complete before it, and weight files that no longer load."""
    from pbt.checkpoint import state_problem

    lost = [] if before or not had_state else ["no complete state left"]
    for state in before:
        if state == damaged:
            continue
        if not state.is_dir():
            # rotation deletes the oldest only after a newer state is complete
            continue
        problem = state_problem(state)
        if problem:
            lost.append(f"{state.name}: {problem}")
    for name in ("best.pth", "last.pth"):
        path = run_dir / name
        if path.exists():
            try:
                torch.load(path, weights_only=True)
            except Exception as err:
                lost.append(f"{name}: {type(err).__name__}")
    return lost


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--disk_full", type=int, default=5)
    parser.add_argument("--corrupt", type=int, default=3)
    parser.add_argument("--slow_disk", type=int, default=4)
    parser.add_argument("--no_points", action="store_true",
                        help="leave out the kill at every point of a state save")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temp dir)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from pbt.checkpoint import complete_states

    rng = random.Random(args.seed)
    work = Path(args.work or tempfile.mkdtemp(prefix="pbt-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    reference = run(work, "reference", env={"PBT_KILL_AT_WRITE": "0"})
    assert reference.returncode == 0, reference.stderr
    writes = int(reference.stdout.rsplit("writes: ", 1)[1].split()[0])
    straight = work / "w" / "reference"
    counted = run(work, "counted", "--keep_checkpoints", "1", env={"PBT_KILL_AT": "none,0"})
    saves = int(counted.stdout.rsplit("'pbt_state.pt': ", 1)[1].split(",")[0])
    sys.path.insert(0, str(ROOT / "tests"))
    from train_tiny import KILL_POINTS

    points = [] if args.no_points else [(keep, point) for keep in (1, 2) for point in KILL_POINTS]
    plan = [("point", i) for i in range(len(points))] + \
        [("kill", i) for i in range(args.kills)] + \
        [("slow_disk", i) for i in range(args.slow_disk)] + \
        [("disk_full", i) for i in range(args.disk_full)] + \
        [("corrupt", i) for i in range(args.corrupt)]
    tried = identical = lost_total = 0
    for kind, i in plan:
        name = f"{kind}-{i}"
        env, damaged, what, keep = {}, None, "", "2"
        if kind == "point":
            keep, point = str(points[i][0]), points[i][1]
            rotations = saves - int(keep)  # the first save that rotates is save keep + 1
            number = rng.randint(1, rotations) if point == "rotate" else rng.randint(1, saves)
            env = {"PBT_KILL_AT": f"{point},{number}"}
            what = f"keep {keep}: SIGKILL before {point} of save {number}" if point != "rotate" \
                else f"keep {keep}: SIGKILL before rotation {number}"
        elif kind == "slow_disk":
            number = rng.randint(1, saves)
            env = {"PBT_SLOW_DISK": "1", "PBT_KILL_AFTER_STATE": str(number)}
            what = f"slow .pth renames (1 s), SIGKILL right after state {number}/{saves}"
        elif kind == "kill" and i % 2 == 0:
            point = rng.randint(1, writes)
            env, what = {"PBT_KILL_AT_WRITE": str(point)}, f"SIGKILL before write {point}/{writes}"
        elif kind == "kill":
            epoch, batch = rng.randint(1, EPOCHS), rng.randint(1, BATCHES)
            env, what = {"PBT_SIGNAL_AT": f"{epoch},{batch},KILL"}, \
                f"SIGKILL after epoch {epoch} batch {batch}"
        elif kind == "disk_full":
            epoch, batch, limit = rng.randint(1, EPOCHS), rng.randint(1, BATCHES), \
                rng.randint(300, 14000)
            env, what = {"PBT_FSIZE_AT": f"{epoch},{batch},{limit}"}, \
                f"disk full (files <= {limit} bytes) from epoch {epoch} batch {batch}"
        else:
            epoch, batch = rng.randint(2, EPOCHS), rng.randint(1, BATCHES)
            env = {"PBT_SIGNAL_AT": f"{epoch},{batch},KILL"}
        faulted = run(work, name, "--keep_checkpoints", keep, env=env)
        run_dir = work / "w" / name
        before = complete_states(run_dir)
        # a state was complete before these faults (a kill inside the first save has none)
        had_state = kind == "slow_disk" or (
            kind == "point" and (number > 1 or points[i][1] == "rotate"))
        if kind == "corrupt" and len(before) >= 2:
            damaged = before[-1]
            target = rng.choice(sorted(p for p in damaged.iterdir() if p.is_file()))
            data = bytearray(target.read_bytes())
            if rng.random() < 0.5:
                target.write_bytes(bytes(data[: len(data) // 2]))
                what = f"truncated {damaged.name}/{target.name} (after a kill at {epoch},{batch})"
            else:
                data[rng.randrange(len(data))] ^= 0xFF
                target.write_bytes(bytes(data))
                what = f"flipped a byte of {damaged.name}/{target.name}"
        one_message = faulted.returncode in (0, -9, 75) and "Traceback" not in faulted.stderr
        if kind in ("point", "slow_disk") and faulted.returncode != -9:
            one_message = False  # the kill was not reached: this fault was not tried
        resumed = run(work, name, "--keep_checkpoints", keep, "--resume", "auto")
        lost = intact(run_dir, before, damaged, had_state)
        same = resumed.returncode == 0 and ends_as(straight, run_dir)
        tried += 1
        identical += same and one_message
        lost_total += bool(lost)
        status = "identical" if same else f"DIFFERENT (resume exit {resumed.returncode})"
        if not one_message:
            status += f"; fault run exit {faulted.returncode}: {faulted.stderr.strip()[-300:]}"
        print(f"{name:12s} {what:66s} exit {faulted.returncode:4d}  {status}"
              + (f"  LOST {lost}" if lost else ""), flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"faults tried {tried} / resumed to identical best and last {identical} / data lost "
          f"{lost_total}  ({time.time() - started:.0f} s)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if identical == tried and lost_total == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
