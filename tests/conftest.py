"""Test-wide set-up: Airflow gets a metadata DB of its own for the test session, so tests
never touch the checkout's `.airflow/` (a demo may be using it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Under pytest-xdist (make test: two workers, a test file on one worker), a worker's session
# labs (the integration tier's and the e2e tier's) take octets of their own: worker k adds
# 100 * k. The labs of single modules have distinct octets already and stay on one worker.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and _WORKER[2:].isdigit() and int(_WORKER[2:]) > 0:
    for _name, _octet in (("LIFTOFF_TEST_LAB_OCTET", 43), ("LIFTOFF_E2E_LAB_OCTET", 45)):
        os.environ.setdefault(_name, str(_octet + 100 * int(_WORKER[2:])))

_home = Path(tempfile.mkdtemp(prefix="liftoff-test-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_home)
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_home}/airflow.db"
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
