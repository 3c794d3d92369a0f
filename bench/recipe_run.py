"""One run of the classification recipe for the benchmarks (default config, no progress
bar, an existing run dir of the same name replaced)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_recipe(work_dir: Path, run_name: str, *args: str) -> Path:
    """Run ``recipes/classification.py`` with ``args``; return its run dir."""
    command = [sys.executable, str(ROOT / "recipes" / "classification.py"),
               "-c", str(ROOT / "recipes" / "classification.yaml"), "--progress", "false",
               "--overwrite", "true", "--work_dir", str(work_dir), "--run_name", run_name,
               *args]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return work_dir / run_name
