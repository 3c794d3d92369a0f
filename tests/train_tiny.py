"""A tiny real training run as a script, for tests that kill, signal or spread a process.

    python tests/train_tiny.py [pbt flags, e.g. --num_processes 2]

With ``PBT_SIGNAL_AT=EPOCH,BATCH,SIGNAL[,RANK]`` the run (or that rank) sends itself SIGNAL
(KILL, TERM, INT) after that batch (1-based), which is how tests crash or preempt it at a
known point.
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


def main(cfg: Config) -> dict:
    spec = os.environ.get("PBT_SIGNAL_AT")
    return tiny_trainer_class()(cfg, [SignalAt(spec)] if spec else []).run()


if __name__ == "__main__":
    launch(main, parse_config())
