"""Learning-rate schedules with linear warm-up, as callbacks that set the LR every step.

Each schedule is a pure function of the optimizer step about to be taken, so it is exact
after a resume, under gradient accumulation and with any number of processes: it never
counts hook calls. With ``S = trainer.steps_per_epoch`` (optimizer steps per epoch),
``E = trainer.num_epochs`` and ``N = E * S``:

- ``s = trainer.global_step + 1`` is the 1-based index of the upcoming optimizer step and
  ``t = (s - 1) / S`` its epoch as a float: step ``s`` lies in epoch ``(s - 1) // S``
  (0-based), and epoch ``k`` starts at step ``k * S + 1``.
- Warm-up lasts ``W = round(num_warn_up * S)`` steps: ``factor = s / W``, small but positive
  at step 1, exactly 1 at step ``W``, rising across epoch boundaries.
- After warm-up, ``p = (s - 1 - W) / (N - 1 - W)`` goes from 0 (first step after warm-up)
  to 1 (last step of training).

Each param group gets ``group["initial_lr"] * factor``; ``initial_lr`` is recorded once from
the group's ``lr`` and travels in the optimizer's state dict, so groups keep their own base.

Schedules (config name, aliases):

- ``multi-step`` (``multi_step``, ``MultiStepLR``): ``gamma ** k``, ``k`` = milestones
  ``<= (s - 1) // S``; milestone ``m`` first applies to epoch ``m`` (0-based), as in PBT.
  Milestones inside the warm-up apply when it ends. ``gamma`` defaults to 0.1.
- ``cosine`` (``CosineAnnealingLR``): ``m + (1 - m) * (1 + cos(pi * p)) / 2``; reaches the
  floor ``m = min_lr / lr`` exactly at the last step. ``min_lr`` defaults to ``lr / 100``.
- ``ExpLR`` (``exp``, ``ExponentialLR``): ``gamma ** (t - W / S)``, smooth, a factor
  ``gamma`` per epoch after warm-up. ``gamma`` defaults to 0.95.
- ``LambdaLR`` (``lambda``, ``poly``): from config (YAML holds no callables) a polynomial
  decay ``m + (1 - m) * (1 - p) ** lr_power`` reaching ``m = min_lr / lr`` at the last
  step; from Python, :class:`LambdaSchedule` takes any ``fn(t) -> factor``.

If ``min_lr`` is set it is a floor for every schedule after warm-up. The LR is never zero
or negative at any step.
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pbt.callbacks import Callback
from pbt.config import DEFAULTS, ConfigError

SCHEDULE_KEYS = ("scheduler", "lr", "num_epochs", "num_warn_up", "milestones", "gamma",
                 "min_lr", "lr_power")

SCHEDULER_NAMES = ("multi-step", "cosine", "ExpLR", "LambdaLR")

# Lookup is on the lower-cased name without "-" and "_", so "multi_step", "MultiStepLR"
# and "multistep" all resolve.
_ALIASES = {
    "multistep": "multi-step",
    "multisteplr": "multi-step",
    "cosine": "cosine",
    "cosineannealinglr": "cosine",
    "explr": "ExpLR",
    "exp": "ExpLR",
    "exponentiallr": "ExpLR",
    "lambdalr": "LambdaLR",
    "lambda": "LambdaLR",
    "poly": "LambdaLR",
}

# Guards the "never zero" promise when a steep decay underflows float64.
_MIN_FACTOR = 1e-12


class LRSchedule(Callback):
    """Base of the schedules: linear warm-up over ``num_warn_up`` epochs, then :meth:`decay`.

    ``min_factor`` is a floor on the factor after warm-up (``min_lr / lr``). The schedule
    holds no state of its own (everything follows from ``trainer.global_step``), so
    ``state_dict()`` is empty and a resumed run needs nothing but the optimizer's state.
    """

    def __init__(self, num_warn_up: float = 0, min_factor: float = 0.0) -> None:
        if num_warn_up < 0:
            raise ConfigError(f"key 'num_warn_up' has value {num_warn_up!r}; expected >= 0")
        if not 0.0 <= min_factor <= 1.0:
            raise ConfigError(f"min_factor {min_factor!r} must be between 0 and 1")
        self.num_warn_up = num_warn_up
        self.min_factor = min_factor

    def warmup_steps(self, steps_per_epoch: int) -> int:
        """Number of warm-up steps; at least one when ``num_warn_up > 0``."""
        if self.num_warn_up <= 0:
            return 0
        return max(1, round(self.num_warn_up * steps_per_epoch))

    def lr_factor(self, step: int, steps_per_epoch: int, num_epochs: int) -> float:
        """Factor on each group's base LR for 1-based optimizer step ``step``."""
        if steps_per_epoch < 1 or num_epochs < 1 or step < 1:
            raise ValueError(
                f"lr_factor needs step >= 1, steps_per_epoch >= 1 and num_epochs >= 1; got "
                f"step={step}, steps_per_epoch={steps_per_epoch}, num_epochs={num_epochs}"
            )
        warmup = self.warmup_steps(steps_per_epoch)
        if step <= warmup:
            return step / warmup
        factor = max(self.decay(step, steps_per_epoch, num_epochs), self.min_factor)
        return max(factor, _MIN_FACTOR)

    def decay(self, step: int, steps_per_epoch: int, num_epochs: int) -> float:
        """The factor after warm-up; subclasses define it."""
        raise NotImplementedError

    def progress(self, step: int, steps_per_epoch: int, num_epochs: int) -> float:
        """``p``: 0 at the first step after warm-up, 1 at the last step, clamped to [0, 1]."""
        warmup = self.warmup_steps(steps_per_epoch)
        span = num_epochs * steps_per_epoch - 1 - warmup
        if span <= 0:
            return 1.0
        return min(1.0, max(0.0, (step - 1 - warmup) / span))

    def _apply(self, logs: dict | None) -> None:
        trainer = self.trainer
        factor = self.lr_factor(trainer.global_step + 1, trainer.steps_per_epoch,
                                trainer.num_epochs)
        groups = trainer.optimizer.param_groups
        for group in groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * factor
        if logs is not None and groups:
            logs["lr"] = groups[0]["lr"]

    def on_train_begin(self, logs: dict) -> None:
        # Also sets the first step's LR so whatever reads it before the first batch sees it.
        self._apply(logs)

    def on_batch_begin(self, batch: int, logs: dict) -> None:
        self._apply(logs)

    def state_dict(self) -> dict:
        """Empty: the LR follows from ``trainer.global_step`` and the groups' ``initial_lr``."""
        return {}


class MultiStepSchedule(LRSchedule):
    """``gamma ** k`` where ``k`` counts the milestones (epochs) reached by the step's epoch."""

    def __init__(self, milestones: Sequence[int], gamma: float = 0.1, num_warn_up: float = 0,
                 min_factor: float = 0.0) -> None:
        super().__init__(num_warn_up, min_factor)
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = gamma

    def decay(self, step: int, steps_per_epoch: int, num_epochs: int) -> float:
        epoch = (step - 1) // steps_per_epoch
        return self.gamma ** sum(1 for m in self.milestones if m <= epoch)


class CosineSchedule(LRSchedule):
    """Half a cosine from 1 after warm-up down to ``min_factor`` at the last step."""

    def decay(self, step: int, steps_per_epoch: int, num_epochs: int) -> float:
        p = self.progress(step, steps_per_epoch, num_epochs)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * p))


class ExpSchedule(LRSchedule):
    """``gamma ** (epochs since warm-up ended)``, updated every step."""

    def __init__(self, gamma: float = 0.95, num_warn_up: float = 0,
                 min_factor: float = 0.0) -> None:
        super().__init__(num_warn_up, min_factor)
        self.gamma = gamma

    def decay(self, step: int, steps_per_epoch: int, num_epochs: int) -> float:
        epochs = (step - 1 - self.warmup_steps(steps_per_epoch)) / steps_per_epoch
        return self.gamma ** epochs


class PolySchedule(LRSchedule):
    """``min_factor + (1 - min_factor) * (1 - p) ** power``: config's ``LambdaLR``."""

    def __init__(self, power: float = 0.9, num_warn_up: float = 0,
                 min_factor: float = 0.01) -> None:
        super().__init__(num_warn_up, min_factor)
        self.power = power

    def decay(self, step: int, steps_per_epoch: int, num_epochs: int) -> float:
        p = self.progress(step, steps_per_epoch, num_epochs)
        return self.min_factor + (1.0 - self.min_factor) * (1.0 - p) ** self.power


class LambdaSchedule(LRSchedule):
    """``fn(t)`` after warm-up, ``t`` the step's epoch as a float (0 at the first step)."""

    def __init__(self, fn: Callable[[float], float], num_warn_up: float = 0,
                 min_factor: float = 0.0) -> None:
        super().__init__(num_warn_up, min_factor)
        if not callable(fn):
            raise ConfigError(f"LambdaSchedule needs a callable fn(epoch) -> factor; got {fn!r}")
        self.fn = fn

    def decay(self, step: int, steps_per_epoch: int, num_epochs: int) -> float:
        t = (step - 1) / steps_per_epoch
        factor = self.fn(t)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (
            math.isfinite(factor) and factor > 0
        ):
            raise ConfigError(
                f"LambdaSchedule: fn({t!r}) returned {factor!r}; the LR factor must be a "
                "positive finite number"
            )
        return float(factor)


def scheduler_name(name: Any) -> str:
    """The canonical name (one of :data:`SCHEDULER_NAMES`) for ``name`` or an alias."""
    key = name.lower().replace("-", "").replace("_", "") if isinstance(name, str) else None
    if key not in _ALIASES:
        raise ConfigError(
            f"key 'scheduler' has value {name!r}; valid schedulers are "
            f"{', '.join(SCHEDULER_NAMES)} (aliases: multi_step, MultiStepLR, "
            "CosineAnnealingLR, exp, ExponentialLR, lambda, poly)"
        )
    return _ALIASES[key]


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    return cfg[key] if key in cfg else DEFAULTS[key]


def _number(cfg: Mapping[str, Any], key: str, *, integer: bool = False) -> Any:
    """The value of ``key`` as a finite number (YAML may hand over "1e-3" as a string)."""
    value = _get(cfg, key)
    expected = "an integer" if integer else "a number"
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            raise ConfigError(f"key {key!r} has value {value!r}; expected {expected}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
        value
    ) or (integer and value != int(value)):
        raise ConfigError(f"key {key!r} has value {value!r}; expected {expected}")
    return int(value) if integer else float(value)


def build_scheduler(cfg: Mapping[str, Any]) -> LRSchedule:
    """The schedule callback named by ``cfg["scheduler"]``; keys missing from ``cfg`` take
    their :data:`pbt.config.DEFAULTS`. Raises :class:`~pbt.config.ConfigError` naming the key
    and value when one is wrong.

    Keys: ``scheduler``, ``lr``, ``num_warn_up`` (epochs), ``num_epochs``, ``milestones``
    (epochs, multi-step), ``gamma`` (null: 0.1 for multi-step, 0.95 for ExpLR), ``min_lr``
    (null: ``lr / 100`` for cosine and LambdaLR, no floor otherwise), ``lr_power`` (LambdaLR).
    """
    name = scheduler_name(_get(cfg, "scheduler"))
    lr = _number(cfg, "lr")
    if lr <= 0:
        raise ConfigError(f"key 'lr' has value {lr!r}; expected a positive number")
    num_epochs = _number(cfg, "num_epochs", integer=True)
    if num_epochs < 1:
        raise ConfigError(f"key 'num_epochs' has value {num_epochs!r}; expected an integer >= 1")
    num_warn_up = _number(cfg, "num_warn_up")
    if num_warn_up < 0:
        raise ConfigError(f"key 'num_warn_up' has value {num_warn_up!r}; expected a number of "
                          "epochs >= 0")
    num_warn_up = min(num_warn_up, num_epochs)  # PBT configs warm up longer than short runs
    if _get(cfg, "min_lr") is None:
        min_factor = 0.01 if name in ("cosine", "LambdaLR") else 0.0
    else:
        min_lr = _number(cfg, "min_lr")
        if not 0 < min_lr <= lr:
            raise ConfigError(
                f"key 'min_lr' has value {min_lr!r}; expected a number > 0 and <= lr ({lr!r})"
            )
        min_factor = min_lr / lr
    gamma = None if _get(cfg, "gamma") is None else _number(cfg, "gamma")
    if gamma is not None and not 0 < gamma <= 1:
        raise ConfigError(f"key 'gamma' has value {gamma!r}; expected a number in (0, 1]")

    if name == "multi-step":
        milestones = _get(cfg, "milestones")
        if isinstance(milestones, (int, str)):
            milestones = [milestones]
        if not isinstance(milestones, (list, tuple)):
            raise ConfigError(
                f"key 'milestones' has value {milestones!r}; expected a list of epochs"
            )
        epochs = []
        for item in milestones:
            epoch = _number({"milestones": item}, "milestones", integer=True)
            if epoch < 0:
                raise ConfigError(
                    f"key 'milestones' has value {milestones!r}; epochs must be >= 0"
                )
            epochs.append(epoch)
        return MultiStepSchedule(epochs, 0.1 if gamma is None else gamma, num_warn_up,
                                 min_factor)
    if name == "cosine":
        return CosineSchedule(num_warn_up, min_factor)
    if name == "ExpLR":
        return ExpSchedule(0.95 if gamma is None else gamma, num_warn_up, min_factor)
    power = _number(cfg, "lr_power")
    if power <= 0:
        raise ConfigError(f"key 'lr_power' has value {power!r}; expected a positive number")
    return PolySchedule(power, num_warn_up, min_factor)


def lr_curve(cfg: Mapping[str, Any], steps_per_epoch: int) -> list[float]:
    """The LR of a group with base ``cfg["lr"]`` at every optimizer step 1..num_epochs*S."""
    schedule = build_scheduler(cfg)
    lr = _number(cfg, "lr")
    num_epochs = _number(cfg, "num_epochs", integer=True)
    total = num_epochs * steps_per_epoch
    return [lr * schedule.lr_factor(s, steps_per_epoch, num_epochs) for s in range(1, total + 1)]


def plot_lr(cfg: Mapping[str, Any], path: str | Path, steps_per_epoch: int,
            names: Sequence[str] | None = None) -> Path:
    """Draw LR against epoch (float) to a PNG, one curve per scheduler in ``names``
    (default: ``cfg["scheduler"]``, a name or a list of names)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if names is None:
        names = _get(cfg, "scheduler")
    if not isinstance(names, (list, tuple)):
        names = [names]
    if not names:
        raise ConfigError("key 'scheduler': no scheduler to plot")
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name in names:
        curve = lr_curve({**cfg, "scheduler": name}, steps_per_epoch)
        epochs = [s / steps_per_epoch for s in range(len(curve))]
        ax.plot(epochs, curve, label=scheduler_name(name))
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title(
        f"lr={_get(cfg, 'lr')}, num_warn_up={_get(cfg, 'num_warn_up')}, "
        f"num_epochs={_get(cfg, 'num_epochs')}, {steps_per_epoch} steps/epoch"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m pbt.schedulers -c cfg.yaml --plot lr.png [--steps-per-epoch N]``."""
    from pbt.config import read_yaml

    parser = argparse.ArgumentParser(
        prog="python -m pbt.schedulers",
        description="Plot the learning-rate schedule(s) of a config, LR against epoch.",
    )
    parser.add_argument("-c", "--config_file", help="YAML config (missing keys: defaults)")
    parser.add_argument("--plot", required=True, metavar="PNG", help="output image")
    parser.add_argument("--steps-per-epoch", type=int, default=100, metavar="N",
                        help="optimizer steps per epoch (default 100)")
    parser.add_argument("--scheduler", nargs="+", metavar="NAME",
                        help="scheduler(s) to draw instead of the config's")
    args = parser.parse_args(argv)
    try:
        if args.steps_per_epoch < 1:
            raise ConfigError(f"--steps-per-epoch {args.steps_per_epoch}; expected >= 1")
        cfg = dict(DEFAULTS)
        if args.config_file:
            data = read_yaml(args.config_file)
            # a recipe's YAML holds other keys too; only near-misses of schedule keys are errors
            for key in data:
                close = difflib.get_close_matches(str(key), SCHEDULE_KEYS, n=1, cutoff=0.75)
                if key not in DEFAULTS and close:
                    raise ConfigError(f"config file {args.config_file!r}: unknown key {key!r}; "
                                      f"did you mean {close[0]!r}?")
            cfg.update({k: v for k, v in data.items() if k in SCHEDULE_KEYS})
        names = args.scheduler or cfg["scheduler"]
        try:
            for name in names if isinstance(names, list) else [names]:
                build_scheduler({**cfg, "scheduler": name})
        except ConfigError as err:
            where = f"config file {args.config_file!r}" if args.config_file else "defaults"
            raise ConfigError(f"{where}: {err}") from None
        out = plot_lr(cfg, args.plot, args.steps_per_epoch, names)
    except ConfigError as err:
        print(f"pbt.schedulers: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
