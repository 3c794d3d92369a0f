"""``launch(main, cfg)``: run ``main`` in this process, or start DDP workers (PBT's
``engine/launch.py``). Bad input and stopped training end with one message and an exit code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from pbt.callbacks import TrainingError
from pbt.config import Config, ConfigError, load_config

logger = logging.getLogger("pbt")

# PBT's launch(main, num_gpus_per_machine=..., dist_url=..., args=(cfg,)) keywords: the
# process count comes from gpu_id / num_processes / the launcher, so these are not needed.
_PBT_LAUNCH_KEYWORDS = ("num_gpus_per_machine", "num_machines", "machine_rank", "dist_url",
                        "distributed")


def launch(main: Callable[[Config], Any], cfg: Config | None = None,
           args: tuple | None = None, **pbt_keywords: Any) -> Any:
    """Run ``main(cfg)`` in this process or as DDP workers; bad input and stopped training
    end with one message and an exit code.

    ``cfg`` defaults to the command line (``-c file.yaml`` and flags). Under a launcher
    (``accelerate launch``, ``torchrun``, ``mpirun``) this process is one worker and runs
    ``main`` itself. Otherwise pbt starts the workers on this machine with torch's elastic
    launcher: one per GPU listed in ``gpu_id`` (``CUDA_VISIBLE_DEVICES`` is set from it),
    or, without CUDA, ``num_processes`` CPU workers on gloo. Several GPUs always mean DDP,
    whatever ``distributed`` says (pbt has no DataParallel mode). When a worker dies the
    others are stopped and the job exits non-zero, naming the failed rank.
    """
    unknown = set(pbt_keywords) - set(_PBT_LAUNCH_KEYWORDS)
    if unknown:
        raise TypeError(f"launch() got unexpected keyword(s) {sorted(unknown)}")
    if cfg is None and args:  # PBT: launch(main, ..., args=(cfg,))
        cfg = args[0]
    try:
        if cfg is None:
            cfg = load_config()
        if launched_world_size(os.environ) is not None:
            return _run_main(main, cfg)
        visible = select_gpus(cfg.gpu_id, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if visible is not None:  # before anything asks CUDA for its devices
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
        num_processes, note = plan_processes(cfg, torch.cuda.device_count())
        if note:
            print(f"pbt: {note}", flush=True)
        if num_processes == 1:
            return _run_main(main, cfg)
        return _start_workers(main, cfg, num_processes)
    except ConfigError as err:
        print(f"pbt: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def launched_world_size(env: Any) -> int | None:
    """The world size a launcher gave this process (torchrun / accelerate / MPI), else None."""
    for key in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        if env.get(key):
            return int(env[key])
    return None


def select_gpus(gpu_id: list[int], visible: str | None) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` for ``gpu_id``: the ids themselves, or, when the variable is
    already set, the listed positions in it (so ``gpu_id`` counts the devices you can see).
    None when it is set to nothing (CUDA hidden: nothing to select)."""
    if len(set(gpu_id)) != len(gpu_id) or min(gpu_id, default=0) < 0:
        raise ConfigError(f"key 'gpu_id' has value {gpu_id!r}; expected distinct device ids >= 0")
    if visible is None:
        return ",".join(str(i) for i in gpu_id)
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    if not devices:
        return None
    if max(gpu_id) >= len(devices):
        raise ConfigError(f"key 'gpu_id' has value {gpu_id!r}, but CUDA_VISIBLE_DEVICES="
                          f"{visible!r} makes only {len(devices)} device(s) visible "
                          f"(ids 0..{len(devices) - 1})")
    return ",".join(devices[i] for i in gpu_id)


def plan_processes(cfg: Config, cuda_devices: int) -> tuple[int, str | None]:
    """How many workers to start on this machine, and a note for the user (or None).

    With CUDA: one per ``gpu_id`` entry (``cuda_devices`` is what ``CUDA_VISIBLE_DEVICES``
    from :func:`select_gpus` left visible). Without: ``num_processes`` (0 = 1) on CPU.
    """
    gpu_id, wanted = list(cfg.gpu_id), int(cfg.num_processes)
    if cuda_devices == 0:
        note = None
        if len(gpu_id) > 1:
            note = (f"no CUDA device visible: gpu_id {gpu_id} is ignored "
                    "(--num_processes N starts N CPU workers)")
        return max(wanted, 1), note
    if cuda_devices < len(gpu_id):
        raise ConfigError(f"key 'gpu_id' has value {gpu_id!r}, but only {cuda_devices} of these "
                          "CUDA devices exist")
    if wanted not in (0, len(gpu_id)):
        raise ConfigError(f"key 'num_processes' has value {wanted!r}, but gpu_id {gpu_id} lists "
                          f"{len(gpu_id)} GPU(s); pbt starts one process per listed GPU")
    note = None
    if len(gpu_id) > 1 and not cfg.distributed:
        note = (f"distributed: false, but gpu_id lists {len(gpu_id)} GPUs: training with DDP, "
                "one process per GPU (pbt has no DataParallel mode; PyTorch recommends DDP)")
    return len(gpu_id), note


def _run_main(main: Callable[[Config], Any], cfg: Config) -> Any:
    """``main(cfg)`` in this process; with several processes each says it is up first."""
    import socket

    world = launched_world_size(os.environ) or 1
    rank = next((os.environ[k] for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
                 if os.environ.get(k)), "0")
    where = f" (rank {rank})" if world > 1 else ""
    if world > 1:
        print(f"pbt: rank {rank}/{world} ready (pid {os.getpid()}, host {socket.gethostname()})",
              flush=True)
    try:
        return main(cfg)
    except ConfigError as err:
        print(f"pbt: error{where}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except TrainingError as err:
        print(f"pbt: stopped{where}: {err}", file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt as err:  # Ctrl-C outside the engine's loop, or a second one
        print(f"pbt: stopped{where}: {err or 'Ctrl-C'}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except Exception as err:
        if world == 1 or not _lost_a_peer(err):
            raise
        # another rank died: the launcher names it; a collective's traceback adds nothing
        reason = next((line for line in str(err).splitlines() if line.strip()),
                      type(err).__name__).split(". ")[0]
        print(f"pbt: rank {rank} stopped: lost contact with another process of the job "
              f"({reason.strip()[:160]})", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _lost_a_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another process is gone."""
    dist_error = getattr(torch.distributed, "DistError", ())
    markers = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    return isinstance(err, dist_error) or any(marker in str(err) for marker in markers)


def _start_workers(main: Callable[[Config], Any], cfg: Config, num_processes: int) -> Any:
    """Start ``num_processes`` workers on this machine (torch elastic, no restarts) and
    return rank 0's result; any failed worker stops them all and exits non-zero."""
    import shutil
    import uuid

    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # as torchrun does: N processes x all cores each would oversubscribe the CPU
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    on_gpu = torch.cuda.device_count() > 0
    where = f"GPUs {os.environ['CUDA_VISIBLE_DEVICES']} (nccl)" if on_gpu else "CPU (gloo)"
    print(f"pbt: starting {num_processes} DDP worker processes on {where}; batch_size "
          f"{cfg.batch_size} is per process", flush=True)
    port = int(cfg.main_process_port)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=num_processes, run_id=uuid.uuid4().hex,
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}",
        # is_host: a busy port is an error, never a silent join of another job's store
        rdzv_configs={"is_host": True}, max_restarts=0, start_method="spawn",
        # Ctrl-C reaches the workers from the terminal; the agent then sends SIGTERM, not a
        # second SIGINT (which would abort their resumable save)
        signals_to_handle="SIGTERM,SIGHUP,SIGQUIT",
        logs_specs=DefaultLogsSpecs(),  # a temporary dir for the workers' error files
    )
    # pbt names each failed worker below; torch's own log lines would add a traceback
    quiet = [logging.getLogger(name) for name in ("torch.distributed.elastic",
                                                  "torch.multiprocessing.spawn")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, _run_main)(main, cfg)
    except RendezvousError as err:
        reason = str(err.__cause__ or err).split(". ")[-1]  # e.g. "... address already in use"
        raise ConfigError(f"key 'main_process_port': cannot listen on 127.0.0.1:{port} "
                          f"({reason}); pass --main_process_port 0 to use any free port") from None
    except ChildFailedError as err:
        failures = sorted(err.failures.items())
        for rank, failure in failures:
            how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
                   else f"exited with code {failure.exitcode}")
            # an uncaught exception leaves an error file: {"message": "ValueError: ...", ...}
            error = failure.message.get("message") if isinstance(failure.message, dict) else None
            print(f"pbt: worker rank {rank} (pid {failure.pid}) {how}"
                  + (f": {str(error).strip().splitlines()[-1]}" if error else ""), file=sys.stderr)
        print(f"pbt: stopped all {num_processes} workers; checkpoints already saved in the run "
              "dir are intact", file=sys.stderr, flush=True)
        codes = [failure.exitcode for _, failure in failures if failure.exitcode > 0]
        raise SystemExit(max(codes, default=1)) from None
    except SignalException as err:
        print(f"pbt: {err.sigval.name} received; all workers were stopped", file=sys.stderr)
        raise SystemExit(128 + int(err.sigval)) from None
    except KeyboardInterrupt:
        print("pbt: SIGINT received; all workers were stopped", file=sys.stderr)
        raise SystemExit(130) from None
    finally:  # the error files were read into the failures above
        shutil.rmtree(config.logs_specs.root_log_dir, ignore_errors=True)
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return results[0]


def accelerator_settings(cfg: Config, env: Any) -> tuple[dict, list[str]]:
    """Accelerator arguments from pbt's config where set (else Accelerate's own settings
    apply: ``accelerate launch`` flags, ``accelerate config``, its environment), and a
    note for each setting where both are given and differ."""
    settings, notes = {}, []
    for key, arg, variable in (
            ("mixed_precision", "mixed_precision", "ACCELERATE_MIXED_PRECISION"),
            ("grad_accum_steps", "gradient_accumulation_steps",
             "ACCELERATE_GRADIENT_ACCUMULATION_STEPS")):
        ours, theirs = cfg.get(key), env.get(variable)
        if ours is None:
            continue
        settings[arg] = ours
        if theirs is not None and str(theirs) != str(ours):
            notes.append(f"{key}: pbt's config says {ours} and Accelerate's setting says "
                         f"{theirs}; pbt's config wins (leave {key} unset to use Accelerate's)")
    return settings, notes


class Preempted(TrainingError):
    """SIGINT / SIGTERM: a resumable state was saved; the message says how to resume."""

    def __init__(self, signum: int, run_dir: Path) -> None:
        import signal

        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received; a resumable state was saved in {run_dir}. Resume with the "
            f"same command plus: --resume {run_dir}")


class _LogFile(logging.FileHandler):
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """A full disk must not print a traceback per line: the console has the line."""


def setup_logging(log_file: Path | None = None) -> None:
    """Console + file logging for the ``pbt`` logger (called by the trainer, not at import).

    Without ``log_file`` records are also kept in memory, and written to the file once it
    is given, so the log holds everything printed before the run dir was safe to create.
    """
    from logging.handlers import MemoryHandler

    logger.setLevel(logging.INFO)
    logger.propagate = False
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    if not any(getattr(h, "_pbt_console", False) for h in logger.handlers):
        console = logging.StreamHandler(sys.stdout)
        console._pbt_console = True  # type: ignore[attr-defined]
        console.setFormatter(formatter)
        logger.addHandler(console)
    buffers = [h for h in logger.handlers if isinstance(h, MemoryHandler)]
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(handler)
        handler.close()
    if log_file is None:
        for buffer in buffers:
            logger.removeHandler(buffer)
        logger.addHandler(MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1))
        return
    file_handler = _LogFile(log_file)
    file_handler.setFormatter(formatter)
    for buffer in buffers:
        buffer.setTarget(file_handler)
        buffer.flush()
        logger.removeHandler(buffer)
        buffer.close()
    logger.addHandler(file_handler)


@contextlib.contextmanager
def stop_on_signals(trainer: Any) -> Iterator[None]:
    """SIGINT / SIGTERM set ``trainer.stop_signal``: the trainer finishes the step, saves a
    resumable state and raises :class:`Preempted`. A second Ctrl-C stops at once."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        if trainer.stop_signal is not None:
            if signum == signal.SIGINT and trainer.stop_signal == signal.SIGINT:
                raise KeyboardInterrupt(
                    "second Ctrl-C: stopped at once; the states saved before it are intact "
                    f"(--resume {trainer.run_dir})")
            return  # e.g. a launcher's SIGTERM after the Ctrl-C: keep the first signal
        trainer.stop_signal = signum
        trainer.log(f"{signal.Signals(signum).name}: saving a resumable state after this step")

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
