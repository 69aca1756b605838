"""Checks before a stage changes anything: the stage precheck (fails closed) and the
production checks before a promotion. They only read; the door (:mod:`liftoff.guard`) checks
the lock again on every change that follows.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from liftoff import canary, locks
from liftoff.alerts import AlertClient
from liftoff.errors import LiftoffError, PrecheckFailed
from liftoff.haproxy import HAProxy, out_of_service
from liftoff.inventory import Environment
from liftoff.runs import Run, read_installed
from liftoff.versions import parse_version, validate_reason

log = logging.getLogger(__name__)


def in_weekly_change_lock(now: datetime) -> bool:
    """GitLab's weekly production change lock: Friday 23:00 UTC to Monday 06:00 UTC."""
    now = now.astimezone(UTC)
    day, hour = now.weekday(), now.hour  # Monday is 0
    return (day == 4 and hour >= 23) or day in (5, 6) or (day == 0 and hour < 6)


def _lb_failures(run: Run, env: Environment) -> list[str]:
    """Servers out of service in HAProxy that no liftoff record explains, or an unreachable LB."""
    recorded = {d.host for d in run.store.drained(env.name)}
    lb_hosts = {h.name for h in env.hosts()}
    try:
        snap = HAProxy.for_env(env).snapshot()
    except LiftoffError as exc:
        return [f"haproxy: {exc}"]
    down = {h: s for h, s in out_of_service(snap).items() if h in lb_hosts and h not in recorded}
    if not down:
        return []
    return ["haproxy: out of service without a liftoff record: "
            + ", ".join(f"{h} ({s})" for h, s in sorted(down.items()))]


def _version_failures(versions: dict[str, str | None], version: str) -> list[str]:
    failures = []
    unreadable = sorted(h for h, v in versions.items() if v is None)
    if unreadable:
        failures.append(f"versions: cannot read the installed package on {', '.join(unreadable)}")
    others = Counter(v for v in versions.values() if v and v != version)
    if len(others) > 1:
        failures.append("versions: hosts run more than one version besides the target: "
                        + ", ".join(f"{v} x{n}" for v, n in others.most_common()))
    return failures


def _decide(run: Run, what: str, result: dict, failures: list[str], override_reason: str | None,
            field_name: str) -> dict:
    result.update(failures=failures, overridden=False)
    if failures:
        if not override_reason:
            raise PrecheckFailed(f"{what} failed: " + "; ".join(failures))
        reason = validate_reason(override_reason, field_name=field_name)
        log.warning("%s failed, overridden by %s (%s): %s", what, run.who, reason, failures)
        result.update(overridden=True, override_reason=reason)
    return result


def precheck(run: Run, env_name: str, version: str, *, override_reason: str | None = None,
             severities: tuple[str, ...] = ("critical",), now: datetime | None = None) -> dict:
    """Fail closed before changing an environment: critical alerts (or Alertmanager down), a
    lock held by another run, a server out of service in HAProxy that no liftoff record
    explains, an unreachable LB, hosts on versions other than one previous and the target.
    With ``override_reason`` the failures are recorded and the stage goes on."""
    env = run.env(env_name)
    version = str(parse_version(version))
    failures: list[str] = []
    if env.extra.get("change_lock") == "weekly" and in_weekly_change_lock(now or datetime.now(UTC)):
        failures.append("change lock: the weekly production change lock is on (Friday 23:00 to "
                        "Monday 06:00 UTC); an emergency needs an override reason")
    gate = AlertClient.from_settings(run.inventory).check(dict(env.alert_matchers), severities)
    if not gate.ok:
        failures.append(f"alerts: {gate.reason}")
    lock = locks.held_by_other(run, env.name)
    if lock is not None:
        failures.append(f"lock: {locks.describe(lock)}")
    failures += _lb_failures(run, env)
    versions = read_installed(run, env)
    failures += _version_failures(versions, version)
    others = Counter(v for v in versions.values() if v and v != version)
    previous = others.most_common(1)[0][0] if others else (run.store.previous_version(env.name) or version)
    result = {"env": env.name, "version": version, "previous_version": previous, "versions": versions}
    return _decide(run, f"precheck of {env.name}", result, failures, override_reason,
                   "allow_precheck_failure")


def _canary_failures(run: Run, canary_env: str, env_name: str, version: str) -> list[str]:
    failures = []
    lock = locks.held_by_other(run, canary_env)
    if lock is not None:
        failures.append(f"a canary deploy holds {canary_env}: {lock.who} (run {lock.run_id})")
    names = set(canary.canary_hosts(run, canary_env))
    try:
        down = {h: s for h, s in out_of_service(HAProxy.for_env(run.env(env_name)).snapshot()).items()
                if h in names}
        if down:
            failures.append("canary not in service: "
                            + ", ".join(f"{h} ({s})" for h, s in sorted(down.items())))
    except LiftoffError as exc:
        failures.append(f"haproxy: {exc}")
    off = sorted(h for h, v in read_installed(run, run.env(canary_env)).items() if v != version)
    if off:
        failures.append(f"canary hosts not on {version}: {', '.join(off)}")
    return failures


# -- GitLab's production checks: incidents and change requests on the ops instance --------------

PRODUCTION_PROJECT = "gitlab-com/gl-infra/production"
PRODUCTION_PROJECT_EXTRA = "production_project"
INCIDENT_LABEL = "incident"
BLOCKING_SEVERITIES = ("severity::1", "severity::2")
CHANGE_IN_PROGRESS_LABEL = "change::in-progress"
GITLAB_TIMEOUT_S = 5.0
_PROJECT_RE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*|[0-9]+")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True)
class ProductionIssues:
    """The ops GitLab's production project, whose open issues are incidents (``incident`` and
    ``severity::N``) and change requests (``change::in-progress``). From the ``gitlab``
    connection (``liftoff_ops_gitlab``, as QA and :mod:`liftoff.changes` read it); the project
    is its ``extra.production_project``, by default ``gitlab-com/gl-infra/production``."""

    gitlab_url: str
    private_token: str | None = field(default=None, repr=False)
    project: str = PRODUCTION_PROJECT
    ssl_verify: bool = True
    timeout: float = GITLAB_TIMEOUT_S

    @classmethod
    def from_settings(cls, inventory: Any = None) -> ProductionIssues:
        from liftoff.settings import connection_for, gitlab_settings

        s = gitlab_settings(inventory)
        extra = connection_for("gitlab", inventory).extra_dejson
        project = str(extra.get(PRODUCTION_PROJECT_EXTRA) or PRODUCTION_PROJECT)
        if not _PROJECT_RE.fullmatch(project) or ".." in project:
            raise ValueError(f"extra.{PRODUCTION_PROJECT_EXTRA} is not a project path like "
                             f"{PRODUCTION_PROJECT}")
        return cls(s.url.rstrip("/"), s.private_token, project, s.ssl_verify)

    def opened(self, labels: list[str]) -> list[dict]:
        """The open issues carrying every one of ``labels`` (python-gitlab, every page)."""
        import gitlab

        gl = gitlab.Gitlab(self.gitlab_url, private_token=self.private_token or None, timeout=self.timeout,
                           ssl_verify=self.ssl_verify, retry_transient_errors=False)
        project = gl.projects.get(self.project, lazy=True)
        return [dict(i.attributes) for i in project.issues.list(labels=labels, state="opened", get_all=True)]


def _issue_text(issue: Mapping[str, Any]) -> str:
    title = _UNPRINTABLE.sub("?", str(issue.get("title") or ""))[:120]
    return f"#{issue.get('iid')} \"{title}\" ({issue.get('web_url') or 'no link'})"


def _read_blockers(source: ProductionIssues) -> list[str]:
    incidents: dict[Any, str] = {}
    for severity in BLOCKING_SEVERITIES:
        for issue in source.opened([INCIDENT_LABEL, severity]):
            incidents.setdefault(issue.get("iid"), f"active {severity} incident: {_issue_text(issue)}")
    changes = [f"change request in progress: {_issue_text(i)}"
               for i in source.opened([CHANGE_IN_PROGRESS_LABEL])]
    return list(incidents.values()) + changes


def gitlab_production_blockers(run: Run, source: ProductionIssues | None = None) -> list[str]:
    """GitLab's production checks: one sentence per open severity 1/2 incident and per change
    request in progress in the ops GitLab's production project; none when production is clear.
    Fails closed: an unreachable or unreadable GitLab is a sentence too."""
    project = source.project if source else PRODUCTION_PROJECT
    try:
        source = source or ProductionIssues.from_settings(getattr(run, "inventory", None))
        project = source.project
        return _read_blockers(source)
    except Exception as exc:  # no answer is no proof that production is clear
        why = f"{type(exc).__name__}: {str(exc)[:120]}".rstrip(": ")
        return [f"ops GitLab: cannot read the incidents and change requests of {project} ({why}); "
                "production changes stay blocked until it answers"]


def production_checks(run: Run, version: str, *, override_reason: str | None = None,
                      env_name: str = "gprd", gitlab: ProductionIssues | None = None) -> dict:
    """Before promotion: the environment's precheck, no canary deploy running, every canary
    server in service on every LB, canary running the version, and GitLab's production checks
    (no active severity 1/2 incident, no change request in progress: :func:`gitlab_production_blockers`)."""
    failures: list[str] = []
    try:
        result = precheck(run, env_name, version)
    except PrecheckFailed as exc:
        failures.append(str(exc))
        result = {"env": env_name, "version": version}
    canary_env = canary.canary_env_of(run.inventory, env_name)
    if canary_env:
        failures += _canary_failures(run, canary_env, env_name, version)
    blockers = gitlab_production_blockers(run, gitlab)
    result["gitlab_blockers"] = blockers
    failures += blockers
    return _decide(run, "production checks", result, failures, override_reason, "reason")


def fast_precheck(run: Run, env_name: str, version: str, reason: str) -> dict:
    """The precheck, recorded but never blocking: a fast deploy is the fix for what it finds
    (an active alert, a host out of service); only another run's lock stops it later."""
    reason = validate_reason(reason)
    return precheck(run, env_name, version, override_reason=f"fast deploy: {reason}")
