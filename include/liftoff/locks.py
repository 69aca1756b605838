"""Environment locks: held by a run from its first change to its end, or by a person by hand.

The lock lives in the state store (atomic, survives Airflow restarts, visible to ChatOps).
Runs take it through :func:`liftoff.guard.admit` on every change, so a cleared task takes it
again when it is free and refuses, naming the holder, when someone else holds it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from liftoff.errors import LockHeld
from liftoff.runs import Run
from liftoff.store import Lock
from liftoff.versions import validate_name, validate_reason

log = logging.getLogger(__name__)

MANUAL_PREFIX = "manual-"  # run id of a lock taken by hand: manual-<who>
REASON_CHARS = 500


def manual_run_id(who: str) -> str:
    return f"{MANUAL_PREFIX}{validate_name('who', who)}"[:250]


def by_hand(lock: Lock | None) -> bool:
    return lock is not None and lock.run_id.startswith(MANUAL_PREFIX)


def describe(lock: Lock) -> str:
    """``gstg is locked by alice (run manual-alice, since 2026-12-02 16:40Z): incident 4242``."""
    return (f"{lock.env} is locked by {lock.who} (run {lock.run_id}, since {lock.since:%Y-%m-%d %H:%M}Z)"
            + (f": {lock.reason}" if lock.reason else "") + _watch_hint(lock))


def _watch_hint(lock: Lock) -> str:
    """How to follow the holder: its run id as Airflow made it, with its DAG (the pipeline that
    starts the lock reason), ready to paste."""
    if lock.run_id.startswith(MANUAL_PREFIX):
        return ""
    dag = lock.reason.split(" ", 1)[0] if lock.reason else ""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", dag):
        return ""
    return f" (follow it: liftoff watch {lock.run_id} --dag {dag})"


def held_by_other(run: Run, env_name: str) -> Lock | None:
    """The lock of ``env_name`` when someone other than this run holds it."""
    lock = run.store.get_lock(env_name)
    return lock if lock is not None and lock.run_id != run.run_id else None


def hold(run: Run, env_name: str, reason: str) -> Lock:
    """This run holds ``env_name``'s lock: taken when free (again, for a cleared task), kept when
    it holds it already; LockHeld naming the holder when another run or a person holds it."""
    try:
        return run.store.acquire(env_name, run.run_id, run.who, reason[:REASON_CHARS])
    except LockHeld as exc:
        raise LockHeld(exc.lock, f"{exc}. Nothing was changed: wait for it, or ask {exc.lock.who} to "
                                 f"release it (liftoff unlock {env_name} --reason ...)") from None


def release_locks(run: Run, envs: Iterable[str]) -> list[str]:
    """Release every lock this run still holds (the run is over, whatever its result)."""
    return [e for e in envs if run.store.release(e, run.run_id)]


def lock_env(run: Run, env_name: str, reason: str) -> dict:
    """``deploy lock ENV``: hold the environment's lock by hand (run id ``manual-<who>``); every
    deploy's changes are refused until it is unlocked. Raises LockHeld naming another holder."""
    env = run.env(env_name)
    reason = validate_reason(reason)
    lock = run.store.acquire(env.name, manual_run_id(run.who), run.who, f"locked by hand: {reason}")
    return {"env": env.name, "locked": True, "run_id": lock.run_id, "who": lock.who, "reason": lock.reason,
            "since": lock.since.isoformat()}


def unlock_env(run: Run, env_name: str, reason: str) -> dict:
    """``deploy unlock ENV``: remove whoever holds the lock (by hand or a run), recorded with
    who and why. A run whose lock is removed takes it again at its next change, if still free."""
    env = run.env(env_name)
    reason = validate_reason(reason)
    removed = run.store.force_release(env.name, run.who, reason)
    if removed is None:
        return {"env": env.name, "locked": False, "removed": None}
    if not by_hand(removed):  # a running deploy's lock
        log.warning("unlocked %s held by running deploy %s (%s)", env.name, removed.run_id, removed.who)
    return {"env": env.name, "locked": False,
            "removed": {"run_id": removed.run_id, "who": removed.who, "reason": removed.reason,
                        "since": removed.since.isoformat(), "by_hand": by_hand(removed)}}
