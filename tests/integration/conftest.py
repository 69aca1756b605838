"""The session lab: one real lab (labd, sshd, HAProxy x3, Prometheus, Alertmanager,
Pushgateway) on loopback for the whole integration run.

Octet 43 by default (``LIFTOFF_TEST_LAB_OCTET`` to change it); the lab lives in a pytest
temporary directory and is brought down at the end of the session.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.labkit import Lab, lab_octet, run_lab_cli, running_lab


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("lab"), lab_octet(), "--install-seconds", "0.2") as lab:
        yield lab


@pytest.fixture(scope="session")
def lab_cli() -> Callable[..., subprocess.CompletedProcess]:
    """``lab_cli(lab_dir, *args)`` runs ``python -m lab --lab-dir lab_dir *args``."""
    return run_lab_cli


@pytest.fixture(scope="session")
def lab_test_octet() -> int:
    """The session lab's octet (43, or LIFTOFF_TEST_LAB_OCTET)."""
    return lab_octet()


@pytest.fixture
def lab_env(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The lab's liftoff exports (Airflow connections, inventory) set in os.environ."""
    for name, value in lab.env.items():
        monkeypatch.setenv(name, value)
    return lab.env
