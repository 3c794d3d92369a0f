"""The run directory: which one a run uses, and that it belongs to that run alone.

A run dir is resolved before anything is built: a fresh run never reuses a directory that
holds files (``overwrite: true`` replaces it), ``--resume`` names or finds one, and the
main process then holds a POSIX lock on ``.pbt.lock`` in it until the run ends, so a second
run in the same dir is refused at start, naming the holder. The kernel drops the lock when
its process dies, so a lock left by ``kill -9`` is taken over without a word. The lock is
``lockf``, not ``flock``: forked DataLoader workers do not inherit it, so workers that outlive
a run (persistent workers of a trainer not yet collected) do not keep its dir locked.
"""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from pbt.config import ConfigError

LOCK_FILE = ".pbt.lock"
_HELD: dict[str, RunLock] = {}  # this process's locks, by run dir


class RunLock:
    """An exclusive lock (``lockf``) on ``run_dir/.pbt.lock``, held until :meth:`release`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.handle = Path(run_dir), None
        self.made_dir = not self.run_dir.exists()
        # the folders above it that the lock's mkdir makes (a new work_dir): a run that
        # stops at a check removes them again when they are still empty
        self.made_parents = [p for p in self.run_dir.parents if not p.exists()]

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no lockf; the run dir checks still apply
            self.run_dir.mkdir(parents=True, exist_ok=True)
            return

        previous = _HELD.pop(str(self.run_dir), None)
        if previous is not None:  # an earlier trainer of this process that did not finish
            previous.release()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LOCK_FILE
        handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                handle.close()
                raise
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(
                f"run dir {str(self.run_dir)!r} is in use by {holder}; wait for that run to "
                "end (or stop it), or choose another --run_name") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.handle = handle
        _HELD[str(self.run_dir)] = self
        atexit.register(self.release)

    def release(self) -> None:
        """Unlock; a run dir this lock created that holds nothing else is removed."""
        if self.handle is None:
            return
        _HELD.pop(str(self.run_dir), None)
        # the dir may be gone already (a temporary work_dir removed before exit)
        if self.made_dir and self.run_dir.is_dir() and \
                [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(self.run_dir, ignore_errors=True)  # a run that stopped at a check
            for parent in self.made_parents:  # nearest first
                try:
                    parent.rmdir()
                except OSError:  # not empty: another run (or a file) lives there now
                    break
        self.handle.close()  # closing drops the lock
        self.handle = None


def check_writable(folder: Path, key: str) -> None:
    """Raise a ConfigError naming ``folder`` (or the nearest existing folder above it) when
    this process cannot create files there; nothing is written to find out."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"key {key!r}: {str(existing)!r} is a file, so {str(folder)!r} "
                          "cannot be made; choose another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"key {key!r}: cannot write in {str(existing)!r} (read-only or "
                          f"permission denied), so {str(folder)!r} cannot be used; choose a "
                          "writable directory")


def _holds_a_run(run_dir: Path) -> list[str]:
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)


def resolve_run_dir(trainer: Any) -> tuple[Path, Path | None]:
    """``(run_dir, state to resume from or None)``; the main process decides for everyone,
    checks that it may write there and takes the run dir's lock. A bad ``resume`` or a
    run dir that holds another run changes nothing on disk."""
    from accelerate.utils import broadcast_object_list

    from pbt.checkpoint import find_resume

    cfg = trainer.cfg
    holder: list = [None, None, None]
    if trainer.accelerator.is_main_process:
        try:
            work_dir = Path(cfg.work_dir)
            prefix = cfg.run_name or "_".join(trainer.run_name_parts(cfg) + [cfg.flag or ""])
            prefix = prefix.strip("_")
            name = cfg.run_name or f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir, state = work_dir / name, None
            if cfg.resume:
                found = find_resume(cfg.resume, work_dir, cfg.run_name, prefix, trainer.log)
                if found is not None:
                    run_dir, state = found
            held = _holds_a_run(run_dir) if state is None else []
            # a pbt run killed before its first state was complete: nothing in it resumes
            restart = bool(cfg.resume == "auto" and cfg.run_name and held
                           and {"config.yaml", "train.log"} <= set(held))
            if restart:
                trainer.log(f"resume auto: {str(run_dir)!r} holds no complete state (its run "
                            "stopped before saving one); starting that run afresh there")
            elif cfg.resume and state is None:
                trainer.log(f"resume auto: no state of {prefix!r} under {str(work_dir)!r}, "
                            "starting fresh")
            if held and not cfg.run_name:
                number = 1
                while _holds_a_run(run_dir):  # a generated name taken (same second)
                    number += 1
                    run_dir = work_dir / f"{name}_{number}"
                held = []
            elif held and not (cfg.overwrite or restart):
                raise ConfigError(
                    f"run dir {str(run_dir)!r} already holds a run "
                    f"({', '.join(held[:5])}); a fresh run never reuses it. "
                    f"Continue it with --resume {run_dir} (or --resume auto), choose another "
                    "--run_name, or pass --overwrite true to replace it")
            check_writable(run_dir, "resume" if state else "work_dir")
            trainer.run_lock = RunLock(run_dir)
            trainer.run_lock.acquire()
            if held:  # overwrite: true, or a restart of a run that saved no state
                if not restart:
                    trainer.log(f"overwrite: replacing the run in {run_dir}")
                for entry in held:
                    target = run_dir / entry
                    if target.is_dir():
                        shutil.rmtree(target)
                    else:
                        target.unlink()
            holder = [str(run_dir), str(state) if state else None, None]
        except ConfigError as err:
            holder = [None, None, str(err)]
    if trainer.accelerator.num_processes > 1:
        broadcast_object_list(holder)
    if holder[2]:
        raise ConfigError(holder[2])
    return Path(holder[0]), (Path(holder[1]) if holder[1] else None)


def open_run_dir(trainer: Any) -> None:
    """Once every check has passed: save the resolved config (a resumed run keeps its
    name), start the log file, write the class order."""
    from pbt.config import save_config
    from pbt.launch import setup_logging

    if trainer.accelerator.is_main_process:
        run_dir = trainer.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        trainer.cfg.run_name = run_dir.name
        save_config(trainer.cfg, run_dir / "config.yaml")
        setup_logging(run_dir / "train.log")
        if getattr(trainer, "class_names", None):  # predictions map back to names
            (run_dir / "class_names.txt").write_text("\n".join(trainer.class_names) + "\n")
    trainer.accelerator.wait_for_everyone()
