"""The e2e tier: the DAGs against a real lab of their own (octet 45), through dag.test()."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.labkit import Lab, running_lab

E2E_OCTET = int(os.environ.get("LIFTOFF_E2E_LAB_OCTET", "45"))


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """Migrate the session's Airflow metadata DB (tests/conftest.py points it at a tmp dir)."""
    out = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]


@pytest.fixture(scope="session")
def e2e_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("e2e-lab"), E2E_OCTET, "--install-seconds", "0.2") as lab:
        # These tests roll gstg back on purpose many times in a row: the halt after repeated
        # automatic rollbacks (tested on its own) is off for this lab.
        path = Path(lab.env["LIFTOFF_INVENTORY"])
        data = yaml.safe_load(path.read_text())
        for env in data["environments"].values():
            env.setdefault("extra", {})["halt_after_rollbacks"] = 0
        path.write_text(yaml.safe_dump(data))
        yield lab


@pytest.fixture(scope="session")
def pipelines(airflow_db: str, e2e_lab: Lab) -> dict:
    """The lab's connections in the environment, and the DAGs parsed from dags/."""
    for name, value in e2e_lab.env.items():
        os.environ[name] = value
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(os.path.join(os.path.dirname(__file__), "..", "..", "dags")))
    assert not bag.import_errors, bag.import_errors
    return bag.dags
