"""QA gate: trigger the GitLab-QA pipeline on the ops GitLab instance and follow it.

The ops instance (``gitlab`` connection) is not one of the environments being deployed.
The pipeline gets ``QA_ENVIRONMENT``, ``QA_URL``, ``QA_EXPECTED_VERSION``, ``QA_CANARY``
(``"true"``/``"false"``) and, for canary, ``QA_COOKIES`` (the cookie that routes to canary,
as GitLab QA reads it). Anything that keeps us from knowing the result (GitLab unreachable,
401, a bad answer) raises :class:`QAError`: the gate fails closed. Tokens never appear in
messages or logs.

python-gitlab requests used (what an ops instance, or the lab, must answer):
``POST /api/v4/projects/:path/trigger/pipeline`` (JSON: ref, token, variables) when a trigger
token is set, else ``POST /api/v4/projects/:path/pipeline`` (JSON: ref, variables list);
``GET /api/v4/projects/:path/pipelines/:id``; ``GET /api/v4/projects/:path/pipelines/:id/jobs``;
``POST /api/v4/projects/:path/pipelines/:id/cancel`` (best effort, on timeout).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import gitlab
import gitlab.exceptions
import requests

from liftoff.errors import InvalidInput, QAError
from liftoff.versions import parse_version, validate_name

log = logging.getLogger(__name__)

RUNNING, PASSED, FAILED, CANCELED = "running", "passed", "failed", "canceled"
_STATE = {
    "success": PASSED,
    "failed": FAILED,
    "skipped": FAILED,  # nothing ran: not a pass
    "canceled": CANCELED,
    "canceling": CANCELED,
}


@dataclass(frozen=True)
class TriggeredPipeline:
    id: int
    web_url: str


@dataclass(frozen=True)
class QAStatus:
    state: str  # running | passed | failed | canceled
    failed_jobs: tuple[tuple[str, str], ...] = ()
    web_url: str = ""
    gitlab_status: str = ""

    @property
    def done(self) -> bool:
        return self.state != RUNNING


@dataclass(frozen=True)
class QAResult:
    passed: bool
    state: str  # passed | failed | canceled | timeout
    pipeline_id: int
    web_url: str
    failed_jobs: tuple[tuple[str, str], ...] = ()
    reason: str = ""
    variables: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed_jobs"] = [list(j) for j in self.failed_jobs]
        return d


def qa_variables(env: str, url: str, version: str, canary_cookie: str | None,
                 expect_version: bool = True) -> dict[str, str]:
    """The pipeline variables, validated. Without ``expect_version`` (QA while only part of
    the environment runs the new version) the version is informational (``QA_VERSION``)."""
    validate_name("env", env)
    parts = urlsplit(url) if isinstance(url, str) else None
    if (not parts or parts.scheme not in ("http", "https") or not parts.hostname
            or any(c.isspace() for c in url)):
        raise InvalidInput(f"QA URL must be an http(s) URL, got {url!r}")
    v = parse_version(version)
    variables = {
        "QA_ENVIRONMENT": env,
        "QA_URL": url,
        ("QA_EXPECTED_VERSION" if expect_version else "QA_VERSION"): str(v),
        "QA_CANARY": "true" if canary_cookie else "false",
    }
    if canary_cookie:
        if not isinstance(canary_cookie, str) or any(c in canary_cookie for c in ";\n\r\"' ") or \
                "=" not in canary_cookie:
            raise InvalidInput(f"canary cookie must look like 'gitlab_canary=true', got {canary_cookie!r}")
        variables["QA_COOKIES"] = canary_cookie
    return variables


def is_auth_refused(exc: Exception) -> bool:
    """GitLab refused the token: 401, whichever python-gitlab error carries it."""
    return isinstance(exc, gitlab.exceptions.GitlabAuthenticationError) or (
        isinstance(exc, gitlab.exceptions.GitlabError) and getattr(exc, "response_code", None) == 401)


def token_refused(gitlab_url: str, connection: str, what: str) -> str:
    """The one sentence for a 401: which GitLab, which connection to fix (and, next to a lab,
    that a purge made new tokens)."""
    lab_dir = os.environ.get("LIFTOFF_LAB_DIR")
    lab = f" (a lab purge makes a new token: source {lab_dir}/liftoff.env again)" if lab_dir else ""
    return (f"the ops GitLab at {gitlab_url} refused liftoff's token (HTTP 401) when {what}: "
            f"check the {connection} connection's password{lab}")


def _http_reason(exc: Exception) -> str:
    if is_auth_refused(exc):
        return "authentication refused (HTTP 401): check the gitlab connection's token"
    if isinstance(exc, gitlab.exceptions.GitlabError):
        code = getattr(exc, "response_code", None)
        msg = str(getattr(exc, "error_message", "") or "")[:200]
        if code == 404:
            return f"not found (HTTP 404){': ' + msg if msg else ''}"
        if code == 403:
            return "forbidden (HTTP 403): the token may not run pipelines in the QA project"
        return f"HTTP {code}: {msg}" if code else f"{type(exc).__name__}: {msg}"
    if isinstance(exc, requests.RequestException):
        return f"unreachable ({type(exc).__name__})"
    return f"{type(exc).__name__}"


class QAClient:
    """Triggers and follows QA pipelines in ``project`` at ``ref`` on the ops GitLab."""

    def __init__(self, gitlab_url: str, private_token: str | None, trigger_token: str | None = None,
                 project: str = "gitlab-org/quality/gitlab-qa-runner", ref: str = "main",
                 *, timeout: float = 30.0, ssl_verify: bool = True, connection: str = "gitlab"):
        if not isinstance(gitlab_url, str) or not gitlab_url.startswith(("http://", "https://")):
            raise InvalidInput(f"GitLab URL must start with http:// or https://, got {gitlab_url!r}")
        if not private_token and not trigger_token:
            raise QAError("no token for the ops GitLab: set the gitlab connection's password "
                          "or extra.trigger_token")
        self.gitlab_url = gitlab_url.rstrip("/")
        self.project_path = project
        self.ref = ref
        self.connection = connection  # the Airflow connection id, named in errors
        self._trigger_token = trigger_token
        self._gl = gitlab.Gitlab(self.gitlab_url, private_token=private_token or None, timeout=timeout,
                                 ssl_verify=ssl_verify, retry_transient_errors=False)
        self._project = self._gl.projects.get(project, lazy=True)

    def __repr__(self) -> str:
        return f"QAClient({self.gitlab_url!r}, project={self.project_path!r}, ref={self.ref!r})"

    @classmethod
    def from_settings(cls, inventory=None) -> QAClient:
        from liftoff.settings import conn_id_for, gitlab_settings

        s = gitlab_settings(inventory)
        return cls(s.url, s.private_token, s.trigger_token, s.project, s.ref, ssl_verify=s.ssl_verify,
                   connection=conn_id_for("gitlab", inventory))

    def _fail(self, what: str, exc: Exception, if_not_found: str = "") -> QAError:
        if is_auth_refused(exc):
            return QAError(token_refused(self.gitlab_url, self.connection, what))
        reason = _http_reason(exc)
        if if_not_found and getattr(exc, "response_code", None) == 404:
            reason += f"; {if_not_found}"
        return QAError(f"QA on {self.gitlab_url} ({self.project_path}): {what} failed: {reason}")

    def trigger(self, env: str, url: str, version: str,
                canary_cookie: str | None = None, expect_version: bool = True) -> TriggeredPipeline:
        """Start a QA pipeline for the environment; returns its id and web URL."""
        variables = qa_variables(env, url, version, canary_cookie, expect_version)
        try:
            if self._trigger_token:
                pipeline = self._project.trigger_pipeline(self.ref, self._trigger_token, variables=variables)
            else:
                pipeline = self._project.pipelines.create(
                    {"ref": self.ref, "variables": [{"key": k, "value": v} for k, v in variables.items()]})
        except (gitlab.exceptions.GitlabError, requests.RequestException) as exc:
            hint = (f"the QA project or the trigger token (extra.trigger_token of the {self.connection} "
                    "connection) is wrong") if self._trigger_token else ""
            raise self._fail("triggering the pipeline", exc, hint) from None
        attrs = pipeline.attributes
        if not isinstance(attrs.get("id"), int):
            raise QAError(f"QA on {self.gitlab_url}: the trigger answer has no pipeline id")
        log.info("QA pipeline %s triggered for %s %s: %s", attrs["id"], env, version,
                 attrs.get("web_url", ""))
        return TriggeredPipeline(attrs["id"], str(attrs.get("web_url") or ""))

    def status(self, pipeline_id: int) -> QAStatus:
        """The pipeline's state, and the failed jobs (name, URL) once it failed."""
        try:
            pipeline = self._project.pipelines.get(pipeline_id)
        except (gitlab.exceptions.GitlabError, requests.RequestException) as exc:
            raise self._fail(f"reading pipeline {pipeline_id}", exc) from None
        raw = pipeline.attributes.get("status")
        if not isinstance(raw, str):
            raise QAError(f"QA on {self.gitlab_url}: pipeline {pipeline_id} has no status")
        state = _STATE.get(raw, RUNNING)
        web_url = str(pipeline.attributes.get("web_url") or "")
        failed: tuple[tuple[str, str], ...] = ()
        if state in (FAILED, CANCELED):
            failed = self._failed_jobs(pipeline)
        return QAStatus(state, failed, web_url, raw)

    def _failed_jobs(self, pipeline: Any) -> tuple[tuple[str, str], ...]:
        try:
            jobs = pipeline.jobs.list(get_all=True)
        except (gitlab.exceptions.GitlabError, requests.RequestException) as exc:
            raise self._fail(f"listing the jobs of pipeline {pipeline.id}", exc) from None
        failed = [j for j in jobs if j.attributes.get("status") == "failed"]
        blocking = [j for j in failed if not j.attributes.get("allow_failure")]
        return tuple((str(j.attributes.get("name", "?")), str(j.attributes.get("web_url") or ""))
                     for j in (blocking or failed))

    def cancel(self, pipeline_id: int) -> bool:
        try:
            self._project.pipelines.get(pipeline_id, lazy=True).cancel()
            return True
        except (gitlab.exceptions.GitlabError, requests.RequestException) as exc:
            log.warning("could not cancel QA pipeline %s: %s", pipeline_id, _http_reason(exc))
            return False

    def wait(self, pipeline: TriggeredPipeline, timeout: float, poll: float = 10.0,
             max_poll_errors: int = 3, cancel_on_timeout: bool = True,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> QAResult:
        """Follow a triggered pipeline to its end; a few poll errors in a row are tolerated."""
        deadline = clock() + timeout
        errors = 0
        while True:
            try:
                st = self.status(pipeline.id)
                errors = 0
            except QAError:
                errors += 1
                if errors >= max_poll_errors:
                    raise
                st = None
            if st is not None and st.done:
                return _result(pipeline, st)
            if clock() >= deadline:
                if cancel_on_timeout:
                    self.cancel(pipeline.id)
                return QAResult(False, "timeout", pipeline.id, pipeline.web_url, (),
                                f"QA pipeline {pipeline.id} did not finish within {timeout:.0f}s: "
                                f"{pipeline.web_url}")
            sleep(max(0.0, min(poll, deadline - clock())))

    def run(self, env: str, url: str, version: str, canary_cookie: str | None = None,
            timeout: float = 1800.0, poll: float = 10.0, **kwargs: Any) -> QAResult:
        """Trigger QA for the environment and wait for its result."""
        variables = qa_variables(env, url, version, canary_cookie)
        pipeline = self.trigger(env, url, version, canary_cookie)
        result = self.wait(pipeline, timeout, poll, **kwargs)
        return QAResult(result.passed, result.state, result.pipeline_id, result.web_url, result.failed_jobs,
                        result.reason, variables)


def _result(pipeline: TriggeredPipeline, st: QAStatus) -> QAResult:
    web_url = st.web_url or pipeline.web_url
    if st.state == PASSED:
        return QAResult(True, PASSED, pipeline.id, web_url, (),
                        f"QA pipeline {pipeline.id} passed: {web_url}")
    jobs = "; ".join(f"{name} {url}".strip() for name, url in st.failed_jobs) or "no failed job listed"
    return QAResult(False, st.state, pipeline.id, web_url, st.failed_jobs,
                    f"QA pipeline {pipeline.id} {st.state} ({st.gitlab_status}): {jobs}; {web_url}")
