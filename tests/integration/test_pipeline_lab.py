"""The stage precheck against the real lab: it passes on a healthy environment and fails
closed, naming why, on a lock held by another run, a server drained without a record, or
the weekly change lock; an override reason lets it pass, recorded."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import pytest

from liftoff.checks import precheck
from liftoff.errors import PrecheckFailed
from liftoff.inventory import load_inventory
from liftoff.runs import Run

pytestmark = pytest.mark.lab
SUNDAY = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
WEDNESDAY = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@pytest.fixture
def run(lab_env) -> Run:
    return Run(run_id="precheck-test", who="tester")


def test_healthy_environment_passes(lab, run: Run):
    result = precheck(run, "gstg", "17.9.0-ee.0", now=WEDNESDAY)
    assert result["failures"] == [] and not result["overridden"]
    assert set(result["versions"].values()) == {result["previous_version"]}


def test_lock_held_by_another_run_names_the_holder(lab, run: Run):
    run.store.acquire("gstg", "other-run", "alice", "deploying by hand")
    try:
        with pytest.raises(PrecheckFailed, match="locked by alice .run other-run"):
            precheck(run, "gstg", "17.9.0-ee.0", now=WEDNESDAY)
    finally:
        run.store.force_release("gstg", "tester", "test over")


def test_drained_server_without_a_record_fails_closed(lab, run: Run):
    lab.haproxy("fe-01-lb-gstg", "set server web/web-02-sv-gstg state drain")
    try:
        with pytest.raises(PrecheckFailed, match="web-02-sv-gstg"):
            precheck(run, "gstg", "17.9.0-ee.0", now=WEDNESDAY)
        run.store.record_drained("gstg", "web-02-sv-gstg", "earlier-run", "left by a failed deploy")
        assert precheck(run, "gstg", "17.9.0-ee.0", now=WEDNESDAY)["failures"] == []
    finally:
        run.store.clear_drained("gstg", "web-02-sv-gstg")
        lab.haproxy("fe-01-lb-gstg", "set server web/web-02-sv-gstg state ready")


def test_weekly_change_lock_needs_an_override(lab, run: Run):
    inventory = load_inventory()
    gstg = inventory.env("gstg")
    locked = dataclasses.replace(gstg, extra={**gstg.extra, "change_lock": "weekly"})
    run.inventory = dataclasses.replace(inventory, environments={**inventory.environments, "gstg": locked})
    with pytest.raises(PrecheckFailed, match="change lock"):
        precheck(run, "gstg", "17.9.0-ee.0", now=SUNDAY)
    assert precheck(run, "gstg", "17.9.0-ee.0", now=WEDNESDAY)["failures"] == []
    result = precheck(run, "gstg", "17.9.0-ee.0", now=SUNDAY, override_reason="security fix S1 incident 42")
    assert result["overridden"] and "change lock" in result["failures"][0]
