"""Test-wide set-up: Airflow gets a metadata DB of its own for the test session, so tests
never touch the checkout's `.airflow/` (a demo may be using it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

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


# -- the order and the split of `make test` (two workers, --dist loadfile --no-loadscope-reorder) --
# The modules that start real Airflow stacks (api-server, scheduler, dag-processor, triggerer; a
# Celery worker; the soak's own) form one unit of work: they run on one worker, one stack at a
# time, first (two stacks at once on two slow cores made the api-server answer tasks' calls late
# enough to have them killed). Every other module is a unit of its own (its lab and fixtures stay
# on one worker), and the other worker takes them longest first, so that no long module is left
# to run alone at the end. (pytest-xdist's default order is by number of tests: it put the
# longest modules, the one-test soak and the Celery run, last.)
STACK_GROUP = "airflow-stacks"
STACK_MODULES = ("test_soak_slice", "test_distributed", "test_scheduler_path", "test_approval",
                 "test_chat_e2e", "test_browser_harness", "test_chatops_api")
# Then the longest of the rest (60-420 s each in a run of 2026-12-04), then by tier (e2e,
# integration, unit) in collection order.
LONGEST_FIRST = (*STACK_MODULES, "test_pipelines", "test_canary_judge_dags", "test_faults_dags",
                 "test_operations_lab", "test_analysis_lab", "test_one_door_dags", "test_lab_processes")
TIERS = ("e2e", "integration", "unit")


def _module_rank(path: Path) -> tuple[int, int]:
    if path.stem in LONGEST_FIRST:
        return 0, LONGEST_FIRST.index(path.stem)
    tier = path.parent.name
    return 1, TIERS.index(tier) if tier in TIERS else len(TIERS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The stack modules first, then the longest modules, then by tier."""
    items.sort(key=lambda item: _module_rank(Path(str(item.fspath))))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """With ``--dist loadfile``: a unit of work per module, the stack modules one unit."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class StackGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return STACK_GROUP if Path(module).stem in STACK_MODULES else module

    return StackGroupScheduling(config, log)
