"""A tiny real training run as a script, for tests that kill, signal or spread a process.

    python tests/train_tiny.py [pbt flags, e.g. --num_processes 2]

With ``PBT_SIGNAL_AT=EPOCH,BATCH,SIGNAL[,RANK]`` the run (or that rank) sends itself SIGNAL
(KILL, TERM, INT) after that batch (1-based), which is how tests crash or preempt it at a
known point. Faults inside saves, at a known point:

- ``PBT_KILL_AT_WRITE=N``: SIGKILL just before the N-th file a save writes (torch.save or
  safetensors, counted from the start of the run), so some files of it are on disk.
  ``N=0`` kills nothing and prints ``writes: <count>`` at the end.
- ``PBT_FSIZE_AT=EPOCH,BATCH,BYTES``: after that batch the kernel limits every file this
  process writes to BYTES (``ulimit -f``): the next larger write fails as on a full disk.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import tiny_trainer_class  # noqa: E402

from pbt.callbacks import Callback  # noqa: E402
from pbt.config import Config, parse_config  # noqa: E402
from pbt.launch import launch  # noqa: E402


class SignalAt(Callback):
    def __init__(self, spec: str) -> None:
        epoch, batch, name, *rank = spec.split(",")
        self.at, self.signum = (int(epoch), int(batch)), getattr(signal, "SIG" + name)
        self.rank = int(rank[0]) if rank else None

    def on_batch_end(self, batch, logs):
        mine = self.rank is None or self.rank == self.trainer.accelerator.process_index
        if mine and (self.trainer.epoch + 1, batch + 1) == self.at:
            os.kill(os.getpid(), self.signum)


class FileSizeLimitAt(Callback):
    def __init__(self, spec: str) -> None:
        epoch, batch, self.limit = (int(part) for part in spec.split(","))
        self.at = (epoch, batch)

    def on_batch_end(self, batch, logs):
        if (self.trainer.epoch + 1, batch + 1) == self.at:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (self.limit, resource.RLIM_INFINITY))


def kill_at_write(number: int) -> None:
    import accelerate.utils.other
    import torch

    count = [0]

    def counted(write):
        def wrapper(*args, **kwargs):
            count[0] += 1
            if count[0] == number:
                os.kill(os.getpid(), signal.SIGKILL)
            return write(*args, **kwargs)
        return wrapper

    torch.save = counted(torch.save)
    accelerate.utils.other.safe_save_file = counted(accelerate.utils.other.safe_save_file)
    if number == 0:
        import atexit

        atexit.register(lambda: print(f"writes: {count[0]}", flush=True))


def main(cfg: Config) -> dict:
    callbacks = []
    if os.environ.get("PBT_SIGNAL_AT"):
        callbacks.append(SignalAt(os.environ["PBT_SIGNAL_AT"]))
    if os.environ.get("PBT_FSIZE_AT"):
        callbacks.append(FileSizeLimitAt(os.environ["PBT_FSIZE_AT"]))
    if os.environ.get("PBT_KILL_AT_WRITE") is not None:
        kill_at_write(int(os.environ["PBT_KILL_AT_WRITE"]))
    return tiny_trainer_class()(cfg, callbacks).run()


if __name__ == "__main__":
    launch(main, parse_config())
