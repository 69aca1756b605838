"""Test-wide set-up: Airflow gets a metadata DB of its own for the test session, so tests
never touch the checkout's `.airflow/` (a demo may be using it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_home = Path(tempfile.mkdtemp(prefix="liftoff-test-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_home)
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_home}/airflow.db"
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
