"""How much `import pbt` (and its modules) costs on top of `import torch`.

    python bench/import_time.py [--repeats 7]

Each import runs in a fresh interpreter; medians are printed. Target: <= 0.3 s extra.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

SNIPPETS = {
    "import torch": "import torch",
    "import pbt": "import torch, pbt",
    "import pbt.engine (+ config, callbacks)": "import torch, pbt.engine",
    "all pbt modules": "import torch, pbt.engine, pbt.schedulers, pbt.data, pbt.prune, "
                       "pbt.models, pbt.checkpoint, pbt.export",
}


def time_import(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in SNIPPETS}
    time_import("import torch")  # warm the file cache
    for _ in range(args.repeats):  # interleaved, so drift hits every line alike
        for name, code in SNIPPETS.items():
            times[name].append(time_import(code))
    base = statistics.median(times["import torch"])
    print(f"{'what':42} {'median s':>9} {'extra s':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:42} {median:9.3f} {median - base:8.3f}")


if __name__ == "__main__":
    main()
