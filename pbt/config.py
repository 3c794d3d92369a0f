"""YAML + command-line config: defaults < YAML (``-c``) < flags typed on the command line.

Every key is flat, as in PBT. Misspelt keys and wrong types are errors that name the key,
the value and what was expected, raised before any training starts.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import Any

# Expected type per key. "path" and "paths" are strings checked for existence;
# "?" suffix allows null. Lists accept a single scalar too (PBT: `train_data: a.txt`).
SCHEMA: dict[str, tuple[str, Any]] = {
    # data
    "train_data": ("paths?", None),
    "test_data": ("paths?", None),
    "input_size": ("int_list", [32, 32]),
    "rgb_mean": ("float_list", [0.5, 0.5, 0.5]),
    "rgb_std": ("float_list", [0.5, 0.5, 0.5]),
    "train_transform": ("str?", None),
    "test_transform": ("str?", None),
    "resample": ("str", "none"),
    "skip_bad_images": ("bool", False),
    "batch_size": ("int", 32),
    "num_workers": ("int?", None),
    # model
    "net_type": ("str", "resnet18"),
    "pretrained": ("str?", None),
    "model_file": ("str?", None),
    "finetune": ("bool_or_str", False),
    "sync_bn": ("bool", False),
    # optimisation
    "optim_type": ("str", "SGD"),
    "lr": ("float", 0.1),
    "momentum": ("float", 0.9),
    "nesterov": ("bool", False),
    "weight_decay": ("float", 5e-4),
    "no_decay_bn_bias": ("bool", True),
    "loss_type": ("str", "CrossEntropyLoss"),
    "smoothing": ("float", 0.1),
    "focal_gamma": ("float", 2.0),
    "num_epochs": ("int", 10),
    "grad_accum_steps": ("int", 1),
    "clip_grad_norm": ("float?", None),
    "mixed_precision": ("str", "no"),
    # schedule
    "scheduler": ("str", "multi-step"),
    "milestones": ("int_list", [30, 80, 100]),
    "gamma": ("float?", None),
    "min_lr": ("float?", None),
    "lr_power": ("float", 0.9),
    "num_warn_up": ("int", 0),
    # run
    "work_dir": ("str", "work_space"),
    "run_name": ("str?", None),
    "seed": ("int", 0),
    "gpu_id": ("int_list", [0]),
    "distributed": ("bool", False),
    "num_processes": ("int", 0),
    "main_process_port": ("int", 29500),
    "log_freq": ("int", 20),
    "progress": ("bool", True),
    "eval_only": ("bool", False),
    "monitor": ("str", "test/top1"),
    "monitor_mode": ("str", "max"),
    "early_stop_patience": ("int", 0),
    "early_stop_min_delta": ("float", 0.0),
    "resume": ("str?", None),
    "save_steps": ("int", 0),
    "keep_checkpoints": ("int", 2),
    # pruning
    "use_prune": ("bool", False),
    "prune_method": ("str", "l1"),
    "prune_ratio": ("float", 0.5),
    "prune_global": ("bool", False),
    "prune_steps": ("int", 1),
    "prune_ignore": ("str_list", []),
    "prune_backend": ("str", "torch-pruning"),
    "round_to": ("int", 8),
    "slim_reg": ("float", 0.0),
}

DEFAULTS: dict[str, Any] = {key: default for key, (_, default) in SCHEMA.items()}

CHOICES = {
    "optim_type": ("SGD", "Adam", "AdamW"),
    "loss_type": ("CrossEntropyLoss", "CELoss", "LabelSmoothing", "FocalLoss"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "monitor_mode": ("max", "min"),
    "resample": ("none", "mean", "sqrt", "log"),
    "prune_method": ("l1", "l2", "fpgm", "slim"),
    "prune_backend": ("torch-pruning", "nni"),
}

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


class ConfigError(ValueError):
    """Bad user input: the message says what was wrong and where."""


class Config(dict):
    """A dict whose keys also read as attributes (``cfg.lr``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


def nearest_key(key: str, valid: list[str] | tuple[str, ...]) -> str:
    """A hint naming the closest valid key, or all of them when none is close."""
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if close:
        return f"did you mean {close[0]!r}?"
    return "valid keys: " + ", ".join(sorted(valid))


def _coerce(key: str, value: Any, where: str) -> Any:
    """Check ``value`` against the schema of ``key``; convert CLI strings; raise if wrong."""
    kind, _ = SCHEMA[key]
    optional = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None and optional:
        return None
    expected = {
        "int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
        "bool_or_str": "true, false or a file path", "paths": "a path or a list of paths",
        "int_list": "a list of integers", "float_list": "a list of numbers",
        "str_list": "a list of strings",
    }[kind] + (" or null" if optional else "")

    def wrong() -> ConfigError:
        return ConfigError(f"{where}: key {key!r} has value {value!r}; expected {expected}")

    def as_bool(item: Any) -> bool:
        if isinstance(item, bool):
            return item
        if isinstance(item, str) and item.lower() in _TRUE | _FALSE:
            return item.lower() in _TRUE
        raise wrong()

    def as_int(item: Any) -> int:
        if isinstance(item, bool):
            raise wrong()
        if isinstance(item, int):
            return item
        if isinstance(item, str):
            try:
                return int(item)
            except ValueError:
                raise wrong() from None
        raise wrong()

    def as_float(item: Any) -> float:
        if isinstance(item, bool):
            raise wrong()
        if isinstance(item, (int, float)):
            return float(item)
        if isinstance(item, str):
            try:
                return float(item)
            except ValueError:
                raise wrong() from None
        raise wrong()

    def as_list(item: Any) -> list:
        if isinstance(item, (list, tuple)):
            return list(item)
        if isinstance(item, str) and "," in item:
            return [part.strip() for part in item.split(",") if part.strip()]
        return [item]

    if isinstance(value, str) and optional and value.lower() in ("null", "none", "~"):
        return None
    if kind == "int":
        return as_int(value)
    if kind == "float":
        return as_float(value)
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
        return [as_int(item) for item in as_list(value)]
    if kind == "float_list":
        return [as_float(item) for item in as_list(value)]
    if kind == "str_list":
        items = as_list(value)
        if not all(isinstance(item, str) for item in items):
            raise wrong()
        return items
    raise AssertionError(kind)


def _check_values(cfg: Config) -> None:
    """Checks across keys and of allowed values, after types are right."""
    for key, choices in CHOICES.items():
        if cfg[key] not in choices:
            raise ConfigError(
                f"key {key!r} has value {cfg[key]!r}; expected one of {', '.join(choices)}"
            )
    if len(cfg.input_size) != 2 or min(cfg.input_size) < 1:
        raise ConfigError(f"key 'input_size' has value {cfg.input_size!r}; expected [W, H] > 0")
    for key in ("rgb_mean", "rgb_std"):
        if len(cfg[key]) != 3:
            raise ConfigError(f"key {key!r} has value {cfg[key]!r}; expected 3 numbers")
    for key in ("batch_size", "num_epochs", "grad_accum_steps", "log_freq", "keep_checkpoints"):
        if cfg[key] < 1:
            raise ConfigError(f"key {key!r} has value {cfg[key]!r}; expected an integer >= 1")
    if not 0.0 < cfg.prune_ratio < 1.0:
        raise ConfigError(f"key 'prune_ratio' has value {cfg.prune_ratio!r}; expected 0 < r < 1")
    if cfg.use_prune and cfg.prune_backend == "nni":
        import importlib.util

        if cfg.prune_global:
            raise ConfigError("key 'prune_global' is true, but prune_backend 'nni' prunes per "
                              "layer only; use prune_backend 'torch-pruning' for global pruning")
        if importlib.util.find_spec("nni") is None:
            raise ConfigError("key 'prune_backend' is 'nni', which is not installed; install "
                              'the extra with: pip install -e ".[nni]"')
    if cfg.lr <= 0:
        raise ConfigError(f"key 'lr' has value {cfg.lr!r}; expected a positive number")
    for key in ("train_data", "test_data"):
        paths = cfg[key] if isinstance(cfg[key], list) else [cfg[key]]
        for path in paths:
            if path is not None and not Path(path).exists():
                raise ConfigError(f"key {key!r}: data path {path!r} does not exist")
    for key in ("model_file", "pretrained"):
        if cfg[key] and not Path(cfg[key]).is_file():
            raise ConfigError(f"key {key!r}: file {cfg[key]!r} does not exist")
    if isinstance(cfg.finetune, str) and not Path(cfg.finetune).is_file():
        raise ConfigError(f"key 'finetune': file {cfg.finetune!r} does not exist")


def read_yaml(path: str | Path) -> dict:
    """Read a config YAML with ``safe_load``; every key is checked against the schema."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    for key in data:
        if key not in SCHEMA:
            raise ConfigError(
                f"config file {str(path)!r}: unknown key {key!r}; " + nearest_key(key, list(SCHEMA))
            )
    return data


def build_parser() -> argparse.ArgumentParser:
    """One flag per config key; untyped flags stay absent so they never override YAML."""
    parser = argparse.ArgumentParser(
        description="pbt training run. Flags override the YAML file given with -c.",
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    parser.add_argument("-c", "--config_file", help="YAML config file")
    for key, (kind, default) in SCHEMA.items():
        base = kind.rstrip("?")
        if base in ("paths", "int_list", "float_list", "str_list"):
            parser.add_argument(f"--{key}", nargs="+", metavar="V", help=f"default {default}")
        elif base in ("bool", "bool_or_str"):
            parser.add_argument(f"--{key}", nargs="?", const="true", metavar="BOOL",
                                help=f"default {default}")
        else:
            parser.add_argument(f"--{key}", metavar="V", help=f"default {default}")
    return parser


def load_config(argv: list[str] | None = None, default_file: str | Path | None = None,
                **overrides: Any) -> Config:
    """Resolve defaults < YAML < command line < ``overrides``; raise ConfigError if bad.

    ``default_file`` is the YAML used when the command line names none (a recipe's own).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if default_file is not None and getattr(args, "config_file", None) is None:
        args.config_file = str(default_file)
    for token in unknown:
        if token.startswith("-"):
            name = token.lstrip("-").split("=")[0]
            raise ConfigError(
                f"command line: unknown flag {token!r}; "
                + nearest_key(name, list(SCHEMA)).replace("'", "'--", 1)
            )
        raise ConfigError(f"command line: unexpected argument {token!r}")
    typed = vars(args)
    cfg = Config(DEFAULTS)
    config_file = typed.pop("config_file", None)
    if config_file:
        for key, value in read_yaml(config_file).items():
            cfg[key] = _coerce(key, value, f"config file {config_file!r}")
    for key, value in typed.items():
        cfg[key] = _coerce(key, value, "command line")
    for key, value in overrides.items():
        if key not in SCHEMA:
            raise ConfigError(f"unknown key {key!r}; " + nearest_key(key, list(SCHEMA)))
        cfg[key] = _coerce(key, value, "override")
    if config_file:
        cfg["config_file"] = str(config_file)
    _check_values(cfg)
    return cfg


def parse_config(argv: list[str] | None = None,
                 default_file: str | Path | None = None) -> Config:
    """Command-line entry: like :func:`load_config`, but a bad input exits with one message."""
    try:
        return load_config(argv, default_file)
    except ConfigError as err:
        print(f"pbt: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config so ``-c path`` re-runs the same experiment."""
    import yaml

    data = {key: cfg[key] for key in SCHEMA}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))


def default_run_name(cfg: Config, stamp: str) -> str:
    """PBT-style run name: net type, input size, loss and a timestamp."""
    width, height = cfg.input_size
    return f"{cfg.net_type}_{width}_{height}_{cfg.loss_type}_{stamp}"

