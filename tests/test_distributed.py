"""Distributed training on CPU with real worker processes (gloo): the launch paths
(``--num_processes``, ``accelerate launch`` on two "machines"), sharding, metrics, files,
LR schedule, SyncBatchNorm and a killed worker. Every multi-process test checks that two
ranks really ran: ``world_size`` 2 in ``summary.json`` and a "ready" line per rank.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from pbt.config import ConfigError, load_config
from pbt.launch import launched_world_size, plan_processes, select_gpus

sys.path.insert(0, str(ROOT / "recipes"))
from classification import KEYS  # noqa: E402

RECIPE = ROOT / "recipes" / "classification.py"
TRAIN_SIZE, TEST_SIZE = 40, 37  # 37: the test set does not split evenly over 2 ranks
BATCH = 4  # per process: 40 / 4 = 10 batches, 5 per rank, no padding in training

# The classification recipe, plus a record per rank (written to $PBT_PROBE_OUT/rank<R>.json)
# of the train indices loaded each epoch, the lr after every step, the norm layers of the
# model, and every file this process opened for writing, renamed into place or saved with
# torch.save / safetensors.
PROBE = '''
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.environ["PBT_RECIPES"])
from classification import KEYS, ClassificationTrainer  # noqa: E402

from pbt.callbacks import Callback  # noqa: E402
from pbt.config import parse_config  # noqa: E402
from pbt.launch import launch  # noqa: E402

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class Recorder:
    def __init__(self, dataset, probe):
        self.dataset, self.probe = dataset, probe

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        self.probe.seen.setdefault(str(self.probe.epoch), []).append(int(index))
        return self.dataset[index]


class Probe(Callback):
    def __init__(self):
        self.epoch, self.seen, self.lrs, self.norms = 0, {}, [], []

    def on_train_begin(self, logs):
        self.norms = sorted({type(m).__name__ for m in self.trainer.unwrapped_model.modules()
                             if "Norm" in type(m).__name__})

    def on_epoch_begin(self, epoch, logs):
        self.epoch = epoch

    def on_batch_end(self, batch, logs):
        self.lrs.append(self.trainer.lr)


class ProbeTrainer(ClassificationTrainer):
    def __init__(self, cfg):
        self.probe = Probe()
        super().__init__(cfg)

    def build_dataloader(self, dataset, *args, train=None, **kwargs):
        if train:
            dataset = Recorder(dataset, self.probe)
        return super().build_dataloader(dataset, *args, train=train, **kwargs)

    def build_callbacks(self, cfg):
        return super().build_callbacks(cfg) + [self.probe]


def recording(save, position, writes):
    """Wrap a writer that opens files outside Python's open() (torch's C++ writer,
    safetensors) to record its target path."""
    def wrapper(*args, **kwargs):
        target = args[position] if len(args) > position else None
        if isinstance(target, (str, os.PathLike)):
            writes.append(os.path.abspath(target))
        return save(*args, **kwargs)
    return wrapper


def main(cfg):
    import accelerate.utils.other
    import torch

    writes = []
    torch.save = recording(torch.save, 1, writes)
    accelerate.utils.other.safe_save_file = recording(
        accelerate.utils.other.safe_save_file, 1, writes)

    def audit(event, args):
        path = args[0] if event == "open" else args[1] if event == "os.rename" else None
        if not isinstance(path, (str, bytes, os.PathLike)):
            return
        if event == "os.rename" or args[2] & WRITE_FLAGS:
            writes.append(os.path.abspath(os.fsdecode(path)))

    sys.addaudithook(audit)
    trainer = ProbeTrainer(cfg)
    summary = trainer.run()
    record = {"rank": int(os.environ.get("RANK", 0)), "local_rank": os.environ.get("LOCAL_RANK"),
              "seen": trainer.probe.seen, "lrs": trainer.probe.lrs,
              "norms": trainer.probe.norms, "writes": sorted(set(writes))}
    out = Path(os.environ["PBT_PROBE_OUT"]) / f"rank{record['rank']}.json"
    out.write_text(json.dumps(record))
    return summary


if __name__ == "__main__":
    launch(main, parse_config(keys=KEYS))
'''


# -- helpers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> tuple[Path, Path]:
    """40 train and 37 test images copied from the digits tree, spread over the classes."""
    from pbt.data import materialise_digits

    root = tmp_path_factory.mktemp("data")
    digits_train, digits_test = materialise_digits(root / "digits", seed=0)
    trees = []
    for source, size in ((digits_train, TRAIN_SIZE), (digits_test, TEST_SIZE)):
        by_class = [sorted(d.iterdir()) for d in sorted(source.iterdir())]
        chosen = [files[i] for i in range(size) for files in by_class if i < len(files)][:size]
        tree = root / "small" / source.name
        for file in chosen:
            (tree / file.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(file, tree / file.parent.name / file.name)
        trees.append(tree)
    return trees[0], trees[1]


@pytest.fixture
def probe(tmp_path, monkeypatch) -> Path:
    script = tmp_path / "dist_probe.py"
    script.write_text(PROBE)
    (tmp_path / "records").mkdir()
    monkeypatch.setenv("PBT_RECIPES", str(ROOT / "recipes"))
    monkeypatch.setenv("PBT_PROBE_OUT", str(tmp_path / "records"))
    return script


def train_args(data: tuple[Path, Path], work: Path, run_name: str, **extra) -> list[str]:
    options = dict(train_data=data[0], test_data=data[1], work_dir=work, run_name=run_name,
                   input_size="16 16", batch_size=BATCH, num_workers=0, progress="false",
                   lr=0.05, num_epochs=2, scheduler="cosine", num_warn_up=1, log_freq=5)
    options.update(extra)
    return [token for key, value in options.items()
            for token in (f"--{key}", *str(value).split())]


def cpu_env(**extra: str) -> dict:
    """Worker environment: CPU only, no user accelerate config, no launcher variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HOME=str(Path(env["PBT_PROBE_OUT"]).parent / "hf"),
               PYTHONPATH=str(ROOT), **extra)
    return env


def ready_ranks(text: str) -> set[str]:
    return set(re.findall(r"pbt: rank (\d+)/2 ready \(pid \d+", text))


def read_records(probe: Path) -> dict[int, dict]:
    files = sorted((probe.parent / "records").glob("rank*.json"))
    records = {r["rank"]: r for r in (json.loads(f.read_text()) for f in files)}
    assert sorted(records) == [0, 1], f"expected records of ranks 0 and 1, got {files}"
    return records


def assert_ranks_split_the_train_set(records: dict[int, dict], epochs: int) -> None:
    """Each epoch the two ranks load disjoint halves that together are the train set, and
    the order changes from epoch to epoch."""
    for epoch in map(str, range(epochs)):
        first, second = records[0]["seen"][epoch], records[1]["seen"][epoch]
        assert len(first) == len(second) == TRAIN_SIZE // 2
        assert not set(first) & set(second), "both ranks loaded the same samples"
        assert sorted(first + second) == list(range(TRAIN_SIZE))
    if epochs > 1:
        assert records[0]["seen"]["0"] != records[0]["seen"]["1"], "no reshuffle between epochs"


def single_process_correct(checkpoint: Path, test_dir: Path, class_names: list[str]) -> int:
    """Top-1 hits of saved weights, evaluated here in one process without the engine."""
    from pbt.data import build_dataset, build_transforms
    from pbt.models import build_model

    state = torch.load(checkpoint, weights_only=True)
    model = build_model(state["net_type"], state["num_classes"])
    model.load_state_dict(state["model"])
    model.eval()
    transform = build_transforms(state["input_size"], [0.5] * 3, [0.5] * 3, train=False)
    dataset = build_dataset(str(test_dir), transform, class_names=class_names)
    assert len(dataset) == TEST_SIZE
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH)
    correct = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += int((model(images).argmax(1) == labels).sum())
    return correct


# -- how many workers, which GPUs (no processes) --------------------------------------------
def test_gpu_selection_and_process_count():
    assert select_gpus([0, 1], None) == "0,1"
    assert select_gpus([1], "4,5,6") == "5"  # positions in what is already visible
    assert select_gpus([0], "") is None  # CUDA hidden: a CPU run, not an error
    with pytest.raises(ConfigError, match="gpu_id.*only 2 device"):
        select_gpus([0, 2], "3,4")
    with pytest.raises(ConfigError, match="gpu_id"):
        select_gpus([0, 0], None)

    cfg = load_config([], gpu_id=[0, 1], distributed=False)
    count, note = plan_processes(cfg, cuda_devices=2)
    assert count == 2 and "DDP" in note and "distributed: false" in note
    assert plan_processes(load_config([], gpu_id=[0, 1], distributed=True), 2) == (2, None)
    assert plan_processes(load_config([], gpu_id=[3]), 1) == (1, None)
    with pytest.raises(ConfigError, match="only 1 of these"):
        plan_processes(cfg, cuda_devices=1)
    with pytest.raises(ConfigError, match="num_processes.*one process per listed GPU"):
        plan_processes(load_config([], gpu_id=[0, 1], num_processes=4), 2)
    # no CUDA: num_processes decides (0 = one), a GPU list is ignored with a note
    assert plan_processes(load_config([], num_processes=2), 0) == (2, None)
    assert plan_processes(load_config([]), 0) == (1, None)
    count, note = plan_processes(cfg, cuda_devices=0)
    assert count == 1 and "ignored" in note
    with pytest.raises(ConfigError, match="num_processes"):
        plan_processes(load_config([], num_processes=-1), 0)

    assert launched_world_size({}) is None
    assert launched_world_size({"WORLD_SIZE": "4", "RANK": "1"}) == 4
    assert launched_world_size({"OMPI_COMM_WORLD_SIZE": "2"}) == 2


def test_busy_port_is_a_clear_error(tmp_path, small_data, probe):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = train_args(small_data, tmp_path / "work", "busy", num_processes=2,
                          main_process_port=port)
        result = subprocess.run([sys.executable, str(RECIPE), *args], capture_output=True,
                                text=True, timeout=120, env=cpu_env())
    assert result.returncode == 2, result.stderr
    assert f"main_process_port': cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "--main_process_port 0" in result.stderr


# A user's script (tests/regression_script.py's trainer) that records, per rank, the torch
# threads it has when main() starts and when training begins, and OMP_NUM_THREADS.
THREADS = '''
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.environ["PBT_TESTS"])
from regression_script import KEYS, RegressionTrainer  # noqa: E402

from pbt.callbacks import Callback  # noqa: E402
from pbt.config import parse_config  # noqa: E402
from pbt.launch import launch  # noqa: E402


class Threads(Callback):
    def on_train_begin(self, logs):
        self.training = torch.get_num_threads()


def main(cfg):
    record = {"rank": int(os.environ.get("RANK", 0)), "at_start": torch.get_num_threads(),
              "omp": os.environ.get("OMP_NUM_THREADS")}
    probe = Threads()

    class Probed(RegressionTrainer):
        def build_callbacks(self, cfg):
            return super().build_callbacks(cfg) + [probe]

    summary = Probed(cfg).run()
    record["training"] = probe.training
    out = Path(os.environ["PBT_PROBE_OUT"]) / f"threads{record['rank']}.json"
    out.write_text(json.dumps(record))
    return summary


if __name__ == "__main__":
    launch(main, parse_config(keys=KEYS))
'''


@pytest.mark.slow  # two 2-process runs: ~20 s on 2 idle cores
def test_num_processes_gives_each_worker_its_share_of_the_cores(tmp_path, probe):
    """README: with ``--num_processes N`` each worker gets cores / N torch threads, unless
    ``OMP_NUM_THREADS`` is already set. (The test suite sets it to 1 for every process, so
    the first run drops it; the second sets it to the core count, torch's cap.)"""
    script = tmp_path / "threads.py"
    script.write_text(THREADS)
    records = probe.parent / "records"
    cores = os.cpu_count() or 1
    share = max(1, cores // 2)
    for name, preset in (("share", None), ("preset", str(cores))):
        env = cpu_env(PBT_TESTS=str(ROOT / "tests"))
        env.pop("OMP_NUM_THREADS", None)
        env.pop("MKL_NUM_THREADS", None)
        if preset:
            env["OMP_NUM_THREADS"] = preset
        result = subprocess.run(
            [sys.executable, str(script), "--work_dir", str(tmp_path / "work"), "--run_name",
             name, "--num_processes", "2", "--main_process_port", "0", "--num_epochs", "1",
             "--progress", "false", "--num_workers", "0"],
            capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert ready_ranks(result.stdout) == {"0", "1"}
        threads = {int(f.stem[-1]): json.loads(f.read_text())
                   for f in records.glob("threads*.json")}
        assert sorted(threads) == [0, 1]
        expected = int(preset) if preset else share
        for record in threads.values():
            assert record["omp"] == str(expected), (name, record)
            assert record["at_start"] == record["training"] == expected, (name, record)
        for file in records.glob("threads*.json"):
            file.unlink()


# -- two processes started by pbt itself ------------------------------------------------------
@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path, small_data, probe):
    """``--num_processes 2`` on CPU: sharding by global rank with a reshuffle each epoch,
    ``sync_bn`` skipped on CPU, exact test metrics over 37 images, files written once by
    rank 0, and the same LR curve as one process taking as many steps per epoch."""
    work = tmp_path / "work"
    args = train_args(small_data, work, "ddp", num_processes=2, main_process_port=0,
                      sync_bn="true")
    result = subprocess.run([sys.executable, str(probe), *args], capture_output=True,
                            text=True, timeout=300, env=cpu_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ready_ranks(result.stdout) == {"0", "1"}
    assert "starting 2 DDP worker processes on CPU (gloo)" in result.stdout
    run_dir = work / "ddp"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 2
    records = read_records(probe)

    assert_ranks_split_the_train_set(records, epochs=2)
    # torch's SyncBatchNorm is GPU-only: on CPU it is skipped with a log line, not a crash
    assert records[0]["norms"] == records[1]["norms"] == ["BatchNorm2d"]

    # test metrics: every test image once (no padding duplicates), and the count of hits is
    # what the saved best weights score in a single process
    best_epoch = summary["best_epoch"]
    best = torch.load(run_dir / "best.pth", weights_only=True)
    assert best["epoch"] == best_epoch
    tested = summary["history"][best_epoch - 1]["test"]
    assert tested["count"] == TEST_SIZE
    correct = single_process_correct(run_dir / "best.pth", small_data[1], best["class_names"])
    assert correct == tested["correct"]
    assert summary["best_top1"] == pytest.approx(100.0 * correct / TEST_SIZE)

    # files: no file written by both ranks; rank 1 wrote only its own part of the resumable
    # state; rank 0 wrote the outputs
    run = str(run_dir.resolve())
    assert not set(records[0]["writes"]) & set(records[1]["writes"])
    theirs = [w for w in records[1]["writes"] if w.startswith(str(work.resolve()))]
    assert all(w.startswith(os.path.join(run, "checkpoints", "")) for w in theirs), theirs
    mine = [w for w in records[0]["writes"] if w.startswith(run)]
    for name in ("train.log", "summary.json", "best.pth", "last.pth.tmp", "last.pth",
                 "config.yaml"):
        assert os.path.join(run, name) in mine, name
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and str(events[0].resolve()) in mine
    assert not list(run_dir.rglob("*.tmp"))
    log = (run_dir / "train.log").read_text()
    assert log.count("best test top1") == 1
    assert log.count("sync_bn: true is ignored on CPU") == 1
    assert [log.count(f"epoch {e}/2  train_loss") for e in (1, 2)] == [1, 1]

    # LR: one process with twice the batch takes the same 5 steps per epoch -> same curve
    spec = importlib.util.spec_from_file_location("dist_probe", probe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = load_config(train_args(small_data, work, "one", batch_size=2 * BATCH), keys=KEYS)
    single = module.ProbeTrainer(cfg)
    assert single.steps_per_epoch == TRAIN_SIZE // (2 * BATCH) == 5
    single_summary = single.run()
    assert single_summary["global_step"] == summary["global_step"] == 10
    assert [h["lr"] for h in single_summary["history"]] == [h["lr"] for h in summary["history"]]
    assert single.probe.lrs == records[0]["lrs"] == records[1]["lrs"]
    assert len(set(records[0]["lrs"])) >= 9  # warm-up, then cosine from the same peak


def launch_two_machines(port: int, probe: Path, args: list[str]) -> list[tuple[int, str]]:
    """``(exit code, stdout + stderr)`` of two one-process ``accelerate launch`` machines;
    both are killed if either runs past its deadline."""
    procs = []
    try:
        for machine in (0, 1):
            command = ["accelerate", "launch", "--multi_gpu", "--num_machines", "2",
                       "--machine_rank", str(machine), "--num_processes", "2",
                       "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                       "--mixed_precision", "no", "--dynamo_backend", "no", str(probe), *args]
            procs.append(subprocess.Popen(command, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True, env=cpu_env()))
        deadline = time.monotonic() + 300
        outputs = [proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
                   for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [(proc.returncode, out) for proc, out in zip(procs, outputs)]


# -- two "machines" on one host ---------------------------------------------------------------
@pytest.mark.slow
def test_two_machines_on_one_host(tmp_path, small_data, probe):
    """Two ``accelerate launch`` commands, one process each (both local rank 0), train one
    model together: one summary with world_size 2, and the ranks split the data by global
    rank (PBT used the local rank, so both "machines" saw the same half)."""
    work = tmp_path / "work"
    args = train_args(small_data, work, "nodes", num_epochs=1)
    for _ in range(3):  # both commands need the port in advance: another program
        port = free_port()    # may take it between free_port() and the rendezvous
        outputs = launch_two_machines(port, probe, args)
        if not any("address already in use" in out.lower() for _, out in outputs):
            break
        shutil.rmtree(work, ignore_errors=True)
    for returncode, out in outputs:
        assert returncode == 0, f"port {port}:\n" + out[-4000:]
    assert ready_ranks(outputs[0][1]) == {"0"} and ready_ranks(outputs[1][1]) == {"1"}
    assert [p.name for p in work.iterdir()] == ["nodes"]
    summary = json.loads((work / "nodes" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["history"][0]["test"]["count"] == TEST_SIZE
    records = read_records(probe)
    assert records[0]["local_rank"] == records[1]["local_rank"] == "0"
    assert_ranks_split_the_train_set(records, epochs=1)


# -- a worker dies --------------------------------------------------------------------------
def wait_for_saved_epoch(path: Path, epoch: int, proc: subprocess.Popen) -> int:
    """Poll ``path`` until it holds weights of ``epoch`` or later; returns the saved epoch."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if path.is_file():
            saved = torch.load(path, weights_only=True)["epoch"]
            if saved >= epoch:
                return saved
        time.sleep(0.2)
    raise AssertionError(f"{path} never held epoch {epoch} (process exit code {proc.poll()})")


@pytest.mark.slow
def test_killed_worker_stops_the_job(tmp_path, small_data, probe):
    """SIGKILL to rank 1 mid-training: the job ends non-zero within 60 s naming rank 1, and
    ``last.pth`` is intact."""
    import queue
    import threading

    work = tmp_path / "work"
    args = train_args(small_data, work, "killed", num_processes=2, main_process_port=0,
                      num_epochs=100, scheduler="multi-step", num_warn_up=0)
    proc = subprocess.Popen([sys.executable, str(RECIPE), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cpu_env())
    lines: queue.Queue = queue.Queue()  # a thread drains the pipe, so the job never blocks
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout],
                              daemon=True)
    reader.start()
    pids, seen = {}, []
    try:
        deadline = time.monotonic() + 180
        while "epoch 2/100  train_loss" not in (seen[-1] if seen else ""):
            try:
                seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail("no 'epoch 2/100' line within 180 s:\n" + "".join(seen))
            match = re.search(r"pbt: rank (\d+)/2 ready \(pid (\d+)", seen[-1])
            if match:
                pids[int(match[1])] = int(match[2])
        assert set(pids) == {0, 1}, "".join(seen)
        # ModelCheckpoint writes in a background thread: wait until epoch 2's weights are in.
        saved_epoch = wait_for_saved_epoch(work / "killed" / "last.pth", 2, proc)
        os.kill(pids[1], signal.SIGKILL)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("the job still ran 60 s after rank 1 was killed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    while not lines.empty():
        seen.append(lines.get())
    err = "".join(seen)
    assert proc.returncode != 0
    assert f"worker rank 1 (pid {pids[1]}) was killed by SIGKILL" in err
    assert "Traceback" not in err, err  # rank 0's failed collective: one line, not a trace
    last = torch.load(work / "killed" / "last.pth", weights_only=True)
    assert last["epoch"] >= saved_epoch >= 2 and last["net_type"] == "resnet18"
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_sync_bn_on_two_gpus(tmp_path, small_data, probe):
    """``--gpu_id 0 1`` without a launcher: one DDP worker per GPU, BatchNorm -> SyncBatchNorm."""
    args = train_args(small_data, tmp_path / "work", "gpus", gpu_id="0 1", sync_bn="true",
                      num_epochs=1, main_process_port=0)
    env = cpu_env()
    env.pop("CUDA_VISIBLE_DEVICES")
    result = subprocess.run([sys.executable, str(probe), *args], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ready_ranks(result.stdout) == {"0", "1"} and "GPUs 0,1 (nccl)" in result.stdout
    summary = json.loads((tmp_path / "work" / "gpus" / "summary.json").read_text())
    assert summary["world_size"] == 2
    records = read_records(probe)
    assert records[0]["norms"] == records[1]["norms"] == ["SyncBatchNorm"]


# -- resume of a 2-process run, and resampling across ranks ----------------------------------
TINY = Path(__file__).parent / "train_tiny.py"


def train_tiny_2p(cwd: Path, run_name: str, *args: str, signal_at: str | None = None,
                  processes: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PBT_SIGNAL_AT")}
    env.update(CUDA_VISIBLE_DEVICES="", **({"PBT_SIGNAL_AT": signal_at} if signal_at else {}))
    command = [sys.executable, str(TINY), "--work_dir", "w", "--run_name", run_name,
               "--num_processes", str(processes), "--main_process_port", "0",
               "--num_epochs", "3", "--batch_size", "4", "--num_workers", "0",
               "--progress", "false", "--lr", "0.05", "--num_warn_up", "1", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env)


def mix_kinds(folder: Path, rank: int) -> list[tuple[int, int, str]]:
    """``(epoch, batch, kind)`` per training batch of ``rank``, as tests/train_tiny.py's
    PBT_MIX_LOG recorded them."""
    lines = (folder / f"mix_rank{rank}.txt").read_text().split("\n")
    return [(int(e), int(b), kind) for e, b, kind in (line.split() for line in lines if line)]


@pytest.mark.slow
def test_two_process_run_resumes_exactly(tmp_path, tiny_trainer, monkeypatch):
    """With EMA, mixup and CutMix on (each batch picks one of the two; 2x4x4 images give
    CutMix boxes to paste): per-process state that must survive the kill."""
    extra = ["--ema_decay", "0.9", "--mixup_alpha", "0.4", "--cutmix_alpha", "1.0"]
    monkeypatch.setenv("PBT_TINY_IMAGES", "1")
    logs = {name: tmp_path / f"mix_{name}" for name in ("straight", "resumed")}
    for folder in logs.values():
        folder.mkdir()
    monkeypatch.setenv("PBT_MIX_LOG", str(logs["straight"]))
    straight = train_tiny_2p(tmp_path, "straight", *extra)
    monkeypatch.delenv("PBT_MIX_LOG")
    assert straight.returncode == 0, straight.stderr
    assert ready_ranks(straight.stdout) == {"0", "1"}
    crashed = train_tiny_2p(tmp_path, "crashed", "--save_steps", "2", *extra,
                            signal_at="2,3,KILL,1")  # rank 1 dies in epoch 2
    assert crashed.returncode != 0 and "rank 1" in crashed.stderr
    run_dir = tmp_path / "w" / "crashed"
    # each rank averaged the same (all-reduced) parameters: the same EMA of them
    state = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    ranks = [torch.load(state / f"pbt_rank_{r}.pt", weights_only=True)["callbacks"]
             ["ModelEMA#0"]["weights"] for r in (0, 1)]
    parameters = [name for name in ranks[0] if "running" not in name and "num_batches" not in name]
    assert parameters and all(torch.equal(ranks[0][k], ranks[1][k]) for k in parameters)
    monkeypatch.setenv("PBT_MIX_LOG", str(logs["resumed"]))
    resumed = train_tiny_2p(tmp_path, "crashed", "--save_steps", "2", "--resume", str(run_dir),
                            *extra)
    assert resumed.returncode == 0, resumed.stderr
    # from the state of step 6 (epoch 2, batch 1) each rank mixed as in the uninterrupted
    # run, its own way (the generator is seeded by the process too), and both kinds happened
    for rank in (0, 1):
        mixes = mix_kinds(logs["straight"], rank)
        assert [(e, b) for e, b, _ in mixes] == [(e, b) for e in range(3) for b in range(5)]
        assert mix_kinds(logs["resumed"], rank) == mixes[6:]
        assert {"mixup", "cutmix"} <= {kind for _, _, kind in mixes[6:]}
    assert mix_kinds(logs["straight"], 0) != mix_kinds(logs["straight"], 1)
    assert "resumed from" in resumed.stdout and ready_ranks(resumed.stdout) == {"0", "1"}
    a = torch.load(tmp_path / "w" / "straight" / "last.pth", weights_only=True)["model"]
    b = torch.load(run_dir / "last.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary_a = json.loads((tmp_path / "w" / "straight" / "summary.json").read_text())
    summary_b = json.loads((run_dir / "summary.json").read_text())
    assert summary_b["world_size"] == 2 and summary_a["history"] == summary_b["history"]

    # the same state with one process: refused, nothing changed
    from conftest import tiny_cfg

    def files():  # all but the lock, which each holder rewrites with its pid
        return sorted((p, p.stat().st_mtime_ns) for p in run_dir.rglob("*")
                      if p.name != ".pbt.lock")

    before = files()
    with pytest.raises(ConfigError, match="saved by 2 processes and this run has 1"):
        tiny_trainer(tiny_cfg(tmp_path, work_dir=str(tmp_path / "w"), resume=str(run_dir)))
    assert files() == before


@pytest.mark.slow
def test_resampling_across_two_ranks(tmp_path, probe, small_data):
    """resample: sqrt with 2 processes: the ranks load disjoint shares of one epoch draw whose
    class histogram is the mode's target."""
    from pbt.data import ResampleSampler, build_dataset

    train = tmp_path / "imbalanced"
    sizes = {"0": 2, "1": 4, "2": 6, "3": 12, "4": 16}  # 40 images
    source = small_data[0].parent.parent / "digits" / "train"
    for name, size in sizes.items():
        (train / name).mkdir(parents=True)
        for file in sorted((source / name).iterdir())[:size]:
            shutil.copy(file, train / name / file.name)
    test = tmp_path / "test"
    for name in sizes:
        shutil.copytree(small_data[1] / name, test / name)
    args = train_args((train, test), tmp_path / "work", "resample", resample="sqrt",
                      num_epochs=1, main_process_port=0, num_processes=2)
    result = subprocess.run([sys.executable, str(probe), *args], capture_output=True,
                            text=True, timeout=300, env=cpu_env())
    assert result.returncode == 0, result.stderr
    assert ready_ranks(result.stdout) == {"0", "1"}
    records = read_records(probe)
    targets = build_dataset(str(train)).targets
    draw = ResampleSampler(targets, "sqrt", seed=0).epoch_draw(0)
    loaded = records[0]["seen"]["0"] + records[1]["seen"]["0"]
    assert len(records[0]["seen"]["0"]) == len(records[1]["seen"]["0"]) == len(draw) // 2
    assert sorted(loaded) == sorted(draw)  # disjoint shares: together exactly the draw
    histogram = {c: sum(targets[i] == c for i in loaded) for c in range(5)}
    quotas = ResampleSampler(targets, "sqrt", seed=0).quotas
    assert histogram == {c: quotas[c] for c in range(5)}
    assert histogram[0] > 2 and histogram[4] < 16  # small classes up, the large one down
