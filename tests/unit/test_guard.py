"""The one door (liftoff.guard) without a lab: an in-memory store, the unit inventory, and the
database and build source read through monkeypatched seams. Plus a walk over the engine's
source: every function that changes hosts, LBs, the role, the database or chef passes the door.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from liftoff import builds, guard
from liftoff.errors import InvalidInput, InvalidVersion, InventoryError, LockHeld, RollbackRefused
from liftoff.inventory import parse_inventory
from liftoff.runs import Run
from liftoff.store import Store
from tests.unit.test_operations_unit import INVENTORY

V1, V2, V3 = "17.5.0-ee.0", "17.6.0-ee.0", "17.7.0-ee.0"
ENGINE = Path(__file__).resolve().parents[2] / "include" / "liftoff"


@pytest.fixture()
def store():
    s = Store("sqlite://")
    yield s
    s.close()


@pytest.fixture(autouse=True)
def lbs(monkeypatch):
    """The unit inventory's LBs do not exist: the door's LB step (put back by
    tests/unit/test_lb_reconcile.py against fake LBs) is a seam here; its calls are kept."""
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(guard, "reconcile_lbs", lambda run, env, change: calls.append((env.name, change)))
    return calls


def make_run(store: Store, run_id: str = "unit-run-1", who: str = "alice",
             override: str | None = None) -> Run:
    return Run(run_id=run_id, who=who, pipeline="unit", inventory=parse_inventory(INVENTORY), _store=store,
               override_reason=override)


@pytest.fixture()
def database(monkeypatch):
    """gprd's applied post-deployment migrations and what the build source says of each build."""
    state = {"applied": ["000001_post_a", "000002_post_b"], "builds": {V1: {"seq": 1}, V2: {"seq": 2}}}
    monkeypatch.setattr(guard, "applied_post_migrations", lambda run, env: list(state["applied"]))
    monkeypatch.setattr(builds, "build_info", lambda inventory, version: state["builds"].get(version, {}))
    return state


def deployed(store: Store, version: str, run_id: str = "earlier", status: str = "success") -> None:
    store.record_deployment("gprd", version, run_id, status=status)


# -- the lock ----------------------------------------------------------------------------------------

def test_a_free_environment_is_locked_by_the_run_that_changes_it(store):
    run = make_run(store)
    admission = guard.admit(run, "gprd", "rollout")
    assert admission.took_lock and store.get_lock("gprd").run_id == run.run_id
    again = guard.admit(run, "gprd", "chef")  # a cleared task of the same run: re-entrant
    assert not again.took_lock and store.get_lock("gprd").run_id == run.run_id


def test_a_lock_held_by_a_person_refuses_every_change_naming_the_holder(store):
    store.acquire("gprd", "manual-bob", "bob", "incident 4242")
    run = make_run(store)
    for change in guard.CHANGES:
        with pytest.raises(LockHeld, match=r"locked by run manual-bob \(bob\).*4242.*Nothing was changed"):
            guard.admit(run, "gprd", change)
    assert store.get_lock("gprd").run_id == "manual-bob"


def test_a_lock_released_by_finalize_is_taken_again_by_a_cleared_task(store):
    run = make_run(store)
    guard.admit(run, "gprd", "begin", version=V2)
    store.release("gprd", run.run_id)  # the run failed: finalize released its lock
    assert guard.admit(run, "gprd", "rollout", version=V2).took_lock
    assert store.get_lock("gprd").run_id == run.run_id


def test_force_passes_a_held_lock_with_a_record_and_leaves_it(store):
    store.acquire("gprd-cny", "canary-deploy", "carol", "deploy_canary")
    run = make_run(store)
    with guard.entered(run, "gprd-cny", "canary_weight", force=True) as admission:
        assert not admission.took_lock
    assert store.get_lock("gprd-cny").run_id == "canary-deploy"
    assert store.lock_events("gprd-cny")[0].action == "override"


def test_a_one_shot_change_releases_only_a_lock_it_took(store):
    run = make_run(store)
    with guard.entered(run, "gprd-cny", "canary_weight"):
        assert store.get_lock("gprd-cny").run_id == run.run_id
    assert store.get_lock("gprd-cny") is None
    guard.admit(run, "gprd-cny", "begin")
    with guard.entered(run, "gprd-cny", "canary_weight"):
        pass
    assert store.get_lock("gprd-cny").run_id == run.run_id, "a lock the run held before was released"


# -- inputs --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "change", "version", "error"), [
    ("gstg", "rollout", None, InventoryError),
    ("gprd", "reboot", None, InvalidInput),
    ("gprd", "rollout", "17.5.0-ee.0\n", InvalidVersion),
    ("gprd", "rollout", "17.5.0; rm -rf /", InvalidVersion),
])
def test_bad_input_is_refused_and_takes_no_lock(store, env, change, version, error):
    with pytest.raises(error):
        guard.admit(make_run(store), env, change, version=version)
    assert store.list_locks() == []


# -- migration safety ----------------------------------------------------------------------------------

def test_going_back_past_a_post_deployment_migration_is_refused_and_changes_nothing(store, database):
    deployed(store, V1)
    deployed(store, V2, "the-deploy", status="failed")
    with pytest.raises(RollbackRefused, match=r"rollout of gprd back to 17\.5\.0-ee\.0 refused: 1 post-deploy"
                                              r"ment migration\(s\) newer than 17\.5\.0-ee\.0 ran on gprd "
                                              r"\(schema version 1\): 000002_post_b\. Nothing was changed"):
        guard.admit(make_run(store), "gprd", "rollout", version=V1)
    assert store.get_lock("gprd") is None, "a refused change kept the lock it took"


def test_an_unknown_target_is_refused_too(store, database):
    deployed(store, V2)
    with pytest.raises(RollbackRefused, match="cannot tell which post-deployment migrations 17.4.0-ee.0"):
        guard.admit(make_run(store), "gprd", "rollback", version="17.4.0-ee.0")


def test_an_override_reason_passes_and_is_recorded_once(store, database):
    deployed(store, V1)
    deployed(store, V2)
    run = make_run(store, override="INC-12 data fixed by hand")
    first = guard.admit(run, "gprd", "rollback", version=V1)
    guard.admit(run, "gprd", "rollout", version=V1)
    assert first.downgrade_from == V2 and first.newer_post_migrations == ("000002_post_b",)
    assert first.overridden == "INC-12 data fixed by hand"
    overrides = [e for e in store.lock_events("gprd") if e.action == "override"]
    assert len(overrides) == 1 and "INC-12 data fixed by hand" in overrides[0].reason
    assert "000002_post_b" in overrides[0].reason


def test_forward_and_safe_changes_pass_without_reading_the_database(store, monkeypatch):
    deployed(store, V1)
    monkeypatch.setattr(guard, "applied_post_migrations", lambda run, env: pytest.fail("read the database"))
    assert guard.admit(make_run(store), "gprd", "rollout", version=V2).downgrade_from is None
    assert guard.admit(make_run(store), "gprd", "rollout", version=V1).downgrade_from is None


def test_going_back_before_any_post_migration_ran_passes(store, database):
    database["applied"] = ["000001_post_a"]
    deployed(store, V1)
    deployed(store, V2, status="failed")
    admission = guard.admit(make_run(store), "gprd", "rollout", version=V1)
    assert admission.downgrade_from == V2 and admission.newer_post_migrations == ()


# -- every change passes the door: a walk over the engine's source -------------------------------------

DOMAIN = ("deploy", "rollback", "canary", "patches", "locks", "checks", "builds", "runs")
# Calls that change a host, an LB, the version role, the database or chef.
PRIMITIVES = {
    ("fleet", "run_rollout"), ("fleet", "rollout"), ("chef", "prepare"), ("chef", "finish"),
    ("chef", "start"), ("chef", "stop"), ("chef", "set_role_version"), ("migrations", "regular"),
    ("migrations", "post_deployment"), ("migrations", "ensure_package"), ("haproxy", "set_weight"),
    ("haproxy", "drain"), ("haproxy", "ready"), ("haproxy", "maint"), (None, "patch_apply_command"),
    (None, "gitlab_ctl_command"), (None, "apt_install_command"), (None, "getattr_haproxy"),
}
DOORS = {"admit", "entered"}
LB_CHANGES = {"set_weight", "drain", "ready", "maint"}


def _calls(node: ast.AST) -> set[tuple[str | None, str]]:
    out = set()
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        f = call.func
        if isinstance(f, ast.Attribute):
            owner = f.value.id if isinstance(f.value, ast.Name) else None
            out.add((owner, f.attr))
            if owner not in {"fleet", "chef", "migrations"} and f.attr in LB_CHANGES:
                out.add(("haproxy", f.attr))
        elif isinstance(f, ast.Name):
            out.add((None, f.id))
            if f.id == "getattr" and call.args and ast.unparse(call.args[0]) == "haproxy":
                out.add((None, "getattr_haproxy"))
    return out


def engine_functions() -> dict[str, set[tuple[str | None, str]]]:
    """Every top-level function of the domain modules with the calls in it (nested ones included)."""
    found = {}
    for module in DOMAIN:
        tree = ast.parse((ENGINE / f"{module}.py").read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found[f"{module}.{node.name}"] = _calls(node)
    return found


def test_every_engine_function_that_changes_something_passes_the_door():
    functions = engine_functions()
    changing = {name for name, calls in functions.items() if calls & PRIMITIVES}
    admitted = {name for name, calls in functions.items() if {c for _, c in calls} & DOORS}
    assert changing, "the walk found no change at all: PRIMITIVES is out of date"
    # a helper that changes something without the door is fine only when every caller passed it
    # (or is such a helper itself): grow the safe set to a fixed point
    callers = {f: {name for name, calls in functions.items() if f.split(".")[1] in {c for _, c in calls}}
               for f in functions}
    safe = set(admitted)
    while grown := {f for f in functions if f not in safe and callers[f] and callers[f] <= safe}:
        safe |= grown
    unguarded = {f: sorted(callers[f] - safe) or "no caller" for f in changing - safe}
    assert unguarded == {}, f"changes without the door (liftoff.guard.admit): {unguarded}"
    assert changing - admitted <= {"deploy.prepare_env", "patches._patch_all", "patches._patch_host"}


def test_the_walk_would_catch_a_new_path_that_forgets_the_door():
    tree = ast.parse("def sneaky(run, env):\n    return fleet.run_rollout(env, '17.6.0-ee.0')\n")
    assert _calls(tree.body[0]) & PRIMITIVES
    assert not {c for _, c in _calls(tree.body[0])} & DOORS
