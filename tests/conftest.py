"""Test-wide set-up: Airflow gets a metadata DB of its own for the test session, so tests
never touch the checkout's `.airflow/` (a demo may be using it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Under pytest-xdist (make test: two workers, a test file on one worker), the second worker's
# session labs (the integration tier's 43 and 44, the e2e tier's 45) take octets of their own
# (83, 84, 85: below 128, so the lab's wildcard sshd port stays out of the ephemeral range).
# Every module with a lab of its own has an octet no other module uses.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER == "gw1":
    for _name, _octet in (("LIFTOFF_TEST_LAB_OCTET", 83), ("LIFTOFF_E2E_LAB_OCTET", 85)):
        os.environ.setdefault(_name, str(_octet))
elif _WORKER and _WORKER != "gw0":
    raise RuntimeError(f"liftoff's tests run on at most two workers (-n 2), not {_WORKER}")

_home = Path(tempfile.mkdtemp(prefix="liftoff-test-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_home)
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_home}/airflow.db"
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
