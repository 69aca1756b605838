"""The one door on the automatic rollback, through the real DAGs (dag.test) on a lab of its own
(octet 53, ``LIFTOFF_DOOR_E2E_LAB_OCTET``).

A gate that fails after post-deployment migrations (stage 4 on gstg, stage 9 on gprd) sends
the run to ``on_failure=rollback``; the environment's database then holds a post-deployment
migration the previous package does not contain, so the rollback flow's safety check (and the
guard behind every step) refuses: the run halts with one sentence naming the migration, the
hosts stay on the new build (nothing of the old package is installed), and the refusal is
recorded in the environment's lock history with the deploy record ``halted``.

The gate failure is a real alert: once the lab's database shows the build's post-deployment
migration, a warning alert for the environment goes to the lab's Alertmanager, which the
stage's quiet period (in the triggerer path of dag.test) sees.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from liftoff.inventory import load_inventory
from liftoff.store import Store
from tests.labkit import Lab, dags_on, running_lab

pytestmark = [pytest.mark.airflow, pytest.mark.lab]

OCTET = int(os.environ.get("LIFTOFF_DOOR_E2E_LAB_OCTET", "53"))
BASE = "17.5.0-ee.0"
STAGING_BUILD = "17.9.0+rnightly.5301.abc5301-0"
PRODUCTION_BUILD = "17.9.0+rnightly.5302.abc5302-0"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("door-e2e-lab"), OCTET, "--install-seconds", "0.1") as lab:
        yield lab


@pytest.fixture(scope="module")
def dags(airflow_db: str, lab: Lab) -> Iterator[dict]:
    with dags_on(lab) as parsed:
        yield parsed


@pytest.fixture
def store(dags) -> Iterator[Store]:
    s = Store.from_settings(load_inventory())
    yield s
    s.close()


def post_alert(lab: Lab, env: str, starts: datetime, ends: datetime) -> None:
    body = [{"labels": {"alertname": "LiftoffDoorTest", "env": env, "severity": "warning"},
             "annotations": {"summary": "injected by test_one_door_dags"},
             "startsAt": starts.isoformat(), "endsAt": ends.isoformat()}]
    req = urllib.request.Request(f"http://{lab.config.alertmanager_addr}/api/v2/alerts",
                                 data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


class AlertAfterMigration(threading.Thread):
    """Fires a warning alert on ``env`` once its database shows ``migration``; resolves it at exit."""

    def __init__(self, lab: Lab, env: str, migration: str):
        super().__init__(daemon=True)
        self.lab, self.env, self.migration = lab, env, migration
        self.stop = threading.Event()
        self.fired = threading.Event()
        self.started = datetime.now(UTC)

    def run(self) -> None:
        while not self.stop.is_set():
            if self.migration in self.lab.status()["environments"][self.env]["migrations"]:
                self.started = datetime.now(UTC)
                post_alert(self.lab, self.env, self.started, self.started + timedelta(minutes=10))
                self.fired.set()
                return
            self.stop.wait(0.3)

    def __enter__(self) -> AlertAfterMigration:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(30)
        if self.fired.is_set():
            post_alert(self.lab, self.env, self.started, datetime.now(UTC))  # resolved
            self.lab.wait_for(f"the injected alert on {self.env} resolved",
                              lambda: not self.lab.alerts(env=self.env, alertname="LiftoffDoorTest"), 120)


def run(dag, capfd, **conf) -> tuple[str, dict[str, str], str]:
    defaults = {"dry_run": False, "on_failure": "rollback", "allow_precheck_failure": None,
                "quiet_period_seconds": 4}
    conf = {k: v for k, v in {**defaults, **conf}.items() if k in dag.params}
    try:
        dr = dag.test(run_conf=conf)
    finally:
        out, err = capfd.readouterr()
    return dr.state, {ti.task_id: ti.state for ti in dr.get_task_instances()}, out + err


def installs_of(lab: Lab, version: str) -> list[str]:
    log = lab.config.path("state", "audit.log")
    text = log.read_text() if log.exists() else ""
    return [ln for ln in text.splitlines() if f"gitlab-ee={version}" in ln]


def post_migration(build: dict) -> str:
    """The lab's post-deployment migration of a build (``<seq>_post_<slug>``)."""
    from lab.model import slug

    return f"{build['seq']:06d}_post_{slug(build['version'])}"


def fleet_versions(lab: Lab, env: str) -> set[str]:
    hosts = lab.status()["environments"][env]["hosts"]
    return {h["installed"] for h in hosts if not h["name"].startswith("deploy")}


def assert_refused_and_halted(store: Store, lab: Lab, env: str, build: str, migration: str, out: str,
                              tasks: dict[str, str], old_installs: int) -> None:
    assert tasks["rollback"] == "failed" and tasks["halt"] == "skipped", tasks
    assert f"automatic rollback of {env} to {BASE} refused: " in out, out[-3000:]
    assert "post-deployment migration(s) newer than" in out
    assert migration in out and f"liftoff rollback {env} --to {BASE} --override-reason" in out
    assert fleet_versions(lab, env) == {build}, "the refused rollback changed hosts"
    assert len(installs_of(lab, BASE)) == old_installs, "the old package was installed somewhere"
    records = [d for d in store.deployments(env) if d.version == build]
    assert records and records[0].status == "halted", records
    assert not [d for d in store.deployments(env) if d.kind == "rollback" and d.run_id == records[0].run_id]
    events = [e for e in store.lock_events(env) if e.action == "rollback_refused"]
    assert events and events[0].run_id == records[0].run_id and migration in events[0].reason
    assert store.get_lock(env) is None, "the halted run kept its lock"


def test_stage_4_failing_after_post_migrations_refuses_the_automatic_rollback(dags, lab: Lab, store, capfd):
    migration = post_migration(lab.build_add(STAGING_BUILD, nightly=True))
    old_installs = len(installs_of(lab, BASE))
    with AlertAfterMigration(lab, "gstg", migration) as watcher:
        state, tasks, out = run(dags["deploy_canary"], capfd, version=STAGING_BUILD)
    assert watcher.fired.is_set(), "the post-deployment migration never showed up"
    assert state == "failed", tasks
    assert tasks["stage_4_staging_post_migrations.post_migrations"] == "success", tasks
    assert tasks["stage_4_staging_post_migrations.quiet_period"] == "failed", tasks
    assert_refused_and_halted(store, lab, "gstg", STAGING_BUILD, migration, out, tasks, old_installs)
    assert fleet_versions(lab, "gprd-cny") == {BASE}, "canary was touched"


def test_stage_9_failing_after_post_migrations_refuses_the_automatic_rollback(dags, lab: Lab, store, capfd):
    # canary (still on the base build) gets no production traffic: QA must see the new build only
    migration = post_migration(lab.build_add(PRODUCTION_BUILD, nightly=True))
    old_installs = len(installs_of(lab, BASE))
    with AlertAfterMigration(lab, "gprd", migration) as watcher:
        state, tasks, out = run(dags["deploy_production"], capfd, version=PRODUCTION_BUILD,
                                override_reason="door test: canary skipped on purpose", canary_weight=0,
                                allow_precheck_failure="door test: canary is not on this build")
    assert watcher.fired.is_set(), "the post-deployment migration never showed up"
    assert state == "failed", tasks
    assert tasks["stage_9_post_deployment_migrations.post_migrations"] == "success", tasks
    assert tasks["stage_9_post_deployment_migrations.quiet_period"] == "failed", tasks
    assert_refused_and_halted(store, lab, "gprd", PRODUCTION_BUILD, migration, out, tasks, old_installs)


PATCH_ID = "sec-door-1"
PATCHED_ROLES = ("web", "api")


def audit_since(lab: Lab, mark: int) -> list[tuple[str, str]]:
    """(host, command) of every command the lab's hosts ran after ``mark`` lines of its audit log."""
    lines = lab.config.path("state", "audit.log").read_text().splitlines()[mark:]
    return [(f[1], f[4]) for f in (ln.split("\t") for ln in lines) if len(f) >= 5]


def audit_mark(lab: Lab) -> int:
    log = lab.config.path("state", "audit.log")
    return len(log.read_text().splitlines()) if log.exists() else 0


def role_hosts(lab: Lab, env: str, roles: tuple[str, ...]) -> set[str]:
    return {h["name"] for h in lab.status()["environments"][env]["hosts"] if h["role"] in roles}


def fast_deploy(dags, capfd, version: str) -> tuple[str, dict[str, str], str]:
    dag = dags["fast_deploy"]
    try:
        dr = dag.test(run_conf={"environment": "gstg", "version": version, "internal": False,
                                "reason": "security fix rollout INC-77"})
    finally:
        out, err = capfd.readouterr()
    return dr.state, {ti.task_id: ti.state for ti in dr.get_task_instances()}, out + err


def test_a_patch_for_web_and_api_is_not_reapplied_on_other_roles_by_a_later_deploy(dags, lab: Lab, capfd):
    patch = dags["post_deploy_patch"].test(run_conf={
        "environment": "gstg", "patch_id": PATCH_ID, "patch": "--- a/app.rb\n+++ b/app.rb\n-x\n+y\n",
        "roles": list(PATCHED_ROLES), "reason": "security fix 42", "action": "apply"})
    capfd.readouterr()
    assert patch.state == "success"
    patched = role_hosts(lab, "gstg", PATCHED_ROLES)
    others = role_hosts(lab, "gstg", ("gitaly", "git", "sidekiq"))
    assert patched and others

    lab.build_add("17.9.1+rnightly.5303.abc5303-0", nightly=True)
    mark = audit_mark(lab)
    state, tasks, _ = fast_deploy(dags, capfd, "17.9.1+rnightly.5303.abc5303-0")
    assert state == "success", tasks
    applied = {host for host, cmd in audit_since(lab, mark) if f"gitlab-patch apply {PATCH_ID}" in cmd}
    assert applied == patched, f"re-applied on {sorted(applied)}; its roles' hosts are {sorted(patched)}"
    assert not applied & others

    # a build that includes the patch does not get it re-applied anywhere
    lab.build_add("17.9.2+rnightly.5304.abc5304-0", nightly=True, includes_patches=[PATCH_ID])
    mark = audit_mark(lab)
    state, tasks, _ = fast_deploy(dags, capfd, "17.9.2+rnightly.5304.abc5304-0")
    assert state == "success", tasks
    assert [c for _, c in audit_since(lab, mark) if "gitlab-patch apply" in c] == []
    assert any("apt-get install" in c for _, c in audit_since(lab, mark)), "the build was not installed"
