"""The build source: the apt repositories Omnibus packages come from. Which builds exist, which
is the newest nightly, what a build contains (the post-deployment patches it includes, its
schema version, for rollback safety), which commit it was made from.

Two repositories, each an Airflow HTTP connection read with the http provider's ``HttpHook``
(its timeout from the connection's ``extra.timeout``, else :data:`TIMEOUT_S`):

* ``liftoff_builds`` (inventory ``connections.builds``): the public repository;
* ``liftoff_builds_internal`` (``connections.builds_internal``): undisclosed security builds,
  behind the connection's login and password (HTTP Basic). Without that connection, internal
  builds are simply not known.

The connection's host is the repository's URI (as in a sources list: ``deb URI SUITE main``);
``extra.suite`` (default ``stable``), ``extra.component`` (``main``) and ``extra.arch``
(``amd64``) name the index read: ``URI/dists/SUITE/COMPONENT/binary-ARCH/Packages``. Its
``gitlab-ee`` stanzas are the builds: ``Version``, ``Filename``, ``Size``, ``SHA256``, and
liftoff's own fields, which apt ignores: ``X-Liftoff-Nightly: yes|no``, ``X-Liftoff-Sha`` (the
application commit, 7 to 40 hex digits; without it a nightly or auto-deploy version's own SHA is
used, :func:`build_sha`), ``X-Liftoff-Includes-Patches`` (comma-separated patch ids) and
``X-Liftoff-Schema-Version`` (an integer). A build entry is a dict: ``version``, ``nightly``,
``internal``, ``includes_patches`` and, when given, ``sha``, ``schema_version``, ``filename``,
``size``, ``sha256``.

An internal build's entry has ``internal: True``: callers redact its version. Its version
never appears in what this module logs or raises, and never in :func:`newest_nightly` or
:func:`newest_build`, which only consider public builds. Each index is read at most once per
:data:`CACHE_S` seconds in a process (one task's several questions, one fetch).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import time
from typing import Any

from liftoff.errors import ConnectionNotFound, LiftoffError
from liftoff.inventory import Inventory
from liftoff.runs import Run
from liftoff.versions import PACKAGE, commit_sha, parse_version

log = logging.getLogger(__name__)

TIMEOUT_S = 15
CACHE_S = 10.0
PURPOSES = {False: "builds", True: "builds_internal"}
DEFAULT_CONN_IDS = {"builds": "liftoff_builds", "builds_internal": "liftoff_builds_internal"}
REPO_EXTRA = {"suite": "stable", "component": "main", "arch": "amd64"}
_SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")
_FIELD_RE = re.compile(r"^([!-9;-~]+):(.*)$")  # a field name: printable ASCII but ':' and space
_cache: dict[tuple[str, str | None], tuple[float, list[dict]]] = {}
_cache_lock = threading.Lock()
_clock = time.monotonic  # the cache's clock (tests move it)


# -- the Packages index -----------------------------------------------------------------------

def parse_packages(text: str, where: str = "the Packages index") -> list[dict[str, str]]:
    """The stanzas of a Debian control file (``Packages``): ``{field (lowercase): value}`` each,
    continuation lines joined with ``\\n``. Raises LiftoffError naming the line (never its text)."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last = ""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if current:
                stanzas.append(current)
            current, last = {}, ""
        elif line[0] in " \t":
            if not last:
                raise LiftoffError(f"{where} is malformed: line {number} continues no field")
            current[last] += "\n" + line.strip()
        else:
            match = _FIELD_RE.match(line)
            if not match:
                raise LiftoffError(f"{where} is malformed: line {number} is not a 'Field: value' line")
            last = match.group(1).lower()
            if last in current:
                raise LiftoffError(f"{where} is malformed: line {number} repeats a field of its stanza")
            current[last] = match.group(2).strip()
    return [*stanzas, current] if current else stanzas


def build_entry(stanza: dict[str, str], internal: bool) -> dict[str, Any]:
    """A build entry (see the module's doc) from one ``gitlab-ee`` stanza."""
    entry: dict[str, Any] = {
        "version": stanza["version"],
        "nightly": stanza.get("x-liftoff-nightly", "").lower() in ("yes", "true", "1"),
        "internal": internal,
        "includes_patches": [p.strip() for p in stanza.get("x-liftoff-includes-patches", "").split(",")
                             if p.strip()],
    }
    for name, key in (("x-liftoff-sha", "sha"), ("filename", "filename"), ("sha256", "sha256")):
        if stanza.get(name):
            entry[key] = stanza[name]
    for name, key in (("x-liftoff-schema-version", "schema_version"), ("size", "size")):
        if stanza.get(name, "").isdigit():
            entry[key] = int(stanza[name])
    return entry


def entries_of(text: str, internal: bool, where: str = "the Packages index") -> list[dict]:
    """The ``gitlab-ee`` build entries of an index, in its order, each version once."""
    entries: dict[str, dict] = {}
    for number, stanza in enumerate(parse_packages(text, where), 1):
        if stanza.get("package") != PACKAGE:
            continue
        if not stanza.get("version"):
            raise LiftoffError(f"{where} is malformed: {PACKAGE} stanza {number} has no Version")
        entries.setdefault(stanza["version"], build_entry(stanza, internal))
    return list(entries.values())


# -- reading a repository over HTTP -----------------------------------------------------------

def conn_id_of(inventory: Inventory | None, internal: bool) -> str:
    purpose = PURPOSES[internal]
    connections = getattr(inventory, "connections", None) or {}
    return connections.get(purpose) or DEFAULT_CONN_IDS[purpose]


def index_path(extra: dict) -> str:
    """``dists/SUITE/COMPONENT/binary-ARCH/Packages`` from a connection's extra."""
    suite, component, arch = (str(extra.get(k) or default).strip("/") for k, default in REPO_EXTRA.items())
    return f"dists/{suite}/{component}/binary-{arch}/Packages"


def _plain_connection(conn_id: str) -> Any:
    """A connection Airflow does not know, from liftoff's plain-config fallbacks (the
    ``LIFTOFF_CONNECTIONS`` file of the distributed set-up), as an Airflow connection."""
    from airflow.sdk import Connection

    from liftoff.settings import resolve_connection

    info = resolve_connection(conn_id)  # ConnectionNotFound when nowhere
    if hasattr(info, "extra_dejson"):
        return info
    return Connection(conn_id=conn_id, conn_type=info.conn_type or "http", host=info.host, port=info.port,
                      login=info.login, password=info.password, schema=info.schema,
                      extra=json.dumps(info.extra or {}))


@functools.cache
def _hook_class() -> type:
    """``HttpHook`` that also finds a connection Airflow does not know in liftoff's fallbacks."""
    from airflow.providers.http.hooks.http import HttpHook

    class RepositoryHook(HttpHook):
        @classmethod
        def get_connection(cls, conn_id: str) -> Any:
            try:
                return super().get_connection(conn_id)
            except Exception as exc:  # by name: the SDK's and the core's class differ across versions
                if type(exc).__name__ != "AirflowNotFoundException":
                    raise
                return _plain_connection(conn_id)

    return RepositoryHook


def _hook(conn_id: str) -> Any:
    return _hook_class()(method="GET", http_conn_id=conn_id)


def _get(conn_id: str, timeout: float) -> tuple[str, str, Any, bool]:
    """GET the index of the repository ``conn_id``: (repository URL, index URL, response, whether
    credentials were sent)."""
    from requests import Request

    hook = _hook(conn_id)
    extra = hook.get_connection(conn_id).extra_dejson or {}
    session = hook.get_conn(extra_options={"check_response": False, "timeout": extra.get("timeout", timeout)})
    for key in REPO_EXTRA:  # the provider sends unknown extra keys as headers
        session.headers.pop(key, None)
    url = hook.url_from_endpoint(index_path(extra))
    resp = hook.run_and_check(session, session.prepare_request(Request("GET", url)), hook.merged_extra)
    return hook.base_url, url, resp, session.auth is not None


def fetch_index(conn_id: str, timeout: float = TIMEOUT_S) -> tuple[str, str]:
    """(url, text) of the ``Packages`` index of the repository ``conn_id``; LiftoffError with one
    sentence when it cannot be read (ConnectionNotFound when no such connection exists)."""
    try:
        repo, url, resp, sent = _get(conn_id, timeout)
    except LiftoffError:
        raise
    except (OSError, ValueError) as exc:  # requests' errors (refused, timeout, bad URL) are among them
        raise LiftoffError(f"the build repository {conn_id} is unreachable ({type(exc).__name__})") from None
    if resp.status_code in (401, 403):
        how = "refused the credentials of" if sent else "needs credentials: set the login and password of"
        raise LiftoffError(f"the build repository {repo} {how} the Airflow connection {conn_id} "
                           f"(HTTP {resp.status_code})")
    if resp.status_code != 200:
        raise LiftoffError(f"the build repository {repo} (connection {conn_id}) answered HTTP "
                           f"{resp.status_code} for {url}")
    return url, resp.content.decode("utf-8", "replace")


def read_repository(inventory: Inventory | None, internal: bool = False,
                    timeout: float = TIMEOUT_S, fresh: bool = False) -> list[dict]:
    """The build entries of the public (or internal) repository, from a cache younger than
    :data:`CACHE_S` (unless ``fresh``), else fetched. Raises LiftoffError (ConnectionNotFound:
    no such connection)."""
    conn_id = conn_id_of(inventory, internal)
    key = (conn_id, os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}"))
    with _cache_lock:
        cached = _cache.get(key)
    if cached and not fresh and _clock() - cached[0] < CACHE_S:
        return [dict(e) for e in cached[1]]
    url, text = fetch_index(conn_id, timeout)
    entries = entries_of(text, internal, f"the Packages index of {url}")
    with _cache_lock:
        _cache[key] = (_clock(), entries)
    return [dict(e) for e in entries]


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def internal_builds(inventory: Inventory | None, timeout: float = TIMEOUT_S,
                    fresh: bool = False) -> list[dict]:
    """The internal repository's entries; [] when it is not configured or cannot be read (why is
    logged, never a version)."""
    try:
        return read_repository(inventory, True, timeout, fresh)
    except ConnectionNotFound:
        log.debug("no internal build repository (%s): internal builds are not known",
                  conn_id_of(inventory, True))
    except LiftoffError as exc:
        log.warning("internal builds are not known: %s", exc)
    return []


# -- the questions ----------------------------------------------------------------------------

def list_builds(inventory: Inventory, timeout: float = TIMEOUT_S) -> list[dict]:
    """Every build: the public repository's, then the internal one's (``internal: True``).
    Raises LiftoffError when the public repository cannot be read."""
    return [*read_repository(inventory, False, timeout), *internal_builds(inventory, timeout)]


def newest_nightly(inventory: Inventory) -> str:
    """The newest nightly build of the public repository (versions.py's order and rules)."""
    nightlies = []
    for b in read_repository(inventory, False):
        try:
            v = parse_version(b.get("version"))
        except ValueError:
            continue
        if b.get("nightly") or v.kind == "nightly":
            nightlies.append(v)
    if not nightlies:
        raise LiftoffError(f"the build repository {conn_id_of(inventory, False)} lists no nightly build")
    return str(max(nightlies))


def build_info(inventory: Inventory, version: str) -> dict:
    """The entry of one build (``internal: True`` for an internal one), {} when neither
    repository lists it or it cannot be read. A version missing from the cached indexes is
    looked up again in freshly fetched ones: a build published seconds ago is found."""
    return _find_build(inventory, version, False) or _find_build(inventory, version, True) or {}


def _find_build(inventory: Inventory, version: str, fresh: bool) -> dict | None:
    try:
        public = read_repository(inventory, False, fresh=fresh)
    except LiftoffError as exc:
        log.warning("build source unavailable: %s", exc)
        public = []
    found = next((b for b in public if b.get("version") == version), None)
    if found is None:
        internal = internal_builds(inventory, fresh=fresh)
        found = next((b for b in internal if b.get("version") == version), None)
    return found


def entry_sha(entry: dict) -> str | None:
    """A build entry's ``sha`` when it is 7 to 40 lowercase hex digits, else None."""
    sha = entry.get("sha") if isinstance(entry, dict) else None
    return sha if isinstance(sha, str) and _SHA_RE.match(sha) else None


def build_sha(version: str, builds: list[dict] | None = None,
              inventory: Inventory | None = None) -> str | None:
    """The application commit of the build ``version``: its entry's ``sha`` in ``builds`` (read
    from the build source of ``inventory`` when not given), else the SHA its version carries
    (nightly, auto-deploy), else None. Never raises."""
    if builds is None and inventory is not None:
        info = build_info(inventory, version)
    else:
        info = next((b for b in builds or () if b.get("version") == version), {})
    return entry_sha(info) or commit_sha(version)


def newest_build(builds: list[dict]) -> str | None:
    """The newest public version (liftoff's version order) among build entries, None when none
    parses; internal entries are never the answer."""
    versions = []
    for b in builds:
        if b.get("internal"):
            continue
        try:
            versions.append(parse_version(b.get("version")))
        except ValueError:
            continue
    return str(max(versions)) if versions else None


def included_patches(inventory: Inventory, version: str) -> tuple[str, ...]:
    """The post-deployment patches the build ``version`` includes."""
    return tuple(str(p) for p in build_info(inventory, version).get("includes_patches") or ())


def resolve_version(run: Run, requested: str | None, scheduled: bool) -> str:
    """The version to deploy: the requested one, or for a scheduled run the newest nightly."""
    if requested:
        return str(parse_version(requested))
    if not scheduled:
        raise LiftoffError("a manual run needs a version (only scheduled runs pick the newest nightly)")
    return newest_nightly(run.inventory)
