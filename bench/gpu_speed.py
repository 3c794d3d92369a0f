"""GPU training speed: precision, channels_last and torch.compile, pbt's engine vs a
hand-written loop; then whether pbt's JPEG loader keeps the GPU busy.

    python bench/gpu_speed.py                     # one CUDA GPU: about 3-4 min on an H100
    python bench/gpu_speed.py --device cpu --smoke --skip_compile   # end-to-end check, no GPU

Phase 1 (time limit ``--phase1_limit``, 185 s): resnet50 at 224x224, batch 64, on ONE
synthetic batch (random images and labels generated once on the device and fed every step:
no loader, no host-to-device copy, so the numbers are the training step itself) for fp32,
bf16, bf16 + channels_last and bf16 + channels_last + torch.compile, each through

- a hand-written loop: ``torchvision`` model, ``model.to(memory_format=channels_last)`` and
  the input converted the same way, ``torch.compile(model)``, ``torch.autocast`` bf16
  around forward and loss, SGD (momentum 0.9, weight decay 5e-4);
- pbt's engine: the classification recipe's trainer with ``mixed_precision``,
  ``channels_last``, ``compile`` set, fed the same batch, with only a timer callback (no
  schedule, metrics, checkpoints or test epochs), timed between its optimizer steps.

The first ``--warmup`` steps are not timed; the first of them includes torch.compile's
compilation (forward and backward), and its time is shown as "first step". The hand-written
run goes first; the engine's compile may find the kernels of the first in the on-disk caches.
Prints a Markdown table: variant, hand img/s, engine img/s, engine / hand, speed-up vs
fp32 eager (each against its own fp32 row), first-step seconds, GPU utilisation.

Phase 2 (``--phase2_limit``, 60 s): resnet18 at 224x224, bf16 + channels_last, batch 64,
through pbt's engine, fed three ways: the on-device synthetic batch (no loader: what the
GPU can do), in-memory synthetic tensors through pbt's loader (collate, pin, copy; no
decoding), and ``--jpegs`` JPEG files (5,000 at 256x256, written first under a temp dir)
through the recipe's loader (``build_dataset``, the default train transforms:
RandomResizedCrop 224 + flip + normalise, ``build_dataloader`` with pbt's default worker
count unless ``--workers``; the 150 timed steps span two epoch boundaries). Prints
images/s, the ratio to the on-device batch, and the GPU utilisation sampled every 0.1 s
during the timed steps (NVML through ``torch.cuda.utilization()``, else ``nvidia-smi``; the
table says which): the share of time a kernel was running, not how busy the SMs were.

Each phase stops at its time limit: a run still going is cut, the rest of the phase is
skipped, and the table says so (the hand-written compile run may use half of the time left,
so that the engine's gets its turn). The script exits 1 if any run failed or was cut (a
compile that falls back to eager is noted, not failed). ``--smoke`` shrinks everything
(resnet18 at 32x32, batch 8, 2 timed steps, 20 JPEGs) to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "recipes")]  # pbt, helpers, recipe

from classification import KEYS, ClassificationTrainer  # noqa: E402
from data_throughput import make_jpegs  # noqa: E402
from ddp_scaling import RandomImages, StepTimer  # noqa: E402

from pbt.config import Config, load_config  # noqa: E402

NUM_CLASSES = 10
LR = 0.01
FALLBACK = "compile fell back to eager"
RUN_NAMES = itertools.count()
FULL = {"net": "resnet50", "size": 224, "batch_size": 64, "warmup": 10, "steps": 50,
        "real_net": "resnet18", "jpegs": 5000, "jpeg_size": 256, "real_warmup": 20,
        "real_steps": 150, "phase1_limit": 185.0, "phase2_limit": 60.0}
SMOKE = {"net": "resnet18", "size": 32, "batch_size": 8, "warmup": 1, "steps": 2,
         "real_net": "resnet18", "jpegs": 20, "jpeg_size": 48, "real_warmup": 1,
         "real_steps": 2, "phase1_limit": 1200.0, "phase2_limit": 600.0}


@dataclass(frozen=True)
class Variant:
    name: str
    short: str  # for the one-line summary
    precision: str  # pbt's mixed_precision: "no" or "bf16"
    channels_last: bool
    compile: bool


VARIANTS = [Variant("fp32", "fp32", "no", False, False),
            Variant("bf16", "bf16", "bf16", False, False),
            Variant("bf16 + channels_last", "bf16+cl", "bf16", True, False),
            Variant("bf16 + channels_last + compile", "bf16+cl+compile", "bf16", True, True)]


@dataclass
class Run:
    """One measurement; ``note`` says why a number is missing or suspect."""

    images_per_s: float | None = None
    first_step_s: float | None = None
    util: float | None = None  # mean GPU utilisation (%) over the timed steps
    util_samples: int = 0
    note: str = ""


# -- time limits, GPU utilisation -------------------------------------------------------------
class TimeLimit(BaseException):
    """Raised in the main thread when a run's time is up (a BaseException, so that
    torch.compile's error handling cannot turn it into an eager fallback)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`TimeLimit` in the main thread after ``seconds`` (SIGALRM)."""
    def expire(signum: int, frame: object) -> None:
        raise TimeLimit(f"time limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class UtilSampler:
    """GPU utilisation (%) sampled every ``period`` s in a thread, as (perf_counter, %)."""

    def __init__(self, device: torch.device, period: float = 0.1) -> None:
        self.samples: list[tuple[float, float]] = []
        self.source = "n/a (no CUDA device)"
        self.period, self.index = period, device.index or 0
        self.stopped = threading.Event()
        self.process: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        if device.type != "cuda":
            return
        try:
            torch.cuda.utilization(self.index)
            self.source = "torch.cuda.utilization() (NVML)"
            self.thread = threading.Thread(target=self._poll_nvml, daemon=True)
        except Exception as err:  # no pynvml / NVML: ask nvidia-smi instead
            if shutil.which("nvidia-smi") is None:
                self.source = f"n/a (torch.cuda.utilization: {type(err).__name__}; no nvidia-smi)"
                return
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
            gpu = visible if visible.isdigit() else str(self.index)
            self.process = subprocess.Popen(
                ["nvidia-smi", f"--id={gpu}", "--query-gpu=utilization.gpu",
                 "--format=csv,noheader,nounits", f"-lms={int(period * 1000)}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self.source = "nvidia-smi --query-gpu=utilization.gpu"
            self.thread = threading.Thread(target=self._read_smi, daemon=True)
        self.thread.start()

    def _poll_nvml(self) -> None:
        while not self.stopped.wait(self.period):
            self.samples.append((time.perf_counter(), float(torch.cuda.utilization(self.index))))

    def _read_smi(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip().isdigit():
                self.samples.append((time.perf_counter(), float(line)))

    def window(self, start: float, end: float) -> tuple[float | None, int]:
        """Mean utilisation and sample count between two perf_counter readings."""
        values = [value for when, value in self.samples if start <= when <= end]
        return (sum(values) / len(values) if values else None), len(values)

    def stop(self) -> None:
        self.stopped.set()
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=5)


# -- the data -------------------------------------------------------------------------------
def synthetic_batch(batch_size: int, size: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of random images (float32, NCHW) and labels, generated on ``device``."""
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randn(batch_size, 3, size, size, generator=generator, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator, device=device)
    return images, labels


class DeviceBatches:
    """A "loader" that yields the same on-device batch ``length`` times (Accelerate's
    ``prepare`` passes it through unchanged)."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self.batch for _ in range(self.length))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- pbt's engine -----------------------------------------------------------------------------
class SpeedTimer(StepTimer):
    """ddp_scaling's timer, synchronising only at the ends: the first step's time, then
    the images and seconds of the optimizer steps after ``warmup``; stops training after
    ``warmup + steps`` steps."""

    def __init__(self, warmup: int, steps: int) -> None:
        super().__init__(warmup)
        self.total, self.images, self.began, self.first = warmup + steps, 0, 0.0, 0.0

    def on_batch_begin(self, batch: int, logs: dict) -> None:
        if self.trainer.global_step == 0 and not self.began:
            self._sync()
            self.began = time.perf_counter()

    def on_batch_end(self, batch: int, logs: dict) -> None:
        step = self.trainer.global_step
        if step == 1:
            self._sync()
            self.first = time.perf_counter() - self.began
        if step == self.warmup:
            self._sync()
            self.start = time.perf_counter()
        elif step > self.warmup:
            self.images += int(self.trainer.targets.shape[0])
            if step == self.total:
                self._sync()
                self.end, self.steps = time.perf_counter(), step - self.warmup
                self.trainer.stop_training = True


class SpeedTrainer(ClassificationTrainer):
    """The recipe's trainer with only a timer callback and no test epochs or checkpoints;
    ``source`` picks the training data: "device" (one on-device batch), "memory"
    (RandomImages through pbt's loader) or "jpeg" (the recipe's own loader)."""

    def __init__(self, cfg: Config, source: str, timer: SpeedTimer) -> None:
        self.source, self.timer, self.messages = source, timer, []
        super().__init__(cfg)

    def build_train_loader(self, cfg: Config) -> object:
        if self.source == "jpeg":
            return super().build_train_loader(cfg)
        self.num_classes, self.class_names = NUM_CLASSES, [str(c) for c in range(NUM_CLASSES)]
        if self.source == "memory":
            dataset = RandomImages(cfg.batch_size * self.timer.total, cfg.input_size,
                                   NUM_CLASSES)
            return self.build_dataloader(dataset, train=True)
        batch = synthetic_batch(cfg.batch_size, cfg.input_size[0], self.accelerator.device)
        return DeviceBatches(batch, self.timer.total + 1)

    def build_test_loader(self, cfg: Config) -> list:
        return []  # no test epochs

    def build_callbacks(self, cfg: Config) -> list:
        return [self.timer]

    def test_epoch(self) -> None:
        """No test epoch: not part of the measurement."""

    def after_epoch(self) -> None:
        """No resumable state at epoch ends: not part of the measurement."""

    def log(self, message: str) -> None:
        self.messages.append(message)
        if message.startswith("compile"):  # the eager fallback must show
            super().log(message)


def reset_accelerate() -> None:
    """Forget Accelerate's process-wide state, so the next trainer may change precision."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def engine_run(args: argparse.Namespace, variant: Variant, source: str, net: str,
               warmup: int, steps: int, sampler: UtilSampler, work_dir: str,
               **keys: object) -> Run:
    """Train through pbt's engine; time the steps after ``warmup``."""
    from pbt.data import stop_workers

    timer = SpeedTimer(warmup, steps)
    cfg = load_config(
        [], keys=KEYS, work_dir=work_dir, run_name=f"{source}_{next(RUN_NAMES)}",
        net_type=net, input_size=[args.size, args.size], batch_size=args.batch_size,
        num_workers=args.workers, progress=False, num_epochs=10_000, lr=LR,
        mixed_precision=variant.precision, channels_last=variant.channels_last,
        compile=variant.compile, compile_mode=args.compile_mode, **keys)
    trainer = SpeedTrainer(cfg, source, timer)
    try:
        trainer.loop()
    finally:
        stop_workers(trainer.train_loader, trainer.test_loader)
    util, samples = sampler.window(timer.start, timer.end)
    notes = []
    weight = next(p for p in trainer.unwrapped_model.parameters() if p.ndim == 4)
    if weight.is_contiguous(memory_format=torch.channels_last) != variant.channels_last:
        notes.append(f"the model is not in the memory format asked for ({weight.stride()})")
    if trainer.accelerator.mixed_precision != variant.precision:
        notes.append(f"mixed precision is {trainer.accelerator.mixed_precision}")
    if any("torch.compile failed" in message for message in trainer.messages):
        notes.append(FALLBACK)
    return Run(timer.images / (timer.end - timer.start), timer.first, util, samples,
               "; ".join(notes))


# -- the hand-written loop ----------------------------------------------------------------------
def hand_run(args: argparse.Namespace, variant: Variant, device: torch.device,
             sampler: UtilSampler) -> Run:
    """The loop people write: torchvision model, autocast, channels_last, torch.compile."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.net)(num_classes=NUM_CLASSES).to(device)
    memory_format = torch.channels_last if variant.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    forward: Callable = model
    if variant.compile:
        forward = torch.compile(model, mode=None if args.compile_mode == "default"
                                else args.compile_mode)
    images, labels = synthetic_batch(args.batch_size, args.size, device)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=variant.precision == "bf16"):
            loss = nn.functional.cross_entropy(
                forward(images.contiguous(memory_format=memory_format)), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    sync(device)
    began = time.perf_counter()
    step()  # with compile: the compilation
    sync(device)
    first = time.perf_counter() - began
    for _ in range(args.warmup - 1):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    end = time.perf_counter()
    util, samples = sampler.window(start, end)
    return Run(args.batch_size * args.steps / (end - start), first, util, samples)


# -- running, printing ---------------------------------------------------------------------
def guarded(what: str, seconds: float, measure: Callable[[], Run]) -> Run:
    """``measure()`` within ``seconds``; a failure or time-out becomes the run's note."""
    if seconds < 1:
        return Run(note="skipped: the phase's time limit was reached")
    print(f"-- {what} (limit {seconds:.0f} s)", flush=True)
    try:
        with time_limit(seconds):
            return measure()
    except TimeLimit:
        return Run(note=f"cut at its time limit ({seconds:.0f} s)")
    except Exception as err:
        traceback.print_exc()
        return Run(note=f"error: {type(err).__name__}: {err}".splitlines()[0][:150])
    finally:
        reset_accelerate()
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "—" if value is None else format(value, spec)


def ratio(top: float | None, bottom: float | None) -> str:
    return "—" if top is None or not bottom else f"{top / bottom:.2f}×"


def phase1(args: argparse.Namespace, device: torch.device, sampler: UtilSampler,
           work_dir: str) -> list[tuple[Variant, Run, Run]]:
    deadline = time.monotonic() + args.phase1_limit
    variants = [v for v in VARIANTS if not (v.compile and args.skip_compile)]
    rows = []
    for variant in variants:
        left = deadline - time.monotonic()
        # a compile run may take minutes: the hand-written one gets half of what is left
        hand = guarded(f"hand-written, {variant.name}", left / 2 if variant.compile else left,
                       lambda v=variant: hand_run(args, v, device, sampler))
        engine = guarded(f"pbt engine, {variant.name}", deadline - time.monotonic(),
                         lambda v=variant: engine_run(args, v, "device", args.net, args.warmup,
                                                      args.steps, sampler, work_dir))
        rows.append((variant, hand, engine))
    print(f"\n### {args.net} {args.size}x{args.size}, batch {args.batch_size}, one synthetic "
          f"batch on the device, {args.warmup} warm-up + {args.steps} timed steps\n")
    print("| variant | hand img/s | engine img/s | engine / hand | speed-up vs fp32 "
          "(hand / engine) | first step s (hand / engine) | GPU util % (hand / engine) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base_hand, base_engine = rows[0][1].images_per_s, rows[0][2].images_per_s
    for variant, hand, engine in rows:
        print(f"| {variant.name} | {fmt(hand.images_per_s)} | {fmt(engine.images_per_s)} | "
              f"{ratio(engine.images_per_s, hand.images_per_s)} | "
              f"{ratio(hand.images_per_s, base_hand)} / "
              f"{ratio(engine.images_per_s, base_engine)} | {fmt(hand.first_step_s, '.1f')} / "
              f"{fmt(engine.first_step_s, '.1f')} | {fmt(hand.util)} / {fmt(engine.util)} |")
    for variant, hand, engine in rows:
        for who, run in (("hand-written", hand), ("engine", engine)):
            if run.note:
                print(f"note: {variant.name}, {who}: {run.note}")
    return rows


def phase2(args: argparse.Namespace, sampler: UtilSampler,
           work_dir: str) -> list[tuple[str, Run]]:
    from pbt.data import default_num_workers

    deadline = time.monotonic() + args.phase2_limit
    variant = VARIANTS[2]  # bf16 + channels_last
    root = Path(work_dir) / "jpegs"
    began = time.perf_counter()
    make_jpegs(root, args.jpegs, NUM_CLASSES, (args.jpeg_size, args.jpeg_size))
    print(f"-- wrote {args.jpegs} JPEGs {args.jpeg_size}x{args.jpeg_size} in "
          f"{time.perf_counter() - began:.1f} s", flush=True)
    workers = default_num_workers() if args.workers is None else args.workers
    sources = [("device", "one synthetic batch on the device (no loader)", {}),
               ("memory", "in-memory synthetic tensors, pbt's loader", {}),
               ("jpeg", f"{args.jpegs} JPEG files {args.jpeg_size}x{args.jpeg_size}, "
                "recipe's loader + train transforms", {"train_data": [str(root)],
                                                       "test_data": [str(root)]})]
    rows = []
    for source, label, keys in sources:
        run = guarded(f"pbt engine, {args.real_net}, {label}", deadline - time.monotonic(),
                      lambda s=source, k=keys: engine_run(
                          args, variant, s, args.real_net, args.real_warmup, args.real_steps,
                          sampler, work_dir, **k))
        rows.append((label, run))
    print(f"\n### {args.real_net} {args.size}x{args.size}, batch {args.batch_size}, bf16 + "
          f"channels_last, pbt's engine, {args.real_warmup} warm-up + {args.real_steps} timed "
          f"steps; GPU utilisation from {sampler.source}\n")
    print("| training input | loader workers | img/s | vs on-device batch | GPU util % "
          "(samples) |")
    print("|---|---:|---:|---:|---:|")
    base = rows[0][1].images_per_s
    for (source, _, _), (label, run) in zip(sources, rows):
        print(f"| {label} | {workers if source != 'device' else '—'} | "
              f"{fmt(run.images_per_s)} | {ratio(run.images_per_s, base)} | "
              f"{fmt(run.util)} ({run.util_samples}) |")
    for label, run in rows:
        if run.note:
            print(f"note: {label}: {run.note}")
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes (resnet18 32x32, 2 steps, 20 JPEGs): a CPU check")
    parser.add_argument("--phases", type=int, nargs="+", default=[1, 2], choices=(1, 2))
    parser.add_argument("--net", help="phase 1 network (resnet50)")
    parser.add_argument("--size", type=int, help="training input size (224)")
    parser.add_argument("--batch_size", type=int, help="both phases (64)")
    parser.add_argument("--warmup", type=int, help="phase 1 untimed steps (10)")
    parser.add_argument("--steps", type=int, help="phase 1 timed steps (50)")
    parser.add_argument("--compile_mode", default="default",
                        choices=("default", "reduce-overhead", "max-autotune",
                                 "max-autotune-no-cudagraphs"))
    parser.add_argument("--skip_compile", action="store_true", help="no compile variant")
    parser.add_argument("--cudnn_benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True for every run "
                             "(pbt leaves it off)")
    parser.add_argument("--real_net", help="phase 2 network (resnet18)")
    parser.add_argument("--jpegs", type=int, help="phase 2 JPEG files (5000)")
    parser.add_argument("--jpeg_size", type=int, help="their width and height (256)")
    parser.add_argument("--real_warmup", type=int, help="phase 2 untimed steps (20)")
    parser.add_argument("--real_steps", type=int, help="phase 2 timed steps (150)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader workers (default: pbt's, min(8, CPUs - 1))")
    parser.add_argument("--phase1_limit", type=float, help="seconds (185)")
    parser.add_argument("--phase2_limit", type=float, help="seconds (60)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on --device cpu")
    args = parser.parse_args()
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.warmup, args.real_warmup) < 1 or min(args.steps, args.real_steps) < 1:
        parser.error("warm-up and timed steps must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible (use --device cpu --smoke)")
    return args


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU check even on a GPU machine
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" \
        else torch.device("cpu")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        x = torch.randn(2, 3, 8, 8, device=device)  # CUDA context, cuDNN, cuBLAS loaded here
        nn.functional.conv2d(x, torch.randn(4, 3, 3, 3, device=device)).sum().item()
        sync(device)
    else:
        name = f"CPU, {torch.get_num_threads()} torch thread(s)"
    print(f"gpu_speed on {name}: torch {torch.__version__}, cuDNN "
          f"{torch.backends.cudnn.version()}, cudnn.benchmark {args.cudnn_benchmark}, "
          f"fp32 convs {torch.backends.cudnn.conv.fp32_precision} / matmuls "
          f"{torch.backends.cuda.matmul.fp32_precision} (tf32 or ieee; none: torch's default, "
          f"TF32 convs), compile mode {args.compile_mode}, {os.cpu_count()} CPU cores",
          flush=True)
    sampler = UtilSampler(device)
    started = time.monotonic()
    runs: list[Run] = []
    summary = []
    try:
        with tempfile.TemporaryDirectory(prefix="pbt-gpu-speed-") as work_dir:
            if 1 in args.phases:
                rows = phase1(args, device, sampler, work_dir)
                runs += [run for _, hand, engine in rows for run in (hand, engine)]
                best = max(rows, key=lambda row: row[2].images_per_s or 0.0)
                summary.append(f"{args.net} {best[0].short} {fmt(best[2].images_per_s)} img/s "
                               f"{ratio(best[2].images_per_s, rows[0][2].images_per_s)} fp32 "
                               f"{ratio(best[2].images_per_s, best[1].images_per_s)} hand")
            if 2 in args.phases:
                real = phase2(args, sampler, work_dir)
                runs += [run for _, run in real]
                summary.append(f"JPEG {ratio(real[2][1].images_per_s, real[0][1].images_per_s)}"
                               f" util {fmt(real[2][1].util)}")
    finally:
        sampler.stop()
    failed = [run for run in runs if run.note and run.note != FALLBACK]
    # one short ASCII line: gpu_check.sh shows its first 90 characters
    flag = f"{len(failed)} run(s) FAILED or CUT; " if failed else ""
    line = f"gpu_speed: {flag}{'; '.join(summary)} ({time.monotonic() - started:.0f} s)"
    print("\n" + line.replace("×", "x").replace("—", "-"))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
