"""Resumable training states: written atomically, found again, loaded without pickled code.

A state is a folder ``run_dir/checkpoints/step-<global_step>``. Accelerate's ``save_state``
writes model, optimizer, grad scaler and RNG files into a temporary sibling folder; pbt adds
``pbt_state.pt`` (counters, position in the epoch, history, pruning history) and one
``pbt_rank_<rank>.pt`` per process (its RNGs and its callbacks' state: running sums differ
per process), then a completion mark, and only then renames the folder into place. A
folder without the mark is never resumed from.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from pbt.config import ConfigError

COMPLETE_MARK = "pbt-complete"
STATE_FILE = "pbt_state.pt"
PREFIX = "step-"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_states(run_dir: Path) -> list[Path]:
    """Complete states of a run, oldest first (by global step)."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    states = [p for p in folder.iterdir()
              if p.is_dir() and p.name.startswith(PREFIX) and (p / COMPLETE_MARK).is_file()]
    return sorted(states, key=lambda p: int(p.name[len(PREFIX):]))


def latest_state(run_dir: Path) -> Path | None:
    states = complete_states(run_dir)
    return states[-1] if states else None


def find_resume(resume: str, work_dir: Path, run_prefix: str) -> tuple[Path, Path] | None:
    """``(run_dir, state_dir)`` to resume from, or None (``auto`` with nothing usable).

    ``resume`` is a run dir, a state dir inside one, or ``auto``: the newest run under
    ``work_dir`` whose name is ``run_prefix`` (or starts with it) holding a complete state.
    """
    if resume == "auto":
        candidates = []
        if Path(work_dir).is_dir():
            for run_dir in Path(work_dir).iterdir():
                if run_dir.is_dir() and (run_dir.name == run_prefix
                                         or run_dir.name.startswith(run_prefix + "_")):
                    state = latest_state(run_dir)
                    if state is not None:
                        candidates.append((state.stat().st_mtime, run_dir, state))
        if not candidates:
            return None
        _, run_dir, state = max(candidates)
        return run_dir, state
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"key 'resume': path {resume!r} does not exist")
    if (path / COMPLETE_MARK).is_file():
        return path.parent.parent, path
    state = latest_state(path)
    if state is None:
        raise ConfigError(
            f"key 'resume': {resume!r} holds no complete pbt training state (expected "
            f"{str(checkpoints_dir(path) / (PREFIX + '<step>'))!r} with a {COMPLETE_MARK!r} "
            "mark); pass a run directory written by pbt, or 'auto'"
        )
    return path, state


def safe_load(path: Path, key: str = "", numpy_arrays: bool = False) -> Any:
    """``torch.load(weights_only=True)``; a file that needs pickled code is refused.

    ``numpy_arrays`` also allows the numpy types of Accelerate's RNG files; ``key`` names
    the config key in the error.
    """
    try:
        if numpy_arrays:
            from accelerate.utils import load as accelerate_load

            return accelerate_load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or ["unreadable"])[0]
        raise ConfigError(
            f"{key + ': ' if key else ''}{str(path)!r} is not a file that loads with "
            f"torch.load(weights_only=True) (files that need pickled code are refused; pbt "
            f"never runs code from a checkpoint): {first}"
        ) from None


def verify_state_files(state_dir: Path) -> None:
    """Every pickle-format file of a state must load as plain data before Accelerate
    (which reads some with ``weights_only=False``) touches it."""
    for path in sorted(state_dir.iterdir()):
        if path.suffix in (".bin", ".pkl", ".pt", ".pth"):
            safe_load(path, key="key 'resume'", numpy_arrays=True)


def check_model_fits(state_dir: Path, model: torch.nn.Module) -> None:
    """Compare the saved model's keys and shapes with ``model``; name the first misfit."""
    weights = state_dir / "model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        saved = {}
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                saved[key] = tuple(handle.get_slice(key).get_shape())
    else:
        saved = {k: tuple(v.shape) for k, v in safe_load(state_dir / "pytorch_model.bin").items()}
    own = {k.removeprefix("module."): tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in saved.items():
        key = key.removeprefix("module.")
        if key not in own or own[key] != shape:
            ours = own.get(key, "absent")
            raise ConfigError(
                f"key 'resume': the state in {str(state_dir)!r} was saved for another network "
                f"(net_type or number of classes): key {key!r} has shape {shape} in the state "
                f"and {ours} in this model"
            )


def capture_rng() -> dict:
    """Every RNG of this process as plain data (loads with ``weights_only=True``)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(accelerator: Any, run_dir: Path, global_step: int, pbt_state: dict,
               rank_state: dict, keep: int) -> Path:
    """Write a complete state atomically and keep the newest ``keep`` (all processes call)."""
    folder = checkpoints_dir(run_dir)
    final = folder / f"{PREFIX}{global_step:08d}"
    tmp = folder / f".tmp-{PREFIX}{global_step:08d}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    torch.save({"rng": capture_rng(), **rank_state},
               tmp / f"pbt_rank_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(pbt_state, tmp / STATE_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / COMPLETE_MARK, "w") as mark:
            mark.write(f"{global_step}\n")
            mark.flush()
            os.fsync(mark.fileno())
        if final.exists():  # a state of this step is there already: the new one replaces it
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_states(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in folder.glob(f".tmp-{PREFIX}*"):
            if stale != tmp:
                shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_pbt_state(state_dir: Path) -> dict:
    state = safe_load(state_dir / STATE_FILE)
    if not isinstance(state, dict) or "global_step" not in state:
        raise ConfigError(f"key 'resume': {str(state_dir / STATE_FILE)!r} is not a pbt state")
    return state


def load_rank_state(state_dir: Path, rank: int) -> dict:
    """This process's part of a state: ``{"rng": ..., "callbacks": ...}``."""
    path = state_dir / f"pbt_rank_{rank}.pt"
    if not path.is_file():
        raise ConfigError(f"key 'resume': {str(path)!r} is missing")
    return safe_load(path)
