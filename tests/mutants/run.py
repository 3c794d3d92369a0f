"""Break the code on purpose and check that the suite notices.

    python tests/mutants/run.py [NAME ...] [--list] [--keep] [--shard K/N]

Each ``tests/mutants/*.yaml`` lists breaks: ``name``, the ``promise`` it breaks, the
``file`` it edits, an ``old`` text found exactly once in that file and the ``new`` text
that replaces it, and the ``tests`` (pytest node ids) that must catch it. For each break
the repository is copied to a scratch folder, the break applied there (never here), and
the named tests run against the copy (``PYTHONPATH`` puts the copy's ``pbt`` first).
A break is caught when pytest reports a failing test (exit 1); a test that errors out on
collection or finds nothing (exit 2-5) counts as not caught. Prints one line a break and
``breaks N / caught M``; exits 1 unless every break is caught.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COPIED = ("pbt", "recipes", "tests", "bench", "pyproject.toml", "README.md")


def load_breaks() -> list[dict]:
    breaks = []
    for path in sorted(Path(__file__).parent.glob("*.yaml")):
        for entry in yaml.safe_load(path.read_text()) or []:
            missing = {"name", "promise", "file", "old", "new", "tests"} - set(entry)
            if missing:
                raise SystemExit(f"{path}: break {entry.get('name')!r} lacks {sorted(missing)}")
            breaks.append({**entry, "source": path.name})
    names = [b["name"] for b in breaks]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise SystemExit(f"break names used twice: {sorted(duplicated)}")
    return breaks


def scratch_copy() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="pbt-mutant-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "work_space")
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=ignore)
        elif source.exists():
            shutil.copy2(source, folder / name)
    return folder


def try_break(entry: dict, keep: bool) -> tuple[bool, str, float]:
    folder = scratch_copy()
    started = time.time()
    try:
        target = folder / entry["file"]
        target.write_text(target.read_text().replace(entry["old"], entry["new"], 1))
        env = dict(os.environ, PYTHONPATH=str(folder) + os.pathsep
                   + os.environ.get("PYTHONPATH", ""))
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
             "-o", "addopts=", *entry["tests"]],
            cwd=folder, env=env, capture_output=True, text=True, timeout=1800)
        lines = [line for line in result.stdout.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else result.stderr.strip()[-200:]
        return result.returncode == 1, last, time.time() - started
    finally:
        if keep:
            print(f"  kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="only these breaks (default: all)")
    parser.add_argument("--list", action="store_true", help="list the breaks and stop")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies")
    parser.add_argument("--shard", default="1/1",
                        help="K/N: only every N-th break from the K-th (for N runs side by side)")
    args = parser.parse_args()
    breaks = load_breaks()
    if args.names:
        unknown = set(args.names) - {b["name"] for b in breaks}
        if unknown:
            raise SystemExit(f"no such break: {sorted(unknown)}")
        breaks = [b for b in breaks if b["name"] in args.names]
    shard, shards = (int(part) for part in args.shard.split("/"))
    breaks = breaks[shard - 1::shards]
    if args.list:
        for entry in breaks:
            print(f"{entry['name']:40s} {entry['file']:28s} {entry['promise']}")
        return 0
    stale = [f"{b['source']}: {b['name']!r}" for b in breaks
             if (ROOT / b["file"]).read_text().count(b["old"]) != 1]
    if stale:
        raise SystemExit("these breaks' 'old' text is not found exactly once in their file "
                         "(the code moved: update the break): " + "; ".join(stale))
    caught = 0
    for entry in breaks:
        ok, last, seconds = try_break(entry, args.keep)
        caught += ok
        print(f"{'caught' if ok else 'MISSED':7s} {entry['name']:40s} {seconds:6.0f} s  {last}",
              flush=True)
    print(f"breaks {len(breaks)} / caught {caught}")
    return 0 if caught == len(breaks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
