"""Every weights file and resumable state: written atomically, loaded without pickled code.

Weights files (``best.pth``, ``last.pth``) are plain dicts of the unwrapped model's
state_dict plus what rebuilds the network; ``load_weights`` reads them and PBT-style files
for ``model_file`` / ``finetune``. A resumable state is a folder
``run_dir/checkpoints/step-<global_step>``: Accelerate's ``save_state`` writes model,
optimizer, grad scaler and RNG files into a temporary sibling folder; pbt adds
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


# -- weights files -----------------------------------------------------------------------
def save_atomic(state: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary name, then rename: readers never see half a file."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name, then rename."""
    import json

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def link_atomic(source: str | Path, target: str | Path) -> None:
    """Make ``target`` a hard link to ``source`` by an atomic rename (copy where links
    are not supported). Replacing ``source`` later leaves ``target`` untouched."""
    tmp = f"{target}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def strip_module_prefix(state: dict) -> dict:
    """Keys without DataParallel / DDP's ``module.`` prefix."""
    return {key.removeprefix("module."): value for key, value in state.items()}


def weights_state(trainer: Any, metric: float | None = None) -> dict:
    """A plain weights checkpoint (loads with ``weights_only=True``): the unwrapped model's
    tensors (copies, so training may go on while it is written), the trainer's
    ``checkpoint_meta()`` (what rebuilds the net), epoch, step, metric, pruning history."""
    state = {
        "model": {k: v.detach().to("cpu", copy=True)
                  for k, v in trainer.unwrapped_model.state_dict().items()},
        **trainer.checkpoint_meta(),
        "epoch": trainer.epoch + 1,
        "global_step": trainer.global_step,
        "metric": metric,
    }
    if trainer.prune_history is not None:
        state["prune_history"] = trainer.prune_history
    return state


def state_dict_of(loaded: Any, path: Path, key: str) -> dict:
    """The tensors of a loaded weights file: a pbt checkpoint, a bare state_dict,
    ``{"model": ...}`` or ``{"state_dict": ...}``, without ``module.`` prefixes."""
    state = loaded
    if isinstance(state, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not state or not all(
            torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"key {key!r}: {str(path)!r} holds no state_dict of tensors")
    return strip_module_prefix(state)


def load_weights(model: torch.nn.Module, path: str | Path, strict: bool = False,
                 key: str = "model_file", loaded: Any = None) -> list[str]:
    """Load a weights file into ``model`` by name and shape; return the keys skipped.

    ``strict`` turns a missing key or a shape mismatch into an error naming the first such
    key and both shapes. ``loaded`` is the file's content when the caller has read it.
    """
    path = Path(path)
    if loaded is None:
        if not path.is_file():
            raise ConfigError(f"key {key!r}: weight file {str(path)!r} does not exist")
        loaded = safe_load(path, key=key)
    state = state_dict_of(loaded, path, key)
    own = model.state_dict()
    usable, skipped = {}, []
    for name, value in state.items():
        if name in own and own[name].shape == value.shape:
            usable[name] = value
        elif strict:
            ours = tuple(own[name].shape) if name in own else "absent"
            raise ConfigError(
                f"key {key!r}: {str(path)!r} does not fit this network: key {name!r} has "
                f"shape {tuple(value.shape)} in the file and {ours} in the model (another "
                "network or number of classes? finetune: true loads what fits)")
        else:
            skipped.append(name)
    missing = [name for name in own if name not in usable]
    if strict and missing:
        raise ConfigError(f"key {key!r}: {str(path)!r} lacks key {missing[0]!r} of this network")
    model.load_state_dict(usable, strict=False)
    return skipped


# -- resumable states ----------------------------------------------------------------------
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
    path = Path(path)
    try:
        if numpy_arrays:
            from accelerate.utils import load as accelerate_load

            return accelerate_load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        import re

        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
        text = " ".join(text.split())
        # torch's message is a page of advice; the unpickler's one sentence names the type
        marker = "WeightsUnpickler error: "
        if marker in text:
            text = text.split(marker, 1)[1]
        reason = (text.split(". ")[0].rstrip(".") + ".") if text else type(err).__name__
        what = f"{key}: " if key else ""
        if path.is_file() and path.stat().st_size and not _looks_like_torch_file(path):
            raise ConfigError(f"{what}{str(path)!r} is not a PyTorch checkpoint "
                              f"({type(err).__name__}: {reason}).") from None
        raise ConfigError(
            f"{what}{str(path)!r} does not load with torch.load(weights_only=True), so it is "
            f"refused (pbt never runs code from a checkpoint): {reason}"
        ) from None


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (old format: a pickle starting with 0x80)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head[:2] == b"PK" or head[:1] == b"\x80"


def check_plain_data(value: Any, where: str) -> None:
    """Raise TypeError naming ``where`` and the type when ``value`` holds anything that
    ``torch.load(weights_only=True)`` refuses."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor,
                                           torch.dtype, torch.device, torch.Size)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain_data(key, f"{where} key")
            check_plain_data(item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple, set)):
        for i, item in enumerate(value):
            check_plain_data(item, f"{where}[{i}]")
        return
    raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which "
                    "a resumable state cannot hold (it must load with weights_only=True); "
                    "use numbers, strings, tensors, numpy values, or lists / dicts of them")


def to_plain_data(value: Any) -> Any:
    """numpy scalars become Python numbers and numpy arrays tensors; the rest is kept."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        return {key: to_plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain_data(item) for item in value)
    return value


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


def callback_keys(callbacks: list) -> dict[str, Any]:
    """Callbacks by ``ClassName#k`` (k-th of its class), the key of their saved state."""
    keys: dict[str, Any] = {}
    for callback in callbacks:
        name = type(callback).__name__
        count = sum(key.startswith(name + "#") for key in keys)
        keys[f"{name}#{count}"] = callback
    return keys


def callback_states(callbacks: list) -> dict[str, Any]:
    """Each callback's ``state_dict()`` as plain data; a state that would not load with
    ``weights_only=True`` is refused now, naming the callback and the type."""
    from pbt.callbacks import TrainingError

    states = {}
    for key, callback in callback_keys(callbacks).items():
        state = to_plain_data(callback.state_dict())
        try:
            check_plain_data(state, f"{key}.state_dict()")
        except TypeError as err:
            raise TrainingError(f"callback state not saved: {err}") from None
        if state:
            states[key] = state
    return states


def restore_callbacks_and_rng(state_dir: Path, accelerator: Any, callbacks: list) -> list[str]:
    """Load this process's callback states and RNGs; return notes for states no callback
    of this run takes."""
    mine = load_rank_state(state_dir, accelerator.process_index)
    keys, notes = callback_keys(callbacks), []
    for key, state in mine["callbacks"].items():
        if key in keys:
            keys[key].load_state_dict(state)
        else:
            notes.append(f"resume: the saved state of callback {key} has no callback in this run")
    restore_rng(mine["rng"])
    return notes


def save_state(accelerator: Any, run_dir: Path, global_step: int, pbt_state: dict,
               callbacks: list, keep: int) -> Path:
    """Write a complete state atomically and keep the newest ``keep`` (all processes call)."""
    rank_state = {"callbacks": callback_states(callbacks)}
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


def open_resume_state(trainer: Any) -> dict:
    """Check the state ``trainer.resume_from`` before anything is built from it: every file
    loads as plain data, the process count matches, the model (after replaying a saved
    pruning history) fits. Returns pbt's part of the state."""
    state_dir = trainer.resume_from
    verify_state_files(state_dir)
    saved = load_pbt_state(state_dir)
    world = trainer.accelerator.num_processes
    if saved["world_size"] != world:
        raise ConfigError(
            f"key 'resume': the state in {str(state_dir)!r} was saved by {saved['world_size']} "
            f"processes and this run has {world}; resume with the same number of processes "
            "(the data order and optimizer shards depend on it)")
    if saved.get("prune_history") is not None:
        trainer.rebuild_pruned(trainer.model, saved["prune_history"])
    check_model_fits(state_dir, trainer.model)
    return saved


def restore_trainer(trainer: Any, saved: dict) -> None:
    """After ``prepare``: model, optimizer, scaler (Accelerate), then pbt's counters, each
    process's callbacks and RNGs."""
    trainer.accelerator.load_state(str(trainer.resume_from))
    for message in restore_callbacks_and_rng(trainer.resume_from, trainer.accelerator,
                                             trainer.callbacks):
        trainer.log(message)
    trainer.history, trainer.global_step = saved["history"], saved["global_step"]
    trainer.seconds_before, trainer.prune_history = saved["seconds"], saved.get("prune_history")
    trainer.start_epoch, trainer.skip_batches = saved["epoch"], saved["batches_done"]
    trainer.log(f"resumed from {trainer.resume_from}: epoch {trainer.start_epoch + 1}, "
                f"batch {trainer.skip_batches}, global step {trainer.global_step}")


def resolve_run_dir(trainer: Any) -> tuple[Path, Path | None]:
    """``(run_dir, state to resume from or None)``; the main process decides for everyone.
    Nothing is written here, so a bad ``resume`` changes nothing on disk."""
    import time

    from accelerate.utils import broadcast_object_list

    cfg = trainer.cfg
    holder: list = [None, None, None]
    if trainer.accelerator.is_main_process:
        try:
            prefix = cfg.run_name or "_".join(trainer.run_name_parts(cfg) + [cfg.flag or ""])
            prefix = prefix.strip("_")
            name = cfg.run_name or f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}"
            run_dir, state = Path(cfg.work_dir) / name, None
            if cfg.resume:
                found = find_resume(cfg.resume, Path(cfg.work_dir), prefix)
                if found is not None:
                    run_dir, state = found
                else:
                    trainer.log(f"resume auto: no usable state under {cfg.work_dir}, "
                                "starting fresh")
            holder = [str(run_dir), str(state) if state else None, None]
        except ConfigError as err:
            holder = [None, None, str(err)]
    if trainer.accelerator.num_processes > 1:
        broadcast_object_list(holder)
    if holder[2]:
        raise ConfigError(holder[2])
    return Path(holder[0]), (Path(holder[1]) if holder[1] else None)


def save_trainer_state(trainer: Any, epoch: int, batches_done: int) -> Path:
    """A resumable state of ``trainer``, to go on at ``epoch`` after ``batches_done``."""
    import time

    pbt_state = {"epoch": epoch, "batches_done": batches_done,
                 "global_step": trainer.global_step, "history": trainer.history,
                 "world_size": trainer.accelerator.num_processes,
                 "seconds": trainer.seconds_before + time.time() - trainer.started,
                 "prune_history": trainer.prune_history}
    return save_state(trainer.accelerator, trainer.run_dir, trainer.global_step, pbt_state,
                      trainer.callbacks, keep=trainer.cfg.keep_checkpoints)


def load_model_file(trainer: Any, model: torch.nn.Module, path: str) -> None:
    """``model_file`` / ``finetune`` weights into ``model``, replaying the file's pruning
    history first. With ``finetune`` keys are matched by name and shape and the skipped
    ones logged; otherwise every key must fit."""
    key = "finetune" if isinstance(trainer.cfg.finetune, str) else "model_file"
    saved = safe_load(Path(path), key=key)
    if isinstance(saved, dict) and saved.get("prune_history"):
        trainer.rebuild_pruned(model, saved["prune_history"])
    skipped = load_weights(model, path, strict=not trainer.cfg.finetune, key=key, loaded=saved)
    trainer.log(f"loaded weights from {path}" + (
        f"; skipped {len(skipped)} keys that do not fit: {', '.join(skipped)}" if skipped else ""))
