"""Endpoints and secrets: Airflow connections, one model (``airflow.sdk.Connection``).

``resolve_connection(conn_id)`` returns an ``airflow.sdk.Connection``. It asks Airflow first
(``BaseHook.get_connection``: the metadata DB, secrets backends and ``AIRFLOW_CONN_*``
variables) when Airflow is importable and ``LIFTOFF_NO_AIRFLOW`` is not set. Otherwise, or
when Airflow does not know the id (the CLI, tests and the lab run without a metadata DB), it
reads ``AIRFLOW_CONN_<ID>`` with Airflow's own parsers (``Connection.from_json`` for the JSON
form, ``Connection.from_uri`` for the URI form), then the file named by
``LIFTOFF_CONNECTIONS`` with Airflow's local-filesystem secrets backend parser
(``airflow.secrets.local_filesystem.load_connections_dict``: ``.yaml``/``.yml``/``.json``/
``.env``, ``{conn_id: {conn_type, host, port, login, password, schema, extra}}`` or URIs).

:func:`base_url` builds a connection's URL the way ``HttpHook`` does (host, which may be a
URL, ``schema`` as the scheme, port), plus liftoff's ``extra.scheme`` and ``extra.path``;
:func:`bound_hook` gives an ``HttpHook``/``HttpAsyncHook`` that uses a connection already
resolved here instead of looking it up again.

Which connection id serves which purpose comes from the inventory's ``connections`` map.
Passwords and extras are never logged nor shown in ``repr``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow.sdk import Connection as _AirflowConnection

from liftoff.errors import ConfigError, ConnectionNotFound

if TYPE_CHECKING:
    from liftoff.inventory import Inventory

log = logging.getLogger(__name__)

# extra keys liftoff reads itself; an HttpHook would send them as HTTP headers
OWN_EXTRA = frozenset({"scheme", "path", "base_path"})


class Connection(_AirflowConnection):
    """``airflow.sdk.Connection`` whose ``repr`` leaves out the password and the extra."""

    def __repr__(self) -> str:
        return (f"Connection(conn_id={self.conn_id!r}, conn_type={self.conn_type!r}, host={self.host!r}, "
                f"port={self.port!r}, schema={self.schema!r}, login={self.login!r})")

    @classmethod
    def of(cls, conn: _AirflowConnection, conn_id: str | None = None) -> Connection:
        """The same connection (any Airflow connection object) as this class."""
        return cls(conn_id=conn_id or conn.conn_id, conn_type=conn.conn_type or None, host=conn.host or None,
                   schema=conn.schema or None, login=conn.login or None, password=conn.password or None,
                   port=conn.port or None, extra=conn.extra or None)


def _no_airflow() -> bool:
    return os.environ.get("LIFTOFF_NO_AIRFLOW", "").lower() in ("1", "true", "yes")


def resolve_connection(conn_id: str) -> Connection:
    """The connection ``conn_id`` from Airflow, ``AIRFLOW_CONN_<ID>`` or the LIFTOFF_CONNECTIONS file."""
    airflow_said = ""
    if not _no_airflow():
        conn, airflow_said = _from_airflow(conn_id)
        if conn is not None:
            return conn
    env_value = os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}")
    if env_value:
        return _from_env_value(conn_id, env_value)
    file = os.environ.get("LIFTOFF_CONNECTIONS")
    if file:
        conn = _from_file(conn_id, Path(file))
        if conn is not None:
            return conn
    raise ConnectionNotFound(
        f"connection {conn_id!r} is not defined (Airflow connection, AIRFLOW_CONN_{conn_id.upper()}, "
        f"or LIFTOFF_CONNECTIONS file)" + (f"; Airflow said: {airflow_said}" if airflow_said else "")
    )


def _from_airflow(conn_id: str) -> tuple[Connection | None, str]:
    """The connection from Airflow, or None and why not (never the secret itself)."""
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception as exc:  # AirflowNotFoundException and friends
        log.debug("Airflow has no connection %s (%s)", conn_id, type(exc).__name__)
        return None, type(exc).__name__
    return Connection.of(conn, conn_id), ""


def _from_env_value(conn_id: str, value: str) -> Connection:
    """``AIRFLOW_CONN_<ID>`` read as Airflow reads it: JSON when it starts with ``{``, else a URI."""
    text = value.strip()
    var = f"AIRFLOW_CONN_{conn_id.upper()}"
    if text.startswith("{"):
        try:
            return Connection.from_json(text, conn_id=conn_id)
        except json.JSONDecodeError:
            raise ConfigError(f"connection {conn_id}: {var} is not valid JSON") from None
        except (TypeError, ValueError) as exc:  # a bad port or an unknown field
            raise ConfigError(f"connection {conn_id}: {var}: {exc}") from None
    if "://" not in text:
        raise ConfigError(f"connection {conn_id}: {var} is not a connection URI or JSON")
    try:
        return Connection.from_uri(text, conn_id=conn_id)
    except ValueError:
        raise ConfigError(f"connection {conn_id}: {var} has a bad port") from None
    except Exception as exc:  # AirflowException: an invalid URI (never echoed: it may hold a secret)
        raise ConfigError(f"connection {conn_id}: {var} is not a valid URI ({type(exc).__name__})") from None


def _from_file(conn_id: str, path: Path) -> Connection | None:
    """The connection from the LIFTOFF_CONNECTIONS file, parsed by Airflow's local-filesystem
    secrets backend."""
    from airflow.secrets.local_filesystem import load_connections_dict

    try:
        found = load_connections_dict(str(path)).get(conn_id)
    except Exception as exc:  # unreadable, unsupported type, syntax (never echoed: it holds secrets)
        raise ConfigError(f"LIFTOFF_CONNECTIONS file {path} is unreadable: {type(exc).__name__} "
                          f"(a .yaml, .yml, .json or .env file of connections by id)") from None
    return None if found is None else Connection.of(found, conn_id)


def base_url(conn: _AirflowConnection, default_scheme: str = "http") -> str:
    """``scheme://host[:port][/path]`` as ``HttpHook`` builds it from host (which may already be
    a URL) and port; the scheme comes from the host when it has one, else ``extra.scheme``, else
    ``schema`` or ``conn_type`` when either is http/https, else ``default_scheme``; ``extra.path``
    (or ``extra.base_path``) is appended."""
    if not conn.host:
        raise ConfigError(f"connection {conn.conn_id or '?'} has no host")
    extra = conn.extra_dejson if conn.extra else {}
    host = conn.host.rstrip("/")
    if "://" in host:
        url = host
        parts = urlsplit(host)
        if conn.port and parts.port is None:
            url = f"{parts.scheme}://{parts.netloc}:{conn.port}{parts.path}"
    else:
        candidates = (extra.get("scheme"), conn.schema, conn.conn_type)
        scheme = next((c for c in candidates if c in ("http", "https")), default_scheme)
        netloc = f"[{host}]" if ":" in host else host
        url = f"{scheme}://{netloc}" + (f":{conn.port}" if conn.port else "")
    path = extra.get("path") or extra.get("base_path") or ""
    if path:
        url = url.rstrip("/") + "/" + str(path).strip("/")
    return url.rstrip("/")


def http_connection(conn: _AirflowConnection | str, conn_id: str = "") -> Connection:
    """An ``http`` connection for the provider's hooks: host the whole :func:`base_url` (so
    ``extra.path`` counts), the same login, password and extra (headers, ``timeout``...) less
    liftoff's own keys. A plain URL gives a connection without credentials."""
    if isinstance(conn, str):
        return Connection(conn_id=conn_id or "liftoff_url", conn_type="http", host=conn.rstrip("/"))
    extra = {k: v for k, v in (conn.extra_dejson if conn.extra else {}).items() if k not in OWN_EXTRA}
    return Connection(conn_id=conn_id or conn.conn_id, conn_type="http", host=base_url(conn),
                      login=conn.login, password=conn.password, extra=json.dumps(extra) if extra else None)


def bound_hook(conn: _AirflowConnection | str, hook_class: type | None = None, **hook_kwargs: Any) -> Any:
    """``hook_class`` (default ``HttpHook``; or ``HttpAsyncHook``) on :func:`http_connection` of
    ``conn``: liftoff resolved it once (Airflow, ``AIRFLOW_CONN_*`` or the file), so the hook
    uses that answer instead of asking Airflow again (which knows nothing of the file)."""
    if hook_class is None:
        from airflow.providers.http.hooks.http import HttpHook as hook_class
    bound = http_connection(conn)

    class _Bound(hook_class):
        def get_connection(self, conn_id: str) -> Connection:
            return bound

        async def aget_connection(self, conn_id: str) -> Connection:
            return bound

    _Bound.__name__ = _Bound.__qualname__ = f"Bound{hook_class.__name__}"
    return _Bound(http_conn_id=bound.conn_id, **hook_kwargs)


# -- purpose helpers ------------------------------------------------------------------------------

def conn_id_for(purpose: str, inventory: Inventory | None = None) -> str:
    from liftoff.inventory import DEFAULT_CONNECTIONS

    connections = getattr(inventory, "connections", None) or DEFAULT_CONNECTIONS
    try:
        return connections[purpose]
    except KeyError:
        raise ConfigError(f"no connection configured for {purpose!r}") from None


def connection_for(purpose: str, inventory: Inventory | None = None) -> Connection:
    return resolve_connection(conn_id_for(purpose, inventory))


def alertmanager_url(inventory: Inventory | None = None) -> str:
    return base_url(connection_for("alertmanager", inventory))


def pushgateway_url(inventory: Inventory | None = None) -> str:
    return base_url(connection_for("pushgateway", inventory))


def prometheus_url(inventory: Inventory | None = None) -> str:
    return base_url(connection_for("prometheus", inventory))


@dataclass(frozen=True)
class GitLabSettings:
    """The ops GitLab instance that runs QA (configured apart from the deployed environments)."""

    url: str
    private_token: str | None = field(default=None, repr=False)
    trigger_token: str | None = field(default=None, repr=False)
    project: str = "gitlab-org/quality/gitlab-qa-runner"
    ref: str = "main"
    ssl_verify: bool = True
    timeout_s: float = 1800.0
    poll_s: float = 10.0


def gitlab_settings(inventory: Inventory | None = None) -> GitLabSettings:
    """From the ``gitlab`` connection: host (URL), password (private token), extra
    ``trigger_token``, ``qa_project`` (or ``project``), ``qa_ref`` (or ``ref``), ``ssl_verify``.
    The inventory's ``qa`` section overrides project and ref and sets timeout and poll interval."""
    from liftoff.inventory import DEFAULT_QA_PROJECT, DEFAULT_QA_REF, QAConfig

    conn = connection_for("gitlab", inventory)
    qa = inventory.qa if inventory is not None else QAConfig()
    extra = conn.extra_dejson
    token = conn.password or extra.get("private_token") or extra.get("token")
    ssl_verify = extra.get("ssl_verify", True)
    if isinstance(ssl_verify, str):
        ssl_verify = ssl_verify.lower() not in ("false", "0", "no")
    return GitLabSettings(
        url=base_url(conn, default_scheme="https"),
        private_token=token,
        trigger_token=extra.get("trigger_token"),
        project=qa.project or extra.get("qa_project") or extra.get("project") or DEFAULT_QA_PROJECT,
        ref=qa.ref or extra.get("qa_ref") or extra.get("ref") or DEFAULT_QA_REF,
        ssl_verify=bool(ssl_verify),
        timeout_s=qa.timeout_s,
        poll_s=qa.poll_s,
    )


def state_url(inventory: Inventory | None = None) -> str:
    """SQLAlchemy URL of the state store: env ``LIFTOFF_STATE_URL``, else the ``state``
    connection (``extra.url``, a host that is a URL, or a postgres connection's fields)."""
    url = os.environ.get("LIFTOFF_STATE_URL")
    if url:
        return url
    try:
        conn = connection_for("state", inventory)
    except ConnectionNotFound:
        raise ConfigError("no state store: set LIFTOFF_STATE_URL or define the state connection") from None
    extra = conn.extra_dejson
    if extra.get("url"):
        return str(extra["url"])
    if conn.host and "://" in conn.host:
        return conn.host
    if conn.conn_type in ("postgres", "postgresql") and conn.host:
        from sqlalchemy.engine import URL

        return URL.create("postgresql+psycopg2", username=conn.login, password=conn.password, host=conn.host,
                          port=conn.port, database=conn.schema).render_as_string(hide_password=False)
    if conn.conn_type == "sqlite" and (conn.host or conn.schema):
        return f"sqlite:///{conn.host or conn.schema}"
    raise ConfigError(f"connection {conn.conn_id}: cannot tell the state store URL (set extra.url)")
