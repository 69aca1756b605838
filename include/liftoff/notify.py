"""ChatOps notifications: what a release manager hears in chat, posted as Slack incoming-webhook
JSON (``{"text": ..., "attachments": [...]}``, which Mattermost accepts as well) through the
HTTP provider's ``HttpHook`` on the Airflow connection ``liftoff_chat`` (the inventory's
``connections.chat`` may name another).

The connection: ``host`` the webhook's base URL (or the whole webhook URL), the webhook's
path (Slack's ``services/T.../B.../token``) in ``password`` (kept secret) or ``extra.endpoint``;
``extra.timeout`` (seconds, default 5), ``extra.events`` (comma list or list), and
``extra.channel``/``extra.username`` (Mattermost and legacy Slack webhooks honour them). Other
extra keys are HTTP headers, as for every Airflow HTTP connection.

Which events go out: env ``LIFTOFF_NOTIFY_EVENTS`` (``all``, ``none``, or a comma list, where
``-name`` leaves one out: ``all,-stage_passed``), else the connection's ``extra.events``, else
all of :data:`EVENTS`.

Never in the way of a deploy: without a connection nothing is sent and nothing is said; a
chat outage, an error answer or a slow webhook makes the call return False after at most the
connection's timeout (the request runs in a thread joined for that long). The failure is
logged without the webhook's path or token and counted, in this process
(:func:`failed_counts`) and as ``liftoff_notifications_failed_total{event}`` pushed with
liftoff's metrics (group ``{pipeline}``). An internal build's version never appears: it is
"internal" in every message of such a run.

Links: ``LIFTOFF_AIRFLOW_URL`` (default ``http://127.0.0.1:8080``) +
``/dags/{dag_id}/runs/{run_id}`` (a task's, an approval's required action page).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from liftoff.errors import ConnectionNotFound, RollbackRefused
from liftoff.metrics import REDACTED, PipelineMetrics
from liftoff.settings import Connection, base_url, resolve_connection

log = logging.getLogger(__name__)

DEFAULT_CONN_ID = "liftoff_chat"
DEFAULT_TIMEOUT_S = 5.0
MAX_TIMEOUT_S = 60.0
DEFAULT_AIRFLOW_URL = "http://127.0.0.1:8080"
EVENTS_ENV = "LIFTOFF_NOTIFY_EVENTS"
AIRFLOW_URL_ENV = "LIFTOFF_AIRFLOW_URL"
# Share of the timeout the request itself may take; the rest counts a failure in time.
REQUEST_SHARE = 0.8
REASON_CHARS = 600

EVENTS: dict[str, str] = {
    "deploy_started": "a deploy started: version, environments, who, link to the run",
    "stage_passed": "a stage passed its gates",
    "stage_failed": "a step failed, with its reason",
    "halted": "a run halted and left the environment as it is",
    "rollback_started": "a rollback (by hand or automatic) started",
    "rollback_finished": "a rollback finished",
    "rollback_refused": "a rollback was refused (the guard's sentence)",
    "canary_verified": "canary verified a build",
    "canary_judged": "the canary judge compared canary with main: verdict, score, what liftoff does",
    "approval_waiting": "a promotion waits for approval, with the link to answer",
    "patch_applied": "a post-deployment patch was applied and canary deploys halted",
    "halt_lifted": "the halt on canary deploys was lifted on purpose",
    "lock_taken": "an environment was locked by hand",
    "lock_force_released": "an environment's lock was removed by hand",
    "freeze_changed": "an environment's changes were frozen or unfrozen by hand, with the reason",
    "checks_approved": "a person approved failed production checks, with who and why",
    "fast_deploy": "a fast deploy started, with its reason",
    "run_finished": "a pipeline run ended, with its summary",
}

# Extra keys liftoff reads itself; the others are HttpHook's (headers, verify, proxies, ...).
OWN_EXTRA = frozenset({"events", "timeout", "endpoint", "webhook_path", "channel", "username",
                       "icon_emoji", "icon_url", "path", "base_path", "scheme"})

GOOD, BAD, WARN, INFO = "#2eb886", "#a30200", "#daa038", "#439fe0"

_counts: Counter[str] = Counter()
_counts_lock = threading.Lock()
_reported: set[tuple[str, str]] = set()  # (run id, task id) whose failure already has its message

# HttpHook's own logger says "Max retries exceeded with url: <the webhook path>": kept quiet,
# liftoff logs one sanitized line instead.
_QUIET = logging.Logger("liftoff.notify.httphook")
_QUIET.disabled = True


def failed_counts() -> dict[str, int]:
    """Failed notifications of this process, by event."""
    with _counts_lock:
        return dict(_counts)


# -- configuration -------------------------------------------------------------------------------

def parse_events(value: str | Iterable[str] | None) -> frozenset[str] | None:
    """``all`` / ``none`` / ``a,b`` / ``all,-stage_passed`` (or a list of those) -> the event
    names; None when ``value`` is None. Unknown names are logged and ignored."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    chosen: set[str] = set()
    for raw in (i.strip().lower() for i in items):
        if not raw:
            continue
        minus = raw.startswith("-")
        name = raw[1:].strip() if minus else raw
        names = set(EVENTS) if name == "all" else set() if name == "none" else {name}
        unknown = names - set(EVENTS)
        if unknown:
            log.warning("notify: unknown event %s ignored (known: all, none, %s)", sorted(unknown)[0],
                        ", ".join(EVENTS))
        names &= set(EVENTS)
        chosen = chosen - names if minus else chosen | names
    return frozenset(chosen)


def _timeout_of(extra: Mapping[str, Any]) -> float:
    try:
        value = float(extra.get("timeout", DEFAULT_TIMEOUT_S))
    except (TypeError, ValueError):
        log.warning("notify: the chat connection's timeout %r is not a number; %ss used",
                    extra.get("timeout"), DEFAULT_TIMEOUT_S)
        return DEFAULT_TIMEOUT_S
    return min(max(value, 0.1), MAX_TIMEOUT_S)


def safe_url(url: str) -> str:
    """``scheme://host[:port]``: what logs may say of a webhook (never its path or token)."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}" if parts.hostname else "(no host)"
    except ValueError:
        return "(unparsable URL)"


def conn_id_of(inventory: Any = None) -> str:
    connections = getattr(inventory, "connections", None) or {}
    return connections.get("chat") or DEFAULT_CONN_ID


def airflow_url() -> str:
    return (os.environ.get(AIRFLOW_URL_ENV) or DEFAULT_AIRFLOW_URL).rstrip("/")


def run_link(dag_id: str, run_id: str, task_id: str | None = None) -> str:
    """The Airflow UI page of a run (or of one of its tasks)."""
    url = f"{airflow_url()}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
    return url + (f"/tasks/{quote(task_id, safe='')}" if task_id else "")


def approval_link(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """The page where a person answers an approval (Airflow's "required actions")."""
    return f"{run_link(dag_id, run_id, task_id)}/required_actions?map_index={map_index}"


# -- the chat connection -------------------------------------------------------------------------

@dataclass
class Chat:
    """One chat webhook: where, which events, how long a post may take."""

    conn: Connection | None
    events: frozenset[str] = field(default_factory=lambda: frozenset(EVENTS))
    timeout: float = DEFAULT_TIMEOUT_S
    pipeline: str = "liftoff"
    inventory: Any = None

    @classmethod
    def from_settings(cls, pipeline: str = "liftoff", inventory: Any = None) -> Chat:
        """From the chat connection; without one, a disabled Chat (nothing is sent)."""
        conn_id = conn_id_of(inventory)
        try:
            conn = resolve_connection(conn_id)
        except ConnectionNotFound:
            log.debug("notify: no %s connection, no chat notifications", conn_id)
            return cls(None, frozenset(), pipeline=pipeline, inventory=inventory)
        if not conn.host:
            log.warning("notify: connection %s has no host; no chat notifications", conn_id)
            return cls(None, frozenset(), pipeline=pipeline, inventory=inventory)
        extra = dict(conn.extra_dejson)
        events = parse_events(os.environ.get(EVENTS_ENV) or None)  # set but empty: as if unset
        if events is None:
            events = parse_events(extra.get("events"))
        return cls(conn, frozenset(EVENTS) if events is None else events, _timeout_of(extra), pipeline,
                   inventory)

    @property
    def enabled(self) -> bool:
        return self.conn is not None

    def wants(self, event: str) -> bool:
        return self.enabled and event in self.events

    # where the post goes
    def base_url(self) -> str:
        return base_url(self.conn) if self.conn else ""

    def endpoint(self) -> str:
        c = self.conn
        if c is None:
            return ""
        extra = c.extra_dejson
        path = extra.get("endpoint") or extra.get("webhook_path") or (c.password if not c.login else None)
        return str(path or "").strip()

    def secrets(self) -> list[str]:
        """Strings that must not reach a log: the token path, the password, the whole URL."""
        c = self.conn
        found = [self.endpoint(), c.password if c else None, self.base_url()]
        path = urlsplit(self.base_url()).path
        found += [path] if path.strip("/") else []
        found += [p.rstrip("/").rsplit("/", 1)[-1] for p in (self.endpoint(), path)]  # the token alone
        return sorted({s for s in found if s and len(s) > 2}, key=len, reverse=True)

    def sanitize(self, text: str) -> str:
        for secret in self.secrets():
            text = text.replace(secret, "***")
            text = text.replace(secret.lstrip("/"), "***")
        text = re.sub(r"(url: )\S+", r"\1***", text)
        return text[:300]

    def _hook(self):
        """An ``HttpHook`` (POST) on this connection, built from what liftoff resolved (Airflow,
        ``AIRFLOW_CONN_*`` or the ``LIFTOFF_CONNECTIONS`` file): one lookup, the same answer."""
        from airflow.providers.http.hooks.http import HttpHook
        from airflow.sdk import Connection

        c = self.conn
        headers = {k: v for k, v in c.extra_dejson.items() if k not in OWN_EXTRA}
        connection = Connection(conn_id=c.conn_id or DEFAULT_CONN_ID, conn_type="http", host=self.base_url(),
                                login=c.login, password=c.password if c.login else None,
                                extra=json.dumps(headers) if headers else None)

        class _ChatHook(HttpHook):
            def get_connection(self, conn_id: str):  # the one liftoff resolved
                return connection

        hook = _ChatHook(method="POST", http_conn_id=connection.conn_id, tcp_keep_alive=False)
        hook._log = _QUIET
        return hook

    def post(self, event: str, payload: dict) -> bool:
        """POST ``payload``; True when the webhook accepted it. Never raises; returns within
        ``timeout`` seconds; a failure is logged (no secrets) and counted."""
        if not self.wants(event):
            return False
        try:  # imports and the connection object: before the clock starts, not the chat's time
            hook = self._hook()
        except Exception as exc:  # a notification never fails a deploy
            failed = _Attempt(self, event, time.monotonic() + self.timeout)
            failed.fail(f"{type(exc).__name__}: {exc}", push=True)
            return False
        attempt = _Attempt(self, event, time.monotonic() + self.timeout)

        def work() -> None:
            try:
                hook.run(endpoint=self.endpoint() or None, json=payload,
                         extra_options={"timeout": self.timeout * REQUEST_SHARE, "check_response": True})
                attempt.succeed()
            except BaseException as exc:  # a notification never fails a deploy
                attempt.fail(f"{type(exc).__name__}: {exc}", push=True)

        thread = threading.Thread(target=work, name=f"liftoff-notify-{event}", daemon=True)
        thread.start()
        thread.join(self.timeout)
        attempt.fail(f"no answer within {self.timeout:g} s", push=False)  # nothing when it has ended
        return attempt.ok


class _Attempt:
    """One post's outcome: the first of success and failure wins; a failure is logged and
    counted once."""

    def __init__(self, chat: Chat, event: str, deadline: float):
        self.chat, self.event, self.deadline = chat, event, deadline
        self.ok = False
        self._done = False
        self._lock = threading.Lock()

    def succeed(self) -> None:
        with self._lock:
            if not self._done:
                self._done = self.ok = True

    def fail(self, why: str, push: bool) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        with _counts_lock:
            _counts[self.event] += 1
        log.warning("chat notification %s to %s failed (the run goes on): %s", self.event,
                    safe_url(self.chat.base_url()), self.chat.sanitize(why))
        if push:  # in the post's thread, within what is left of the timeout
            _push_failure(self.chat, self.event, max(0.3, self.deadline - time.monotonic()))
        else:  # the post's thread is stuck: count from a thread of its own, the run goes on
            threading.Thread(target=_push_failure, args=(self.chat, self.event, 2.0), daemon=True).start()


class NotifyMetrics(PipelineMetrics):
    """``liftoff_notifications_failed_total{event}`` in the pipeline's group."""

    def notification_failed(self, event: str) -> bool:
        return self._guard("notification_failed", self._notification_failed, event)

    def _notification_failed(self, event: str) -> None:
        self._count("liftoff_notifications_failed", "Chat notifications that failed, by event.",
                    {"pipeline": self.pipeline}, "event", event)


def _push_failure(chat: Chat, event: str, timeout: float) -> None:
    try:
        NotifyMetrics.from_settings(chat.pipeline, chat.inventory, timeout=timeout).notification_failed(event)
    except Exception as exc:
        log.warning("notify: counting the failed %s notification failed: %s", event, type(exc).__name__)


# -- messages ------------------------------------------------------------------------------------

@dataclass
class Origin:
    """Where a message comes from: the Airflow run (real run id for links) and who."""

    dag_id: str
    run_id: str
    who: str
    inventory: Any = None
    dry_run: bool = False
    hidden_versions: tuple[str, ...] = ()  # an internal build's version: never shown


def _context() -> Mapping[str, Any] | None:
    try:
        from airflow.sdk import get_current_context

        return get_current_context()
    except Exception:  # outside a task
        return None


def _who_of(dag_run: Any) -> str:
    conf = getattr(dag_run, "conf", None) or {}
    who = conf.get("requested_by") if isinstance(conf, Mapping) else None
    return str(who or ("scheduler" if getattr(dag_run, "run_type", "") == "scheduled" else "airflow-user"))


def origin(run: Any = None, context: Mapping[str, Any] | None = None) -> Origin:
    """From the task's context when there is one (the real run id), else from ``run``."""
    ctx = context if context is not None else _context()
    inventory = getattr(run, "inventory", None)
    dag_run = ctx.get("dag_run") if ctx else None
    if dag_run is not None:
        params = ctx.get("params") or {}
        hidden = ()
        if params.get("internal") and params.get("version"):
            hidden = (str(params["version"]),)
        who = getattr(run, "who", None) or _who_of(dag_run)
        return Origin(dag_run.dag_id, dag_run.run_id, who, inventory, bool(params.get("dry_run")), hidden)
    return Origin(getattr(run, "pipeline", None) or "liftoff", getattr(run, "run_id", None) or "?",
                  getattr(run, "who", None) or "liftoff", inventory)


def _inventory(o: Origin) -> Any:
    if o.inventory is None:
        try:
            from liftoff.inventory import load_inventory

            o.inventory = load_inventory()
        except Exception:  # no inventory: the default connection id
            o.inventory = None
    return o.inventory


def _redact(value: Any, hidden: Iterable[str]) -> Any:
    if isinstance(value, str):
        for version in hidden:
            value = value.replace(version, REDACTED)
        return value
    if isinstance(value, list):
        return [_redact(v, hidden) for v in value]
    if isinstance(value, dict):
        return {k: _redact(v, hidden) for k, v in value.items()}
    return value


def _reason(value: Any) -> str:
    text = " ".join(str(value or "").split())
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 1] + "…"


def payload(event: str, headline: str, o: Origin, *, lines: Iterable[str] = (),
            fields: Mapping[str, Any] | None = None, color: str = INFO, link: str | None = None,
            chat: Chat | None = None) -> dict:
    """The Slack incoming-webhook JSON of one message (Mattermost reads the same)."""
    link = link or run_link(o.dag_id, o.run_id)
    head = ("[dry run] " if o.dry_run else "") + headline
    text = "\n".join([head, *(s for s in lines if s), link])
    shown = {"run": o.run_id, "by": o.who, **{k: v for k, v in (fields or {}).items() if v not in (None, "")}}
    attachment = {
        "fallback": head,
        "color": color,
        "fields": [{"title": k, "value": ", ".join(map(str, v)) if isinstance(v, list | tuple) else str(v),
                    "short": len(str(v)) <= 40} for k, v in shown.items()],
        "footer": f"liftoff · {o.dag_id} · {event}",
        "ts": int(time.time()),
    }
    body: dict[str, Any] = {"text": text, "attachments": [attachment]}
    extra = (chat.conn.extra_dejson if chat and chat.conn else None) or {}
    for key in ("channel", "username", "icon_emoji", "icon_url"):
        if extra.get(key):
            body[key] = str(extra[key])
    return _redact(body, o.hidden_versions)


def emit(event: str, headline: str, *, run: Any = None, context: Mapping[str, Any] | None = None,
         lines: Iterable[str] = (), fields: Mapping[str, Any] | None = None, color: str = INFO,
         link: str | None = None, hidden: Iterable[str] = ()) -> bool:
    """Build and post one message; True when the chat accepted it. Never raises."""
    try:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}")
        o = origin(run, context)
        o.hidden_versions = tuple(dict.fromkeys([*o.hidden_versions, *(h for h in hidden if h)]))
        chat = Chat.from_settings(o.dag_id, _inventory(o))
        if not chat.wants(event):
            return False
        body = payload(event, headline, o, lines=lines, fields=fields, color=color, link=link, chat=chat)
        return chat.post(event, body)
    except Exception as exc:  # a notification never fails a deploy
        log.warning("chat notification %s not sent: %s: %s", event, type(exc).__name__, str(exc)[:200])
        return False


def _never_raises(fn: Callable[..., bool]) -> Callable[..., bool]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> bool:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # a notification never fails a deploy
            log.warning("chat notification (%s) not sent: %s: %s", fn.__name__, type(exc).__name__,
                        str(exc)[:200])
            return False
    return wrapper


def _shown(version: Any, internal: bool) -> str:
    return REDACTED if internal else str(version)


# -- the events ----------------------------------------------------------------------------------

@_never_raises
def deploy_started(run: Any, version: str, envs: Iterable[str], *, internal: bool = False,
                   seen: list | None = None) -> bool:
    """The deploy begins: version, environments, and what changed on the first environment (the
    commits between the build it runs and ``version``, :mod:`liftoff.changes`) or why that is not
    known. Then each environment's deploy pressure is pushed (best effort)."""
    envs = list(envs)
    internal = internal or bool(getattr(run, "redact_version", False))
    o = origin(run)
    running, rng = _what_changed(run, version, envs, internal)
    if seen is not None:  # the caller keeps the range for the run's summary
        seen.append(rng)
    sent = emit("deploy_started",
                f":rocket: {o.dag_id}: deploying {_shown(version, internal)} to {', '.join(envs)} "
                f"(started by {o.who})",
                run=run, lines=_change_lines(rng, envs),
                fields={"version": _shown(version, internal), "environments": envs,
                        "commits": rng.count if rng is not None and rng.known else "not known"},
                color=INFO, hidden=[version] if internal else ())
    known = {env: v for env, v in running.items() if v}
    if known:
        from liftoff.changes import push_pressure

        push_pressure(run, list(known), known)
    return sent


def _what_changed(run: Any, version: str, envs: list[str], internal: bool) -> tuple[dict, Any]:
    """``({env: the build it runs}, the change range on the first environment)``; never raises."""
    try:
        from liftoff.changes import ChangeRange, change_range, running_version

        found = {env: running_version(run, env) for env in envs}
        running = {env: v for env, (v, _) in found.items()}
        if not envs:
            return running, None
        current, why = found[envs[0]]
        if current is None:
            return running, ChangeRange(None, _shown(version, internal), reason=why)
        return running, change_range(run, current, version, internal=internal)
    except Exception as exc:  # a notification never fails a deploy
        log.warning("what changed: not known: %s", type(exc).__name__)
        return {}, None


def _change_lines(rng: Any, envs: list[str]) -> list[str]:
    if rng is None:
        return ["what changed: not known"]
    from liftoff.changes import chat_lines

    return chat_lines(rng, envs[0] if len(envs) > 1 else None)


@_never_raises
def stage_passed(run: Any, env: str, stage: str, duration_s: float | None = None) -> bool:
    took = f" in {duration_s:.0f} s" if duration_s is not None else ""
    return emit("stage_passed", f":white_check_mark: {stage} on {env} passed{took}", run=run,
                fields={"environment": env, "stage": stage}, color=GOOD)


def _task_of(ti: Any) -> tuple[str, str | None]:
    task_id = str(getattr(ti, "task_id", "") or "?")
    group = task_id.split(".", 1)[0] if "." in task_id else None
    return task_id, group


@_never_raises
def step_failed(context: Mapping[str, Any]) -> bool:
    """A task failed (its ``on_failure_callback``): the step and its reason. Not for finalize
    (``run_finished`` says it) nor for a failure already told (a refused rollback)."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    task_id, group = _task_of(ti)
    run_id = str(getattr(dag_run, "run_id", "") or getattr(ti, "run_id", ""))
    if task_id == "finalize" or (run_id, task_id) in _reported:
        return False
    exc = context.get("exception")
    reason = _reason(exc) or "no reason given (see the task log)"
    where = f"{group} failed at {task_id.split('.', 1)[1]}" if group else f"{task_id} failed"
    o = origin(None, context)
    return emit("stage_failed", f":x: {o.dag_id}: {where}", context=context, lines=[reason],
                fields={"step": task_id, "reason": reason}, color=BAD,
                link=run_link(o.dag_id, o.run_id, task_id))


@_never_raises
def halted(run: Any, envs: Iterable[str], result: Mapping[str, Any] | None = None) -> bool:
    result = result or {}
    envs = list(result.get("halted") or envs)
    drained = list(result.get("drained") or [])
    lines = [f"hosts out of service: {', '.join(drained[:10])}" + (" …" if len(drained) > 10 else "")
             if drained else "no host out of service"]
    if result.get("not_rolled_back"):  # the run asked for a rollback; why it halted instead
        lines.append(str(result["not_rolled_back"]))
    o = origin(run)
    return emit("halted", f":octagonal_sign: {o.dag_id} halted: {', '.join(envs) or 'nothing'} left as it is",
                run=run, lines=lines, fields={"environments": envs}, color=WARN)


@_never_raises
def rollback_started(run: Any, env: str | None = None, target: str | None = None, *, mode: str = "normal",
                     reason: str | None = None, envs: Iterable[str] = (), automatic: bool = False) -> bool:
    """A rollback begins; an automatic one names the environment the run was changing."""
    if env is None and automatic:
        from liftoff.deploy import failed_environment

        env = failed_environment(run, list(envs))
        if env is None:
            return False  # nothing was changed: nothing to roll back
    kind = "automatic rollback" if automatic else f"rollback ({mode} mode)"
    to = f" to {target}" if target else " to its last good version (safety check first)"
    reason = reason or ("a gate failed" if automatic else None)
    return emit("rollback_started", f":rewind: {kind} of {env}{to}", run=run,
                lines=[f"reason: {_reason(reason)}"] if reason else [],
                fields={"environment": env, "target": target, "mode": mode}, color=WARN)


@_never_raises
def rollback_finished(run: Any, env: str | None, target: str | None, *, automatic: bool = False) -> bool:
    if not env:
        return False
    kind = "automatic rollback" if automatic else "rollback"
    return emit("rollback_finished", f":leftwards_arrow_with_hook: {kind} of {env} to {target} finished",
                run=run, fields={"environment": env, "version": target}, color=GOOD)


@_never_raises
def rollback_refused(run: Any, sentence: str, env: str | None = None) -> bool:
    """The guard's sentence, as it is; the step's failure is not told again."""
    ctx = _context()
    if ctx and ctx.get("ti") is not None and ctx.get("dag_run") is not None:
        _reported.add((str(ctx["dag_run"].run_id), str(ctx["ti"].task_id)))
    return emit("rollback_refused", f":no_entry: rollback{' of ' + env if env else ''} refused", run=run,
                lines=[_reason(sentence)], fields={"environment": env}, color=BAD)


@contextlib.contextmanager
def refusals(run: Any, env: str | None = None) -> Iterator[None]:
    """``with notify.refusals(run, env):`` a RollbackRefused inside is told, then raised on."""
    try:
        yield
    except RollbackRefused as exc:
        rollback_refused(run, str(exc), env)
        raise


@_never_raises
def canary_verified(run: Any, version: str, lifted: Iterable[str] = ()) -> bool:
    lifted = list(lifted)
    return emit("canary_verified", f":large_green_circle: canary verified {version}", run=run,
                lines=[f"halts lifted (patches included): {', '.join(lifted)}"] if lifted else [],
                fields={"version": version}, color=GOOD)


_JUDGED = {"next": ("goes on", GOOD), "abort": ("canary weight 0, the run stops", BAD),
           "ask": ("a person decides (continue or abort)", WARN),
           "accepted": ("goes on: a person accepted this canary", WARN)}


@_never_raises
def canary_judged(run: Any, env: str, where: str, verdict: str, score: float | None, reason: str,
                  decision: str) -> bool:
    what, color = _JUDGED.get(decision, (decision, INFO))
    shown = "-" if score is None else f"{score:g}"
    return emit("canary_judged", f":scales: canary {env} judged {verdict} (score {shown}) in {where}: {what}",
                run=run, lines=[_reason(reason)], fields={"environment": env, "verdict": verdict},
                color=color)


@_never_raises
def approval_waiting(context: Mapping[str, Any]) -> bool:
    """An ApprovalOperator waits: subject, what it says, when it times out, the link to answer."""
    ti = context.get("ti") or context.get("task_instance")
    task = context.get("task")
    o = origin(None, context)
    subject = str(getattr(task, "subject", "") or "approval needed")
    body = _reason(getattr(task, "body", "") or "")
    timeout = getattr(task, "response_timeout", None)
    default = getattr(task, "defaults", None)
    lines = [body] if body else []
    if timeout:
        hours = timeout.total_seconds() / 3600
        when = f"{hours:g} h" if hours >= 1 else f"{timeout.total_seconds() / 60:g} min"
        lines.append(f"answer within {when}" + (f", then: {', '.join(default)}" if default else ""))
    map_index = getattr(ti, "map_index", None)
    link = approval_link(o.dag_id, o.run_id, str(getattr(ti, "task_id", "approval")),
                         -1 if map_index is None else int(map_index))
    lines.append(f"answer: {link}")
    return emit("approval_waiting", f":raising_hand: {subject}", context=context, lines=lines,
                fields={"task": getattr(ti, "task_id", None)}, color=WARN,
                link=run_link(o.dag_id, o.run_id))


@_never_raises
def patch_applied(run: Any, result: Mapping[str, Any]) -> bool:
    env, patch = result.get("env"), result.get("patch_id")
    applied, failed = list(result.get("applied") or []), dict(result.get("failed") or {})
    halt = (result.get("halt") or {}).get("reason")
    lines = [f"roles: {', '.join(result.get('roles') or [])}; {len(applied)} host(s) patched"
             + (f", {len(failed)} failed" if failed else ""),
             ":warning: deploy_canary is halted until a build includes the patch"
             + (f" ({halt})" if halt else "")]
    return emit("patch_applied", f":adhesive_bandage: post-deployment patch {patch} applied on {env}; "
                "canary deploys halted", run=run, lines=lines,
                fields={"environment": env, "patch": patch, "status": result.get("status")}, color=WARN)


@_never_raises
def halt_lifted(run: Any, result: Mapping[str, Any]) -> bool:
    lifted = list(result.get("lifted") or [])
    still = ", ".join(result.get("still_active") or []) or "nothing"
    by = ", ".join(lifted) or "?"
    return emit("halt_lifted", f":arrow_forward: canary deploys no longer halted by {by}",
                run=run, lines=[f"reason: {_reason(result.get('reason'))}"],
                fields={"still halted by": still}, color=INFO)


@_never_raises
def lock_changed(run: Any, result: Mapping[str, Any]) -> bool:
    """deploy_lock's result: a lock taken by hand, or whoever's lock removed by hand."""
    env = result.get("env")
    if result.get("locked"):
        return emit("lock_taken", f":lock: {env} locked by {result.get('who')}", run=run,
                    lines=[_reason(result.get("reason"))], fields={"environment": env}, color=WARN)
    removed = result.get("removed")
    if not removed:
        return False  # nothing was locked
    whose = "a lock taken by hand" if removed.get("by_hand") else "a running deploy's lock"
    o = origin(run)
    return emit("lock_force_released", f":unlock: {env} unlocked by {o.who}: removed {whose}",
                run=run, lines=[f"held by {removed.get('who')} (run {removed.get('run_id')}, since "
                                f"{removed.get('since')}): {_reason(removed.get('reason'))}"],
                fields={"environment": env}, color=WARN)


@_never_raises
def freeze_changed(run: Any, result: Mapping[str, Any]) -> bool:
    """deploy_lock's freeze or unfreeze: who froze which environment until when, and why."""
    env = result.get("env")
    o = origin(run)
    if result.get("action") == "freeze":
        return emit("freeze_changed", f":snowflake: {env} frozen by {o.who} until {result.get('until')}",
                    run=run, lines=[f"reason: {_reason(result.get('reason'))}"],
                    fields={"environment": env}, color=WARN)
    lifted = len(result.get("lifted") or [])
    return emit("freeze_changed", f":sunny: {env} unfrozen by {o.who} ({lifted} freeze(s) lifted)", run=run,
                lines=[f"reason: {_reason(result.get('reason'))}"], fields={"environment": env}, color=INFO)


@_never_raises
def checks_approved(run: Any, result: Mapping[str, Any]) -> bool:
    """A person approved failed production checks: who, why and what failed."""
    env = result.get("env")
    failures = [str(f) for f in result.get("failures") or []]
    return emit("checks_approved", f":warning: failed production checks of {env} approved by "
                f"{result.get('who')} ({result.get('step')})", run=run,
                lines=[f"reason: {_reason(result.get('reason'))}", *[f"failed: {f}" for f in failures[:10]]],
                fields={"environment": env}, color=WARN)


@_never_raises
def fast_deploy(run: Any, env: str, version: str, reason: str, internal: bool = False) -> bool:
    shown = _shown(version, internal)
    return emit("fast_deploy", f":zap: fast deploy of {shown} to {env} (no QA, no quiet period)", run=run,
                lines=[f"reason: {_reason(reason)}"], fields={"environment": env, "version": shown},
                color=WARN, hidden=[version] if internal else ())


@_never_raises
def run_finished(run: Any, result: Mapping[str, Any]) -> bool:
    ok = result.get("status") == "success"
    o = origin(run)
    return emit("run_finished", f"{':checkered_flag:' if ok else ':red_circle:'} {o.dag_id} "
                f"{'succeeded' if ok else 'failed'}", run=run, lines=[_reason(result.get("summary"))],
                fields={"status": result.get("status")}, color=GOOD if ok else BAD)
