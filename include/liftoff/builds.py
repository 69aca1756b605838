"""The build source: which Omnibus builds exist, which is the newest nightly, what a build
contains (the post-deployment patches it includes, its post-deployment migrations or schema
version, for rollback safety).

The ``builds`` connection points at a JSON list of ``{"version": ..., "nightly": bool, ...}``.
An entry may carry ``sha``: the application commit the build was made from (7 to 40 hex
digits); without it, a nightly or auto-deploy version's own SHA is used (:func:`build_sha`).
"""

from __future__ import annotations

import json
import logging
import re
import urllib.request

from liftoff.errors import LiftoffError
from liftoff.inventory import Inventory
from liftoff.runs import Run
from liftoff.settings import connection_for
from liftoff.versions import commit_sha, parse_version

log = logging.getLogger(__name__)

TIMEOUT_S = 15
_SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")


def list_builds(inventory: Inventory, timeout: float = TIMEOUT_S) -> list[dict]:
    """Every build the build source lists (raises OSError/ValueError/LiftoffError when unreadable)."""
    url = connection_for("builds", inventory).base_url()
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - URL from the connection
        builds = json.load(resp)
    if not isinstance(builds, list):
        raise LiftoffError(f"the build source {url} did not answer a JSON list")
    return [b for b in builds if isinstance(b, dict)]


def newest_nightly(inventory: Inventory) -> str:
    """The newest nightly build the build source lists."""
    nightlies = []
    for b in list_builds(inventory):
        try:
            v = parse_version(b.get("version"))
        except ValueError:
            continue
        if b.get("nightly") or v.kind == "nightly":
            nightlies.append(v)
    if not nightlies:
        raise LiftoffError(f"the build source {connection_for('builds', inventory).base_url()} lists no "
                           "nightly build")
    return str(max(nightlies))


def build_info(inventory: Inventory, version: str) -> dict:
    """What the build source says of one build ({} when it does not list it or cannot be read)."""
    try:
        builds = list_builds(inventory)
    except (OSError, ValueError, LiftoffError) as exc:
        log.warning("build source unavailable: %s", exc)
        return {}
    return next((b for b in builds if b.get("version") == version), {})


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
    """The newest version (liftoff's version order) among build entries, None when none parses."""
    versions = []
    for b in builds:
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
