"""A tiny real training run as a script, for tests that kill or signal a process.

    python tests/train_tiny.py [pbt flags] [--signal_at EPOCH BATCH SIGNAL]

``--signal_at`` makes the run send itself SIGNAL (KILL, TERM, INT) after that batch
(1-based epoch and batch), which is how the tests crash or preempt it at a known point.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import tiny_trainer_class  # noqa: E402

from pbt.callbacks import Callback  # noqa: E402
from pbt.config import parse_config  # noqa: E402
from pbt.engine import launch  # noqa: E402


class SignalAt(Callback):
    def __init__(self, epoch: int, batch: int, signame: str) -> None:
        self.epoch, self.batch, self.signum = epoch, batch, getattr(signal, "SIG" + signame)

    def on_batch_end(self, engine, logs):
        if (engine.epoch + 1, engine.batch_idx + 1) == (self.epoch, self.batch):
            os.kill(os.getpid(), self.signum)


if __name__ == "__main__":
    argv = sys.argv[1:]
    extra = []
    if "--signal_at" in argv:
        at = argv.index("--signal_at")
        epoch, batch, signame = argv[at + 1: at + 4]
        extra.append(SignalAt(int(epoch), int(batch), signame))
        del argv[at: at + 4]
    cfg = parse_config(argv)
    launch(lambda cfg: tiny_trainer_class()(cfg, extra).run(), cfg)
