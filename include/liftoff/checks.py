"""Checks before a stage changes anything: the stage precheck (fails closed) and GitLab's
production checks before a promotion and before post-deployment migrations (change lock and
freeze windows, incidents and change requests on the ops GitLab, deployment health on
Prometheus, canary up on every LB), whose failures a person may approve with a reason. They
only read; the door (:mod:`liftoff.guard`) checks the lock again on every change that follows.
Freezes (``liftoff freeze``/``unfreeze``) are kept here too. The clock is injectable: ``now=``
or ``LIFTOFF_CLOCK``.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from liftoff import canary, locks
from liftoff.alerts import AlertClient
from liftoff.errors import ConfigError, InvalidInput, LiftoffError, PrecheckFailed
from liftoff.haproxy import HAProxy, out_of_service
from liftoff.inventory import Environment
from liftoff.runs import Run, read_installed
from liftoff.versions import parse_version, validate_reason

log = logging.getLogger(__name__)


CLOCK_ENV = "LIFTOFF_CLOCK"  # tests and drills: the time the checks take as now (ISO 8601 with a zone)


def clock_now() -> datetime:
    """Now, as the checks see it: ``LIFTOFF_CLOCK`` when set (a drill of the weekend change lock,
    a test), else the real time. A value that is not an ISO time with a zone is refused."""
    fixed = os.environ.get(CLOCK_ENV, "").strip()
    if not fixed:
        return datetime.now(UTC)
    try:
        value = datetime.fromisoformat(fixed.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{CLOCK_ENV}={fixed[:40]!r} is not an ISO 8601 time") from None
    if value.tzinfo is None:
        raise ConfigError(f"{CLOCK_ENV}={fixed[:40]!r} has no time zone (add Z or +00:00)")
    return value.astimezone(UTC)


def in_weekly_change_lock(now: datetime) -> bool:
    """GitLab's weekly production change lock: Friday 23:00 UTC to Monday 06:00 UTC."""
    now = now.astimezone(UTC)
    day, hour = now.weekday(), now.hour  # Monday is 0
    return (day == 4 and hour >= 23) or day in (5, 6) or (day == 0 and hour < 6)


WEEKLY_LOCK_SENTENCE = ("change lock: the weekly production change lock is on (Friday 23:00 to Monday 06:00 "
                        "UTC); an emergency needs an override reason")


def parse_time(value: Any, what: str = "time") -> datetime:
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError:
            raise InvalidInput(f"{what} {str(value)[:40]!r} is not an ISO 8601 time") from None
    if parsed.tzinfo is None:
        raise InvalidInput(f"{what} {str(value)[:40]!r} has no time zone (add Z or +00:00)")
    return parsed.astimezone(UTC)


def inventory_freezes(env: Environment) -> list[dict]:
    """The freeze windows the inventory declares for ``env`` (``extra.freezes``: a list of
    ``{from, until, reason}``, times ISO 8601 with a zone). An unreadable entry is refused."""
    raw = env.extra.get("freezes") or []
    if not isinstance(raw, list):
        raise InvalidInput(f"environment {env.name}: extra.freezes must be a list of {{from, until, reason}}")
    out = []
    for i, item in enumerate(raw):
        where = f"environment {env.name}: extra.freezes[{i}]"
        if not isinstance(item, Mapping):
            raise InvalidInput(f"{where} must be a mapping with from, until and reason")
        start = parse_time(item.get("from"), f"{where}.from")
        end = parse_time(item.get("until"), f"{where}.until")
        if end <= start:
            raise InvalidInput(f"{where} ends before it starts")
        out.append({"from": start, "until": end,
                    "reason": validate_reason(item.get("reason"), field_name=f"{where}.reason")})
    return out


def change_window_failures(run: Run, env: Environment, now: datetime) -> list[str]:
    """The weekly change lock (``extra.change_lock: weekly``) and the freeze windows in force at
    ``now``: from the inventory (``extra.freezes``) and from ``liftoff freeze`` (the state store)."""
    failures = []
    if env.extra.get("change_lock") == "weekly" and in_weekly_change_lock(now):
        failures.append(WEEKLY_LOCK_SENTENCE)
    try:
        for f in inventory_freezes(env):
            if f["from"] <= now < f["until"]:
                failures.append(f"freeze: {env.name} is frozen until {f['until']:%Y-%m-%d %H:%M}Z by the "
                                f"inventory: {f['reason']}")
    except InvalidInput as exc:  # a freeze that cannot be read is not proof there is none
        failures.append(f"freeze: {exc}")
    for f in run.store.freezes(env.name, active_at=now):
        failures.append(f"freeze: {env.name} is frozen until {f.until:%Y-%m-%d %H:%M}Z by {f.who} "
                        f"(since {f.since:%Y-%m-%d %H:%M}Z): {f.reason}")
    return failures


def freeze_env(run: Run, env_name: str, reason: str, *, until: str | None = None,
               duration: str | None = None, now: datetime | None = None) -> dict:
    """``liftoff freeze ENV --until ISO|--for DURATION --reason R``: freeze the environment's
    changes from now until then; every precheck of it fails (a person may approve, with a reason)."""
    env = run.env(env_name)
    reason = validate_reason(reason)
    now = now or clock_now()
    if (until is None) == (duration is None):
        raise InvalidInput("give either --until TIME or --for DURATION")
    end = parse_time(until, "until") if until is not None else now + parse_duration(duration)
    if end <= now:
        raise InvalidInput(f"until {end:%Y-%m-%d %H:%M}Z is not in the future")
    if end - now > MAX_FREEZE:
        raise InvalidInput(f"a freeze lasts at most {MAX_FREEZE.days} days")
    f = run.store.add_freeze(env.name, run.who, reason, now, end)
    return {"env": env.name, "action": "freeze", "id": f.id, "who": f.who, "reason": f.reason,
            "since": f.since.isoformat(), "until": f.until.isoformat()}


def unfreeze_env(run: Run, env_name: str, reason: str, *, now: datetime | None = None) -> dict:
    """``liftoff unfreeze ENV --reason R``: lift the environment's freezes (in force or to come)."""
    env = run.env(env_name)
    reason = validate_reason(reason)
    lifted = run.store.lift_freezes(env.name, run.who, reason, now or clock_now())
    return {"env": env.name, "action": "unfreeze", "reason": reason, "who": run.who,
            "lifted": [{"id": f.id, "who": f.who, "reason": f.reason, "until": f.until.isoformat()}
                       for f in lifted]}


MAX_FREEZE = timedelta(days=30)
_DURATION_RE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: Any) -> timedelta:
    """``90m``, ``2h``, ``1d12h``, ``1w``: a positive duration."""
    text = str(value or "").strip().lower().replace(" ", "")
    parts = _DURATION_RE.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise InvalidInput(f"duration {str(value)[:40]!r} is not like 90m, 2h, 1d12h or 1w")
    seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds > 10 * 366 * 86400:
        raise InvalidInput(f"duration {str(value)[:40]!r} is longer than ten years")
    if seconds <= 0:
        raise InvalidInput(f"duration {str(value)[:40]!r} is zero")
    return timedelta(seconds=seconds)


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


def _precheck_failures(run: Run, env: Environment, version: str, severities: tuple[str, ...],
                       now: datetime) -> tuple[list[str], dict]:
    failures = change_window_failures(run, env, now)
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
    return failures, {"env": env.name, "version": version, "previous_version": previous, "versions": versions}


def _approved(run: Run, env: str, failures: list[str],
              step: str | None = None) -> tuple[list[str], list[dict]]:
    """Split ``failures`` into those still open and those a person approved for this run (the
    same sentence, approved through the production checks' request; of ``step`` when given)."""
    try:
        approvals = [a for a in run.store.check_approvals(run_id=run.run_id, env=env)
                     if step is None or a.step == step]
    except (AttributeError, TypeError):  # a run handle without a run id (a test's)
        return failures, []
    seen = {f: a for a in approvals for f in a.failures}
    still = [f for f in failures if f not in seen]
    approved = [{"failure": f, "who": seen[f].who, "reason": seen[f].reason, "step": seen[f].step}
                for f in failures if f in seen]
    return still, approved


def precheck(run: Run, env_name: str, version: str, *, override_reason: str | None = None,
             severities: tuple[str, ...] = ("critical",), now: datetime | None = None) -> dict:
    """Fail closed before changing an environment: the weekly change lock and freeze windows,
    critical alerts (or Alertmanager down), a lock held by another run, a server out of service
    in HAProxy that no liftoff record explains, an unreachable LB, hosts on versions other than
    one previous and the target. With ``override_reason`` the failures are recorded and the
    stage goes on; a failure a person approved for this run (the production checks' request)
    passes too."""
    env = run.env(env_name)
    version = str(parse_version(version))
    failures, result = _precheck_failures(run, env, version, severities, now or clock_now())
    failures, approved = _approved(run, env.name, failures)
    if approved:
        result["approved"] = approved
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


# -- deployment health on Prometheus -------------------------------------------------------------

# GitLab's deployment health: one series per service of the environment, 1 healthy, 0 not.
DEFAULT_HEALTH_QUERY = 'gitlab_deployment_health:service{env="$env"}'
HEALTH_QUERY_EXTRA = "deployment_health_query"
PROMETHEUS_TIMEOUT_S = 5.0
_SERVICE_LABELS = ("type", "service", "role", "job")


@dataclass(frozen=True)
class DeploymentHealth:
    """The deployment-health query on Prometheus (the ``prometheus`` connection): every series
    it returns is a service, healthy when its value is 1 or more. The query is the
    environment's ``extra.deployment_health_query`` (``$env`` is the environment's name),
    by default GitLab's ``gitlab_deployment_health:service{env="$env"}``."""

    url: str
    query: str
    auth: tuple[str, str] | None = field(default=None, repr=False)
    timeout: float = PROMETHEUS_TIMEOUT_S

    @classmethod
    def from_settings(cls, inventory: Any, env: Environment) -> DeploymentHealth:
        from liftoff.settings import base_url, connection_for

        conn = connection_for("prometheus", inventory)
        template = env.extra.get(HEALTH_QUERY_EXTRA) or DEFAULT_HEALTH_QUERY
        if not isinstance(template, str) or not template.strip():
            raise InvalidInput(f"environment {env.name}: extra.{HEALTH_QUERY_EXTRA} must be a PromQL query")
        auth = (conn.login, conn.password or "") if conn.login else None
        return cls(base_url(conn).rstrip("/"), template.replace("$env", env.name), auth)

    def samples(self) -> list[tuple[dict, float]]:
        """``[(labels, value)]`` of the instant query's answer (a vector)."""
        import requests

        resp = requests.get(f"{self.url}/api/v1/query", params={"query": self.query}, auth=self.auth,
                            timeout=self.timeout)
        if resp.status_code != 200:
            raise LiftoffError(f"HTTP {resp.status_code}: {resp.text[:160]}")
        body = resp.json()
        data = body.get("data") if isinstance(body, dict) else None
        if body.get("status") != "success" or not isinstance(data, dict):
            raise LiftoffError(f"the answer is not a success: {str(body)[:160]}")
        if data.get("resultType") != "vector":
            raise LiftoffError(f"the query returns a {data.get('resultType')}, not a vector")
        return [(dict(r.get("metric") or {}), float(r["value"][1])) for r in data.get("result") or []]


def _service_name(labels: Mapping[str, Any]) -> str:
    for key in _SERVICE_LABELS:
        if labels.get(key):
            return _UNPRINTABLE.sub("?", str(labels[key]))[:60]
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))[:80] or "(no labels)"


def health_failures(run: Run, env_name: str, source: DeploymentHealth | None = None) -> list[str]:
    """The deployment-health check: one sentence when a service is unhealthy, the answer is
    empty (no proof of health), or Prometheus cannot be asked (fails closed)."""
    env = run.env(env_name)
    try:
        source = source or DeploymentHealth.from_settings(getattr(run, "inventory", None), env)
        samples = source.samples()
    except Exception as exc:  # no answer is no proof that production is healthy
        why = f"{type(exc).__name__}: {str(exc)[:160]}".rstrip(": ")
        where = f" at {source.url}" if source is not None else ""
        return [f"deployment health: cannot query Prometheus{where} ({why}); production changes stay "
                "blocked until it answers"]
    if not samples:
        return [f"deployment health: the query {source.query} returned nothing: no proof that "
                f"{env.name} is healthy"]
    sick = sorted({f"{_service_name(labels)} ({value:g})" for labels, value in samples
                   if not value >= 1})  # NaN is not healthy
    if sick:
        return [f"deployment health: unhealthy on {env.name}: {', '.join(sick)}"]
    return []


# -- everything GitLab checks before production changes -----------------------------------------

STEPS = ("promotion", "post_migrations")


def on_call(inventory: Any, env_name: str) -> list[dict[str, str]]:
    """The on-call group of ``env_name`` (``extra.on_call``: ``[{id, name}]``, Airflow's HITL
    users; a bare string is an id that is its own name). Empty when none is configured."""
    raw = inventory.env(env_name).extra.get("on_call") or []
    if isinstance(raw, (str, Mapping)):
        raw = [raw]
    users = []
    for item in raw:
        if isinstance(item, str) and item.strip():
            users.append({"id": item.strip(), "name": item.strip()})
        elif isinstance(item, Mapping) and str(item.get("id") or "").strip():
            users.append({"id": str(item["id"]).strip(), "name": str(item.get("name") or item["id"]).strip()})
        else:
            raise InvalidInput(f"environment {env_name}: extra.on_call entries are {{id, name}} or a user "
                               f"id, got {str(item)[:60]!r}")
    return users


def production_checks(run: Run, version: str, *, override_reason: str | None = None,
                      env_name: str = "gprd", gitlab: ProductionIssues | None = None,
                      health: DeploymentHealth | None = None, now: datetime | None = None,
                      step: str = "promotion", ask: bool = False) -> dict:
    """Before promotion and before post-deployment migrations, as GitLab runs them: the
    environment's precheck (change lock and freezes, alerts, locks, LBs, versions), no canary
    deploy running, every canary server in service on every LB and on the version, GitLab's
    production checks (no active severity 1/2 incident, no change request in progress:
    :func:`gitlab_production_blockers`) and the deployment health on Prometheus
    (:func:`health_failures`).

    With ``override_reason`` failures pass, recorded. Otherwise they raise PrecheckFailed, or
    with ``ask`` the result says ``needs_approval`` (a person decides: :func:`approve_checks`).
    Failures a person approved earlier in this run (the same sentences) pass: an approval
    before the promotion also covers them before post-deployment migrations, a new failure
    (another incident, a service turned unhealthy) asks again."""
    if step not in STEPS:
        raise InvalidInput(f"step must be one of {', '.join(STEPS)}, got {step!r}")
    env = run.env(env_name)
    version = str(parse_version(version))
    now = now or clock_now()
    failures, result = _precheck_failures(run, env, version, ("critical",), now)
    canary_env = canary.canary_env_of(run.inventory, env.name)
    if canary_env:
        failures += _canary_failures(run, canary_env, env.name, version)
    blockers = gitlab_production_blockers(run, gitlab)
    result["gitlab_blockers"] = blockers
    failures += blockers
    failures += health_failures(run, env.name, health)
    failures, approved = _approved(run, env.name, failures)  # the same failures, approved in this run
    result.update(step=step, checked_at=now.isoformat(), approved_earlier=approved, needs_approval=False)
    if failures and not override_reason and ask:
        result.update(failures=failures, overridden=False, needs_approval=True,
                      on_call=on_call(run.inventory, env.name))
        log.warning("production checks of %s (%s) failed, asking the on-call group: %s", env.name, step,
                    failures)
        return result
    return _decide(run, "production checks", result, failures, override_reason, "reason")


def approve_checks(run: Run, checks: Mapping[str, Any], answer: Mapping[str, Any] | None) -> dict:
    """Record a person's answer to the production checks' request: Approve with a reason ->
    who, when and why in the state store (and the lock history); anything else raises
    PrecheckFailed (the run ends, nothing changed). No request made (checks passed): nothing."""
    if not checks.get("needs_approval"):
        return {"approved": False, "needed": False}
    env, step = str(checks.get("env")), str(checks.get("step") or "promotion")
    answer = answer or {}
    if list(answer.get("chosen_options") or []) != ["Approve"]:
        raise PrecheckFailed(f"production checks of {env} ({step}) failed and were not approved: "
                             + "; ".join(checks.get("failures") or []))
    user = answer.get("responded_by_user") or answer.get("responded_by") or {}
    who = str((user.get("name") or user.get("id")) if isinstance(user, Mapping) else user or "")
    who = "".join(c if c.isalnum() or c in "._@+-" else "_" for c in who)[:120] or "unknown"
    reason = (answer.get("params_input") or {}).get("reason")
    try:
        reason = validate_reason(reason, field_name="reason")
    except InvalidInput as exc:
        raise PrecheckFailed(f"production checks of {env} ({step}) approved by {who} without a usable reason "
                             f"({exc}): the run stops, nothing changed") from None
    record = run.store.record_check_approval(run.run_id, env, step, who, reason, checks.get("failures") or [])
    log.warning("production checks of %s (%s) approved by %s: %s (failed: %s)", env, step, who, reason,
                record.failures)
    return {"approved": True, "needed": True, "env": env, "step": step, "who": who, "reason": reason,
            "at": record.at.isoformat(), "failures": list(record.failures),
            "responded_at": str(answer.get("responded_at") or "")}


def fast_precheck(run: Run, env_name: str, version: str, reason: str) -> dict:
    """The precheck, recorded but never blocking: a fast deploy is the fix for what it finds
    (an active alert, a host out of service); only another run's lock stops it later."""
    reason = validate_reason(reason)
    return precheck(run, env_name, version, override_reason=f"fast deploy: {reason}")
