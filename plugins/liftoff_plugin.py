"""liftoff's Airflow plugin: a refused trigger answers in one line.

Airflow answers a POST /api/v2/dags/{dag_id}/dagRuns whose conf breaks a Param with a 400
``Invalid input for param NAME: <jsonschema's error>``, which holds the Param's regular
expression, its whole schema and the value over many lines. :class:`OneLineParamErrors`, a
pure ASGI middleware the api-server puts around its routes (``fastapi_root_middlewares``),
rewrites that detail, for liftoff's DAGs only, to ``Invalid input for param NAME: <the rule in
words> (got <value, cut>)`` (liftoff_airflow.params). Every other answer passes untouched:
other methods, paths, DAGs and statuses, a body sent in several parts, a compressed body.

It also serves liftoff's fleet API under ``/liftoff`` (``GET /liftoff/api/status``, what
``liftoff status`` prints): the FastAPI app of liftoff_airflow.fleet_api, which checks the
caller's token as Airflow's own API does. Every Airflow process loads this plugin (each task
does) and only the api-server serves the app, so it is imported on its first request
(:class:`LazyApp`), not here.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any
from urllib.parse import unquote

from airflow.plugins_manager import AirflowPlugin

from liftoff_airflow.params import LIFTOFF_DAG_IDS, explain_param_error

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_TRIGGER_PATH = re.compile(r"/api/v2/dags/(?P<dag_id>[^/]+)/dagRuns/?$")
_PREFIX = "Invalid input for param "


def rewritten_body(body: bytes) -> bytes | None:
    """The JSON body with its ``detail`` in one line, or None to leave it as it is."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    detail = data.get("detail") if isinstance(data, dict) else None
    if not isinstance(detail, str) or not detail.startswith(_PREFIX):
        return None
    line = explain_param_error(detail)
    if line is None or line == detail:
        return None
    return json.dumps({**data, "detail": line}).encode()


class OneLineParamErrors:
    """Pure ASGI middleware: a 400 to a POST .../dagRuns of one of ``dag_ids`` whose JSON
    ``detail`` starts with ``Invalid input for param NAME:`` gets that detail in one line."""

    def __init__(self, app: ASGIApp, dag_ids: Iterable[str] = LIFTOFF_DAG_IDS) -> None:
        self.app = app
        self.dag_ids = frozenset(dag_ids)

    def _concerned(self, scope: Scope) -> bool:
        if scope.get("type") != "http" or scope.get("method") != "POST":
            return False
        m = _TRIGGER_PATH.search(scope.get("path") or "")
        return bool(m) and unquote(m["dag_id"]) in self.dag_ids

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._concerned(scope):
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # a 400's start, until its body is known
        passing = False

        async def send_wrapper(message: Message) -> None:
            nonlocal held, passing
            if passing:
                await send(message)
                return
            kind = message.get("type")
            if kind == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers") or []}
                if (message.get("status") != 400 or b"content-encoding" in headers
                        or not headers.get(b"content-type", b"").startswith(b"application/json")):
                    passing = True
                    await send(message)
                    return
                held = message
                return
            if kind == "http.response.body" and held is not None:
                start, held = held, None
                passing = True
                new = None if message.get("more_body") else rewritten_body(message.get("body", b""))
                if new is None:  # streamed, or not a Param refusal: as it was
                    await send(start)
                    await send(message)
                    return
                headers = [(k, v) for k, v in start.get("headers") or [] if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(new)).encode()))
                await send({**start, "headers": headers})
                await send({**message, "body": new})
                return
            if held is not None:  # anything else first (an extension message): give up on it
                start, held = held, None
                passing = True
                await send(start)
            await send(message)

        await self.app(scope, receive, send_wrapper)


class LazyApp:
    """An ASGI app imported (``module:attribute``) on its first call."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._app: ASGIApp | None = None

    def __repr__(self) -> str:
        return f"LazyApp({self.target!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            module, _, attribute = self.target.partition(":")
            self._app = getattr(importlib.import_module(module), attribute)
        await self._app(scope, receive, send)


class LiftoffPlugin(AirflowPlugin):
    name = "liftoff"
    fastapi_apps = [{
        "app": LazyApp("liftoff_airflow.fleet_api:app"),
        "url_prefix": "/liftoff",
        "name": "liftoff",
    }]
    # The fleet page (liftoff_airflow.fleet_page) in the UI's navigation, and a tab with it on a
    # run's page (Airflow 3.3 ExternalViewResponse: name, href, destination, url_route). A nav view
    # without url_route is a link that opens href in a new tab; a dag_run view needs a url_route
    # (the UI shows it inside the run's page, an iframe) and gets {DAG_ID}/{RUN_ID} filled in.
    external_views = [
        {"name": "liftoff fleet", "href": "/liftoff/fleet", "destination": "nav"},
        {"name": "liftoff fleet", "href": "/liftoff/fleet?dag={DAG_ID}&run={RUN_ID}",
         "destination": "dag_run", "url_route": "liftoff-fleet-run"},
    ]
    fastapi_root_middlewares = [{
        "middleware": OneLineParamErrors,
        "args": [],
        "kwargs": {},
        "name": "liftoff: refused Params in one line",
    }]
