"""Alertmanager (API v2) gates: active alerts for an environment, and quiet periods.

Requests go through the http provider: ``HttpHook`` (sync gates) and ``HttpAsyncHook`` (the
deferrable quiet period) on the ``alertmanager`` connection, with its credentials, headers and
``extra.timeout``. Everything fails closed: an unreachable Alertmanager, an HTTP error or an
answer that is not the expected JSON makes a check *not* pass, with the reason. Severity order is
``critical > warning > info > none``; GitLab's ``s1``/``s2``/``page`` count as critical,
``s3`` as warning, ``s4`` as info, and an alert with a missing or unknown severity counts as
critical (never silently ignored).

:class:`QuietPeriod` is a pure, serialisable state machine (no I/O, no clock of its own), so
a deferrable trigger can drive it with :func:`check_async` and resume it from ``to_dict()``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from liftoff.errors import AlertsUnavailable, InvalidInput

if TYPE_CHECKING:
    from airflow.sdk import Connection

log = logging.getLogger(__name__)

SEVERITY_RANK = {"critical": 3, "warning": 2, "info": 1, "none": 0}
SEVERITY_ALIASES = {"s1": "critical", "s2": "critical", "page": "critical", "s3": "warning",
                    "warn": "warning", "s4": "info"}
DEFAULT_TIMEOUT = 10.0
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def normalize_severity(value: object) -> str:
    """``critical|warning|info|none``; aliases mapped; missing or unknown -> ``critical``."""
    if not isinstance(value, str):
        return "critical"
    v = value.strip().lower()
    v = SEVERITY_ALIASES.get(v, v)
    return v if v in SEVERITY_RANK else "critical"


def _check_severity_name(value: str) -> str:
    v = SEVERITY_ALIASES.get(value.strip().lower(), value.strip().lower())
    if v not in SEVERITY_RANK:
        raise InvalidInput(f"unknown severity {value!r}; expected one of {', '.join(SEVERITY_RANK)}")
    return v


@dataclass(frozen=True)
class Alert:
    name: str
    severity: str  # normalised
    labels: Mapping[str, str]
    annotations: Mapping[str, str] = field(default_factory=dict)
    starts_at: str = ""
    fingerprint: str = ""
    state: str = "active"
    generator_url: str = ""

    @property
    def summary(self) -> str:
        text = self.annotations.get("summary") or self.annotations.get("description") or ""
        return f"{self.name} ({self.severity})" + (f": {text}" if text else "")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"], d["annotations"] = dict(self.labels), dict(self.annotations)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Alert:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class GateResult:
    ok: bool
    reason: str
    alerts: tuple[Alert, ...] = ()
    error: str | None = None  # set when Alertmanager could not be used

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "reason": self.reason, "alerts": [a.to_dict() for a in self.alerts],
                "error": self.error}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateResult:
        return cls(bool(d["ok"]), str(d["reason"]), tuple(Alert.from_dict(a) for a in d.get("alerts", ())),
                   d.get("error"))


# -- request building and answer parsing (shared by the sync and async clients) -------------------

def _matcher_filters(matchers: Mapping[str, str]) -> list[str]:
    filters = []
    for label, value in matchers.items():
        if not isinstance(label, str) or not _LABEL_RE.fullmatch(label):
            raise InvalidInput(f"bad alert matcher label {label!r}")
        if not isinstance(value, str) or any(c in value for c in '"\\\n\r'):
            raise InvalidInput(f"bad alert matcher value {value!r} for {label}")
        filters.append(f'{label}="{value}"')
    return filters


def alerts_query(matchers: Mapping[str, str]) -> list[tuple[str, str]]:
    """Query parameters of ``GET /api/v2/alerts`` for active, unsilenced, uninhibited alerts."""
    params = [("active", "true"), ("silenced", "false"), ("inhibited", "false")]
    params += [("filter", f) for f in _matcher_filters(matchers)]
    return params


def parse_alerts(payload: Any, matchers: Mapping[str, str] | None = None) -> list[Alert]:
    """Alerts from an ``/api/v2/alerts`` answer; raises AlertsUnavailable when malformed.

    Keeps only active, unsilenced, uninhibited alerts whose labels match ``matchers``
    (Alertmanager filters already; this is a second look)."""
    if not isinstance(payload, list):
        raise AlertsUnavailable(
            f"malformed Alertmanager answer: expected a list, got {type(payload).__name__}")
    alerts = []
    for i, item in enumerate(payload):
        if not isinstance(item, dict) or not isinstance(item.get("labels"), dict):
            raise AlertsUnavailable(f"malformed Alertmanager answer: alert #{i} has no labels")
        labels = {str(k): str(v) for k, v in item["labels"].items()}
        status = item.get("status")
        if status is not None and not isinstance(status, dict):
            raise AlertsUnavailable(f"malformed Alertmanager answer: alert #{i} has a bad status")
        status = status or {}
        state = status.get("state") or "active"
        if state == "suppressed" or status.get("silencedBy") or status.get("inhibitedBy"):
            continue
        if matchers and any(labels.get(k) != v for k, v in matchers.items()):
            continue
        annotations = item.get("annotations") if isinstance(item.get("annotations"), dict) else {}
        alerts.append(Alert(
            name=labels.get("alertname", "?"),
            severity=normalize_severity(labels.get("severity")),
            labels=labels,
            annotations={str(k): str(v) for k, v in annotations.items()},
            starts_at=str(item.get("startsAt") or ""),
            fingerprint=str(item.get("fingerprint") or ""),
            state=str(state),
            generator_url=str(item.get("generatorURL") or ""),
        ))
    alerts.sort(key=lambda a: (-SEVERITY_RANK[a.severity], a.name, a.fingerprint))
    return alerts


def _severity_filter(severities: Iterable[str] | str | None) -> set[str] | None:
    if severities is None:
        return None
    if isinstance(severities, str):
        severities = [severities]
    return {_check_severity_name(s) for s in severities}


def _min_rank(min_severity: str | None) -> int:
    return -1 if min_severity is None else SEVERITY_RANK[_check_severity_name(min_severity)]


def _describe_matchers(matchers: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in matchers.items()) or "all"


def evaluate(alerts: Iterable[Alert], matchers: Mapping[str, str],
             severities: Iterable[str] | str | None = ("critical",)) -> GateResult:
    """The gate decision for alerts already fetched."""
    wanted = _severity_filter(severities)
    matching = tuple(a for a in alerts if wanted is None or a.severity in wanted)
    sev_text = "any severity" if wanted is None else "severity " + "/".join(sorted(wanted))
    where = _describe_matchers(matchers)
    if not matching:
        return GateResult(True, f"no active alert for {where} with {sev_text}")
    names = ", ".join(a.summary for a in matching[:10]) + (" ..." if len(matching) > 10 else "")
    return GateResult(False, f"{len(matching)} active alert(s) for {where}: {names}", matching)


def unavailable(matchers: Mapping[str, str], error: str) -> GateResult:
    return GateResult(False, f"alerts for {_describe_matchers(matchers)} unknown (fail closed): {error}",
                      (), error)


# -- clients: the http provider's hooks on the Alertmanager connection -----------------------------

def _base_of(alertmanager: str | Connection) -> str:
    from liftoff.settings import base_url

    url = alertmanager if isinstance(alertmanager, str) else base_url(alertmanager)
    if not url.startswith(("http://", "https://")):
        raise InvalidInput(f"Alertmanager URL must start with http:// or https://, got {url!r}")
    return url.rstrip("/")


def _timeout_of(alertmanager: str | Connection, timeout: float | None) -> float:
    """``timeout``, else the connection's ``extra.timeout``, else DEFAULT_TIMEOUT."""
    if timeout is not None:
        return float(timeout)
    extra = {} if isinstance(alertmanager, str) or not alertmanager.extra else alertmanager.extra_dejson
    return float(extra.get("timeout") or DEFAULT_TIMEOUT)


class AlertClient:
    """Reads alerts from Alertmanager's API v2 through ``HttpHook`` (GET) on the Alertmanager
    connection (or a bare base URL: no credentials). A request that cannot connect is tried
    ``attempts`` times in all, within about ``timeout`` seconds."""

    def __init__(self, alertmanager: str | Connection, timeout: float | None = None, attempts: int = 3):
        self.base_url = _base_of(alertmanager)
        self.connection = alertmanager
        self.timeout = _timeout_of(alertmanager, timeout)
        self.attempts = max(1, attempts)

    @classmethod
    def from_settings(cls, inventory=None, timeout: float | None = None) -> AlertClient:
        """On the inventory's ``alertmanager`` connection (default ``liftoff_alertmanager``)."""
        from liftoff.settings import connection_for

        return cls(connection_for("alertmanager", inventory), timeout)

    def _get(self, params: list[tuple[str, str]]) -> Any:
        import tenacity
        from requests.exceptions import ConnectionError as CannotConnect

        from liftoff.settings import bound_hook

        hook = bound_hook(self.connection, method="GET", tcp_keep_alive=False)
        retry = {"stop": tenacity.stop_after_attempt(self.attempts) | tenacity.stop_after_delay(self.timeout),
                 "wait": tenacity.wait_exponential(multiplier=0.2, max=2.0),
                 "retry": tenacity.retry_if_exception_type(CannotConnect), "reraise": True}
        return hook.run_with_advanced_retry(retry, endpoint="/api/v2/alerts", data=params,
                                            headers={"Accept": "application/json"},
                                            extra_options={"timeout": self.timeout, "check_response": False})

    def active_alerts(self, matchers: Mapping[str, str], min_severity: str | None = None) -> list[Alert]:
        """Active, unsilenced, uninhibited alerts matching ``matchers`` at ``min_severity`` or above.

        Raises AlertsUnavailable when Alertmanager is unreachable or answers badly."""
        params = alerts_query(matchers)
        floor = _min_rank(min_severity)
        try:
            resp = self._get(params)
        except Exception as exc:  # cannot connect, timed out, refused: fail closed
            raise AlertsUnavailable(
                f"Alertmanager at {self.base_url} unreachable: {type(exc).__name__}") from None
        if resp.status_code != 200:
            raise AlertsUnavailable(f"Alertmanager at {self.base_url} answered HTTP {resp.status_code}")
        try:
            payload = resp.json()
        except ValueError:
            raise AlertsUnavailable(f"malformed Alertmanager answer from {self.base_url}: not JSON") from None
        return [a for a in parse_alerts(payload, matchers) if SEVERITY_RANK[a.severity] >= floor]

    def check(self, matchers: Mapping[str, str],
              severities: Iterable[str] | str | None = ("critical",)) -> GateResult:
        """ok=True only when Alertmanager answered and no matching alert of those severities is active."""
        _severity_filter(severities)  # refuse a bad severity before asking
        try:
            alerts = self.active_alerts(matchers)
        except AlertsUnavailable as exc:
            log.warning("alert check failed closed: %s", exc)
            return unavailable(matchers, str(exc))
        return evaluate(alerts, matchers, severities)


async def _get_async(alertmanager: str | Connection, params: list[tuple[str, str]], timeout: float) -> Any:
    """The JSON answer of ``GET /api/v2/alerts`` through ``HttpAsyncHook``; AlertsUnavailable."""
    import aiohttp
    from airflow.providers.http.hooks.http import HttpAsyncHook

    from liftoff.settings import bound_hook

    base = _base_of(alertmanager)
    hook = bound_hook(alertmanager, HttpAsyncHook, method="GET", retry_limit=1)
    try:
        async with hook.session() as http:
            resp = await http.run(endpoint="/api/v2/alerts", data=params,
                                  headers={"Accept": "application/json"},
                                  extra_options={"timeout": aiohttp.ClientTimeout(total=timeout),
                                                 "check_response": False})
            if resp.status != 200:
                raise AlertsUnavailable(f"Alertmanager at {base} answered HTTP {resp.status}")
            try:
                return await resp.json(content_type=None)
            except ValueError:
                raise AlertsUnavailable(f"malformed Alertmanager answer from {base}: not JSON") from None
    except AlertsUnavailable:
        raise
    except Exception as exc:  # cannot connect, timed out: fail closed
        raise AlertsUnavailable(f"Alertmanager at {base} unreachable: {type(exc).__name__}") from None


async def fetch_alerts_async(alertmanager: str | Connection, matchers: Mapping[str, str],
                             min_severity: str | None = None, timeout: float | None = None) -> list[Alert]:
    """Async ``AlertClient.active_alerts`` (``HttpAsyncHook``); raises AlertsUnavailable."""
    params = alerts_query(matchers)
    floor = _min_rank(min_severity)
    payload = await _get_async(alertmanager, params, _timeout_of(alertmanager, timeout))
    return [a for a in parse_alerts(payload, matchers) if SEVERITY_RANK[a.severity] >= floor]


async def check_async(alertmanager: str | Connection, matchers: Mapping[str, str],
                      severities: Iterable[str] | str | None = ("critical",),
                      timeout: float | None = None) -> GateResult:
    _severity_filter(severities)
    try:
        alerts = await fetch_alerts_async(alertmanager, matchers, timeout=timeout)
    except AlertsUnavailable as exc:
        return unavailable(matchers, str(exc))
    return evaluate(alerts, matchers, severities)


# -- quiet period ------------------------------------------------------------------------------------

WAITING, QUIET, FAILED = "waiting", "quiet", "failed"


@dataclass
class QuietPeriod:
    """Quiet only if every poll over a whole ``window_s`` saw no matching alert.

    Feed it each poll with :meth:`observe`; ask :meth:`next_poll_at` when to poll again.
    A non-quiet poll (an alert, or Alertmanager unusable) fails at once when
    ``fail_on_alert`` (naming the alerts), else restarts the window; ``timeout_s`` (default
    three windows, when not failing on alerts) bounds the whole wait. A gap between polls
    longer than ``max_gap_s`` (default 2.5 intervals; e.g. a triggerer restart) restarts the
    window too, since nobody watched. Times are epoch seconds, so the state survives a
    process restart through ``to_dict``/``from_dict``.
    """

    window_s: float
    interval_s: float
    fail_on_alert: bool = True
    timeout_s: float | None = None
    max_gap_s: float | None = None
    started_at: float | None = None
    quiet_since: float | None = None
    last_poll_at: float | None = None
    polls: int = 0
    resets: int = 0
    outcome: str = WAITING
    reason: str = "not started"
    alerts: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.window_s < 0 or self.interval_s <= 0:
            raise InvalidInput(f"quiet period needs window >= 0 and interval > 0, got {self.window_s}/"
                               f"{self.interval_s}")
        if self.timeout_s is None and not self.fail_on_alert:
            self.timeout_s = 3 * self.window_s + self.interval_s
        if self.max_gap_s is None:
            self.max_gap_s = 2.5 * self.interval_s

    @property
    def done(self) -> bool:
        return self.outcome != WAITING

    @property
    def ok(self) -> bool:
        return self.outcome == QUIET

    def observe(self, now: float, result: GateResult) -> str:
        """Record one poll's result at time ``now``; returns the outcome (waiting|quiet|failed)."""
        if self.done:
            return self.outcome
        if self.started_at is None:
            self.started_at = now
        self.polls += 1
        gap = None if self.last_poll_at is None else now - self.last_poll_at
        self.last_poll_at = now
        unwatched = gap is not None and self.max_gap_s is not None and gap > self.max_gap_s
        if unwatched and self.quiet_since is not None:
            self.quiet_since = None
            self.resets += 1
        if result.ok:
            if self.quiet_since is None:
                self.quiet_since = now
            quiet_for = now - self.quiet_since
            if quiet_for >= self.window_s:
                self.outcome = QUIET
                self.reason = (f"quiet for {quiet_for:.0f}s ({self.polls} polls, {self.resets} resets): "
                               f"{result.reason}")
                return self.outcome
            self.reason = f"quiet for {quiet_for:.0f}s of {self.window_s:.0f}s"
        else:
            self.alerts = [a.to_dict() for a in result.alerts]
            if self.fail_on_alert:
                self.outcome = FAILED
                self.reason = f"not quiet: {result.reason}"
                return self.outcome
            self.quiet_since = None
            self.resets += 1
            self.reason = f"window restarted: {result.reason}"
        if self.timeout_s is not None and now - self.started_at >= self.timeout_s:
            self.outcome = FAILED
            self.reason = (f"not quiet for {self.window_s:.0f}s within {self.timeout_s:.0f}s "
                           f"(last: {self.reason})")
        return self.outcome

    def next_poll_at(self, now: float | None = None) -> float:
        """When to poll next (never later than the moment the window would complete)."""
        if self.last_poll_at is None:
            return now if now is not None else time.time()
        nxt = self.last_poll_at + self.interval_s
        if self.quiet_since is not None:
            nxt = min(nxt, max(self.last_poll_at, self.quiet_since + self.window_s))
        return nxt

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuietPeriod:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def run_quiet_period(client: AlertClient, matchers: Mapping[str, str], period: QuietPeriod,
                     severities: Iterable[str] | str | None = ("critical",),
                     clock: Callable[[], float] = time.time,
                     sleep: Callable[[float], None] = time.sleep) -> QuietPeriod:
    """Drive a quiet period to its end with blocking polls (CLI, tests, non-deferred tasks)."""
    while not period.done:
        period.observe(clock(), client.check(matchers, severities))
        if not period.done:
            sleep(max(0.0, period.next_poll_at() - clock()))
    return period


async def run_quiet_period_async(alertmanager: str | Connection, matchers: Mapping[str, str],
                                 period: QuietPeriod, severities: Iterable[str] | str | None = ("critical",),
                                 timeout: float | None = None,
                                 clock: Callable[[], float] = time.time,
                                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                                 on_poll: Callable[[QuietPeriod], None] | None = None) -> QuietPeriod:
    """Async version for triggers; ``on_poll`` sees the state after each poll (e.g. to persist it)."""
    while not period.done:
        result = await check_async(alertmanager, matchers, severities, timeout=timeout)
        period.observe(clock(), result)
        if on_poll is not None:
            on_poll(period)
        if not period.done:
            await sleep(max(0.0, period.next_poll_at() - clock()))
    return period
