"""liftoff's fleet API and pages, served by Airflow's api-server under ``/liftoff`` (the liftoff
plugin's ``fastapi_apps``).

- ``GET /liftoff/api/status[?lbs=false]``: :func:`liftoff.status.snapshot` as JSON, what
  ``liftoff status`` prints.
- ``GET /liftoff/api/fleet[?lbs=false]``: :func:`liftoff.fleetview.view` (the snapshot, the weekly
  change lock, the running deploys' progress, the last runs of liftoff's DAGs and the pending
  approvals from Airflow's metadata DB); ``GET /liftoff/api/runs/{run_id}/analyses``: the
  run's canary judgements; ``GET /liftoff/api/hosts/{host}/audit[?limit=N]``: a
  host's audit trail (:func:`liftoff.fleetview.host_audit`).
- ``GET /liftoff/fleet`` and ``GET /liftoff/fleet/hosts/{host}``: the fleet page and a host's
  audit page (liftoff_airflow.fleet_page): a shell whose script fetches the JSON above.

Read-only: GET only; every change still goes through a DAG.

Security: Airflow does not protect a plugin's FastAPI app. Every route here, pages too, depends
on Airflow's own ``requires_access_dag`` (airflow.api_fastapi.core_api.security), which first
resolves the caller with ``get_user``: the ``Authorization: Bearer`` JWT, or else the UI's
``_token`` cookie (the JWT the UI holds after its login, sent by the browser with the page's
own requests), verified by the auth manager (signature, expiry, audience, revocation) exactly as
for ``/api/v2``. No token: 401; a wrongly signed or revoked one: 403; expired: 401. Then the
caller must be allowed to read DAG runs (a viewer may, a user with no role may not). A page
asked for without a token (or with an expired one) redirects to the auth manager's login page
with ``next`` back to it.

Versions of internal builds (``fast_deploy`` runs with ``internal`` true) are shown as
``internal`` in the fleet view and the audit trail.

Where the state is: the inventory (``LIFTOFF_INVENTORY``) and the state store
(``LIFTOFF_STATE_URL`` or the state connection) of the api-server's environment, opened once
and kept while the inventory file is unchanged. The LB reads of the fleet view are shared for
:data:`LB_CACHE_S` seconds, the pressure reads for :data:`PRESSURE_CACHE_S`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from liftoff import fleetview
from liftoff import status as status_mod
from liftoff.errors import InvalidInput, LiftoffError
from liftoff.inventory import Inventory, load_inventory
from liftoff.status import internal_redactor, snapshot
from liftoff.store import Store
from liftoff.versions import parse_version, validate_name
from liftoff_airflow import fleet_page
from liftoff_airflow.params import LIFTOFF_DAG_IDS

RUNS_SHOWN = 15
INTERNAL_SCANNED = 1000  # the newest fast_deploy runs whose conf says internal
LB_CACHE_S = 2.0
PRESSURE_CACHE_S = 60.0
PAGE_ROUTES = frozenset({"/fleet", "/fleet/hosts/{host}"})
MOUNT = "/liftoff"  # the plugin's url_prefix (liftoff_plugin.py)
_lock = threading.Lock()
_cache: dict[str, Any] = {}


def sources() -> tuple[Inventory, Store]:
    """The inventory and the state store (reopened when the inventory file or
    ``LIFTOFF_STATE_URL`` changes); 503 with the reason when they cannot be read."""
    path = os.environ.get("LIFTOFF_INVENTORY", "")
    try:
        stat = os.stat(path)
        key = (path, stat.st_mtime_ns, stat.st_size, os.environ.get("LIFTOFF_STATE_URL", ""))
    except OSError:
        key = None  # load_inventory says what is wrong
    try:
        with _lock:
            if key is None or _cache.get("key") != key:
                inventory = load_inventory(path or None)
                store = Store.from_settings(inventory)
                old = _cache.get("store")
                _cache.update(key=key, inventory=inventory, store=store)
                if old is not None:
                    old.close()
            return _cache["inventory"], _cache["store"]
    except LiftoffError as exc:
        raise HTTPException(status_code=503, detail=f"liftoff's state is not readable here: {exc}") from None


# -- Airflow's metadata: runs, approvals, internal builds (tests replace these dependencies) ------------

def _stage_state(states: Sequence[str | None]) -> str:
    if any(s in ("failed", "upstream_failed") for s in states):
        return "failed"
    if any(s in ("running", "queued", "scheduled", "deferred", "up_for_retry", "up_for_reschedule",
                 "restarting") for s in states):
        return "running"
    if states and all(s == "skipped" for s in states):
        return "skipped"
    if states and all(s in ("success", "skipped") for s in states):
        return "success"
    return "pending"


def stages_of(tis: Sequence[tuple[str, str | None]]) -> list[dict[str, Any]]:
    """``(task_id, state)`` of a run's task instances grouped by their ``stage_N_...`` group: each
    stage's state and the task a link goes to (the first failed, else running, else first)."""
    groups: dict[str, list[tuple[str, str | None]]] = {}
    for task_id, state in sorted(tis):
        if task_id.startswith("stage_") and "." in task_id:
            groups.setdefault(task_id.split(".", 1)[0], []).append((task_id, state))

    def order(name: str) -> tuple[int, str]:
        number = name.split("_")[1]
        return (int(number) if number.isdigit() else 10**6, name)

    out = []
    for name in sorted(groups, key=order):
        tasks = groups[name]
        state = _stage_state([s for _, s in tasks])
        wanted = {"failed": ("failed", "upstream_failed"), "running": ("running", "deferred", "queued",
                                                                        "up_for_retry", "scheduled")}
        pick = next((t for t, s in tasks if s in wanted.get(state, ())), tasks[0][0])
        out.append({"name": name, "state": state, "task_id": pick, "tasks": len(tasks)})
    return out


def _iso(dt) -> str | None:
    return fleetview._iso(dt)


def read_runs(session) -> list[dict[str, Any]]:
    """The newest runs of liftoff's DAGs with their stages and notes."""
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance as TI
    from sqlalchemy import select
    from sqlalchemy.orm import selectinload

    runs = session.scalars(select(DagRun).where(DagRun.dag_id.in_(sorted(LIFTOFF_DAG_IDS)))
                           .options(selectinload(DagRun.dag_run_note))
                           .order_by(DagRun.id.desc()).limit(RUNS_SHOWN)).all()
    if not runs:
        return []
    rows = session.execute(select(TI.dag_id, TI.run_id, TI.task_id, TI.state)
                           .where(TI.dag_id.in_({r.dag_id for r in runs}),
                                  TI.run_id.in_({r.run_id for r in runs}))).all()
    tis: dict[tuple[str, str], list[tuple[str, str | None]]] = {}
    for dag_id, run_id, task_id, state in rows:
        tis.setdefault((dag_id, run_id), []).append((task_id, None if state is None else str(state)))
    return [{"dag_id": r.dag_id, "run_id": r.run_id, "state": None if r.state is None else str(r.state),
             "note": r.note or "", "run_type": str(r.run_type), "start_date": _iso(r.start_date),
             "end_date": _iso(r.end_date), "run_after": _iso(r.run_after),
             "stages": stages_of(tis.get((r.dag_id, r.run_id), []))} for r in runs]


def read_approvals(session) -> list[dict[str, Any]]:
    """Human-in-the-loop requests of liftoff's DAGs still waiting for an answer."""
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance as TI
    from sqlalchemy import select

    rows = session.execute(select(HITLDetail.subject, HITLDetail.created_at, HITLDetail.options, TI.dag_id,
                                  TI.run_id, TI.task_id, TI.map_index)
                           .join(TI, TI.id == HITLDetail.ti_id)
                           .where(HITLDetail.responded_at.is_(None), TI.state == "deferred",
                                  TI.dag_id.in_(sorted(LIFTOFF_DAG_IDS)))
                           .order_by(HITLDetail.created_at)).all()
    return [{"dag_id": r.dag_id, "run_id": r.run_id, "task_id": r.task_id, "map_index": r.map_index,
             "subject": r.subject, "options": list(r.options or []), "created_at": _iso(r.created_at)}
            for r in rows]


def read_internal(session) -> set[str]:
    """The versions of internal builds: fast_deploy runs whose conf has ``internal`` true."""
    from airflow.models.dagrun import DagRun
    from sqlalchemy import select

    confs = session.scalars(select(DagRun.conf).where(DagRun.dag_id == "fast_deploy")
                            .order_by(DagRun.id.desc()).limit(INTERNAL_SCANNED)).all()
    out = set()
    for conf in confs:
        if isinstance(conf, dict) and conf.get("internal") is True and conf.get("version"):
            out.add(str(conf["version"]))
            with contextlib.suppress(LiftoffError, ValueError):
                out.add(str(parse_version(str(conf["version"]).strip())))
    return out


def _metadata(read: Callable[[Any], Any]) -> Any:
    from airflow.utils.session import create_session

    try:
        with create_session() as session:
            return read(session)
    except Exception as exc:  # fail closed: without the internal builds no version is shown
        raise HTTPException(status_code=503, detail=f"Airflow's metadata DB is not readable here: "
                                                    f"{type(exc).__name__}") from None


def airflow_records() -> dict[str, Any]:
    """Runs, pending approvals and internal versions from Airflow's metadata DB."""
    return _metadata(lambda s: {"runs": read_runs(s), "approvals": read_approvals(s),
                                "internal": read_internal(s)})


def internal_versions() -> set[str]:
    return _metadata(read_internal)


# -- LB and pressure reads shared for a moment --------------------------------------------------------

class TtlCache:
    """``fn(*args)`` kept for ``ttl`` seconds per ``key(*args)`` (one read at a time)."""

    def __init__(self, fn: Callable[..., Any], ttl: float, key: Callable[..., Any]):
        self.fn, self.ttl, self.key = fn, ttl, key
        self._lock = threading.Lock()
        self._kept: dict[Any, tuple[float, Any]] = {}

    def __call__(self, *args: Any) -> Any:
        k = self.key(*args)
        with self._lock:
            hit = self._kept.get(k)
            if hit is not None and time.monotonic() - hit[0] < self.ttl:
                return hit[1]
            value = self.fn(*args)
            self._kept = {k: (time.monotonic(), value)}
            return value

    def clear(self) -> None:
        with self._lock:
            self._kept = {}


read_lbs_cached = TtlCache(lambda lbs: status_mod.read_lbs(lbs), LB_CACHE_S,
                           lambda lbs: tuple((lb.name, lb.admin) for lb in lbs))
read_pressure_cached = TtlCache(lambda inv, running: status_mod._default_pressure(inv, running),
                                PRESSURE_CACHE_S,
                                lambda inv, running: (id(inv), tuple(sorted(running.items()))))


# -- the app ---------------------------------------------------------------------------------------------

def _login_redirect(request: Request) -> RedirectResponse:
    from airflow.api_fastapi.app import get_auth_manager

    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(get_auth_manager().get_url_login(next_url=here), status_code=303)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    """A page asked for without a (valid, unexpired) token: to the login page; else as usual."""
    route = getattr(request.scope.get("route"), "path", None)
    if exc.status_code == 401 and request.method == "GET" and route in PAGE_ROUTES:
        return _login_redirect(request)
    return await http_exception_handler(request, exc)


def _host(host: str) -> str:
    try:
        return validate_name("host", host)
    except InvalidInput as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None


def _bases(request: Request) -> tuple[str, str]:
    """(where this app is mounted, the Airflow UI's root): ``/liftoff`` and ``""`` by default."""
    root = str(request.scope.get("root_path") or "").rstrip("/") or MOUNT
    return root, root[: -len(MOUNT)] if root.endswith(MOUNT) else ""


Sources = Annotated[tuple[Inventory, Store], Depends(sources)]
Lbs = Annotated[bool, Query(description="read every load balancer (false: liftoff's records only)")]
Records = Annotated[Mapping[str, Any], Depends(airflow_records)]
Internal = Annotated[set[str], Depends(internal_versions)]


def _json_routes(app: FastAPI, readers: list) -> None:
    @app.get("/api/status", dependencies=readers)
    def status(response: Response, src: Sources, internal: Internal, lbs: Lbs = True) -> dict[str, Any]:
        """Every environment's state (liftoff.status.snapshot), internal builds as ``internal-<hash>``."""
        inventory, store = src
        response.headers["Cache-Control"] = "no-store"
        try:
            return snapshot(inventory, store, lbs=lbs, redact=internal_redactor(internal))
        except LiftoffError as exc:
            raise HTTPException(status_code=503, detail=f"liftoff status failed: {exc}") from None

    @app.get("/api/fleet", dependencies=readers)
    def fleet(response: Response, src: Sources, records: Records, lbs: Lbs = True) -> dict[str, Any]:
        """The fleet view (liftoff.fleetview.view)."""
        inventory, store = src
        response.headers["Cache-Control"] = "no-store"
        try:
            return fleetview.view(inventory, store, lbs=lbs, runs=records["runs"],
                                  approvals=records["approvals"], internal=records["internal"],
                                  read=read_lbs_cached, read_pressure=read_pressure_cached)
        except LiftoffError as exc:
            raise HTTPException(status_code=503, detail=f"liftoff fleet view failed: {exc}") from None

    @app.get("/api/hosts/{host}/audit", dependencies=readers)
    def audit(response: Response, host: str, src: Sources, internal: Internal,
              limit: Annotated[int, Query(ge=1, le=1000)] = fleetview.AUDIT_LIMIT) -> dict[str, Any]:
        """The commands liftoff ran on the host, newest first."""
        inventory, store = src
        response.headers["Cache-Control"] = "no-store"
        try:
            return fleetview.host_audit(store, _host(host), limit, internal=internal, inventory=inventory)
        except LiftoffError as exc:
            raise HTTPException(status_code=503, detail=f"liftoff audit failed: {exc}") from None


def _analysis_routes(app: FastAPI, readers: list) -> None:
    @app.get("/api/runs/{run_id}/analyses", dependencies=readers)
    def analyses(response: Response, run_id: str, src: Sources) -> dict[str, Any]:
        """Every canary judgement of the run, oldest first, with its metric table."""
        from liftoff.status import analysis_record

        _, store = src
        response.headers["Cache-Control"] = "no-store"
        if not 0 < len(run_id) <= 250:
            raise HTTPException(status_code=400, detail="a run id is 1 to 250 characters")
        try:
            return {"run_id": run_id, "analyses": [analysis_record(r) for r in store.analyses(run_id)]}
        except LiftoffError as exc:
            raise HTTPException(status_code=503, detail=f"liftoff analyses failed: {exc}") from None


def _page_routes(app: FastAPI, readers: list) -> None:
    @app.get("/fleet", dependencies=readers, response_class=HTMLResponse)
    def fleet_html(request: Request) -> Response:
        """The fleet page (its script reads /api/fleet)."""
        api, ui = _bases(request)
        return fleet_page.page(api, ui)

    @app.get("/fleet/hosts/{host}", dependencies=readers, response_class=HTMLResponse)
    def host_html(request: Request, host: str) -> Response:
        """A host's audit page (its script reads /api/hosts/{host}/audit)."""
        api, ui = _bases(request)
        return fleet_page.page(api, ui, host=_host(host))


def create_app() -> FastAPI:
    app = FastAPI(title="liftoff", description="liftoff's fleet state (read-only)", docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    readers = [Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN))]
    _json_routes(app, readers)
    _analysis_routes(app, readers)
    _page_routes(app, readers)
    return app


app = create_app()
