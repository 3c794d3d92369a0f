"""The learning-rate range test ("LR finder", as in fastai and Lightning).

    python -m pbt.lr_find -c my.yaml                        # the classification recipe
    python -m pbt.lr_find --recipe my_script.py --steps 50 --end_lr 1

or ``--lr_find true`` on any trainer's command line (``EngineTrainer.run()`` then calls
:func:`lr_find` instead of training).

The sweep trains the real model on the real training data for up to ``num_steps``
optimizer steps while the lr grows exponentially from ``start_lr`` to ``end_lr``, records
the loss of each step and fastai's bias-corrected exponentially smoothed loss, and stops
early once the smoothed loss exceeds ``diverge`` × its best value or is not finite. Then
the model (parameters and buffers), the optimizer, the gradient scaler and every RNG are
restored exactly: the weights are bit-identical to before, nothing else is trained and no
callback runs (so no checkpoint, TensorBoard or summary file is written).

The suggested lr (``rule`` :data:`RULE`) is the lr where the smoothed loss falls fastest
against log(lr) (Lightning's rule): the first 10 % of the points and those after the
minimum of the smoothed loss are skipped. fastai's ``lr_min`` (the lr of the minimum
smoothed loss / 10) is recorded as ``min_loss_lr``. The run dir gets ``lr_find.json`` (the
curve and both values) and ``lr_find.png`` (loss vs lr, log axis, the suggestion marked).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pbt.config import ConfigError

if TYPE_CHECKING:  # torch is imported where used: a bad command line fails fast
    import torch

RULE = "steepest descent of the smoothed loss"
FALLBACK_RULE = "min loss / 10: too few points before the minimum for the steepest descent"
SKIP_BEGIN = 0.1  # share of the first points the steepest-descent rule ignores
OPTIONS = "lr_find_options"  # cfg entry (not a config key) the CLI passes its flags in
_END = object()


def lr_find(trainer: Any, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
            beta: float = 0.98, diverge: float = 4.0) -> dict:
    """Run the LR range test on a built trainer; leave its model and optimizer as they were.

    ``trainer.cfg[OPTIONS]`` (a dict set by ``python -m pbt.lr_find``), when present,
    overrides the arguments. Returns a summary: ``suggestion``, ``rule``, ``min_loss_lr``,
    ``lr`` (the config's), ``steps``, ``stopped_early``, ``run_dir``, ``json``, ``plot``...
    """
    from pbt.checkpoint import capture_rng, restore_rng, write_json_atomic

    options = {"start_lr": start_lr, "end_lr": end_lr, "num_steps": num_steps, "beta": beta,
               "diverge": diverge}
    options.update({k: v for k, v in (trainer.cfg.get(OPTIONS) or {}).items() if k in options})
    start_lr, end_lr = float(options["start_lr"]), float(options["end_lr"])
    num_steps, beta, diverge = int(options["num_steps"]), float(options["beta"]), \
        float(options["diverge"])
    check_options(start_lr, end_lr, num_steps, beta, diverge)

    accelerator, model, optimizer = trainer.accelerator, trainer.model, trainer.optimizer
    started = time.time()
    # the snapshot: weights and buffers on the CPU (no second copy on the GPU), the
    # optimizer's state (momentum, Adam moments) likewise, the scaler, every RNG
    model_state = {name: _cpu_copy(value) for name, value in
                   trainer.unwrapped_model.state_dict().items()}
    optimizer_state = _cpu_copy(optimizer.state_dict())
    scaler = getattr(accelerator, "scaler", None)
    scaler_state = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
    rng_state, loader_rng = capture_rng(), _loader_generators(trainer.train_loader)
    accelerate_step, was_training = accelerator.step, model.training
    start_epoch = int(getattr(trainer.train_loader, "iteration", trainer.epoch))
    # train_step fires callbacks (not set up for a sweep) and counts optimizer steps
    callbacks, global_step, trainer.callbacks = trainer.callbacks, trainer.global_step, []
    try:
        lrs, losses, stop = _sweep(trainer, start_lr, end_lr, num_steps, beta, diverge,
                                   start_epoch)
    finally:
        trainer.unwrapped_model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.load_state_dict(scaler_state)
        restore_rng(rng_state)
        for generator, state in loader_rng:
            generator.set_state(state)
        if hasattr(trainer.train_loader, "set_epoch"):
            trainer.train_loader.set_epoch(start_epoch)
        accelerator.step = accelerate_step
        model.train(was_training)
        trainer.callbacks, trainer.global_step = callbacks, global_step
        trainer.outputs = trainer.losses = trainer.loss = None

    smoothed = smooth(losses, beta)
    suggestion, rule = suggest_lr(lrs, smoothed)
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__) if smoothed else None
    stopped_at, attempted = None, len(lrs) + (stop == "not_finite")
    if stop is not None:
        stopped_at = lrs[-1] if stop == "diverged" else _lr_at(start_lr, end_lr, num_steps,
                                                               len(lrs))
    run_dir = Path(trainer.run_dir)
    result = {
        "suggestion": suggestion, "rule": rule,
        "min_loss_lr": lrs[lowest] / 10 if lowest is not None else None,
        "lr_at_min_loss": lrs[lowest] if lowest is not None else None,
        "lr": float(trainer.cfg.lr), "start_lr": start_lr, "end_lr": end_lr,
        "num_steps": num_steps, "steps": len(lrs), "beta": beta, "diverge": diverge,
        "stopped_early": stop is not None and attempted < num_steps, "diverged": stop is not None,
        "stop_reason": {None: None, "diverged": f"smoothed loss above {diverge:g} x its best",
                        "not_finite": "loss not finite"}[stop],
        "diverged_at_lr": stopped_at, "world_size": accelerator.num_processes,
        "seconds": round(time.time() - started, 2),
        "lrs": lrs, "losses": losses, "smoothed": smoothed,
    }
    json_path, plot_path = run_dir / "lr_find.json", run_dir / "lr_find.png"
    if accelerator.is_main_process:
        write_json_atomic(json_path, result)
        plot(result, plot_path)
        where = "" if stop is None else (
            f"; {'stopped early' if result['stopped_early'] else 'diverged'} at lr "
            f"{stopped_at:.3g} ({result['stop_reason']})")
        found = (f"suggested lr {suggestion:.3g} ({rule})" if suggestion is not None
                 else "no suggestion (the loss was not finite at the first lr)")
        trainer.log(f"lr_find: {found}; the config's lr is {float(trainer.cfg.lr):g}; "
                    f"{len(lrs)} of {num_steps} steps{where}; plot: {plot_path}")
    accelerator.wait_for_everyone()
    summary = {key: value for key, value in result.items()
               if key not in ("lrs", "losses", "smoothed")}
    return {**summary, "run_dir": str(run_dir), "json": str(json_path), "plot": str(plot_path)}


def check_options(start_lr: float, end_lr: float, num_steps: int, beta: float,
                  diverge: float) -> None:
    """Raise ConfigError naming the first bad sweep setting."""
    if not 0 < start_lr < end_lr or not math.isfinite(end_lr):
        raise ConfigError(f"lr_find: start_lr {start_lr:g} and end_lr {end_lr:g} must satisfy "
                          "0 < start_lr < end_lr")
    if num_steps < 2:
        raise ConfigError(f"lr_find: steps must be at least 2, got {num_steps}")
    if not 0 <= beta < 1:
        raise ConfigError(f"lr_find: beta must be in [0, 1), got {beta:g}")
    if not diverge > 1:
        raise ConfigError(f"lr_find: diverge must be > 1, got {diverge:g}")


def _lr_at(start_lr: float, end_lr: float, num_steps: int, step: int) -> float:
    return start_lr * (end_lr / start_lr) ** (step / (num_steps - 1))


def _sweep(trainer: Any, start_lr: float, end_lr: float, num_steps: int, beta: float,
           diverge: float, start_epoch: int) -> tuple[list[float], list[float], str | None]:
    """The training steps of the sweep: ``(lrs, losses, stop reason or None)``, the reason
    ``"diverged"`` (the last point recorded) or ``"not_finite"`` (the point not recorded).
    One point is one optimizer step (``grad_accum_steps`` batches, their mean loss)."""
    import torch

    accelerator, model, optimizer = trainer.accelerator, trainer.model, trainer.optimizer
    loader = trainer.train_loader
    average, best = 0.0, math.inf
    lrs: list[float] = []
    losses: list[float] = []
    micro: list[torch.Tensor] = []
    mixer = getattr(trainer, "batch_mixer", None)  # mixup / CutMix, as training mixes
    epoch, batches, got_batch, batch_index = start_epoch, None, False, 0
    model.train()
    try:
        while len(lrs) < num_steps:
            if batches is None:  # the next epoch of the training data
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch)
                batches, got_batch, batch_index = iter(loader), False, 0
            batch = next(batches, _END)
            if batch is _END:
                if not got_batch:
                    raise ConfigError("lr_find: the training loader yields no batches")
                batches, epoch = None, epoch + 1
                continue
            got_batch = True
            if mixer is not None:
                batch = mixer(batch, epoch, batch_index)
            batch_index += 1
            lr = _lr_at(start_lr, end_lr, num_steps, len(lrs))
            for group in optimizer.param_groups:
                group["lr"] = lr
            trainer.train_step(batch)  # the engine's own step (lr_find has set no callbacks)
            micro.append(trainer.loss.detach().float())
            if not accelerator.sync_gradients:
                continue
            value = torch.stack(micro).mean()
            micro = []
            if accelerator.num_processes > 1:  # every rank sees the same value and stops alike
                value = accelerator.reduce(value, reduction="mean")
            value = float(value.item())
            average = beta * average + (1 - beta) * value  # as smooth() computes it
            smoothed = average / (1 - beta ** (len(lrs) + 1))
            if not math.isfinite(value) or not math.isfinite(smoothed):
                return lrs, losses, "not_finite"
            lrs.append(lr)
            losses.append(value)
            best = min(best, smoothed)
            if smoothed > diverge * best:
                return lrs, losses, "diverged"
    finally:
        if batches is not None:  # an epoch left unfinished
            if hasattr(batches, "close"):  # a generator (Accelerate's loaders)
                batches.close()
            if hasattr(loader, "end"):  # Accelerate's loader: out of its gradient state
                loader.end()
    return lrs, losses, None


def smooth(losses: list[float], beta: float = 0.98) -> list[float]:
    """fastai's bias-corrected exponential moving average of ``losses``."""
    average, out = 0.0, []
    for count, loss in enumerate(losses, start=1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** count))
    return out


def suggest_lr(lrs: list[float], smoothed: list[float]) -> tuple[float | None, str]:
    """``(lr, rule)``: the point before the minimum of ``smoothed`` where it falls fastest
    against log(lr), the first 10 % of the points skipped (:data:`RULE`; slopes are central
    differences, one-sided at the first point); with no point left before the minimum,
    fastai's lr of the minimum / 10 (:data:`FALLBACK_RULE`); None for an empty curve."""
    if not smoothed:
        return None, "none (no finite loss)"
    lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
    first = int(len(smoothed) * SKIP_BEGIN)
    if first >= lowest:  # the minimum comes early: look at everything before it
        first = 0
    if first >= lowest:
        return lrs[lowest] / 10, FALLBACK_RULE
    xs = [math.log(lr) for lr in lrs]

    def slope(i: int) -> float:
        left, right = max(i - 1, first), i + 1  # right <= lowest: inside the window
        return (smoothed[right] - smoothed[left]) / (xs[right] - xs[left])

    steepest = min(range(first, lowest), key=slope)
    return lrs[steepest], RULE


def plot(result: dict, path: Path) -> None:
    """``lr_find.png``: raw and smoothed loss against lr (log axis), the suggestion and
    fastai's min-loss / 10 marked. Written under a temporary name, then renamed."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    lrs, losses, smoothed = result["lrs"], result["losses"], result["smoothed"]
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        if lrs:
            axes.plot(lrs, losses, color="0.75", linewidth=1, label="loss")
            axes.plot(lrs, smoothed, color="C0", linewidth=2, label="smoothed loss")
            lowest = min(range(len(smoothed)), key=smoothed.__getitem__)
            top = max(smoothed[:lowest + 1])
            bottom = min(min(losses), smoothed[lowest])
            axes.set_ylim(bottom - 0.05 * (top - bottom), top + 0.25 * (top - bottom) + 1e-12)
        if result["suggestion"] is not None:
            axes.axvline(result["suggestion"], color="C3", linestyle="--",
                         label=f"suggestion {result['suggestion']:.3g}")
            if result["suggestion"] in lrs:  # the fallback rule's lr is not a swept point
                index = lrs.index(result["suggestion"])
                axes.plot([lrs[index]], [smoothed[index]], "o", color="C3")
        if result["min_loss_lr"] is not None:
            axes.axvline(result["min_loss_lr"], color="C2", linestyle=":",
                         label=f"min loss / 10: {result['min_loss_lr']:.3g}")
        axes.axvline(result["lr"], color="0.4", linestyle="-.", linewidth=1,
                     label=f"config lr {result['lr']:g}")
        axes.set_xscale("log")
        axes.set_xlabel("learning rate (log scale)")
        axes.set_ylabel("training loss")
        axes.set_title(f"LR range test: {result['rule']}", fontsize=10)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        tmp = path.with_name(path.name + ".tmp")
        figure.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(figure)


def _cpu_copy(value: Any) -> Any:
    """A deep copy with every tensor cloned to the CPU (exact: no dtype change)."""
    import torch

    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return type(value)((key, _cpu_copy(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return copy.deepcopy(value)


def _loader_generators(loader: Any) -> list[tuple[torch.Generator, torch.Tensor]]:
    """The loader's own generators (worker seeds are drawn from them per epoch) and their
    states, so the sweep leaves the next epoch's workers seeded as they would have been."""
    import torch

    found = []
    for holder in (loader, getattr(loader, "base_dataloader", None)):
        for name in ("generator", "synchronized_generator"):
            generator = getattr(holder, name, None)
            if isinstance(generator, torch.Generator) and \
                    all(generator is not seen for seen, _ in found):
                found.append((generator, generator.get_state()))
    return found


# -- command line --------------------------------------------------------------------------
def default_recipe() -> Path:
    """``recipes/classification.py`` of the checkout pbt is installed from."""
    import pbt

    return Path(pbt.__file__).resolve().parents[1] / "recipes" / "classification.py"


def load_recipe(path: str | Path) -> ModuleType:
    """Import a recipe / training script by path (its ``__main__`` block does not run)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist")
    name = f"pbt_lr_find_recipe_{path.stem}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    if str(path.parent) not in sys.path:  # as `python recipe.py` would: its folder imports
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"recipe file {str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise ConfigError(f"recipe file {str(path)!r} has no main(cfg) function to run")
    return module


def run_recipe(cfg: Any) -> Any:
    """``main(cfg)`` of the recipe named in ``cfg[OPTIONS]["recipe"]`` (top level, so DDP
    workers started by :func:`pbt.launch.launch` can unpickle it)."""
    return load_recipe(cfg[OPTIONS]["recipe"]).main(cfg)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pbt.lr_find", add_help=False, allow_abbrev=False,
        description="LR range test: sweep the lr exponentially on the recipe's model and "
        "data, write lr_find.json and lr_find.png to a run dir, suggest an lr; the weights "
        "are left untouched. Every other flag is the recipe's config (-c, --lr, ...).")
    parser.add_argument("--recipe", help="training script with main(cfg) and KEYS "
                        "(default: recipes/classification.py of the pbt checkout)")
    parser.add_argument("--start_lr", type=float, default=1e-7, help="first lr (1e-7)")
    parser.add_argument("--end_lr", type=float, default=10.0, help="last lr (10)")
    parser.add_argument("--steps", type=int, default=100,
                        help="optimizer steps of the sweep at most (100)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """The command line: ``python -m pbt.lr_find [-c cfg.yaml] [--recipe PATH]
    [--start_lr X] [--end_lr Y] [--steps N] [config flags]``."""
    from pbt.config import parse_config

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nconfig flags (of the recipe):\n")
    ours, rest = parser.parse_known_args(argv)
    try:
        check_options(ours.start_lr, ours.end_lr, ours.steps, 0.98, 4.0)
        recipe = Path(ours.recipe) if ours.recipe else default_recipe()
        if not ours.recipe and not recipe.is_file():
            raise ConfigError(f"the default recipe {str(recipe)!r} does not exist (pbt is not "
                              "installed from a repo checkout); pass --recipe PATH")
        module = load_recipe(recipe)
    except ConfigError as err:
        print(f"pbt.lr_find: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    from pbt.launch import launch

    default_file = recipe.with_suffix(".yaml")  # as the recipe's own __main__ does
    cfg = parse_config(rest, default_file=default_file if default_file.is_file() else None,
                       keys=getattr(module, "KEYS", ()))
    cfg.lr_find = True
    if not cfg.run_name and not cfg.flag:  # the generated run dir name says what it holds
        cfg.flag = "lr_find"
    cfg[OPTIONS] = {"recipe": str(recipe.resolve()), "start_lr": ours.start_lr,
                    "end_lr": ours.end_lr, "num_steps": ours.steps}
    # pbt.lr_find's own function, not __main__'s: spawned DDP workers import it by name
    return launch(importlib.import_module("pbt.lr_find").run_recipe, cfg)


if __name__ == "__main__":
    main()
