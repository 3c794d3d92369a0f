"""Time cost of mid-epoch resumable states (``save_steps``) on the default recipe.

    python bench/checkpoint_overhead.py [--save_steps 50] [--rounds 2] [--num_epochs 12]

Runs the default digits recipe without and with ``save_steps`` (interleaved rounds) and
prints the median training seconds of each and the overhead. Epoch-end states are saved in
both, so the difference is the cost of the extra mid-epoch states alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(work_dir: str, name: str, extra: list[str]) -> dict:
    subprocess.run([sys.executable, str(ROOT / "recipes" / "classification.py"), "-c",
                    str(ROOT / "recipes" / "classification.yaml"), "--progress", "false",
                    "--work_dir", work_dir, "--run_name", name, *extra],
                   check=True, stdout=subprocess.DEVNULL)
    return json.loads((Path(work_dir) / name / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--save_steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num_epochs", type=int, default=12)
    args = parser.parse_args()
    plain, saving, steps = [], [], 0
    with tempfile.TemporaryDirectory() as work_dir:
        epochs = ["--num_epochs", str(args.num_epochs)]
        for index in range(args.rounds):
            plain.append(run(work_dir, f"plain{index}", epochs)["seconds"])
            summary = run(work_dir, f"saving{index}",
                          [*epochs, "--save_steps", str(args.save_steps)])
            saving.append(summary["seconds"])
            steps = summary["global_step"]
            print(f"round {index + 1}: without {plain[-1]:.1f} s, with save_steps "
                  f"{args.save_steps}: {saving[-1]:.1f} s", flush=True)
    base, with_saves = statistics.median(plain), statistics.median(saving)
    extra_states = steps // args.save_steps
    print(f"\n{steps} optimizer steps, {extra_states} extra mid-epoch states")
    print(f"without save_steps: {base:.1f} s; with save_steps {args.save_steps}: "
          f"{with_saves:.1f} s; overhead {100 * (with_saves / base - 1):+.1f} % "
          f"({(with_saves - base) / max(extra_states, 1):.2f} s per state)")


if __name__ == "__main__":
    main()
