"""Fault matrix: crash, fill the disk and damage states at random points, resume, compare.

    python bench/faults.py [--kills 20] [--disk_full 5] [--corrupt 3] [--seed 0]

Runs the tiny real trainer of the tests (``tests/train_tiny.py``: real engine, real
Accelerate, 3 epochs, a state every 2 steps) once without faults, then, for each fault, a
run that meets it and a ``--resume auto`` run, and compares the final weights with the
uninterrupted run's. Faults:

- kill: SIGKILL at a random point: after a random batch, or just before a random one of
  the files saves write (so inside a save);
- disk full: from a random batch on, the kernel limits each file to a random size
  (``ulimit -f``, as a full disk: writes fail with EFBIG);
- corrupt: after a kill, a random file of the newest state is truncated or has a byte
  flipped; resume must skip that state and take the one before.

After each fault, "data lost" counts a state that was complete before and no longer
verifies (other than the one damaged on purpose), or a ``best.pth`` / ``last.pth`` that no
longer loads. Prints one line per fault and ``faults tried N / resumed to identical
weights M / data lost L``; exits 1 unless M == N and L == 0.
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
        "--num_epochs", "3", "--save_steps", "2", "--keep_checkpoints", "3"]
EPOCHS, BATCHES = 3, 5  # train_tiny: 40 samples / batch 8


def run(work: Path, name: str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PBT_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(SCRIPT), *ARGS, "--run_name", name, *extra],
                          cwd=work, capture_output=True, text=True, timeout=600, env=full_env)


def same_weights(a: Path, b: Path) -> bool:
    try:
        wa = torch.load(a, weights_only=True)["model"]
        wb = torch.load(b, weights_only=True)["model"]
    except Exception:
        return False
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def intact(run_dir: Path, before: list[Path], damaged: Path | None) -> list[str]:
    """What a fault destroyed: states complete before it that no longer verify, and
    weight files that no longer load."""
    from pbt.checkpoint import state_problem

    lost = []
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
    straight = work / "w" / "reference" / "last.pth"

    plan = [("kill", i) for i in range(args.kills)] + \
        [("disk_full", i) for i in range(args.disk_full)] + \
        [("corrupt", i) for i in range(args.corrupt)]
    tried = identical = lost_total = 0
    for kind, i in plan:
        name = f"{kind}-{i}"
        env, damaged, what = {}, None, ""
        if kind == "kill" and i % 2 == 0:
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
        faulted = run(work, name, env=env)
        run_dir = work / "w" / name
        before = complete_states(run_dir)
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
        resumed = run(work, name, "--resume", "auto")
        lost = intact(run_dir, before, damaged)
        same = resumed.returncode == 0 and same_weights(straight, run_dir / "last.pth")
        tried += 1
        identical += same and one_message
        lost_total += bool(lost)
        status = "identical" if same else f"DIFFERENT (resume exit {resumed.returncode})"
        if not one_message:
            status += f"; fault run exit {faulted.returncode}: {faulted.stderr.strip()[-300:]}"
        print(f"{name:12s} {what:62s} exit {faulted.returncode:4d}  {status}"
              + (f"  LOST {lost}" if lost else ""), flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    print(f"faults tried {tried} / resumed to identical weights {identical} / data lost "
          f"{lost_total}  ({time.time() - started:.0f} s)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if identical == tried and lost_total == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
