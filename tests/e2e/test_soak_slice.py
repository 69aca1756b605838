"""A short slice of the chaos soak (bench/soak.py, issue 14) in `make test`: a fixed seed, a few
short runs (fast_deploy, fast rollback, canary_weight) on a lab of its own (octet 76,
``LIFTOFF_SOAK_SLICE_LAB_OCTET``) through a real Airflow, each with one or two faults at a
seeded moment; fails on any invariant violation. The long soak is ``make soak``.

The soak runs as its own process (as `make soak` does) and writes its JSON summary; the test
reads it: every run done, faults injected, the checker's self-test seen (a server drained by
hand without a record is reported), and no violation.
"""

from __future__ import annotations

import json
import os
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
# Every fault kind of the LocalExecutor soak (the default; the Celery worker kill needs
# --celery), the scheduler, api-server and HAProxy kills included: the two violations they found
# (audit rows lost to a kill -9, a restarted HAProxy's lost state) are fixed, each with a
# regression test of its own (tests/integration/test_faults.py, test_lb_restart_lab.py).


def test_a_short_soak_keeps_every_invariant(tmp_path: Path):
    summary_file = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--seed", str(SEED), "--runs", str(RUNS), "--short",
         "--octet", str(OCTET),
         "--tmp", str(tmp_path / "soak"), "--json", str(summary_file)],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    log = proc.stdout[-6000:] + proc.stderr[-4000:]
    assert summary_file.exists(), f"the soak wrote no summary (exit {proc.returncode}):\n{log}"
    summary = json.loads(summary_file.read_text())
    assert summary["checker_self_test"]["ok"], summary["checker_self_test"]
    assert summary["fault_kinds"] == [k for k, _ in FAULTS if k not in CELERY_ONLY]  # the kills among them
    assert summary["runs"] == RUNS and summary["faults_total"] >= 2, summary  # a fault may miss a 1 s run
    violations = "\n".join(f"{v['violation']}  [{v['step']}; replay: {v['replay']}]"
                           for v in summary["violations"])
    assert summary["violations_total"] == 0, f"invariant violations:\n{violations}"
    assert proc.returncode == 0, log
