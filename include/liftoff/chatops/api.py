"""A small client of Airflow's REST API v2 for the ChatOps CLI.

Authentication: a JWT from ``POST /auth/token`` (user and password), or a token given as is.
The token and the password never appear in a message this module builds: every error text is
passed through :meth:`AirflowClient.redact` first.

Errors carry the CLI's exit code: 2 bad input (also an API 400/422), 3 Airflow unreachable,
4 authentication refused (401/403), 5 any other API error (404, 409, 5xx).
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests

DEFAULT_URL = "http://127.0.0.1:8080"
API_ROOT = "/api/v2"
LIFTOFF_API_ROOT = "/liftoff/api"  # liftoff's Airflow plugin (plugins/liftoff_airflow/fleet_api.py)
PAGE_LIMIT = 100
TERMINAL_STATES = ("success", "failed")
# The states of a task instance that still waits for a human-in-the-loop answer.
WAITING_STATES = ("deferred", "awaiting_input", "running", "scheduled", "queued")


class ChatOpsError(Exception):
    """Anything the CLI reports and exits on; ``exit_code`` says how."""

    exit_code = 1


class BadInput(ChatOpsError):
    exit_code = 2


class ApiUnreachable(ChatOpsError):
    exit_code = 3


class AuthFailed(ChatOpsError):
    """Credentials refused (401) or not allowed (403: ``status`` says which)."""

    exit_code = 4

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ApiError(ChatOpsError):
    """The API answered an error status; ``status`` and ``detail`` say which."""

    exit_code = 5

    def __init__(self, message: str, status: int, detail: str = ""):
        super().__init__(message)
        self.status = status
        self.detail = detail


class ApiBadRequest(ApiError):
    """HTTP 400/422: Airflow refused what we sent (e.g. a conf its Params reject)."""

    exit_code = 2


class NotFound(ApiError):
    pass


@dataclass(frozen=True)
class Credentials:
    """Where Airflow is and how to log in; from LIFTOFF_API_URL, LIFTOFF_API_USER,
    LIFTOFF_API_PASSWORD or LIFTOFF_API_TOKEN."""

    url: str
    user: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:  # never show the secrets
        return f"Credentials(url={self.url!r}, user={self.user!r})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, url: str | None = None) -> Credentials:
        env = os.environ if env is None else env
        base = normalize_url(url or env.get("LIFTOFF_API_URL") or DEFAULT_URL)
        token = env.get("LIFTOFF_API_TOKEN") or None
        user = env.get("LIFTOFF_API_USER") or None
        password = env.get("LIFTOFF_API_PASSWORD") or None
        if token is None and not (user and password):
            raise BadInput("no credentials: set LIFTOFF_API_USER and LIFTOFF_API_PASSWORD, "
                           "or LIFTOFF_API_TOKEN")
        return cls(url=base, user=user, password=password, token=token)


def normalize_url(url: str) -> str:
    parsed = urllib.parse.urlsplit(url.strip())
    # Never echo the URL: it may carry a password or a token.
    if parsed.username or parsed.password:
        raise BadInput("LIFTOFF_API_URL must not carry credentials: use LIFTOFF_API_USER/PASSWORD")
    if parsed.query or parsed.fragment:
        raise BadInput("LIFTOFF_API_URL must not carry a query string or fragment")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise BadInput(f"LIFTOFF_API_URL must be an http(s) URL like {DEFAULT_URL}")
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path.rstrip("/"), "", ""))


def q(segment: str) -> str:
    """One URL path segment (run ids carry ':' and '+')."""
    return urllib.parse.quote(segment, safe="")


def error_detail(resp: requests.Response) -> str:
    """The ``detail`` of a FastAPI error answer, as one line."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:500]
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # pydantic validation errors
        parts = []
        for item in detail:
            if isinstance(item, dict):
                loc = ".".join(str(x) for x in item.get("loc", []) if x != "body")
                parts.append(f"{loc}: {item.get('msg')}" if loc else str(item.get("msg")))
            else:
                parts.append(str(item))
        return "; ".join(parts)
    if isinstance(detail, dict):
        return json.dumps(detail, sort_keys=True)
    return str(detail)


def decode_xcom(value: Any) -> Any:
    """An XCom value as the API returns it (JSON text or already decoded) as Python data."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


class AirflowClient:
    """The calls the CLI makes, each mapped onto ``/api/v2``."""

    def __init__(self, credentials: Credentials, timeout: float = 30.0,
                 session: requests.Session | None = None):
        self.credentials = credentials
        self.base_url = credentials.url
        self.timeout = timeout
        self.session = session or requests.Session()
        self._token = credentials.token

    def __repr__(self) -> str:
        return f"AirflowClient({self.base_url!r})"

    # -- plumbing ------------------------------------------------------------------------------
    def redact(self, text: str) -> str:
        for secret in (self._token, self.credentials.token, self.credentials.password):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        try:
            return self.session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise ApiUnreachable(f"cannot reach Airflow at {self.base_url} ({type(exc).__name__})") from None

    def login(self) -> str:
        """A token: the given one, or a fresh one from ``POST /auth/token``."""
        if self._token:
            return self._token
        creds = self.credentials
        resp = self._send("POST", f"{self.base_url}/auth/token",
                          json={"username": creds.user, "password": creds.password})
        if resp.status_code in (400, 401, 403):
            raise AuthFailed(f"Airflow at {self.base_url} refused the credentials of user {creds.user!r} "
                             f"(HTTP {resp.status_code})")
        if resp.status_code == 404:
            raise AuthFailed(f"{self.base_url}/auth/token does not exist: is this an Airflow 3 API server "
                             f"with password login? (or set LIFTOFF_API_TOKEN)")
        if resp.status_code not in (200, 201):
            raise ApiError(self.redact(f"POST /auth/token: HTTP {resp.status_code}: {error_detail(resp)}"),
                           resp.status_code)
        try:
            token = resp.json()["access_token"]
        except (ValueError, KeyError, TypeError):
            raise ApiError(f"POST /auth/token at {self.base_url} answered no access_token",
                           resp.status_code) from None
        self._token = token
        return token

    def request(self, method: str, path: str, *, body: Any = None, params: Mapping[str, Any] | None = None,
                ok: tuple[int, ...] = (200, 201), root: str = API_ROOT) -> Any:
        """Call ``{root}{path}`` (``/api/v2`` by default); returns the decoded JSON, raises a
        ChatOpsError otherwise."""
        url = f"{self.base_url}{root}{path}"
        if root != API_ROOT:
            path = f"{root}{path}"  # messages name the whole path
        for attempt in (1, 2):
            headers = {"Authorization": f"Bearer {self.login()}", "Accept": "application/json"}
            resp = self._send(method, url, json=body, params=params, headers=headers)
            if resp.status_code == 401 and attempt == 1 and self.credentials.password:
                self._token = None  # expired: log in again once
                continue
            break
        if resp.status_code in ok:
            if not resp.content:
                return None
            try:
                return resp.json()
            except ValueError:
                raise ApiError(f"{method} {path}: not JSON", resp.status_code) from None
        detail = self.redact(error_detail(resp))
        message = self.redact(f"{method} {urllib.parse.unquote(path)}: HTTP {resp.status_code}: {detail}")
        if resp.status_code == 401:
            raise AuthFailed(f"Airflow at {self.base_url} refused the token (HTTP 401): {detail}")
        if resp.status_code == 403:
            raise AuthFailed(f"not allowed: {message}", 403)
        if resp.status_code in (400, 422):
            raise ApiBadRequest(f"Airflow refused the request: {detail}", resp.status_code, detail)
        if resp.status_code == 404:
            raise NotFound(message, resp.status_code, detail)
        raise ApiError(message, resp.status_code, detail)

    # -- DAGs and runs -------------------------------------------------------------------------
    def dag(self, dag_id: str) -> dict | None:
        """The DAG, or None when Airflow has no such DAG."""
        try:
            return self.request("GET", f"/dags/{q(dag_id)}")
        except NotFound:
            return None

    def trigger(self, dag_id: str, conf: dict, note: str | None = None, run_id: str | None = None) -> dict:
        body: dict[str, Any] = {"conf": conf, "logical_date": None}
        if note:
            body["note"] = note
        if run_id:
            body["dag_run_id"] = run_id
        try:
            return self.request("POST", f"/dags/{q(dag_id)}/dagRuns", body=body)
        except NotFound as exc:
            raise NotFound(f"Airflow at {self.base_url} has no DAG {dag_id!r} (not deployed, or not parsed "
                           f"yet): {exc.detail}", exc.status, exc.detail) from None

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        try:
            return self.request("GET", f"/dags/{q(dag_id)}/dagRuns/{q(run_id)}")
        except NotFound as exc:
            raise NotFound(f"no run {run_id!r} of DAG {dag_id!r}", exc.status, exc.detail) from None

    def dag_runs(self, dag_id: str, limit: int = 5) -> list[dict]:
        page = self.request("GET", f"/dags/{q(dag_id)}/dagRuns",
                            params={"limit": limit, "order_by": "-run_after"})
        return list(page.get("dag_runs", []))

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        out: list[dict] = []
        while True:
            page = self.request("GET", f"/dags/{q(dag_id)}/dagRuns/{q(run_id)}/taskInstances",
                                params={"limit": PAGE_LIMIT, "offset": len(out)})
            items = page.get("task_instances", [])
            out.extend(items)
            if not items or len(out) >= int(page.get("total_entries", 0)):
                return out

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """A task's XCom value, decoded; raises NotFound when there is none."""
        entry = self.request(
            "GET", f"/dags/{q(dag_id)}/dagRuns/{q(run_id)}/taskInstances/{q(task_id)}/xcomEntries/{q(key)}")
        return decode_xcom(entry.get("value"))

    def pending_approvals(self, limit: int = 50) -> list[dict]:
        """Human-in-the-loop requests nobody answered yet, of runs still waiting for them."""
        page = self.request("GET", "/dags/~/dagRuns/~/hitlDetails",
                            params={"response_received": "false", "limit": limit, "order_by": "created_at"})
        return [d for d in page.get("hitl_details", [])
                if (d.get("task_instance") or {}).get("state") in WAITING_STATES]

    def run_approvals(self, dag_id: str, run_id: str, *, pending: bool = True) -> list[dict]:
        """The run's human-in-the-loop requests: the unanswered ones of tasks still waiting for
        them (``pending``), or all of them."""
        params: dict[str, Any] = {"limit": PAGE_LIMIT, "order_by": "created_at"}
        if pending:
            params["response_received"] = "false"
        page = self.request("GET", f"/dags/{q(dag_id)}/dagRuns/{q(run_id)}/hitlDetails", params=params)
        details = list((page or {}).get("hitl_details", []))
        if not pending:
            return details
        return [d for d in details if (d.get("task_instance") or {}).get("state") in WAITING_STATES]

    def _hitl_path(self, dag_id: str, run_id: str, task_id: str, map_index: int) -> str:
        run = f"/dags/{q(dag_id)}/dagRuns/{q(run_id)}"
        return f"{run}/taskInstances/{q(task_id)}/{int(map_index)}/hitlDetails"

    def hitl_detail(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict:
        """One task instance's human-in-the-loop request, answered or not."""
        return self.request("GET", self._hitl_path(dag_id, run_id, task_id, map_index)) or {}

    def answer_hitl(self, dag_id: str, run_id: str, task_id: str, map_index: int, *,
                    chosen_options: list[str], params_input: Mapping[str, Any]) -> dict:
        """Answer a human-in-the-loop request (Airflow 3.3's UpdateHITLDetailPayload). Airflow
        answers 409 when it was already answered, 403 when the user is not among its assigned
        users (or may not answer requests at all)."""
        body = {"chosen_options": list(chosen_options), "params_input": dict(params_input)}
        return self.request("PATCH", self._hitl_path(dag_id, run_id, task_id, map_index), body=body) or {}

    def set_run_note(self, dag_id: str, run_id: str, note: str) -> dict:
        """The run's note in the Airflow UI (``PATCH`` of the run with ``update_mask=note``)."""
        return self.request("PATCH", f"/dags/{q(dag_id)}/dagRuns/{q(run_id)}", body={"note": note},
                            params={"update_mask": "note"})

    def clear_task_instances(self, dag_id: str, run_id: str, task_ids: list[str], *, dry_run: bool,
                             only_failed: bool = True, include_downstream: bool = True) -> list[dict]:
        """POST clearTaskInstances for one run (Airflow's default is a dry run: say it each time)."""
        body = {"dry_run": dry_run, "dag_run_id": run_id, "task_ids": list(task_ids),
                "only_failed": only_failed, "include_downstream": include_downstream,
                "include_upstream": False, "include_future": False, "include_past": False,
                "reset_dag_runs": True}
        answer = self.request("POST", f"/dags/{q(dag_id)}/clearTaskInstances", body=body)
        return list((answer or {}).get("task_instances", []))

    def health(self) -> dict:
        """``GET /api/v2/monitor/health``: the metadata DB, scheduler, triggerer and dag-processor
        with their latest heartbeats (Airflow 3.3's REST API has no heartbeat per task instance)."""
        return self.request("GET", "/monitor/health") or {}

    def fleet_status(self, lbs: bool = True) -> dict:
        """``GET /liftoff/api/status``: liftoff's state of every environment (liftoff.status).

        NotFound when the api-server does not serve it (the liftoff plugin is not installed:
        Airflow answers 404, or its UI's HTML page for an unknown path)."""
        path = "/status"
        try:
            answer = self.request("GET", path, params=None if lbs else {"lbs": "false"},
                                  root=LIFTOFF_API_ROOT)
        except NotFound as exc:
            raise NotFound(f"{self.base_url} does not serve {LIFTOFF_API_ROOT}{path} (HTTP 404): is "
                           "liftoff's Airflow plugin installed in the api-server?", exc.status,
                           exc.detail) from None
        except ApiError as exc:
            if exc.status != 200:  # 200 and not JSON: the UI's catch-all page
                raise
            answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("environments"), dict):
            raise NotFound(f"{self.base_url}{LIFTOFF_API_ROOT}{path} did not answer liftoff's status: is "
                           "liftoff's Airflow plugin installed in the api-server?", 404)
        return answer

    def run_analyses(self, run_id: str) -> list[dict]:
        """``GET /liftoff/api/runs/{run_id}/analyses``: the run's canary judgements, oldest first."""
        path = f"/runs/{q(run_id)}/analyses"
        try:
            answer = self.request("GET", path, root=LIFTOFF_API_ROOT)
        except NotFound as exc:
            raise NotFound(f"{self.base_url} does not serve {LIFTOFF_API_ROOT}/runs/.../analyses (HTTP 404): "
                           "is liftoff's Airflow plugin installed in the api-server?", exc.status,
                           exc.detail) from None
        if not isinstance(answer, dict) or not isinstance(answer.get("analyses"), list):
            raise NotFound(f"{self.base_url}{LIFTOFF_API_ROOT}{path} did not answer liftoff's analyses", 404)
        return answer["analyses"]

    def ui_url(self, dag_id: str, run_id: str) -> str:
        return f"{self.base_url}/dags/{q(dag_id)}/runs/{q(run_id)}"
