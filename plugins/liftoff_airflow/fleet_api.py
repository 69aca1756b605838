"""liftoff's fleet API, served by Airflow's api-server under ``/liftoff`` (the liftoff plugin's
``fastapi_apps``).

``GET /liftoff/api/status[?lbs=false]``: :func:`liftoff.status.snapshot` as JSON, what
``liftoff status`` prints. Read-only: every change still goes through a DAG.

Security: Airflow does not protect a plugin's FastAPI app. Every route here depends on
Airflow's own ``requires_access_dag`` (airflow.api_fastapi.core_api.security), which first
resolves the caller with ``get_user``: the ``Authorization: Bearer`` JWT, or the UI's session
cookie, verified by the auth manager (signature, expiry, audience, revocation) exactly as for
``/api/v2``. No token: 401; a wrongly signed or revoked one: 403; expired: 401. Then the
caller must be allowed to read DAG runs (a viewer may, a user with no role may not).

Where the state is: the inventory (``LIFTOFF_INVENTORY``) and the state store
(``LIFTOFF_STATE_URL`` or the state connection) of the api-server's environment, opened once
and kept while the inventory file is unchanged.
"""

from __future__ import annotations

import os
import threading
from typing import Annotated, Any

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query, Response

from liftoff.errors import LiftoffError
from liftoff.inventory import Inventory, load_inventory
from liftoff.status import snapshot
from liftoff.store import Store

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


def create_app() -> FastAPI:
    app = FastAPI(title="liftoff", description="liftoff's fleet state (read-only)", docs_url=None,
                  redoc_url=None, openapi_url=None)
    readers = [Depends(requires_access_dag(method="GET", access_entity=DagAccessEntity.RUN))]

    @app.get("/api/status", dependencies=readers)
    def status(response: Response, src: Annotated[tuple[Inventory, Store], Depends(sources)],
               lbs: Annotated[bool, Query(description="read every load balancer (false: liftoff's records "
                                                      "only)")] = True) -> dict[str, Any]:
        """Every environment's state (liftoff.status.snapshot)."""
        inventory, store = src
        response.headers["Cache-Control"] = "no-store"
        try:
            return snapshot(inventory, store, lbs=lbs)
        except LiftoffError as exc:
            raise HTTPException(status_code=503, detail=f"liftoff status failed: {exc}") from None

    return app


app = create_app()
