"""Run ``python -m lab`` for a benchmark; a failure ends the benchmark with the lab's output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def lab_cli(lab_dir: Path, *args: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "lab", "--lab-dir", str(lab_dir), *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"lab {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
