"""liftoff's durable state: environment locks, drain records, host progress, audit trail,
deployments, rollout reports, patches and halts, in SQL (SQLite or PostgreSQL) through
SQLAlchemy core.

The state lives outside Airflow's metadata so it survives Airflow restarts, is shared by
every worker and the ChatOps CLI, and can sit in the same Postgres under ``liftoff_*``
tables. Locks are atomic across processes: taking one is a primary-key insert, and the
loser reads the holder back and raises :class:`LockHeld` naming it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    insert,
    select,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from liftoff.errors import InvalidInput, LockHeld, StoreError
from liftoff.versions import validate_name, validate_reason

log = logging.getLogger(__name__)

HOST_STATUSES = ("pending", "draining", "installing", "done", "failed", "skipped")
DEPLOYMENT_KINDS = ("deploy", "rollback")
DEPLOYMENT_STATUSES = ("running", "success", "failed", "halted", "canceled", "rolled_back")
OUTPUT_TAIL_CHARS = 4000
# The output of a write-ahead audit row until its result is written (Store.audit_begin_many).
AUDIT_STARTED = "(started; no result on record: the process running it was killed or lost the store)"

metadata = MetaData()

locks_t = Table(
    "liftoff_locks", metadata,
    Column("env", String(64), primary_key=True),
    Column("run_id", String(250), nullable=False),
    Column("who", String(128), nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("since", Float, nullable=False),
)
lock_events_t = Table(
    "liftoff_lock_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("env", String(64), nullable=False, index=True),
    Column("action", String(32), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("who", String(128), nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("at", Float, nullable=False),
)
drained_t = Table(
    "liftoff_drained", metadata,
    Column("env", String(64), primary_key=True),
    Column("host", String(253), primary_key=True),
    Column("run_id", String(250), nullable=False),
    Column("reason", Text, nullable=False, default=""),
    Column("since", Float, nullable=False),
)
progress_t = Table(
    "liftoff_host_progress", metadata,
    Column("rollout", String(250), primary_key=True),
    Column("host", String(253), primary_key=True),
    Column("env", String(64), nullable=False),
    Column("status", String(32), nullable=False),
    Column("version", String(128), nullable=False, default=""),
    Column("detail", Text, nullable=False, default=""),
    Column("updated", Float, nullable=False),
)
audit_t = Table(
    "liftoff_audit", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("run_id", String(250), nullable=False, index=True),
    Column("env", String(64), nullable=False),
    Column("host", String(253), nullable=False, index=True),
    Column("command", Text, nullable=False),
    Column("exit_code", Integer, nullable=True),
    Column("duration_s", Float, nullable=False),
    Column("output_tail", Text, nullable=False, default=""),
)
deployments_t = Table(
    "liftoff_deployments", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("env", String(64), nullable=False, index=True),
    Column("version", String(128), nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("status", String(32), nullable=False),
    Column("started", Float, nullable=False),
    Column("updated", Float, nullable=False),
)
patches_t = Table(
    "liftoff_patches", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("patch_id", String(128), nullable=False, index=True),
    Column("env", String(64), nullable=False, index=True),
    Column("run_id", String(250), nullable=False),
    Column("who", String(128), nullable=False),
    Column("status", String(32), nullable=False),
    Column("hosts", Text, nullable=False, default=""),
    Column("detail", Text, nullable=False, default=""),
    Column("at", Float, nullable=False),
)
# A rollout's full report (fleet.RolloutReport.to_json()); the task's XCom is its summary. Every
# attempt is kept: a cleared task adds a row.
reports_t = Table(
    "liftoff_rollout_reports", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False, index=True),
    Column("rollout", String(250), nullable=False),
    Column("env", String(64), nullable=False),
    Column("report", Text, nullable=False),
    Column("at", Float, nullable=False),
)
step_failures_t = Table(  # why a task failed, in one sentence: finalize, watch and the UI say it
    "liftoff_step_failures", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False, index=True),
    Column("task_id", String(250), nullable=False),
    Column("reason", Text, nullable=False),
    Column("at", Float, nullable=False),
)
analyses_t = Table(  # every canary judgement (liftoff.analysis): one row per stage and weight step
    "liftoff_analyses", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False, index=True),
    Column("env", String(64), nullable=False, index=True),
    Column("stage", String(64), nullable=False),
    Column("weight", Integer, nullable=True),
    Column("verdict", String(32), nullable=False),
    Column("score", Float, nullable=True),
    Column("decision", String(32), nullable=False),
    Column("verdict_json", Text, nullable=False),
    Column("at", Float, nullable=False),
)
freezes_t = Table(  # ad-hoc change freezes of an environment (liftoff freeze / unfreeze)
    "liftoff_freezes", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("env", String(64), nullable=False, index=True),
    Column("who", String(128), nullable=False),
    Column("reason", Text, nullable=False),
    Column("since", Float, nullable=False),
    Column("until", Float, nullable=False),
    Column("lifted_by", String(128), nullable=True),
    Column("lifted_reason", Text, nullable=True),
    Column("lifted_at", Float, nullable=True),
)
check_approvals_t = Table(  # failed production checks a person approved for one run (HITL)
    "liftoff_check_approvals", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False, index=True),
    Column("env", String(64), nullable=False),
    Column("step", String(64), nullable=False),
    Column("who", String(128), nullable=False),
    Column("reason", Text, nullable=False),
    Column("failures", Text, nullable=False),  # JSON list of the sentences approved
    Column("at", Float, nullable=False),
)
# What liftoff last set on the load balancers beyond drains: the canary's weight in its main
# backends and its state (liftoff.canary.apply_weight), so an LB that lost it gets it back
# (liftoff.lbstate). One row per environment and kind; hosts and backends as JSON lists.
lb_settings_t = Table(
    "liftoff_lb_settings", metadata,
    Column("env", String(64), primary_key=True),
    Column("kind", String(16), primary_key=True),  # weight | state
    Column("value", String(16), nullable=False),
    Column("hosts", Text, nullable=False),
    Column("backends", Text, nullable=False),  # "[]": every backend holding the hosts
    Column("run_id", String(250), nullable=False),
    Column("who", String(128), nullable=False),
    Column("at", Float, nullable=False),
)
halts_t = Table(
    "liftoff_halts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("reason", Text, nullable=False),
    Column("patch_id", String(128), nullable=True),
    Column("who", String(128), nullable=False),
    Column("since", Float, nullable=False),
    Column("lifted_by", String(128), nullable=True),
    Column("lifted_reason", Text, nullable=True),
    Column("lifted_at", Float, nullable=True),
)


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC)


@dataclass(frozen=True)
class Lock:
    env: str
    run_id: str
    who: str
    reason: str
    since: datetime


@dataclass(frozen=True)
class LockEvent:
    env: str
    action: str  # acquire | release | force_release | override | rollback_refused | lb_reconciled
    run_id: str
    who: str
    reason: str
    at: datetime


@dataclass(frozen=True)
class DrainRecord:
    env: str
    host: str
    run_id: str
    reason: str
    since: datetime


@dataclass(frozen=True)
class LBSetting:
    """The canary weight (``kind`` weight, ``value`` 0..100) or state (drain/ready/maint) liftoff
    last set on ``hosts`` in ``backends`` (empty: every backend holding them)."""

    env: str
    kind: str
    value: str
    hosts: tuple[str, ...]
    backends: tuple[str, ...]
    run_id: str
    who: str
    at: datetime


@dataclass(frozen=True)
class HostProgress:
    rollout: str
    env: str
    host: str
    status: str
    version: str
    detail: str
    updated: datetime


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: datetime
    run_id: str
    env: str
    host: str
    command: str
    exit_code: int | None
    duration_s: float
    output_tail: str


@dataclass(frozen=True)
class Deployment:
    id: int
    env: str
    version: str
    run_id: str
    kind: str
    status: str
    started: datetime
    updated: datetime


@dataclass(frozen=True)
class PatchRecord:
    id: int
    patch_id: str
    env: str
    run_id: str
    who: str
    status: str
    hosts: tuple[str, ...]
    detail: str
    at: datetime


@dataclass(frozen=True)
class Halt:
    id: int
    reason: str
    patch_id: str | None
    who: str
    since: datetime
    lifted_by: str | None = None
    lifted_reason: str | None = None
    lifted_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.lifted_at is None


@dataclass(frozen=True)
class Freeze:
    """An ad-hoc change freeze: ``env`` frozen from ``since`` to ``until`` (or until lifted)."""

    id: int
    env: str
    who: str
    reason: str
    since: datetime
    until: datetime
    lifted_by: str | None = None
    lifted_reason: str | None = None
    lifted_at: datetime | None = None

    def active_at(self, now: datetime) -> bool:
        return self.lifted_at is None and self.since <= now < self.until


@dataclass(frozen=True)
class CheckApproval:
    """A person approved a run's failed production checks (``failures``) with a reason."""

    id: int
    run_id: str
    env: str
    step: str
    who: str
    reason: str
    failures: tuple[str, ...]
    at: datetime


@dataclass(frozen=True)
class AnalysisRecord:
    run_id: str
    env: str
    stage: str
    weight: int | None
    verdict: str
    score: float | None
    decision: str
    verdict_json: str
    at: datetime

    def verdict_data(self) -> dict:
        try:
            data = json.loads(self.verdict_json)
        except ValueError:
            return {}
        return data if isinstance(data, dict) else {}


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable url>"


class _LockRecords:
    """The environments' locks and their history (a part of :class:`Store`)."""

    # -- locks -----------------------------------------------------------------------------------
    def acquire(self, env: str, run_id: str, who: str, reason: str = "") -> Lock:
        """Take the environment lock, or raise LockHeld naming the holder.

        Re-entrant for the same run id (a retried or cleared task keeps its lock)."""
        validate_name("env", env)
        validate_name("run_id", run_id)
        validate_name("who", who)
        reason = validate_reason(reason) if reason else ""
        for _ in range(20):
            now = time.time()
            try:
                with self._tx() as conn:
                    conn.execute(insert(locks_t).values(env=env, run_id=run_id, who=who, reason=reason,
                                                        since=now))
                    self._event(conn, env, "acquire", run_id, who, reason, now)
                log.info("lock %s taken by run %s (%s)", env, run_id, who)
                return Lock(env, run_id, who, reason, _dt(now))
            except IntegrityError:
                holder = self.get_lock(env)
                if holder is None:
                    continue  # released between our insert and our read: try again
                if holder.run_id == run_id:
                    return holder
                raise LockHeld(holder) from None
        raise StoreError(f"could not take the lock on {env}: it kept changing hands")

    def release(self, env: str, run_id: str) -> bool:
        """Release the lock if ``run_id`` holds it; True when it did."""
        with self._tx() as conn:
            row = conn.execute(select(locks_t).where(and_(locks_t.c.env == env, locks_t.c.run_id == run_id))
                               ).first()
            if row is None:
                return False
            res = conn.execute(delete(locks_t).where(and_(locks_t.c.env == env, locks_t.c.run_id == run_id)))
            if res.rowcount:
                self._event(conn, env, "release", run_id, row.who, "", time.time())
            return bool(res.rowcount)

    def force_release(self, env: str, who: str, reason: str) -> Lock | None:
        """Remove whoever holds the lock, recording who did it and why; returns the removed lock."""
        validate_name("who", who)
        reason = validate_reason(reason)
        with self._tx() as conn:
            row = conn.execute(select(locks_t).where(locks_t.c.env == env)).first()
            if row is None:
                return None
            res = conn.execute(
                delete(locks_t).where(and_(locks_t.c.env == env, locks_t.c.run_id == row.run_id)))
            if not res.rowcount:
                return None
            self._event(conn, env, "force_release", row.run_id, who, reason, time.time())
        log.warning("lock %s of run %s force-released by %s: %s", env, row.run_id, who, reason)
        return _lock(row)

    def get_lock(self, env: str) -> Lock | None:
        with self._tx() as conn:
            row = conn.execute(select(locks_t).where(locks_t.c.env == env)).first()
        return _lock(row) if row else None

    def list_locks(self) -> list[Lock]:
        with self._tx() as conn:
            rows = conn.execute(select(locks_t).order_by(locks_t.c.env)).all()
        return [_lock(r) for r in rows]

    def lock_events(self, env: str | None = None) -> list[LockEvent]:
        """Lock history, newest first."""
        q = select(lock_events_t).order_by(lock_events_t.c.id.desc())
        if env is not None:
            q = q.where(lock_events_t.c.env == env)
        with self._tx() as conn:
            rows = conn.execute(q).all()
        return [LockEvent(r.env, r.action, r.run_id, r.who, r.reason, _dt(r.at)) for r in rows]

    def record_event(self, env: str, action: str, run_id: str, who: str, reason: str) -> None:
        """Add an entry to the environment's lock history (e.g. ``override``: a safety check
        passed with a reason; ``rollback_refused``: an automatic rollback the guard refused)."""
        with self._tx() as conn:
            self._event(conn, env, action[:32], run_id, who, reason[:4000], time.time())

    @staticmethod
    def _event(conn: Connection, env: str, action: str, run_id: str, who: str, reason: str,
               at: float) -> None:
        conn.execute(insert(lock_events_t).values(env=env, action=action, run_id=run_id, who=who,
                                                  reason=reason, at=at))


class _FleetRecords:
    """What a rollout writes as it goes: drain records, LB settings, host progress, the audit
    trail (a part of :class:`Store`)."""

    # -- drain records (write-ahead) ------------------------------------------------------------
    def record_drained(self, env: str, host: str, run_id: str, reason: str = "") -> DrainRecord:
        """Record that ``host`` is (about to be) drained; call BEFORE draining it."""
        self.record_drained_many(env, [host], run_id, reason)
        return next(r for r in self.drained(env) if r.host == host)

    def record_drained_many(self, env: str, hosts: Iterable[str], run_id: str, reason: str = "") -> int:
        """Drain records for several hosts in one transaction (a batch's write-ahead)."""
        validate_name("env", env)
        names = [validate_name("host", h) for h in hosts]
        now = time.time()
        self._upsert_many(drained_t, [({"env": env, "host": h}, {"run_id": run_id, "reason": reason[:1000]},
                                       {"since": now}) for h in names])
        return len(names)

    def clear_drained_many(self, env: str, hosts: Iterable[str]) -> int:
        """Forget several drain records in one transaction; how many there were."""
        names = list(hosts)
        if not names:
            return 0
        with self._tx() as conn:
            res = conn.execute(delete(drained_t).where(and_(drained_t.c.env == env,
                                                            drained_t.c.host.in_(names))))
        return res.rowcount or 0

    def clear_drained(self, env: str, host: str) -> bool:
        """Forget the drain record; call AFTER the host is ready on every LB."""
        return self.clear_drained_many(env, [host]) > 0

    def drained(self, env: str | None = None) -> list[DrainRecord]:
        q = select(drained_t).order_by(drained_t.c.env, drained_t.c.since, drained_t.c.host)
        if env is not None:
            q = q.where(drained_t.c.env == env)
        with self._tx() as conn:
            rows = conn.execute(q).all()
        return [DrainRecord(r.env, r.host, r.run_id, r.reason, _dt(r.since)) for r in rows]

    # -- LB settings (the canary weight and state) -------------------------------------------------
    def record_lb_setting(self, env: str, kind: str, value: int | str, hosts: Iterable[str],
                          backends: Iterable[str], run_id: str, who: str) -> None:
        """Remember what liftoff set on the LBs (``kind`` weight or state), replacing the last one."""
        if kind not in ("weight", "state"):
            raise InvalidInput(f"LB setting kind must be weight or state, got {kind!r}")
        validate_name("env", env)
        row = {"value": str(value)[:16], "hosts": json.dumps(sorted(validate_name("host", h) for h in hosts)),
               "backends": json.dumps(sorted(backends)), "run_id": run_id, "who": who, "at": time.time()}
        self._upsert_many(lb_settings_t, [({"env": env, "kind": kind}, row, {})])

    def forget_lb_state(self, hosts: Iterable[str]) -> int:
        """Take ``hosts`` out of every recorded state (drain/maint/ready) setting: a rollout put
        them back in service, the last thing liftoff did to them. How many rows changed."""
        gone = set(hosts)
        changed = 0
        with self._tx() as conn:  # rows locked: parallel roles forget their hosts at once (PostgreSQL)
            rows = conn.execute(select(lb_settings_t).where(lb_settings_t.c.kind == "state")
                                .with_for_update()).all()
            for r in rows:
                kept = [h for h in json.loads(r.hosts) if h not in gone]
                if len(kept) == len(json.loads(r.hosts)):
                    continue
                where = and_(lb_settings_t.c.env == r.env, lb_settings_t.c.kind == "state")
                conn.execute(update(lb_settings_t).where(where).values(hosts=json.dumps(kept)) if kept
                             else delete(lb_settings_t).where(where))
                changed += 1
        return changed

    def lb_settings(self, env: str | None = None) -> list[LBSetting]:
        q = select(lb_settings_t).order_by(lb_settings_t.c.env, lb_settings_t.c.kind)
        if env is not None:
            q = q.where(lb_settings_t.c.env == env)
        with self._tx() as conn:
            rows = conn.execute(q).all()
        return [LBSetting(r.env, r.kind, r.value, tuple(json.loads(r.hosts)), tuple(json.loads(r.backends)),
                          r.run_id, r.who, _dt(r.at)) for r in rows]

    # -- host progress -----------------------------------------------------------------------------
    def set_host_status(self, rollout: str, env: str, host: str, status: str, version: str,
                        detail: str = "") -> None:
        self.set_host_statuses(rollout, env, [(host, status, detail)], version)

    def set_host_statuses(self, rollout: str, env: str, rows: Iterable[tuple[str, str, str]],
                          version: str) -> None:
        """Several hosts' progress, ``(host, status, detail)`` rows, in one transaction."""
        validate_name("rollout", rollout)
        now = time.time()
        items = []
        for host, status, detail in rows:
            if status not in HOST_STATUSES:
                raise InvalidInput(f"host status {status!r} is not one of {', '.join(HOST_STATUSES)}")
            items.append(({"rollout": rollout, "host": validate_name("host", host)},
                          {"env": env, "status": status, "version": str(version), "detail": detail[:2000],
                           "updated": now}, {}))
        self._upsert_many(progress_t, items)

    def host_statuses(self, rollout: str) -> dict[str, HostProgress]:
        with self._tx() as conn:
            rows = conn.execute(select(progress_t).where(progress_t.c.rollout == rollout)
                                .order_by(progress_t.c.host)).all()
        return {r.host: HostProgress(r.rollout, r.env, r.host, r.status, r.version, r.detail, _dt(r.updated))
                for r in rows}

    # -- audit -------------------------------------------------------------------------------------
    def audit(self, run_id: str, env: str, host: str, command: str, exit_code: int | None,
              duration_s: float, output_tail: str = "") -> None:
        self.audit_many([(run_id, env, host, command, exit_code, duration_s, output_tail)])

    def audit_many(self, records: Iterable[tuple]) -> None:
        """Several audit rows in one transaction: (run_id, env, host, command, exit_code, duration_s,
        output_tail)."""
        now = time.time()
        rows = [
            {"at": now, "run_id": r[0], "env": r[1], "host": r[2], "command": r[3], "exit_code": r[4],
             "duration_s": float(r[5]), "output_tail": (r[6] if len(r) > 6 else "")[-OUTPUT_TAIL_CHARS:]}
            for r in records
        ]
        if rows:
            with self._tx() as conn:
                conn.execute(insert(audit_t), rows)

    def audit_begin_many(self, records: Iterable[tuple]) -> list[int]:
        """Write-ahead audit rows in one transaction, BEFORE their commands run: (run_id, env,
        host, command). Each says the command started with no result yet
        (:data:`AUDIT_STARTED`, no exit code), so a process killed while its commands run leaves
        them on record; :meth:`audit_finish_many` fills the results in. Their ids, in order."""
        now = time.time()
        rows = [{"at": now, "run_id": r[0], "env": r[1], "host": r[2], "command": r[3], "exit_code": None,
                 "duration_s": 0.0, "output_tail": AUDIT_STARTED} for r in records]
        if not rows:
            return []
        with self._tx() as conn:
            if self.engine.dialect.insert_executemany_returning_sort_by_parameter_order:
                stmt = insert(audit_t).returning(audit_t.c.id, sort_by_parameter_order=True)
                return [row[0] for row in conn.execute(stmt, rows)]
            return [conn.execute(insert(audit_t), row).inserted_primary_key[0] for row in rows]

    def audit_finish_many(self, results: Iterable[tuple]) -> None:
        """The results of write-ahead rows in one transaction: (id, exit_code, duration_s,
        output_tail); ``at`` becomes the time the result was written, as for :meth:`audit_many`."""
        now = time.time()
        rows = [{"row_id": r[0], "new_at": now, "new_code": r[1], "new_duration": float(r[2]),
                 "new_tail": (r[3] or "")[-OUTPUT_TAIL_CHARS:]} for r in results]
        if rows:
            stmt = (update(audit_t).where(audit_t.c.id == bindparam("row_id"))
                    .values(at=bindparam("new_at"), exit_code=bindparam("new_code"),
                            duration_s=bindparam("new_duration"), output_tail=bindparam("new_tail")))
            with self._tx() as conn:
                conn.execute(stmt, rows)

    def audit_records(self, run_id: str | None = None, host: str | None = None,
                      env: str | None = None) -> list[AuditRecord]:
        """Audit rows in the order they were written."""
        q = select(audit_t).order_by(audit_t.c.id)
        if run_id is not None:
            q = q.where(audit_t.c.run_id == run_id)
        if host is not None:
            q = q.where(audit_t.c.host == host)
        if env is not None:
            q = q.where(audit_t.c.env == env)
        with self._tx() as conn:
            rows = conn.execute(q).all()
        return [AuditRecord(r.id, _dt(r.at), r.run_id, r.env, r.host, r.command, r.exit_code, r.duration_s,
                            r.output_tail) for r in rows]


class _ReleaseRecords:
    """Deployments, patches and halts, freezes, approved checks, reports, step failures, canary
    judgements (a part of :class:`Store`)."""

    # -- deployments --------------------------------------------------------------------------------
    def record_deployment(self, env: str, version: str, run_id: str, kind: str = "deploy",
                          status: str = "running") -> Deployment:
        """Record a deployment of ``version`` to ``env``, or update the status of this run's one."""
        from liftoff.versions import parse_version

        validate_name("env", env)
        version = str(parse_version(version))
        validate_name("run_id", run_id)
        if kind not in DEPLOYMENT_KINDS:
            raise InvalidInput(f"deployment kind {kind!r} is not one of {', '.join(DEPLOYMENT_KINDS)}")
        if status not in DEPLOYMENT_STATUSES:
            raise InvalidInput(f"deployment status {status!r} is not one of {', '.join(DEPLOYMENT_STATUSES)}")
        now = time.time()
        key = and_(deployments_t.c.env == env, deployments_t.c.run_id == run_id, deployments_t.c.kind == kind,
                   deployments_t.c.version == version)
        with self._tx() as conn:
            res = conn.execute(update(deployments_t).where(key).values(status=status, updated=now))
            if not res.rowcount:
                conn.execute(insert(deployments_t).values(env=env, version=version, run_id=run_id, kind=kind,
                                                          status=status, started=now, updated=now))
            row = conn.execute(select(deployments_t).where(key).order_by(deployments_t.c.id.desc())).first()
        return _deployment(row)

    def deployments(self, env: str, limit: int | None = None) -> list[Deployment]:
        """This environment's deployments and rollbacks, newest first."""
        q = select(deployments_t).where(deployments_t.c.env == env).order_by(deployments_t.c.id.desc())
        if limit:
            q = q.limit(limit)
        with self._tx() as conn:
            rows = conn.execute(q).all()
        return [_deployment(r) for r in rows]

    def current_version(self, env: str) -> str | None:
        """Version of the newest successful deployment (or rollback)."""
        for d in self.deployments(env):
            if d.status == "success":
                return d.version
        return None

    def previous_version(self, env: str) -> str | None:
        """The successfully deployed version before the current one (a different version)."""
        current = None
        for d in self.deployments(env):
            if d.status != "success":
                continue
            if current is None:
                current = d.version
            elif d.version != current:
                return d.version
        return None

    # -- patches and halts ----------------------------------------------------------------------
    def record_patch(self, patch_id: str, env: str, run_id: str, who: str, status: str = "applied",
                     hosts: Iterable[str] = (), detail: str = "") -> PatchRecord:
        validate_name("patch", patch_id)
        validate_name("env", env)
        validate_name("who", who)
        host_list = [validate_name("host", h) for h in hosts]
        now = time.time()
        with self._tx() as conn:
            res = conn.execute(insert(patches_t).values(patch_id=patch_id, env=env, run_id=run_id, who=who,
                                                        status=status, hosts=",".join(host_list),
                                                        detail=detail[:2000], at=now))
            pk = res.inserted_primary_key[0]
        return PatchRecord(pk, patch_id, env, run_id, who, status, tuple(host_list), detail[:2000], _dt(now))

    def patches(self, env: str | None = None) -> list[PatchRecord]:
        """Patch records, newest first."""
        q = select(patches_t).order_by(patches_t.c.id.desc())
        if env is not None:
            q = q.where(patches_t.c.env == env)
        with self._tx() as conn:
            rows = conn.execute(q).all()
        return [PatchRecord(r.id, r.patch_id, r.env, r.run_id, r.who, r.status,
                            tuple(h for h in r.hosts.split(",") if h), r.detail, _dt(r.at)) for r in rows]

    def set_halt(self, reason: str, patch_id: str | None, who: str) -> Halt:
        """Halt canary deploys (e.g. until a build containing ``patch_id`` is deployed)."""
        reason = validate_reason(reason)
        if patch_id is not None:
            validate_name("patch", patch_id)
        validate_name("who", who)
        now = time.time()
        with self._tx() as conn:
            res = conn.execute(insert(halts_t).values(reason=reason, patch_id=patch_id, who=who, since=now))
            pk = res.inserted_primary_key[0]
        return Halt(pk, reason, patch_id, who, _dt(now))

    def lift_halt(self, who: str, reason: str, patch_id: str | None = None) -> Halt | None:
        """Lift the active halts (only those of ``patch_id`` when given); returns the newest lifted."""
        validate_name("who", who)
        reason = validate_reason(reason)
        now = time.time()
        cond = halts_t.c.lifted_at.is_(None)
        if patch_id is not None:
            cond = and_(cond, halts_t.c.patch_id == patch_id)
        with self._tx() as conn:
            rows = conn.execute(select(halts_t.c.id).where(cond).order_by(halts_t.c.id.desc())).all()
            if not rows:
                return None
            ids = [r.id for r in rows]
            conn.execute(update(halts_t).where(and_(halts_t.c.id.in_(ids), halts_t.c.lifted_at.is_(None)))
                         .values(lifted_by=who, lifted_reason=reason, lifted_at=now))
            row = conn.execute(select(halts_t).where(halts_t.c.id == ids[0])).first()
        return _halt(row)

    def active_halt(self) -> Halt | None:
        halts = self.active_halts()
        return halts[0] if halts else None

    def active_halts(self) -> list[Halt]:
        """Active halts, newest first."""
        with self._tx() as conn:
            rows = conn.execute(select(halts_t).where(halts_t.c.lifted_at.is_(None))
                                .order_by(halts_t.c.id.desc())).all()
        return [_halt(r) for r in rows]

    def halts(self) -> list[Halt]:
        with self._tx() as conn:
            rows = conn.execute(select(halts_t).order_by(halts_t.c.id.desc())).all()
        return [_halt(r) for r in rows]

    # -- change freezes --------------------------------------------------------------------------
    def add_freeze(self, env: str, who: str, reason: str, since: datetime, until: datetime) -> Freeze:
        """Freeze ``env``'s changes from ``since`` to ``until`` (recorded with who and why)."""
        validate_name("env", env)
        validate_name("who", who)
        reason = validate_reason(reason)
        if until <= since:
            raise InvalidInput(f"a freeze must end after it starts ({until.isoformat()} <= "
                               f"{since.isoformat()})")
        with self._tx() as conn:
            res = conn.execute(insert(freezes_t).values(env=env, who=who, reason=reason,
                                                        since=since.timestamp(), until=until.timestamp()))
            pk = res.inserted_primary_key[0]
        return Freeze(pk, env, who, reason, _dt(since.timestamp()), _dt(until.timestamp()))

    def lift_freezes(self, env: str, who: str, reason: str, now: datetime) -> list[Freeze]:
        """Lift ``env``'s freezes that are active or still to come at ``now``; returns them lifted."""
        validate_name("who", who)
        reason = validate_reason(reason)
        with self._tx() as conn:
            rows = conn.execute(select(freezes_t).where(and_(
                freezes_t.c.env == env, freezes_t.c.lifted_at.is_(None),
                freezes_t.c.until > now.timestamp())).order_by(freezes_t.c.id)).all()
            ids = [r.id for r in rows]
            if ids:
                conn.execute(update(freezes_t).where(freezes_t.c.id.in_(ids))
                             .values(lifted_by=who, lifted_reason=reason, lifted_at=now.timestamp()))
                rows = conn.execute(select(freezes_t).where(freezes_t.c.id.in_(ids))
                                    .order_by(freezes_t.c.id)).all()
        return [_freeze(r) for r in rows]

    def freezes(self, env: str | None = None, *, active_at: datetime | None = None) -> list[Freeze]:
        """Freezes, newest first (only those in force at ``active_at`` when given)."""
        q = select(freezes_t).order_by(freezes_t.c.id.desc())
        if env is not None:
            q = q.where(freezes_t.c.env == env)
        if active_at is not None:
            t = active_at.timestamp()
            q = q.where(and_(freezes_t.c.lifted_at.is_(None), freezes_t.c.since <= t, freezes_t.c.until > t))
        with self._tx() as conn:
            rows = conn.execute(q).all()
        return [_freeze(r) for r in rows]

    # -- production checks approved by a person ------------------------------------------------------
    def record_check_approval(self, run_id: str, env: str, step: str, who: str, reason: str,
                              failures: Iterable[str]) -> CheckApproval:
        """Keep a person's approval of a run's failed checks (and add it to the lock history)."""
        validate_name("run_id", run_id)
        validate_name("env", env)
        validate_name("who", who)
        reason = validate_reason(reason)
        items = [str(f)[:2000] for f in failures]
        now = time.time()
        with self._tx() as conn:
            res = conn.execute(insert(check_approvals_t).values(
                run_id=run_id, env=env, step=step[:64], who=who, reason=reason, failures=json.dumps(items),
                at=now))
            pk = res.inserted_primary_key[0]
            self._event(conn, env, "checks_approved", run_id, who,
                        f"{step}: {reason} (failed: {'; '.join(items)})"[:4000], now)
        return CheckApproval(pk, run_id, env, step[:64], who, reason, tuple(items), _dt(now))

    def check_approvals(self, run_id: str | None = None, env: str | None = None) -> list[CheckApproval]:
        """Approvals of failed checks, oldest first."""
        q = select(check_approvals_t).order_by(check_approvals_t.c.id)
        if run_id is not None:
            q = q.where(check_approvals_t.c.run_id == run_id)
        if env is not None:
            q = q.where(check_approvals_t.c.env == env)
        with self._tx() as conn:
            rows = conn.execute(q).all()
        return [CheckApproval(r.id, r.run_id, r.env, r.step, r.who, r.reason, tuple(json.loads(r.failures)),
                              _dt(r.at)) for r in rows]

    # -- rollout reports ---------------------------------------------------------------------------
    def save_report(self, run_id: str, env: str, rollout: str, report_json: str) -> None:
        """Keep a rollout's full report (JSON); a later attempt of the same run and rollout adds a
        row, the earlier ones stay."""
        with self._tx() as conn:
            conn.execute(insert(reports_t).values(run_id=run_id, rollout=rollout, env=env,
                                                  report=report_json, at=time.time()))

    def report(self, run_id: str, rollout: str) -> str | None:
        """The newest full report saved for the run and rollout (JSON), or None."""
        with self._tx() as conn:
            row = conn.execute(select(reports_t.c.report)
                               .where(reports_t.c.run_id == run_id, reports_t.c.rollout == rollout)
                               .order_by(reports_t.c.id.desc()).limit(1)).first()
        return row.report if row else None

    # -- why steps failed --------------------------------------------------------------------------
    def record_step_failure(self, run_id: str, task_id: str, reason: str) -> None:
        """Keep the one-sentence reason a task of the run failed with (each attempt adds a row)."""
        with self._tx() as conn:
            conn.execute(insert(step_failures_t).values(run_id=run_id, task_id=task_id[:250],
                                                        reason=reason[:4000], at=time.time()))

    def step_failures(self, run_id: str) -> dict[str, str]:
        """``{task_id: reason}`` of the run, the newest attempt's reason per task."""
        with self._tx() as conn:
            rows = conn.execute(select(step_failures_t.c.task_id, step_failures_t.c.reason)
                                .where(step_failures_t.c.run_id == run_id)
                                .order_by(step_failures_t.c.id)).all()
        return {r.task_id: r.reason for r in rows}

    # -- canary judgements --------------------------------------------------------------------------
    def record_analysis(self, run_id: str, env: str, stage: str, weight: int | None, verdict: str,
                        score: float | None, decision: str, verdict_json: str) -> AnalysisRecord:
        """Keep one judgement of the canary (``verdict_json``: liftoff.analysis.Verdict.to_json())
        and what liftoff did with it (``decision``: next, promote, abort, ask)."""
        at = time.time()
        with self._tx() as conn:
            conn.execute(insert(analyses_t).values(
                run_id=run_id, env=env, stage=stage[:64], weight=weight, verdict=verdict, score=score,
                decision=decision, verdict_json=verdict_json, at=at))
        return AnalysisRecord(run_id, env, stage, weight, verdict, score, decision, verdict_json, _dt(at))

    def analyses(self, run_id: str | None = None, env: str | None = None,
                 limit: int | None = None) -> list[AnalysisRecord]:
        """Judgements, oldest first (of one run, or the newest ``limit`` of an environment)."""
        q = select(analyses_t)
        if run_id is not None:
            q = q.where(analyses_t.c.run_id == run_id)
        if env is not None:
            q = q.where(analyses_t.c.env == env)
        q = q.order_by(analyses_t.c.id.desc())
        if limit is not None:
            q = q.limit(limit)
        with self._tx() as conn:
            rows = conn.execute(q).all()
        return [AnalysisRecord(r.run_id, r.env, r.stage, r.weight, r.verdict, r.score, r.decision,
                               r.verdict_json, _dt(r.at)) for r in reversed(rows)]


class Store(_LockRecords, _FleetRecords, _ReleaseRecords):
    """The state store at a SQLAlchemy URL (``sqlite:///path`` or ``postgresql://...``)."""

    def __init__(self, url: str, *, create: bool = True, echo: bool = False):
        self.url = url
        try:
            parsed = make_url(url)
        except Exception:
            raise StoreError(f"not a database URL: {_safe_url(url)}") from None
        kwargs: dict = {"echo": echo}
        # An in-memory SQLite database is one connection shared by every thread (StaticPool):
        # transactions on it must take turns, or two threads' BEGINs collide.
        self._shared_connection: threading.Lock | contextlib.nullcontext = contextlib.nullcontext()
        if parsed.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
            if parsed.database in (None, "", ":memory:"):
                kwargs["poolclass"] = StaticPool
                self._shared_connection = threading.Lock()
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine: Engine = create_engine(parsed, **kwargs)
        except Exception as exc:
            raise StoreError(
                f"cannot open state store {_safe_url(url)}: {type(exc).__name__}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        if create:
            self.create_tables()

    @classmethod
    def from_settings(cls, inventory=None) -> Store:
        from liftoff.settings import state_url

        return cls(state_url(inventory))

    def __repr__(self) -> str:
        return f"Store({_safe_url(self.url)!r})"

    def close(self) -> None:
        self.engine.dispose()

    def create_tables(self) -> None:
        """Create the tables if missing (safe when several processes start at once)."""
        for attempt in range(5):
            try:
                metadata.create_all(self.engine)
                return
            except (IntegrityError, ProgrammingError, OperationalError) as exc:
                if attempt == 4:
                    raise StoreError(f"cannot create tables in {_safe_url(self.url)}: {exc.orig}") from None
                time.sleep(0.1 * (attempt + 1))

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        try:
            with self._shared_connection, self.engine.begin() as conn:
                yield conn
        except (IntegrityError, LockHeld, InvalidInput):
            raise
        except SQLAlchemyError as exc:
            raise StoreError(f"state store {_safe_url(self.url)} failed: {type(exc).__name__}: "
                             f"{getattr(exc, 'orig', exc)}") from None

    # -- helpers -----------------------------------------------------------------------------------
    def _upsert_many(self, table: Table, items: list[tuple[dict, dict, dict]]) -> None:
        """Update-or-insert rows ``(key, values, insert_only)``, all in one transaction (a key
        given twice: the last wins). One read of the keys that exist, one executemany update and
        one multi-row insert per shape of row, not two statements a row: a batch of 100 hosts'
        statuses cost a fifth of the orchestrator's CPU when each row built its own statements."""
        latest: dict[tuple, tuple[dict, dict, dict]] = {}
        for key, values, insert_only in items:
            latest[(tuple(key), tuple(key.values()))] = (key, values, insert_only)
        shapes: dict[tuple, list[tuple[dict, dict, dict]]] = {}
        for row in latest.values():
            shapes.setdefault(tuple(tuple(part) for part in row), []).append(row)
        if not shapes:
            return
        for _ in range(5):
            try:
                with self._tx() as conn:
                    for (kcols, vcols, _), rows in shapes.items():
                        _upsert_shape(conn, table, kcols, vcols, rows)
                return
            except IntegrityError:
                continue  # inserted concurrently: update it on the next round
        raise StoreError(f"could not write {table.name} for {items[0][0]}" + (
            f" and {len(items) - 1} more" if len(items) > 1 else ""))


def _upsert_shape(conn: Connection, table: Table, kcols: tuple[str, ...], vcols: tuple[str, ...],
                  rows: list[tuple[dict, dict, dict]], chunk: int = 400) -> None:
    """Rows of one shape (the same key, value and insert-only columns): those whose key exists
    are updated, the others inserted. The existing rows are read FOR UPDATE (PostgreSQL): a row
    another transaction deletes meanwhile (``forget_lb_state``) is waited for and then inserted,
    never updated into nothing."""
    keycols = [table.c[k] for k in kcols]
    keyed = [(tuple(r[0][k] for k in kcols), r) for r in rows]
    existing: set[tuple] = set()
    for i in range(0, len(keyed), chunk):
        keys = [k for k, _ in keyed[i:i + chunk]]
        found = conn.execute(select(*keycols).where(tuple_(*keycols).in_(keys)).with_for_update())
        existing.update(tuple(r) for r in found)
    old = [r for k, r in keyed if k in existing]
    new = [r for k, r in keyed if k not in existing]
    if old:
        stmt = (update(table).where(and_(*(table.c[k] == bindparam(f"k_{k}") for k in kcols)))
                .values({v: bindparam(f"v_{v}") for v in vcols}))
        conn.execute(stmt, [{**{f"k_{k}": key[k] for k in kcols}, **{f"v_{v}": values[v] for v in vcols}}
                            for key, values, _ in old])
    if new:
        conn.execute(insert(table), [{**key, **values, **insert_only} for key, values, insert_only in new])


def _lock(row) -> Lock:
    return Lock(row.env, row.run_id, row.who, row.reason, _dt(row.since))


def _deployment(row) -> Deployment:
    return Deployment(row.id, row.env, row.version, row.run_id, row.kind, row.status, _dt(row.started),
                      _dt(row.updated))


def _freeze(row) -> Freeze:
    return Freeze(row.id, row.env, row.who, row.reason, _dt(row.since), _dt(row.until), row.lifted_by,
                  row.lifted_reason, _dt(row.lifted_at))


def _halt(row) -> Halt:
    return Halt(row.id, row.reason, row.patch_id, row.who, _dt(row.since), row.lifted_by, row.lifted_reason,
                _dt(row.lifted_at))


def _sqlite_on_connect(dbapi_conn, _record) -> None:
    # Let SQLAlchemy issue BEGIN itself (pysqlite's implicit transactions break locking).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    with contextlib.suppress(Exception):  # e.g. in-memory databases
        cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_on_begin(conn) -> None:
    # BEGIN IMMEDIATE: take the write lock at the start, so read-then-write is serialised.
    conn.exec_driver_sql("BEGIN IMMEDIATE")
