"""Every weights file and resumable state: written atomically, loaded without pickled code.

Weights files (``best.pth``, ``last.pth``) are plain dicts of the unwrapped model's
state_dict plus what rebuilds the network; ``load_weights`` reads them and PBT-style files
for ``model_file`` / ``finetune``. A resumable state is a folder
``run_dir/checkpoints/step-<global_step>``: Accelerate's ``save_state`` writes model,
optimizer, grad scaler and RNG files into a temporary sibling folder; pbt adds
``pbt_state.pt`` (counters, position in the epoch, history, pruning history, config,
class names) and one ``pbt_rank_<rank>.pt`` per process (its RNGs and its callbacks' state:
running sums differ per process), then a completion mark holding each file's size and
SHA-256, and only then renames the folder into place. A folder without the mark is never
resumed from; one whose files no longer match it is skipped for the previous good one.
A save that fails (a full disk) removes its temporary files and raises one error.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pbt.callbacks import TrainingError
from pbt.config import ConfigError, path_problem

COMPLETE_MARK = "pbt-complete"
STATE_FILE = "pbt_state.pt"
PREFIX = "step-"


# -- a full disk ---------------------------------------------------------------------------
class DiskFull(TrainingError):
    """A save found no space (or hit ``ulimit -f``): its temporary files are removed and
    every file saved before is intact. Exit code 75 (EX_TEMPFAIL: free space, resume)."""

    exit_code = 75


def out_of_space(err: BaseException | None) -> bool:
    """Whether ``err`` (or what caused it) is a full disk, a quota or a file size limit;
    torch and safetensors wrap the OS error in their own exception types."""
    import errno

    markers = ("No space left", "File too large", "Disk quota", "StorageFull", "FileTooLarge",
               "file write failed")
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        if any(marker in str(err) for marker in markers):
            return True
        err = err.__cause__ or err.__context__
    return False


def save_failed(err: BaseException, path: Path, needed: int, largest: int = 0) -> TrainingError:
    """The one-paragraph error for a save into ``path`` (about ``needed`` bytes; its
    largest file reached ``largest`` bytes) that failed with ``err``: :class:`DiskFull`
    when space (or ``ulimit -f``) is short."""
    import resource

    folder = Path(path).parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    limited = limit != resource.RLIM_INFINITY and max(needed, largest) >= limit
    intact = ("Its temporary files were removed and every file saved before is intact; {}, "
              "then continue with --resume auto (or the run dir)")
    if out_of_space(err) or free < needed or limited:
        where = f"{_size(free)} free on its filesystem"
        if limit != resource.RLIM_INFINITY:
            where += f", files limited to {_size(limit)} by ulimit -f"
        need = f"; about {_size(needed)} needed" if needed else ""
        return DiskFull(f"no space to write {str(path)!r} ({where}{need}). "
                        + intact.format("free space"))
    return TrainingError(f"could not write {str(path)!r} ({type(err).__name__}: {err}). "
                         + intact.format("fix the cause"))


def _size(count: float) -> str:
    if count < 1024:
        return f"{count:.0f} bytes"
    for unit in ("KB", "MB", "GB"):
        count /= 1024
        if count < 1024 or unit == "GB":
            break
    return f"{count:.1f} {unit}"


def _tensor_bytes(state: Any) -> int:
    if torch.is_tensor(state):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(v) for v in state)
    return 0


# -- weights files -----------------------------------------------------------------------
def save_atomic(state: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary name, then rename: readers never see half a file."""
    tmp = f"{path}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as err:
        written = os.path.getsize(tmp) if os.path.lexists(tmp) else 0
        if os.path.lexists(tmp):
            os.remove(tmp)
        if not isinstance(err, Exception):
            raise
        before = os.path.getsize(path) if os.path.isfile(path) else 0  # the same model
        raise save_failed(err, Path(path), max(before, written, _tensor_bytes(state)),
                          written) from None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name, then rename."""
    import json

    write_text_atomic(path, json.dumps(data, indent=2))


def write_text_atomic(path: Path, text: str) -> None:
    """Write text to a temporary name, then rename."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write bytes to a temporary name, then rename; a full disk names ``path`` and the
    bytes it needed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise save_failed(err, path, len(data)) from None


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
    tensors (copies, so training may go on while it is written), or the EMA weights when
    the test pass used them (``"weights"`` says which; a ``ModelEMA`` not used for testing
    adds ``"model_ema"``), the trainer's ``checkpoint_meta()`` (what rebuilds the net),
    epoch, step, metric, pruning history."""
    from pbt.callbacks import ModelEMA

    def copy(weights: dict) -> dict:
        return {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}

    ema = next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, ModelEMA)
                and c.weights is not None), None)
    use_ema = ema is not None and ema.eval_weights  # the weights the metric was measured on
    state = {
        "model": copy(ema.weights if use_ema else trainer.unwrapped_model.state_dict()),
        "weights": "ema" if use_ema else "trained",
        **trainer.checkpoint_meta(),
        "epoch": trainer.epoch + 1,
        "global_step": trainer.global_step,
        "metric": metric,
    }
    if ema is not None and not use_ema:
        state["model_ema"] = copy(ema.weights)
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
        problem = path_problem(str(path), want_file=True)
        if problem:
            raise ConfigError(f"key {key!r}: weight file {str(path)!r} {problem}")
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


def _is_run_of(name: str, run_name: str | None, run_prefix: str) -> bool:
    if run_name:
        return name == run_name
    return re.fullmatch(re.escape(run_prefix) + r"_\d{8}-\d{6}(_\d+)?", name) is not None


def find_resume(resume: str, work_dir: Path, run_name: str | None, run_prefix: str,
                log: Callable[[str], None] = print) -> tuple[Path, Path] | None:
    """``(run_dir, state_dir)`` to resume from, or None (``auto`` with no run to resume).

    ``resume`` is a run dir, a state dir inside one, or ``auto``: the run named ``run_name``,
    or without one the newest run named ``<run_prefix>_<timestamp>[_N]`` (so a run with
    another ``flag`` is not taken), that holds a complete state.
    In a run dir the newest state that verifies fully is taken; each newer one skipped is
    logged with the reason. A damaged state named explicitly is an error naming the bad
    file and the good state to use instead.
    """
    if resume == "auto":
        candidates = []
        if Path(work_dir).is_dir():
            for run_dir in Path(work_dir).iterdir():
                if run_dir.is_dir() and _is_run_of(run_dir.name, run_name, run_prefix):
                    states = complete_states(run_dir)
                    if states:
                        candidates.append((states[-1].stat().st_mtime, run_dir))
        if not candidates:
            return None
        run_dir = max(candidates)[1]
        return run_dir, good_state(run_dir, log)
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"key 'resume': path {resume!r} does not exist")
    if (path / COMPLETE_MARK).is_file():
        problem = state_problem(path)
        if problem is None:
            return path.parent.parent, path
        others = [s for s in complete_states(path.parent.parent) if s != path]
        good = next((s for s in reversed(others) if state_problem(s) is None), None)
        instead = (f"; resume from the newest good state instead: --resume {good}" if good
                   else "; the run has no other good state")
        raise ConfigError(f"key 'resume': the state {resume!r} is damaged: {problem}{instead}")
    if not complete_states(path):
        raise ConfigError(
            f"key 'resume': {resume!r} holds no complete pbt training state (expected "
            f"{str(checkpoints_dir(path) / (PREFIX + '<step>'))!r} with a {COMPLETE_MARK!r} "
            "mark); pass a run directory written by pbt, or 'auto'"
        )
    return path, good_state(path, log)


def good_state(run_dir: Path, log: Callable[[str], None]) -> Path:
    """The newest state of ``run_dir`` that verifies; the ones skipped are logged."""
    skipped = []
    for state in reversed(complete_states(run_dir)):
        problem = state_problem(state)
        if problem is None:
            for line in skipped:
                log(f"resume: skipped {line}")
            return state
        skipped.append(f"{state.name}: {problem}")
    raise ConfigError(f"key 'resume': no state in {str(run_dir)!r} is usable: "
                      + "; ".join(skipped))


def state_problem(state_dir: Path) -> str | None:
    """Why a complete state cannot be resumed from (None when it can): a file missing,
    of another size or checksum than when it was written, or not loading."""
    import json

    try:
        manifest = json.loads((state_dir / COMPLETE_MARK).read_text())
    except (OSError, ValueError):
        manifest = None
    files = manifest.get("files", {}) if isinstance(manifest, dict) else {}
    for name, (size, digest) in files.items():
        path = state_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was written"
        if _sha256(path) != digest:
            return f"{name} does not match the checksum recorded when it was written"
    if not (state_dir / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    try:
        verify_state_files(state_dir)
        if not files and (state_dir / "model.safetensors").is_file():
            from safetensors.torch import load_file

            load_file(str(state_dir / "model.safetensors"))
    except ConfigError as err:
        return str(err).removeprefix("key 'resume': ")
    except Exception as err:  # safetensors' own error types
        return f"model.safetensors does not load ({type(err).__name__}: {err})"
    return None


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def safe_load(path: Path, key: str = "", numpy_arrays: bool = False) -> Any:
    """``torch.load(weights_only=True)``; a file that needs pickled code is refused.

    ``numpy_arrays`` also allows the numpy types of Accelerate's RNG files; ``key`` names
    the config key in the error.
    """
    import warnings

    path = Path(path)
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of a file it may then refuse; pbt's
            # own message (below) says what is wrong with the file
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if numpy_arrays:
                from accelerate.utils import load as accelerate_load

                return accelerate_load(path, map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        import re

        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
        text = " ".join(text.split()).split(" Check the documentation of torch.load")[0]
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
    saved = {k.removeprefix("module."): shape for k, shape in saved.items()}
    for key in [*saved, *(k for k in own if k not in saved)]:
        if own.get(key) != saved.get(key):
            raise ConfigError(
                f"key 'resume': the state in {str(state_dir)!r} was saved for another network "
                f"(net_type or number of classes): key {key!r} has shape "
                f"{saved.get(key, 'absent')} in the state and {own.get(key, 'absent')} in "
                "this model")


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
    """Write a complete state atomically and keep the newest ``keep`` (all processes call).

    The completion mark records each file's size and SHA-256, which resume verifies; it is
    written only after every callback's background write (``join()``) has reached the disk,
    so a state never names a ``best.pth`` that is not there yet. Older states are removed
    only after the new one is in place. A full disk removes the temporary folder and
    raises :class:`DiskFull`.
    """
    rank_state = {"callbacks": callback_states(callbacks)}
    folder = checkpoints_dir(run_dir)
    final = folder / f"{PREFIX}{global_step:08d}"
    tmp = folder / f".tmp-{PREFIX}{global_step:08d}"
    try:
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
            # the state names best.pth / last.pth (ModelCheckpoint's best epoch): it is
            # marked complete only once the files being written in the background are on disk
            for callback in callbacks:
                if hasattr(callback, "join"):
                    callback.join()
            _write_mark(tmp, global_step)
    except BaseException as err:
        # a state takes about as much as the last one (or, the first, more than written)
        needed = max(_folder_bytes(latest_state(run_dir)), _folder_bytes(tmp))
        largest = max((p.stat().st_size for p in tmp.rglob("*") if p.is_file()), default=0)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, Exception) or isinstance(err, TrainingError):
            raise  # a weights file's own error already names its file
        raise save_failed(err, tmp, needed, largest) from None
    if accelerator.is_main_process:
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


def _folder_bytes(folder: Path | None) -> int:
    if folder is None or not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _write_mark(state_dir: Path, global_step: int) -> None:
    """The completion mark: written last, synced, with each file's size and checksum."""
    import json

    files = {str(p.relative_to(state_dir)): [p.stat().st_size, _sha256(p)]
             for p in sorted(state_dir.rglob("*")) if p.is_file() and p.name != COMPLETE_MARK}
    with open(state_dir / COMPLETE_MARK, "w") as mark:
        mark.write(json.dumps({"global_step": global_step, "files": files}, indent=1))
        mark.flush()
        os.fsync(mark.fileno())


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


def read_initial_state(trainer: Any) -> dict | None:
    """Before the model is built, what it starts from, checked: a resumable state (the
    process count and config match, see :func:`pbt.config.changed_on_resume`) or a
    ``model_file`` / ``finetune`` file. Saved class names re-map the data's labels."""
    cfg = trainer.cfg
    if trainer.resume_from is not None:
        state_dir = trainer.resume_from
        if not trainer.accelerator.is_main_process:  # the main process did, in find_resume
            verify_state_files(state_dir)  # (other machines may hold their own copies)
        saved = load_pbt_state(state_dir)
        world = trainer.accelerator.num_processes
        if saved["world_size"] != world:
            raise ConfigError(
                f"key 'resume': the state in {str(state_dir)!r} was saved by "
                f"{saved['world_size']} processes and this run has {world}; resume with the "
                "same number of processes (the data order and optimizer shards depend on it)")
        check_resume_config(trainer, saved)
        match_saved_classes(trainer, saved.get("class_names"),
                            f"key 'resume': the state {str(state_dir)!r}", finetune=False)
        return {"resume": saved}
    path = cfg.finetune if isinstance(cfg.finetune, str) else cfg.model_file
    if not path:
        if cfg.finetune:
            raise ConfigError("key 'finetune' is true, but no model_file is given to load")
        if cfg.eval_only:
            trainer.log("eval_only without model_file: evaluating the weights build_model made")
        return None
    key = "finetune" if isinstance(cfg.finetune, str) else "model_file"
    problem = path_problem(str(path), want_file=True)
    if problem:
        raise ConfigError(f"key {key!r}: weight file {str(path)!r} {problem}")
    loaded = safe_load(Path(path), key=key)
    names = loaded.get("class_names") if isinstance(loaded, dict) else None
    match_saved_classes(trainer, names, f"key {key!r}: {str(path)!r}", bool(cfg.finetune))
    return {"file": path, "key": key, "loaded": loaded}


def load_initial_weights(trainer: Any, initial: dict | None) -> dict | None:
    """On the freshly built plain model: replay a saved pruning history, then check that
    a resumable state fits (returned, loaded after ``prepare``) or load the weights file
    (with ``finetune`` by name and shape, logging what is skipped; else every key)."""
    if initial is None:
        return None
    saved = initial.get("resume") or initial["loaded"]
    if isinstance(saved, dict) and saved.get("prune_history"):
        trainer.rebuild_pruned(trainer.model, saved["prune_history"])
    if "resume" in initial:
        check_model_fits(trainer.resume_from, trainer.model)
        return saved
    path = initial["file"]
    skipped = load_weights(trainer.model, path, strict=not trainer.cfg.finetune,
                           key=initial["key"], loaded=saved)
    trainer.log(f"loaded weights from {path}" + (
        f"; skipped {len(skipped)} keys that do not fit: {', '.join(skipped)}" if skipped else ""))
    return None


# Keys a resume never reports as changed: where the run is, and how it was asked for.
_RESUME_SILENT = ("resume", "run_name", "work_dir", "overwrite")


def check_resume_config(trainer: Any, saved: dict) -> None:
    """Refuse a resume whose config changes a key that is not ``safe_on_resume`` (listing
    each, old → new); log the safe ones that change (they apply). The run keeps its name."""
    from pbt.config import changed_on_resume, read_yaml

    cfg, run_dir = trainer.cfg, trainer.resume_from.parent.parent
    saved_cfg = saved.get("config")
    if saved_cfg is None:  # a state written before states recorded their config
        saved_cfg = read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() \
            else {}
    refused, applied = changed_on_resume(saved_cfg, cfg)
    if refused:
        safe = sorted(name for name, key in cfg.keys_.items() if key.safe_on_resume)
        raise ConfigError(
            f"key 'resume': {str(trainer.resume_from)!r} was saved with another config, and "
            "these keys change the data order, the model or the optimizer's path, so a resume "
            f"cannot honour them: {'; '.join(refused)}. Resume with the saved values (see "
            f"{str(run_dir / 'config.yaml')!r}), or start a new run with another --run_name. "
            f"Keys that may change on resume: {', '.join(safe)}")
    for line in applied:
        if line.split(" ", 1)[0] not in _RESUME_SILENT:
            trainer.log(f"resume: {line} (applied)")
    cfg.run_name = saved_cfg.get("run_name", cfg.run_name)


def match_saved_classes(trainer: Any, saved_names: list[str] | None, source: str,
                        finetune: bool) -> None:
    """Map the data's labels to a checkpoint's class order by name. A data class the
    checkpoint lacks is an error, unless ``finetune`` (which then keeps the data's own
    classes, as it does when the class sets differ)."""
    ours = getattr(trainer, "class_names", None)
    if not saved_names or not ours or list(saved_names) == list(ours):
        return
    saved_names = list(saved_names)
    missing = [name for name in ours if name not in saved_names]
    if finetune and set(ours) != set(saved_names):
        trainer.log(f"{source}: the data's classes differ from the file's (new: "
                    f"{', '.join(missing) or 'none'}); the layers that do not fit train anew")
        return
    if missing:
        raise ConfigError(
            f"{source} was trained on other classes: {', '.join(map(repr, missing[:10]))} of "
            f"the data {'is' if len(missing) == 1 else 'are'} not among its {len(saved_names)} "
            f"classes ({', '.join(saved_names[:20])}); finetune: true trains on new classes")
    for loader in (trainer.train_loader, trainer.test_loader):
        dataset = getattr(loader, "dataset", None)
        if not hasattr(dataset, "relabel"):
            raise ConfigError(f"{source} lists the classes in another order than the data, and "
                              f"the dataset {type(dataset).__name__} has no relabel(class_names) "
                              "method to map its labels by name")
        dataset.relabel(saved_names)
    trainer.class_names, trainer.num_classes = saved_names, len(saved_names)
    trainer.log(f"{source}: the data's labels are mapped by name to its class order "
                f"({len(saved_names)} classes)")


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


def save_trainer_state(trainer: Any, epoch: int, batches_done: int) -> Path:
    """A resumable state of ``trainer``, to go on at ``epoch`` after ``batches_done``."""
    import time

    from pbt.config import plain_values

    pbt_state = {"epoch": epoch, "batches_done": batches_done,
                 "global_step": trainer.global_step, "history": trainer.history,
                 "world_size": trainer.accelerator.num_processes,
                 "seconds": trainer.seconds_before + time.time() - trainer.started,
                 "prune_history": trainer.prune_history,
                 "class_names": getattr(trainer, "class_names", None),
                 "config": plain_values(trainer.cfg)}
    return save_state(trainer.accelerator, trainer.run_dir, trainer.global_step, pbt_state,
                      trainer.callbacks, keep=trainer.cfg.keep_checkpoints)
