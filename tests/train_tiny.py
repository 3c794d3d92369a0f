"""A tiny real training run as a script, for tests that kill, signal or spread a process.

    python tests/train_tiny.py [pbt flags, e.g. --num_processes 2]

With ``PBT_SIGNAL_AT=EPOCH,BATCH,SIGNAL[,RANK]`` the run (or that rank) sends itself SIGNAL
(KILL, TERM, INT) after that batch (1-based), which is how tests crash or preempt it at a
known point. Faults inside saves, at a known point:

- ``PBT_KILL_AT_WRITE=N``: SIGKILL just before the N-th file a save writes (torch.save or
  safetensors, counted from the start of the run), so some files of it are on disk.
  ``N=0`` kills nothing and prints ``writes: <count>`` at the end.
- ``PBT_KILL_AT=POINT,N``: SIGKILL just before the N-th time a save reaches POINT: a file
  it writes by name (``model.safetensors``, ``optimizer.bin``, ``random_states_0.pkl``,
  ``pbt_rank_0.pt``, ``pbt_state.pt``, ``last.pth``, ``best.pth``), ``pbt-complete`` (the
  completion mark), ``rename`` (the state's folder moved into place) or ``rotate`` (an
  older state removed). Each state save reaches each of its points once, so N is the
  N-th state save (``KILL_POINTS`` lists a state's points, in order). ``N=0`` kills
  nothing and prints ``points: {POINT: count}`` at the end.
- ``PBT_KILL_AFTER_STATE=N``: SIGKILL as soon as the N-th resumable state is complete.
- ``PBT_SLOW_DISK=SECONDS``: a slow disk for weights files: moving a ``.pth`` file into
  place (the rename of an atomic write) first waits SECONDS.
- ``PBT_FSIZE_AT=EPOCH,BATCH,BYTES``: after that batch the kernel limits every file this
  process writes to BYTES (``ulimit -f``): the next larger write fails as on a full disk.

``PBT_TINY_IMAGES=1`` feeds the tiny trainer its samples as 2x4x4 images (each feature a
2x2 patch; the model averages the patches back first), so CutMix has boxes to paste.
``PBT_MIX_LOG=DIR``: each process appends ``epoch batch kind`` for every training batch to
``DIR/mix_rank<R>.txt``, kind read from the pixels the mixer changed: ``mixup`` (every pixel
of a mixed image blended), ``cutmix`` (a box of it replaced), ``unchanged`` or ``none``
(not mixed: integer labels).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import NoisyBlobs, tiny_trainer_class  # noqa: E402

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


def before_each_file_write(reached) -> None:
    """Call ``reached(file name)`` just before each file torch.save or safetensors writes
    (a temporary ``.tmp`` name counts as its final name)."""
    import accelerate.utils.other
    import torch

    torch.save = named(torch.save, reached, lambda a, k: a[1] if len(a) > 1 else k["f"])
    accelerate.utils.other.safe_save_file = named(
        accelerate.utils.other.safe_save_file, reached,
        lambda a, k: a[1] if len(a) > 1 else k["filename"])


def named(write, reached, where):
    """``write`` that first calls ``reached`` with the name ``where(args, kwargs)`` gives."""
    def wrapper(*args, **kwargs):
        reached(Path(str(where(args, kwargs))).name.removesuffix(".tmp"))
        return write(*args, **kwargs)
    return wrapper


def kill_at_write(number: int) -> None:
    count = [0]

    def reached(name: str) -> None:
        count[0] += 1
        if count[0] == number:
            os.kill(os.getpid(), signal.SIGKILL)

    before_each_file_write(reached)
    if number == 0:
        import atexit

        atexit.register(lambda: print(f"writes: {count[0]}", flush=True))


KILL_POINTS = ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "pbt_rank_0.pt",
               "pbt_state.pt", "pbt-complete", "rename", "rotate")


def kill_at(point: str, number: int) -> None:
    """Wrap the functions a save writes through, to die before ``point``'s N-th time."""
    import shutil

    import pbt.checkpoint

    seen: dict[str, int] = {}

    def reached(name: str) -> None:
        seen[name] = seen.get(name, 0) + 1
        if name == point and seen[name] == number:
            os.kill(os.getpid(), signal.SIGKILL)

    before_each_file_write(reached)
    pbt.checkpoint._write_mark = named(pbt.checkpoint._write_mark, reached,
                                       lambda a, k: pbt.checkpoint.COMPLETE_MARK)
    rename, rmtree = Path.rename, shutil.rmtree

    def renamed(self, target):
        if self.name.startswith(".tmp-step-"):
            reached("rename")
        return rename(self, target)

    def removed(path, *args, **kwargs):
        if Path(path).name.startswith("step-"):
            reached("rotate")
        return rmtree(path, *args, **kwargs)

    Path.rename, shutil.rmtree = renamed, removed
    if number == 0:  # count only: how often each point was reached
        import atexit

        atexit.register(lambda: print(f"points: {seen}", flush=True))


def kill_after_state(number: int) -> None:
    import pbt.checkpoint

    save_state, count = pbt.checkpoint.save_state, [0]

    def saved(*args, **kwargs):
        final = save_state(*args, **kwargs)
        count[0] += 1
        if count[0] == number:
            os.kill(os.getpid(), signal.SIGKILL)
        return final

    pbt.checkpoint.save_state = saved


def slow_disk(seconds: float) -> None:
    import time

    replace = os.replace

    def slow_replace(source, target):
        if str(target).endswith(".pth"):
            time.sleep(seconds)
        return replace(source, target)

    os.replace = slow_replace


class AsImages(NoisyBlobs):
    """NoisyBlobs whose 8 features are the 2x2 patches of a 2x4x4 image."""

    def __getitem__(self, index: int):
        x, label = super().__getitem__(index)
        return x.view(2, 2, 2).repeat_interleave(2, 1).repeat_interleave(2, 2), label


def image_trainer_class():
    from torch import nn

    class ImageTinyTrainer(tiny_trainer_class()):
        def build_train_loader(self, cfg):
            return self.build_dataloader(AsImages(self.train_size, 0, augment=True), train=True)

        def build_test_loader(self, cfg):
            return self.build_dataloader(AsImages(self.test_size, 1), train=False)

        def build_model(self, cfg):  # the average of a patch is its feature again
            return nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), *super().build_model(cfg))

    return ImageTinyTrainer


class MixLog:
    """Wraps a trainer's BatchMixer; records which kind of mixing each batch really got."""

    def __init__(self, mixer, folder: Path, rank: int) -> None:
        self.mixer, self.path = mixer, folder / f"mix_rank{rank}.txt"

    def __call__(self, batch, epoch, batch_index):
        mixed = self.mixer(batch, epoch, batch_index)
        if not mixed[1].is_floating_point():
            kind = "none"
        else:
            images, out = batch[0], mixed[0]
            # same[i, j, p]: pixel p (all channels) of mixed image i is image j's pixel p
            same = out[:, None] == images[None, :]
            same = (same.all(2) if same.ndim == 5 else same).flatten(2)
            moved = ~same.diagonal().T.all(1)  # images that are not all their own pixels
            pasted = same.any(1).all(1)  # every pixel some image's own: a box, not a blend
            kind = "unchanged" if not moved.any() else "cutmix" if pasted.all() else "mixup"
        with open(self.path, "a") as log:
            log.write(f"{epoch} {batch_index} {kind}\n")
        return mixed


def main(cfg: Config) -> dict:
    callbacks = []
    if os.environ.get("PBT_SIGNAL_AT"):
        callbacks.append(SignalAt(os.environ["PBT_SIGNAL_AT"]))
    if os.environ.get("PBT_FSIZE_AT"):
        callbacks.append(FileSizeLimitAt(os.environ["PBT_FSIZE_AT"]))
    if os.environ.get("PBT_KILL_AT_WRITE") is not None:
        kill_at_write(int(os.environ["PBT_KILL_AT_WRITE"]))
    if os.environ.get("PBT_KILL_AT"):
        point, number = os.environ["PBT_KILL_AT"].rsplit(",", 1)
        kill_at(point, int(number))
    if os.environ.get("PBT_KILL_AFTER_STATE"):
        kill_after_state(int(os.environ["PBT_KILL_AFTER_STATE"]))
    if os.environ.get("PBT_SLOW_DISK"):
        slow_disk(float(os.environ["PBT_SLOW_DISK"]))
    images = os.environ.get("PBT_TINY_IMAGES") == "1"
    trainer = (image_trainer_class() if images else tiny_trainer_class())(cfg, callbacks)
    if os.environ.get("PBT_MIX_LOG") and trainer.batch_mixer is not None:
        trainer.batch_mixer = MixLog(trainer.batch_mixer, Path(os.environ["PBT_MIX_LOG"]),
                                     trainer.accelerator.process_index)
    return trainer.run()


if __name__ == "__main__":
    launch(main, parse_config())
