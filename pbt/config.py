"""YAML + command-line config: defaults < YAML (``-c``) < flags typed on the command line.

Every key is flat, as in PBT. The core keys below are the ones the engine uses; a script
or recipe declares its own with :class:`Key` (``parse_config(keys=[...])``), and they get
the same checks, appear in ``--help`` and ``config.yaml``, and travel to DDP workers with
the config. Misspelt keys and wrong types are errors that name the key, the value and what
was expected, raised before any training starts.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

_TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool"}
_EXPECTED = {
    "int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
    "bool_or_str": "true, false or a file path", "paths": "a path or a list of paths",
    "int_list": "a list of integers", "float_list": "a list of numbers",
    "str_list": "a list of strings",
}


class ConfigError(ValueError):
    """Bad user input: the message says what was wrong and where."""


# A config file is a page of keys; a bigger one is a mistake (a data file given as -c, a
# generated list): refused by its size before it is parsed (32 MB took minutes and GBs).
MAX_CONFIG_BYTES = 1 << 20
_VALUE_REPR = 80  # characters of a value an error message quotes
_PATH_REPR = 300  # a path is quoted longer: its end names the file


def short_repr(value: Any, limit: int = _VALUE_REPR) -> str:
    """``repr(value)`` cut to about ``limit`` characters with "...", built without
    spelling out a long value first (an 8-million-element list, YAML aliases nested)."""
    import reprlib

    shortener = reprlib.Repr()
    shortener.maxstring = shortener.maxother = limit
    shortener.maxlong, shortener.maxlevel = 40, 3
    shortener.maxlist = shortener.maxtuple = shortener.maxdict = shortener.maxset = 8
    try:
        text = shortener.repr(value)
    except ValueError:  # an int past Python's 4300-digit str limit
        return f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) \
            else f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def path_problem(item: str, want_file: bool = False) -> str | None:
    """Why ``item`` is not a usable path (an existing one; with ``want_file`` a file)."""
    try:
        path = Path(item)
        if want_file and path.is_dir():
            return "is a directory; a file is expected"
        if want_file and not path.is_file():
            return "does not exist" if not path.exists() else "is not a regular file"
        return None if path.exists() else "does not exist"
    except (OSError, ValueError) as err:  # a name too long, a NUL byte
        return f"cannot be used ({getattr(err, 'strerror', None) or err})"


@dataclass(frozen=True)
class Key:
    """One config key: ``Key("hidden_dim", int, 64, "width of the hidden layer")``.

    ``kind`` is a type (``int``, ``float``, ``str``, ``bool``) or one of ``"paths"``,
    ``"int_list"``, ``"float_list"``, ``"str_list"``, ``"bool_or_str"``; ``nullable`` allows
    ``null``. ``choices`` are matched case-insensitively and stored as spelled here (PBT
    lower-cases names). ``check(value)`` returns an error text for a bad value, or None.
    ``path`` checks that a path value exists. ``safe_on_resume``: the key may take a new
    value when a run is resumed (it changes neither the data order, the model nor the
    optimizer's path); any other changed key makes ``--resume`` refuse the state.
    """

    name: str
    kind: Any
    default: Any = None
    help: str = ""
    nullable: bool = False
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None
    path: bool = False
    safe_on_resume: bool = False

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES.get(self.kind, self.kind)

    def coerce(self, value: Any, where: str) -> Any:
        """``value`` converted (command-line strings) and checked; raise ConfigError if bad."""
        kind = self.type_name
        nullable = self.nullable or self.default is None
        expected = _EXPECTED[kind] + (" or null" if nullable else "")
        if nullable and (value is None or (isinstance(value, str) and value.lower() in
                                           ("null", "none", "~", ""))):
            return None  # PBT writes an unset file as model_file: ""

        def wrong(extra: str = "") -> ConfigError:
            return ConfigError(f"{where}: key {self.name!r} has value {short_repr(value)}; "
                               f"expected {extra or expected}")

        converted = _convert(kind, value, wrong)
        if self.choices is not None:
            items = converted if isinstance(converted, list) else [converted]
            spelled = {str(c).lower(): c for c in self.choices}
            if any(str(item).lower() not in spelled for item in items):
                raise wrong("one of " + ", ".join(map(str, self.choices)))
            items = [spelled[str(item).lower()] for item in items]
            converted = items if isinstance(converted, list) else items[0]
        problem = self.check(converted) if self.check else None
        if problem:
            raise wrong(problem)
        if self.path and isinstance(converted, (str, list)):
            for item in converted if isinstance(converted, list) else [converted]:
                problem = path_problem(item) if isinstance(item, str) else None
                if problem:
                    raise ConfigError(f"{where}: key {self.name!r}: path "
                                      f"{short_repr(item, _PATH_REPR)} {problem}")
        return converted


def _convert(kind: str, value: Any, wrong: Callable[..., ConfigError]) -> Any:
    def as_bool(item: Any) -> bool:
        if isinstance(item, bool):
            return item
        if isinstance(item, str) and item.lower() in _TRUE | _FALSE:
            return item.lower() in _TRUE
        raise wrong()

    def as_number(item: Any, number: type) -> Any:
        if isinstance(item, bool) or not isinstance(item, (int, float, str)):
            raise wrong()
        if number is int and isinstance(item, float):
            raise wrong()
        try:
            return number(item)
        except ValueError:
            raise wrong() from None

    def as_list(item: Any) -> list:
        if isinstance(item, (list, tuple)):
            return list(item)
        if isinstance(item, str) and "," in item:
            return [part.strip() for part in item.split(",") if part.strip()]
        return [item]

    if kind == "int":
        return as_number(value, int)
    if kind == "float":
        return as_number(value, float)
    if kind == "bool":
        return as_bool(value)
    if kind == "str":
        if not isinstance(value, str):
            raise wrong()
        return value
    if kind == "bool_or_str":
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return as_bool(value) if value.lower() in _TRUE | _FALSE else value
        raise wrong()
    if kind == "paths":
        items = as_list(value)
        if not items or not all(isinstance(item, str) for item in items):
            raise wrong()
        return items[0] if len(items) == 1 else items
    if kind == "int_list":
        return [as_number(item, int) for item in as_list(value)]
    if kind == "float_list":
        return [as_number(item, float) for item in as_list(value)]
    if kind == "str_list":
        items = as_list(value)
        if not all(isinstance(item, str) for item in items):
            raise wrong()
        return items
    raise AssertionError(kind)


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"a number >= {low}"


def _in_range(low: int, high: int) -> Callable[[Any], str | None]:
    """An int key's bounds: past them a value is a typo, and too big for the C code that
    takes it (``islice``, ``np.random.seed``), which would fail deep inside a run."""
    return lambda v: None if low <= v <= high else f"an integer from {low} to {high}"


def _plain_name(v: str) -> str | None:
    if not v or "/" in v or "\\" in v or v in (".", "..") or v.startswith("~"):
        return "a plain directory name inside work_dir (no '/', not '.' or '..')"
    return None


def _between_open(v: float) -> str | None:
    return None if 0.0 < v < 1.0 else "a number between 0 and 1 (exclusive)"


# The engine's keys. PBT's keep PBT's meaning; new ones follow the same flat style.
CORE_KEYS: tuple[Key, ...] = (
    # run
    Key("work_dir", str, "work_space", "where run directories are made", safe_on_resume=True),
    Key("run_name", str, None, "run directory name (default: made from the config)",
        check=_plain_name, safe_on_resume=True),
    Key("overwrite", bool, False, "replace an existing run dir of the same name (off: a "
        "fresh run there is refused)", safe_on_resume=True),
    Key("flag", str, "", "PBT: a suffix for the generated run name", safe_on_resume=True),
    Key("seed", int, 0, "seed of data order, augmentation and initialisation",
        check=_in_range(0, 2**32 - 1)),
    Key("gpu_id", "int_list", [0], "GPUs to train on; several mean DDP", safe_on_resume=True),
    Key("distributed", bool, False, "PBT's switch; several GPUs always mean DDP in pbt",
        safe_on_resume=True),
    Key("num_processes", int, 0, "CPU worker processes to start (0: one)",
        check=_in_range(0, 256), safe_on_resume=True),
    Key("main_process_port", int, 29500, "port of the workers' rendezvous (0: any free)",
        check=_in_range(0, 65535), safe_on_resume=True),
    Key("log_freq", int, 20, "log every N optimizer steps", check=_in_range(1, 10**9),
        safe_on_resume=True),
    Key("progress", bool, True, "tqdm progress bar", safe_on_resume=True),
    Key("eval_only", bool, False, "only run the test loop once (with model_file)",
        safe_on_resume=True),
    Key("monitor", str, None, "metric for best.pth and early stopping, e.g. test/loss "
        "(default: test/top1 when accuracy is recorded, else test/loss)"),
    Key("monitor_mode", str, None, "max or min (default: min for losses, max otherwise)",
        choices=("max", "min")),
    Key("early_stop_patience", int, 0, "epochs without improvement before stopping (0: off)",
        check=_in_range(0, 10**6), safe_on_resume=True),
    Key("early_stop_min_delta", float, 0.0, "smallest change that counts as improvement",
        safe_on_resume=True),
    Key("resume", str, None, "a run dir, a state dir, or auto", safe_on_resume=True),
    Key("save_steps", int, 0, "also save a resumable state every N optimizer steps",
        check=_in_range(0, 10**9), safe_on_resume=True),
    Key("keep_checkpoints", int, 2, "resumable states kept", check=_in_range(1, 10**6),
        safe_on_resume=True),
    # data order
    Key("batch_size", int, 32, "batch size per process", check=_in_range(1, 10**6)),
    Key("num_workers", int, None, "DataLoader workers (null: from the CPU count)",
        check=_in_range(0, 512), safe_on_resume=True),
    # weights
    Key("model_file", str, None, "weights to start from (pbt or PBT-style .pth)", path=True),
    Key("finetune", "bool_or_str", False, "load model_file by name and shape, skipping misfits "
        "(PBT: or the file itself)"),
    Key("sync_bn", bool, False, "SyncBatchNorm on several GPUs"),
    # optimisation
    Key("optim_type", str, "SGD", "optimizer", choices=("SGD", "Adam", "AdamW")),
    Key("lr", float, 0.1, "base learning rate",
        check=lambda v: None if v > 0 else "a positive number"),
    Key("momentum", float, 0.9, "SGD momentum"),
    Key("nesterov", bool, False, "Nesterov momentum (SGD)"),
    Key("weight_decay", float, 5e-4, "weight decay"),
    Key("no_decay_bn_bias", bool, True, "no weight decay on BatchNorm and bias parameters"),
    Key("loss_type", str, "CrossEntropyLoss", "default criterion",
        choices=("CrossEntropyLoss", "CELoss", "LabelSmoothing", "FocalLoss")),
    Key("smoothing", float, 0.1, "LabelSmoothing amount"),
    Key("focal_gamma", float, 2.0, "FocalLoss gamma"),
    Key("num_epochs", int, 10, "epochs to train", check=_in_range(1, 10**6),
        safe_on_resume=True),
    Key("grad_accum_steps", int, None, "micro-batches per optimizer step (null: Accelerate's "
        "setting, else 1)", check=_in_range(1, 65536)),
    Key("clip_grad_norm", float, None, "clip the gradient norm to this"),
    Key("mixed_precision", str, None, "no, fp16 or bf16 (null: Accelerate's setting, else no)",
        choices=("no", "fp16", "bf16")),
    # schedule
    Key("scheduler", str, "multi-step", "multi-step, cosine, ExpLR or LambdaLR"),
    Key("milestones", "int_list", [30, 80, 100], "multi-step: epochs where lr drops"),
    Key("gamma", float, None, "multi-step / ExpLR factor"),
    Key("min_lr", float, None, "cosine / LambdaLR floor (null: lr / 100)"),
    Key("lr_power", float, 0.9, "LambdaLR polynomial power"),
    Key("num_warn_up", float, 0, "warm-up epochs (longer than training: clamped)",
        check=_at_least(0)),
    # pruning
    Key("use_prune", bool, False, "prune the model before training"),
    Key("prune_method", str, "l1", "l1, l2, fpgm or slim", choices=("l1", "l2", "fpgm", "slim")),
    Key("prune_ratio", float, 0.5, "share of channels removed", check=_between_open),
    Key("prune_global", bool, False, "rank channels across the whole network"),
    Key("prune_steps", int, 1, "iterative pruning steps", check=_in_range(1, 1000)),
    Key("prune_ignore", "str_list", [], "module names never pruned"),
    Key("prune_backend", str, "torch-pruning", "torch-pruning or nni",
        choices=("torch-pruning", "nni")),
    Key("round_to", int, 8, "keep channel counts multiples of this (0: off)",
        check=_in_range(0, 4096)),
    Key("slim_reg", float, 0.0, "L1 penalty on BatchNorm scales (slim sparsity training)"),
    # knowledge distillation
    Key("distill_from", str, None, "teacher weights (.pth) to distill from (null: off)",
        path=True),
    Key("distill_alpha", float, 0.5, "weight of the KD loss; the task loss gets 1 - alpha",
        check=lambda v: None if 0.0 <= v <= 1.0 else "a number between 0 and 1"),
    Key("distill_temperature", float, 4.0, "softmax temperature of the KD loss",
        check=lambda v: None if v > 0 else "a number > 0"),
    # training better and faster
    Key("ema_decay", float, 0.0, "EMA of the weights, e.g. 0.9998 (0: off); the decay warms "
        "up as min(ema_decay, (1 + step) / (10 + step))",
        check=lambda v: None if 0.0 <= v < 1.0 else "0 (off) or a number in (0, 1)"),
    Key("ema_eval", bool, True, "test (and best.pth / last.pth) use the EMA weights"),
    Key("mixup_alpha", float, 0.0, "mixup Beta(alpha, alpha) (0: off)", check=_at_least(0)),
    Key("cutmix_alpha", float, 0.0, "CutMix Beta(alpha, alpha) (0: off)", check=_at_least(0)),
    Key("mix_prob", float, 1.0, "share of batches mixed (mixup or CutMix, one of them)",
        check=lambda v: None if 0.0 <= v <= 1.0 else "a number between 0 and 1"),
    Key("mix_off_epochs", int, 0, "no mixing in the last N epochs",
        check=_in_range(0, 10**6)),
    Key("channels_last", bool, False, "model in channels-last memory format (activations follow)"),
    Key("compile", bool, False, "torch.compile the model (after pruning, before DDP)"),
    Key("compile_mode", str, "default", "torch.compile mode",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")),
    Key("summary_layers", bool, False, "also log a per-layer table at start",
        safe_on_resume=True),
    Key("lr_find", bool, False, "run the LR range test (pbt.lr_find) instead of training",
        safe_on_resume=True),
)

# PBT keys pbt deliberately does not use: accepted, and named at start with the reason.
IGNORED_PBT_KEYS = {
    "start_save": "pbt writes best.pth and last.pth every epoch",
    "class_file": "class names come from the folders, or class_name.txt beside a list file",
    "data_type": "the data format is read from the path (a folder or a list file)",
    "polyaxon": "pbt has no polyaxon integration",
}

DEFAULTS: dict[str, Any] = {key.name: key.default for key in CORE_KEYS}


class Config(dict):
    """A dict whose keys also read as attributes (``cfg.lr``). It carries its ``keys``
    (core + declared) so saving and DDP workers see the same schema, and ``notes``: lines
    the trainer logs at start (ignored PBT keys, clamped values)."""

    def __init__(self, *args: Any, keys: Iterable[Key] = CORE_KEYS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        object.__setattr__(self, "keys_", {key.name: key for key in keys})
        object.__setattr__(self, "notes", [])

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __reduce__(self) -> tuple:
        # checks ran already, and a script's lambdas would not pickle (spawned DDP workers)
        keys = [replace(key, check=None) for key in self.keys_.values()]
        return _rebuild_config, (dict(self), keys, list(self.notes))


def _rebuild_config(values: dict, keys: list[Key], notes: list[str]) -> Config:
    cfg = Config(values, keys=keys)
    cfg.notes.extend(notes)
    return cfg


# Names other libraries use for pbt's keys: a hint suggests the pbt key for them (and for
# their misspellings: "lerning_rate" is nearest "learning_rate", so "lr").
KEY_ALIASES = {
    "learning_rate": "lr", "base_lr": "lr", "epochs": "num_epochs", "max_epochs": "num_epochs",
    "n_epochs": "num_epochs", "batchsize": "batch_size", "bs": "batch_size",
    "train_batch_size": "batch_size", "wd": "weight_decay", "optimizer": "optim_type",
    "optim": "optim_type", "warmup": "num_warn_up", "warmup_epochs": "num_warn_up",
    "num_warmup": "num_warn_up", "workers": "num_workers", "model": "net_type",
    "arch": "net_type", "backbone": "net_type", "output_dir": "work_dir",
    "loss": "loss_type", "lr_scheduler": "scheduler", "accumulate_grad_batches":
    "grad_accum_steps", "gradient_accumulation_steps": "grad_accum_steps",
    "precision": "mixed_precision", "amp": "mixed_precision", "checkpoint": "model_file",
    "weights": "model_file", "resume_from_checkpoint": "resume", "random_seed": "seed",
}


def nearest_key(key: str, valid: Iterable[str]) -> str:
    """A hint naming the closest valid key (also through :data:`KEY_ALIASES`), or all of
    them when none is close."""
    valid = list(valid)
    spelled = key.lower().replace("-", "_")
    names = {name: name for name in valid}
    names.update({alias: name for alias, name in KEY_ALIASES.items() if name in names})
    if spelled in names:
        return f"did you mean {names[spelled]!r}?"
    close = difflib.get_close_matches(spelled, list(names), n=1, cutoff=0.75) or \
        difflib.get_close_matches(spelled, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean {names[close[0]]!r}?"
    return "valid keys: " + ", ".join(sorted(valid))


def merge_keys(extra: Iterable[Key] = ()) -> dict[str, Key]:
    """Core keys plus a script's own; a script may redeclare a core key's default and help."""
    keys = {key.name: key for key in CORE_KEYS}
    for key in extra:
        if not isinstance(key, Key):
            raise TypeError(f"config keys are declared as pbt.config.Key, got {key!r}")
        keys[key.name] = key
    return keys


class _DuplicateKey(Exception):
    """A mapping names a key twice (raised by the loader, worded by :func:`read_yaml`)."""

    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(key, first, second)
        self.key, self.first, self.second = key, first, second


@lru_cache(maxsize=1)
def _strict_loader() -> type:
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain
    ``safe_load`` keeps the last one without a word: ``lr`` twice, the first is lost)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # "<<: *base": its keys may be overridden here
                    key = self.construct_object(key_node, deep=deep)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in seen:
                            raise _DuplicateKey(key, seen[key], line)
                        seen[key] = line
                    except TypeError:
                        continue  # unhashable: the base class words that error
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def read_yaml(path: str | Path, keys: Iterable[str] | None = None) -> dict:
    """Read a config YAML (``safe_load`` types; a key given twice is an error) of at most
    :data:`MAX_CONFIG_BYTES`; with ``keys``, an unknown key is an error."""
    import yaml

    path = Path(path)
    name = short_repr(str(path), _PATH_REPR)
    if path.is_dir():
        raise ConfigError(f"config file {name} is a directory; -c expects a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {name} does not exist")
    try:
        with open(path, "rb") as handle:  # bounded read: the size may change after stat
            raw = handle.read(MAX_CONFIG_BYTES + 1) \
                if path.stat().st_size <= MAX_CONFIG_BYTES else None
    except OSError as err:
        raise ConfigError(f"cannot read config file {name}: {err.strerror or err}") from None
    if raw is None or len(raw) > MAX_CONFIG_BYTES:
        size = path.stat().st_size
        raise ConfigError(f"config file {name} is {size / 1e6:.1f} MB ({size} bytes); a "
                          f"config file may be at most {MAX_CONFIG_BYTES} bytes (1 MiB). Is "
                          "it a config? Long lists belong in data files")
    try:  # bytes: PyYAML reads UTF-8/16 and drops a byte-order mark
        data = yaml.load(raw, Loader=_strict_loader())  # noqa: S506 - a SafeLoader
    except _DuplicateKey as dup:
        raise ConfigError(f"config file {name}: key {short_repr(dup.key)} is given twice, on "
                          f"lines {dup.first} and {dup.second}; keep one") from None
    except (yaml.YAMLError, ValueError) as err:  # ValueError: an int of > 4300 digits
        text = str(err)
        text = text if len(text) <= 2000 else text[:2000] + " ..."
        raise ConfigError(f"config file {name} is not valid YAML: {text}") from None
    if data is None:
        raise ConfigError(f"config file {name} is empty; it must hold a mapping of "
                          "keys to values")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {name} must hold a mapping of keys to values")
    if keys is not None:
        known = set(keys) | set(IGNORED_PBT_KEYS)
        for key in data:
            if key not in known:
                raise ConfigError(f"config file {name}: unknown key {short_repr(key)}; "
                                  + nearest_key(str(key)[:200], known))
    return data


def build_parser(keys: dict[str, Key], config_file: str | None = None,
                 from_file: dict | None = None) -> argparse.ArgumentParser:
    """One flag per key; untyped flags stay absent so they never override YAML. The
    defaults shown are what a run without that flag uses: ``from_file`` (the values of
    ``config_file``) over the built-in ones."""
    from_file = from_file or {}
    where = f" Defaults shown are those of {config_file}." if config_file else ""
    parser = argparse.ArgumentParser(
        description="pbt training run. Flags override the YAML file given with -c; any key "
        "may also be given as key=value." + where,
        argument_default=argparse.SUPPRESS, allow_abbrev=False,
    )
    parser.add_argument("-c", "--config_file", help="YAML config file")
    for key in keys.values():
        default = from_file.get(key.name, key.default)
        kind, text = key.type_name, f"{key.help} (default {default})".strip()
        if kind in ("paths", "int_list", "float_list", "str_list"):
            parser.add_argument(f"--{key.name}", nargs="+", metavar="V", help=text)
        elif kind in ("bool", "bool_or_str"):
            parser.add_argument(f"--{key.name}", nargs="?", const="true", metavar="BOOL",
                                help=text)
        else:
            parser.add_argument(f"--{key.name}", metavar="V", help=text)
    for name in IGNORED_PBT_KEYS:
        parser.add_argument(f"--{name}", nargs="?", help=argparse.SUPPRESS)
    return parser


def load_config(argv: list[str] | None = None, default_file: str | Path | None = None,
                keys: Iterable[Key] = (), **overrides: Any) -> Config:
    """Resolve defaults < YAML < command line < ``overrides``; raise ConfigError if bad.

    ``keys`` are the script's own :class:`Key` declarations; ``default_file`` is the YAML
    used when the command line names none (a recipe's own).
    """
    schema = merge_keys(keys)
    argv = sys.argv[1:] if argv is None else list(argv)
    # key=value tokens: a way round launchers (torchrun) whose parsers claim --flags
    pairs = [t for t in argv if "=" in t and not t.startswith("-")
             and t.split("=", 1)[0] in set(schema) | set(IGNORED_PBT_KEYS)]
    for token in argv:  # "epochs=3" would otherwise be read as a value of the flag before it
        name = token.split("=", 1)[0]
        if token not in pairs and "=" in token and re.fullmatch(r"[A-Za-z_][\w-]*", name):
            raise ConfigError(f"command line: unknown key {short_repr(name)} in "
                              f"{short_repr(token)}; " + nearest_key(name[:200], schema))
    argv = [t for t in argv if t not in pairs]
    first = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    first.add_argument("-c", "--config_file")
    config_file = first.parse_known_args(argv)[0].config_file or (
        str(default_file) if default_file is not None else None)
    from_file = read_yaml(config_file, schema) if config_file else {}
    args, unknown = build_parser(schema, config_file, from_file).parse_known_args(argv)
    for token in unknown:
        if token.startswith("-"):
            name = token.lstrip("-").split("=")[0]
            raise ConfigError(f"command line: unknown flag {short_repr(token)}; "
                              + nearest_key(name, schema).replace("'", "'--", 1))
        raise ConfigError(f"command line: unexpected argument {short_repr(token)}")
    typed = vars(args)
    typed.update(dict(pair.split("=", 1) for pair in pairs))
    typed.pop("config_file", None)
    cfg = Config({name: key.default for name, key in schema.items()}, keys=schema.values())
    ignored: dict[str, Any] = {}
    sources = [(f"config file {config_file!r}", from_file)] if config_file else []
    sources += [("command line", typed), ("override", overrides)]
    for where, values in sources:
        for name, value in values.items():
            if name in IGNORED_PBT_KEYS:
                ignored[name] = value
            elif name not in schema:
                raise ConfigError(f"{where}: unknown key {short_repr(name)}; "
                                  + nearest_key(str(name)[:200], schema))
            else:
                cfg[name] = schema[name].coerce(value, where)
    if config_file:
        cfg["config_file"] = str(config_file)
    for name, value in ignored.items():
        cfg.notes.append(f"PBT key {name}: {short_repr(value)} is ignored: "
                         f"{IGNORED_PBT_KEYS[name]}")
    _check_across_keys(cfg)
    return cfg


def _check_across_keys(cfg: Config) -> None:
    """Checks that involve more than one key (single values are checked by their Key)."""
    problem = path_problem(cfg.finetune, want_file=True) if isinstance(cfg.finetune, str) \
        else None
    if problem:
        raise ConfigError(f"key 'finetune': file {short_repr(cfg.finetune, _PATH_REPR)} "
                          f"{problem}")
    if cfg.num_warn_up > cfg.num_epochs:
        cfg.notes.append(f"num_warn_up {cfg.num_warn_up:g} is longer than num_epochs "
                         f"{cfg.num_epochs}: warm-up clamped to {cfg.num_epochs} epochs")
        cfg.num_warn_up = cfg.num_epochs
    if cfg.use_prune and cfg.prune_backend == "nni":
        import importlib.util

        if cfg.prune_global:
            raise ConfigError("key 'prune_global' is true, but prune_backend 'nni' prunes per "
                              "layer only; use prune_backend 'torch-pruning' for global pruning")
        if importlib.util.find_spec("nni") is None:
            raise ConfigError("key 'prune_backend' is 'nni', which is not installed; install "
                              'the extra with: pip install -e ".[nni]"')


def parse_config(argv: list[str] | None = None, default_file: str | Path | None = None,
                 keys: Iterable[Key] = ()) -> Config:
    """Command-line entry: like :func:`load_config`, but a bad input exits with one message."""
    try:
        return load_config(argv, default_file, keys)
    except ConfigError as err:
        print(f"pbt: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def changed_on_resume(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """Keys whose value differs from the ``saved`` config, as ``"key old → new"`` lines:
    (those that make a resume refuse, those applied). Keys the saved config lacks are
    not compared (a state written before the key existed)."""
    refused, applied = [], []
    for name, key in cfg.keys_.items():
        if name in saved and name in cfg and saved[name] != cfg[name]:
            line = f"{name} {short_repr(saved[name])} → {short_repr(cfg[name])}"
            (applied if key.safe_on_resume else refused).append(line)
    return refused, applied


def plain_values(cfg: Config) -> dict:
    """The values of the declared keys (what a resumable state records)."""
    return {name: cfg[name] for name in getattr(cfg, "keys_", DEFAULTS) if name in cfg}


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (core and declared keys) so ``-c path`` re-runs it."""
    import yaml

    Path(path).write_text(yaml.safe_dump(plain_values(cfg), sort_keys=False))
