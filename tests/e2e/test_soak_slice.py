"""A short slice of the chaos soak (bench/soak.py, issue 14) in `make test`: a fixed seed, a few
short runs (fast_deploy, fast rollback, canary_weight) on a lab of its own (octet 76,
``LIFTOFF_SOAK_SLICE_LAB_OCTET``) through a real Airflow, each with one or two faults at a
seeded moment; fails on any invariant violation. The long soak is ``make soak``.

The soak runs as its own process (as `make soak` does) and writes its JSON summary; the test
reads it: every run done, faults injected, the checker's self-test seen (a server drained by
hand without a record is reported), and no violation.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak import CELERY_ONLY, FAULTS

pytestmark = [pytest.mark.airflow, pytest.mark.lab]

REPO = Path(__file__).resolve().parents[2]
OCTET = int(os.environ.get("LIFTOFF_SOAK_SLICE_LAB_OCTET", "76"))
SEED = 21
RUNS = 6
TIMEOUT_S = 1500  # 133-382 s on this project's CI machine; several times that on a slower one
# Every fault kind of the LocalExecutor soak (the default; the Celery worker kill needs
# --celery), the scheduler, api-server and HAProxy kills included: the two violations they found
# (audit rows lost to a kill -9, a restarted HAProxy's lost state) are fixed, each with a
# regression test of its own (tests/integration/test_faults.py, test_lb_restart_lab.py).


def test_a_short_soak_keeps_every_invariant(tmp_path: Path):
    summary_file = tmp_path / "soak.json"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--seed", str(SEED), "--runs", str(RUNS), "--short",
         "--octet", str(OCTET),
         "--tmp", str(tmp_path / "soak"), "--json", str(summary_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        out, err = stop_soak(proc, tmp_path / "soak" / "lab")
        pytest.fail(f"the soak slice did not end within {TIMEOUT_S} s (stopped; its lab and Airflow taken "
                    f"down):\n{out[-6000:]}{err[-4000:]}")
    log = out[-6000:] + err[-4000:]
    assert summary_file.exists(), f"the soak wrote no summary (exit {proc.returncode}):\n{log}"
    summary = json.loads(summary_file.read_text())
    assert summary["checker_self_test"]["ok"], summary["checker_self_test"]
    assert summary["fault_kinds"] == [k for k, _ in FAULTS if k not in CELERY_ONLY]  # the kills among them
    assert summary["runs"] == RUNS and summary["faults_total"] >= 2, summary  # a fault may miss a 1 s run
    violations = "\n".join(f"{v['violation']}  [{v['step']}; replay: {v['replay']}]"
                           for v in summary["violations"])
    assert summary["violations_total"] == 0, f"invariant violations:\n{violations}"
    assert proc.returncode == 0, log


def stop_soak(proc: subprocess.Popen, lab_dir: Path) -> tuple[str, str]:
    """SIGTERM: the soak takes its Airflow and lab down; whatever is left of its process group
    is killed, and the lab is taken down again (its daemons leave the group), so nothing of it
    slows the tests after this one."""
    proc.terminate()
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        out, err = "", ""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    if proc.poll() is None:
        out, err = proc.communicate()
    if lab_dir.exists():
        subprocess.run([sys.executable, "-m", "lab", "--lab-dir", str(lab_dir), "down"], cwd=REPO,
                       capture_output=True, timeout=120)
    return out or "", err or ""
