"""What changed: the commits a deploy brings, and the commits an environment is behind.

Every deploy has a change range: the commits between the build an environment runs and the
build being deployed. A build's commit is its build-source entry's ``sha``, else the SHA its
version carries (nightly, auto-deploy: :func:`liftoff.builds.build_sha`). The range is read
from the ops instance's mirror of the application repository with python-gitlab's compare API
(``GET /api/v4/projects/:path/repository/compare?from=&to=``) on the ``gitlab`` connection
(``liftoff_ops_gitlab``, the one QA uses); the project is the connection's
``extra.source_project``, by default ``gitlab-org/gitlab``.

Nothing here raises or blocks a deploy: a build without a known commit, an unreachable GitLab,
an unknown commit give a :class:`ChangeRange` with ``known=False`` and the ``reason``. Every
GitLab call has a short timeout (:data:`TIMEOUT_S`).

An internal (undisclosed security) build's version never appears in what this returns (it is
``internal``), and neither do the titles of the commits it brings (withheld).

``pressure``: the commits not yet deployed in an environment, between the build it runs and
the newest build of the build source (pushed as ``liftoff_deploy_pressure{env}``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from liftoff.metrics import REDACTED

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "gitlab-org/gitlab"
PROJECT_EXTRA = "source_project"
TIMEOUT_S = 5.0
TITLES_KEPT = 5
RECORDS_SCANNED = 50
_PROJECT_RE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*|[0-9]+")


@dataclass(frozen=True)
class ChangeRange:
    """The commits between two builds. ``titles``: first lines, newest first, the first
    :data:`TITLES_KEPT` of ``count``. ``known`` False: ``reason`` says why nothing is known."""

    from_version: str | None
    to_version: str | None
    from_sha: str | None = None
    to_sha: str | None = None
    count: int = 0
    titles: tuple[str, ...] = ()
    web_url: str = ""
    known: bool = False
    reason: str = ""
    withheld: bool = False  # titles not shown: an internal build

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["titles"] = list(self.titles)
        return d


@dataclass(frozen=True)
class ChangeSource:
    """Where commits are read: the ops GitLab and the application repository's project path;
    ``inventory`` for the build source."""

    gitlab_url: str
    private_token: str | None = field(default=None, repr=False)
    project: str = DEFAULT_PROJECT
    ssl_verify: bool = True
    timeout: float = TIMEOUT_S
    inventory: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_settings(cls, inventory: Any = None, timeout: float = TIMEOUT_S) -> ChangeSource:
        """From the ``gitlab`` connection (as QA reads it) and its ``extra.source_project``."""
        from liftoff.settings import connection_for, gitlab_settings

        s = gitlab_settings(inventory)
        project = str(connection_for("gitlab", inventory).extra_dejson.get(PROJECT_EXTRA) or DEFAULT_PROJECT)
        if not _PROJECT_RE.fullmatch(project) or ".." in project:
            raise ValueError(f"extra.{PROJECT_EXTRA} is not a project path like {DEFAULT_PROJECT}")
        return cls(s.url.rstrip("/"), s.private_token, project, s.ssl_verify, timeout, inventory)

    def project_api(self) -> Any:
        """The python-gitlab project (lazy: no request), built as QAClient builds its client."""
        import gitlab

        gl = gitlab.Gitlab(self.gitlab_url, private_token=self.private_token or None, timeout=self.timeout,
                           ssl_verify=self.ssl_verify, retry_transient_errors=False)
        return gl.projects.get(self.project, lazy=True)

    def compare_url(self, from_sha: str, to_sha: str) -> str:
        return f"{self.gitlab_url}/{self.project}/-/compare/{from_sha}...{to_sha}"


# -- where the answers come from ----------------------------------------------------------------

def source_of(run_or_settings: Any, timeout: float = TIMEOUT_S) -> tuple[ChangeSource | None, str]:
    """A ChangeSource from a ChangeSource, a Run (its inventory) or an Inventory; or None and why."""
    if isinstance(run_or_settings, ChangeSource):
        return run_or_settings, ""
    inventory = getattr(run_or_settings, "inventory", run_or_settings)
    if not hasattr(inventory, "environments"):
        inventory = None
    try:
        return ChangeSource.from_settings(inventory, timeout), ""
    except Exception as exc:  # no connection, a bad setting: unknown, never an error
        return None, f"no ops GitLab to read commits from ({type(exc).__name__}: {str(exc)[:120]})"


def read_builds(inventory: Any, timeout: float = TIMEOUT_S) -> tuple[list[dict], str]:
    """The build source's entries, or ``([], why)``; never raises."""
    from liftoff.builds import list_builds

    try:
        return list_builds(inventory, timeout=timeout), ""
    except Exception as exc:  # an unreadable build source: SHAs from the versions only
        return [], f"build source unreadable ({type(exc).__name__})"


def running_version(run: Any, env: str) -> tuple[str | None, str]:
    """The build ``env`` runs (newest successful deployment record), or ``(None, why)``."""
    try:
        store = run.store
        records = store.deployments(env, limit=RECORDS_SCANNED)
    except Exception as exc:  # no store here: unknown
        return None, f"what {env} runs is not known ({type(exc).__name__})"
    current = next((d.version for d in records if d.status == "success"), None)
    return (current, "") if current else (None, f"no successful deploy of {env} recorded")


def _shown(version: str | None, hidden: Iterable[str]) -> str | None:
    return REDACTED if version and version in set(hidden) else version


def _scrub(text: str, hidden: Iterable[str]) -> str:
    for version in hidden:
        if version:
            text = text.replace(version, REDACTED)
    return text


# -- the change range ---------------------------------------------------------------------------

def change_range(run_or_settings: Any, from_version: str | None, to_version: str | None, *,
                 internal: bool | None = None, hidden: Iterable[str] = (), builds: list[dict] | None = None,
                 timeout: float = TIMEOUT_S) -> ChangeRange:
    """The commits between the build ``from_version`` and the build ``to_version``. Never raises.

    ``internal``: ``to_version`` is an internal build (default: the run's ``redact_version``);
    ``hidden``: other versions never to show. ``builds``: the build source's entries, when the
    caller read them already."""
    if internal is None:
        internal = bool(getattr(run_or_settings, "redact_version", False))
    secret = [v for v in (*hidden, to_version if internal else None) if v]
    try:
        result = _change_range(run_or_settings, from_version, to_version, builds, timeout, secret)
    except Exception as exc:  # what changed never fails a deploy
        log.warning("change range unknown: %s", _scrub(f"{type(exc).__name__}: {exc}", secret)[:200])
        result = _unknown(from_version, to_version, secret, f"error: {type(exc).__name__}")
    if result.titles and {from_version, to_version} & set(secret):
        result = ChangeRange(**{**asdict(result), "titles": (), "withheld": True})
    return result


def _unknown(from_version: str | None, to_version: str | None, hidden: list[str], reason: str,
             **known: Any) -> ChangeRange:
    return ChangeRange(_shown(from_version, hidden), _shown(to_version, hidden),
                       reason=_scrub(reason, hidden), **known)


def _change_range(run_or_settings: Any, from_version: str | None, to_version: str | None,
                  builds: list[dict] | None, timeout: float, hidden: list[str]) -> ChangeRange:
    from liftoff.builds import build_sha

    if not from_version or not to_version:
        return _unknown(from_version, to_version, hidden, "a build of the range is not known")
    source, why = source_of(run_or_settings, timeout)
    note = ""
    if builds is None:
        builds, note = read_builds(getattr(source, "inventory", None), timeout)
    shas = {v: build_sha(v, builds) for v in (from_version, to_version)}
    missing = [v for v, sha in shas.items() if not sha]
    if missing:
        names = " and ".join(_shown(v, hidden) or "?" for v in missing)
        return _unknown(from_version, to_version, hidden, f"no known commit for {names} (neither the "
                        f"version nor the build source names one{'; ' + note if note else ''})",
                        from_sha=shas[from_version], to_sha=shas[to_version])
    ends = {"from_sha": shas[from_version], "to_sha": shas[to_version]}
    if from_version == to_version or ends["from_sha"] == ends["to_sha"]:
        return ChangeRange(_shown(from_version, hidden), _shown(to_version, hidden), **ends, known=True)
    if source is None:
        return _unknown(from_version, to_version, hidden, why, **ends)
    return _compared(source, from_version, to_version, ends, hidden)


def _compared(source: ChangeSource, from_version: str, to_version: str, ends: dict[str, str],
              hidden: list[str]) -> ChangeRange:
    try:
        data = source.project_api().repository_compare(ends["from_sha"], ends["to_sha"])
    except Exception as exc:
        return _unknown(from_version, to_version, hidden, _gitlab_reason(source, exc, ends), **ends)
    commits = [c for c in (data or {}).get("commits") or [] if isinstance(c, Mapping)]
    titles = tuple(_first_line(c) for c in reversed(commits))[:TITLES_KEPT]
    web_url = str((data or {}).get("web_url") or source.compare_url(ends["from_sha"], ends["to_sha"]))
    return ChangeRange(_shown(from_version, hidden), _shown(to_version, hidden), **ends, count=len(commits),
                       titles=titles, web_url=web_url, known=True)


def _first_line(commit: Mapping[str, Any]) -> str:
    text = str(commit.get("title") or commit.get("message") or "").strip()
    line = text.splitlines()[0] if text else "(no title)"
    return line if len(line) <= 120 else line[:119] + "…"


def _gitlab_reason(source: ChangeSource, exc: Exception, ends: dict[str, str]) -> str:
    import gitlab.exceptions
    import requests

    where = f"{source.project} on {source.gitlab_url}"
    if isinstance(exc, gitlab.exceptions.GitlabAuthenticationError):
        return f"{where}: authentication refused (HTTP 401)"
    if isinstance(exc, gitlab.exceptions.GitlabError) and getattr(exc, "response_code", None) == 404:
        return f"commit {ends['from_sha']} or {ends['to_sha']} not found in {where} (HTTP 404)"
    if isinstance(exc, gitlab.exceptions.GitlabError):
        return f"{where}: HTTP {getattr(exc, 'response_code', None) or '?'}"
    if isinstance(exc, requests.RequestException):
        return f"GitLab unreachable ({where}: {type(exc).__name__})"
    return f"{where}: {type(exc).__name__}"


# -- pressure: commits not yet deployed ---------------------------------------------------------

def pressure(run_or_settings: Any, env: str, *, running: str | None = None, builds: list[dict] | None = None,
             hidden: Iterable[str] = (), timeout: float = TIMEOUT_S) -> ChangeRange:
    """The commits between the build ``env`` runs (``running``, else the run's store records)
    and the newest build of the build source. Never raises."""
    from liftoff.builds import newest_build

    hidden = [v for v in hidden if v]
    if running is None:
        running, why = running_version(run_or_settings, env)
        if running is None:
            return _unknown(None, None, hidden, why)
    note = ""
    if builds is None:
        source, _ = source_of(run_or_settings, timeout)
        builds, note = read_builds(getattr(source, "inventory", None), timeout)
    newest = newest_build(builds)
    if newest is None:
        return _unknown(running, None, hidden, note or "the build source lists no build")
    return change_range(run_or_settings, running, newest, internal=False, hidden=hidden, builds=builds,
                        timeout=timeout)


def pressures(run_or_settings: Any, running: Mapping[str, str | None], *, hidden: Iterable[str] = (),
              timeout: float = TIMEOUT_S) -> dict[str, ChangeRange]:
    """:func:`pressure` of several environments: the build source read once, one compare per
    environment at the same time, all within about ``timeout`` seconds (a late one: unknown)."""
    hidden = [v for v in hidden if v]
    started = time.monotonic()
    source, why = source_of(run_or_settings, timeout)
    if source is None:
        return {env: _unknown(v, None, hidden, why) for env, v in running.items()}
    builds, note = read_builds(source.inventory, timeout)
    if not builds:
        return {env: _unknown(v, None, hidden, note or "the build source lists no build")
                for env, v in running.items()}
    left = max(0.5, timeout - (time.monotonic() - started))
    pool = concurrent.futures.ThreadPoolExecutor(max(1, len(running)), thread_name_prefix="liftoff-pressure")
    futures = {env: pool.submit(_pressure_of, source, env, v, builds, hidden, left)
               for env, v in running.items()}
    concurrent.futures.wait(futures.values(), timeout=left + 0.5)
    pool.shutdown(wait=False, cancel_futures=True)
    return {env: f.result() if f.done() else _unknown(running[env], None, hidden,
                                                     f"no answer from GitLab within {timeout:g} s")
            for env, f in futures.items()}


def _pressure_of(source: ChangeSource, env: str, running: str | None, builds: list[dict], hidden: list[str],
                 timeout: float) -> ChangeRange:
    if running is None:
        return _unknown(None, None, hidden, f"no successful deploy of {env} recorded")
    bounded = ChangeSource(source.gitlab_url, source.private_token, source.project, source.ssl_verify,
                           timeout, source.inventory)
    return pressure(bounded, env, running=running, builds=builds, hidden=hidden, timeout=timeout)


def push_pressure(run: Any, envs: Iterable[str], running: Mapping[str, str | None] | None = None,
                  timeout: float = TIMEOUT_S) -> dict[str, int | None]:
    """Push ``liftoff_deploy_pressure{env}`` for each environment whose pressure is known;
    ``{env: commits or None}``. ``running``: the build each runs (default: the run's records).
    Never raises."""
    try:
        envs = list(envs)
        running = dict(running) if running is not None else {e: running_version(run, e)[0] for e in envs}
        found = pressures(run, running, timeout=timeout)
        metrics = run.metrics()
        out: dict[str, int | None] = {}
        for env in envs:
            rng = found.get(env)
            out[env] = rng.count if rng is not None and rng.known else None
            if out[env] is not None:
                metrics.deploy_pressure(env, out[env])
        return out
    except Exception as exc:  # a metric never fails a deploy
        log.warning("deploy pressure not pushed: %s: %s", type(exc).__name__, str(exc)[:200])
        return {}


# -- words ----------------------------------------------------------------------------------------

def _commits(n: int) -> str:
    return f"{n} commit{'s' if n != 1 else ''}"


def summary_line(rng: ChangeRange | None) -> str:
    """One line for a run's summary: ``what changed: 12 commits (a1b2c3d4..e5f6a7b8): <title>;
    <title>; … and 10 more: <compare URL>``, or why it is not known."""
    if rng is None:
        return "what changed: not known"
    if not rng.known:
        return f"what changed: not known ({rng.reason or 'no reason given'})"
    if rng.count == 0:
        return "what changed: no new commits"
    span = f"{(rng.from_sha or '?')[:8]}..{(rng.to_sha or '?')[:8]}"
    titles = "; ".join(rng.titles) if rng.titles else ("titles withheld (internal build)" if rng.withheld
                                                        else "")
    more = rng.count - len(rng.titles)
    rest = f" … and {more} more" if rng.titles and more > 0 else ""
    listed = f": {titles}{rest}" if titles else ""
    return f"what changed: {_commits(rng.count)} ({span}){listed}: {rng.web_url}"


def chat_lines(rng: ChangeRange, env: str | None = None) -> list[str]:
    """The lines a chat message shows: the count and the compare link, the first titles, or why
    the range is not known."""
    on = f" on {env}" if env else ""
    if not rng.known:
        return [f"what changed{on}: not known ({rng.reason or 'no reason given'})"]
    if rng.count == 0:
        return [f"what changed{on}: no new commits ({rng.from_version} → {rng.to_version})"]
    span = f"{rng.from_version} → {rng.to_version}"
    lines = [f"what changed{on}: {_commits(rng.count)} ({span}): {rng.web_url}"]
    lines += [f"• {t}" for t in rng.titles]
    if rng.withheld:
        lines.append("(titles withheld: internal build)")
    elif rng.count > len(rng.titles):
        lines.append(f"… and {rng.count - len(rng.titles)} more")
    return lines
