"""Endpoints and secrets: Airflow connections, with a plain-config fallback.

``resolve_connection(conn_id)`` asks Airflow (``airflow.sdk.BaseHook.get_connection``, which
also reads ``AIRFLOW_CONN_*`` variables and secrets backends) when Airflow is importable and
``LIFTOFF_NO_AIRFLOW`` is not set. Otherwise, or when Airflow does not know the id, it reads
``AIRFLOW_CONN_<ID>`` (JSON or URI) and then the file named by ``LIFTOFF_CONNECTIONS``
(YAML/JSON: ``{conn_id: {conn_type, host, port, login, password, schema, extra}}``).

Which connection id serves which purpose comes from the inventory's ``connections`` map.
Passwords and tokens are never logged nor shown in ``repr``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import yaml

from liftoff.errors import ConfigError, ConnectionNotFound

if TYPE_CHECKING:
    from liftoff.inventory import Inventory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConnInfo:
    host: str | None = None
    port: int | None = None
    login: str | None = None
    password: str | None = field(default=None, repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    conn_type: str | None = None
    schema: str | None = None
    conn_id: str = ""

    def base_url(self, default_scheme: str = "http") -> str:
        """``scheme://host:port[/path]`` from host (which may already be a URL), port and extra.

        The scheme comes from the host when it has one, else ``extra.scheme``, else ``schema``
        or ``conn_type`` when either is http/https, else ``default_scheme``; ``extra.path``
        (or ``extra.base_path``) is appended.
        """
        if not self.host:
            raise ConfigError(f"connection {self.conn_id or '?'} has no host")
        host = self.host.rstrip("/")
        if "://" in host:
            url = host
            if self.port and urlsplit(host).port is None:
                parts = urlsplit(host)
                url = f"{parts.scheme}://{parts.netloc}:{self.port}{parts.path}"
        else:
            scheme = self.extra.get("scheme")
            for candidate in (scheme, self.schema, self.conn_type):
                if candidate in ("http", "https"):
                    scheme = candidate
                    break
            else:
                scheme = default_scheme
            netloc = f"[{host}]" if ":" in host else host
            url = f"{scheme}://{netloc}" + (f":{self.port}" if self.port else "")
        path = self.extra.get("path") or self.extra.get("base_path") or ""
        if path:
            url = url.rstrip("/") + "/" + str(path).strip("/")
        return url.rstrip("/")


def _no_airflow() -> bool:
    return os.environ.get("LIFTOFF_NO_AIRFLOW", "").lower() in ("1", "true", "yes")


def resolve_connection(conn_id: str) -> ConnInfo:
    """The connection ``conn_id`` from Airflow or the plain-config fallbacks."""
    airflow_said = ""
    if not _no_airflow():
        info, airflow_said = _from_airflow(conn_id)
        if info is not None:
            return info
    env_value = os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}")
    if env_value:
        return parse_connection(conn_id, env_value)
    file = os.environ.get("LIFTOFF_CONNECTIONS")
    if file:
        info = _from_file(conn_id, Path(file))
        if info is not None:
            return info
    raise ConnectionNotFound(
        f"connection {conn_id!r} is not defined (Airflow connection, AIRFLOW_CONN_{conn_id.upper()}, "
        f"or LIFTOFF_CONNECTIONS file)" + (f"; Airflow said: {airflow_said}" if airflow_said else "")
    )


def _from_airflow(conn_id: str) -> tuple[ConnInfo | None, str]:
    """The connection from Airflow, or None and why not (never the secret itself)."""
    try:
        from airflow.sdk import BaseHook
    except ImportError:
        return None, ""
    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception as exc:  # AirflowNotFoundException and friends
        log.debug("Airflow has no connection %s (%s)", conn_id, type(exc).__name__)
        return None, type(exc).__name__
    try:
        extra = conn.extra_dejson or {}
    except Exception:
        extra = {}
    return ConnInfo(conn.host or None, conn.port or None, conn.login or None, conn.password or None,
                    dict(extra), conn.conn_type, conn.schema or None, conn_id), ""


def parse_connection(conn_id: str, value: str | dict) -> ConnInfo:
    """A connection from Airflow's JSON form (dict or text) or its URI form."""
    if isinstance(value, dict):
        return _from_dict(conn_id, value)
    text = value.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            raise ConfigError(
                f"connection {conn_id}: AIRFLOW_CONN_{conn_id.upper()} is not valid JSON") from None
        return _from_dict(conn_id, data)
    return _from_uri(conn_id, text)


def _from_dict(conn_id: str, data: dict) -> ConnInfo:
    if not isinstance(data, dict):
        raise ConfigError(f"connection {conn_id}: expected a mapping")
    extra = data.get("extra") or {}
    if isinstance(extra, str):
        try:
            extra = json.loads(extra)
        except ValueError:
            raise ConfigError(f"connection {conn_id}: extra is not valid JSON") from None
    port = data.get("port")
    try:
        port = int(port) if port not in (None, "") else None
    except (TypeError, ValueError):
        raise ConfigError(f"connection {conn_id}: port {port!r} is not a number") from None
    return ConnInfo(data.get("host") or None, port, data.get("login") or None, data.get("password") or None,
                    dict(extra), data.get("conn_type") or None, data.get("schema") or None, conn_id)


def _from_uri(conn_id: str, uri: str) -> ConnInfo:
    parts = urlsplit(uri)
    if not parts.scheme:
        raise ConfigError(f"connection {conn_id}: not a connection URI or JSON")
    conn_type = parts.scheme.replace("-", "_")
    extra = dict(parse_qsl(parts.query))
    if "__extra__" in extra:
        try:
            extra = json.loads(extra["__extra__"])
        except ValueError:
            raise ConfigError(f"connection {conn_id}: __extra__ is not valid JSON") from None
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"connection {conn_id}: bad port") from None
    schema = unquote(parts.path.lstrip("/")) or None
    return ConnInfo(unquote(parts.hostname) if parts.hostname else None, port,
                    unquote(parts.username) if parts.username else None,
                    unquote(parts.password) if parts.password else None,
                    extra, conn_type, schema, conn_id)


def _from_file(conn_id: str, path: Path) -> ConnInfo | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"LIFTOFF_CONNECTIONS file {path} is unreadable: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"LIFTOFF_CONNECTIONS file {path}: expected a mapping of connection ids")
    value = data.get(conn_id)
    if value is None:
        return None
    return parse_connection(conn_id, value if isinstance(value, dict) else str(value))


# -- purpose helpers ------------------------------------------------------------------------------

def conn_id_for(purpose: str, inventory: Inventory | None = None) -> str:
    from liftoff.inventory import DEFAULT_CONNECTIONS

    connections = inventory.connections if inventory is not None else DEFAULT_CONNECTIONS
    try:
        return connections[purpose]
    except KeyError:
        raise ConfigError(f"no connection configured for {purpose!r}") from None


def connection_for(purpose: str, inventory: Inventory | None = None) -> ConnInfo:
    return resolve_connection(conn_id_for(purpose, inventory))


def alertmanager_url(inventory: Inventory | None = None) -> str:
    return connection_for("alertmanager", inventory).base_url()


def pushgateway_url(inventory: Inventory | None = None) -> str:
    return connection_for("pushgateway", inventory).base_url()


def prometheus_url(inventory: Inventory | None = None) -> str:
    return connection_for("prometheus", inventory).base_url()


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
    extra = conn.extra
    token = conn.password or extra.get("private_token") or extra.get("token")
    ssl_verify = extra.get("ssl_verify", True)
    if isinstance(ssl_verify, str):
        ssl_verify = ssl_verify.lower() not in ("false", "0", "no")
    return GitLabSettings(
        url=conn.base_url(default_scheme="https"),
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
    if conn.extra.get("url"):
        return str(conn.extra["url"])
    if conn.host and "://" in conn.host:
        return conn.host
    if conn.conn_type in ("postgres", "postgresql") and conn.host:
        from sqlalchemy.engine import URL

        return URL.create("postgresql+psycopg2", username=conn.login, password=conn.password, host=conn.host,
                          port=conn.port, database=conn.schema).render_as_string(hide_password=False)
    if conn.conn_type == "sqlite" and (conn.host or conn.schema):
        return f"sqlite:///{conn.host or conn.schema}"
    raise ConfigError(f"connection {conn.conn_id}: cannot tell the state store URL (set extra.url)")
