"""The GitLab REST v4 subset python-gitlab uses to trigger a QA pipeline and follow it.

Listens on ``config.control_addr:config.gitlab_port``. One project,
``gitlab-org/quality/gitlab-qa-runner``, whose triggered pipelines run the smoke jobs of
``lab.qa_jobs``. Reads need the private token (``PRIVATE-TOKEN`` header,
``Authorization: Bearer`` or ``private_token=``), else 401 ``{"message": "401 Unauthorized"}``;
a wrong private token is refused so on the trigger too, like GitLab; triggering without one
needs the trigger token, else 404 like GitLab. Both are generated on first start and kept in
``<lab_dir>/secrets/gitlab.json`` (mode 0600).

Endpoints (under ``/api/v4``): ``GET /user``, ``GET /version``, ``GET /projects``,
``GET /projects/:id``, ``POST /projects/:id/trigger/pipeline`` (trigger token),
``POST /projects/:id/pipeline`` (private token; JSON ``ref`` and ``variables`` list),
``GET /projects/:id/pipelines[/:pid[/jobs|/variables]]``,
``POST /projects/:id/pipelines/:pid/cancel|retry``, ``GET /projects/:id/jobs[/:jid[/trace]]``,
``POST /projects/:id/jobs/:jid/cancel|retry``. ``:id`` is the number or the URL-encoded path.
Plain HTML views answer at the ``web_url`` of pipelines and jobs.
Issues of ``gitlab-com/gl-infra/production`` (incidents, change requests: labels):
``GET|POST /projects/:id/issues``, ``GET|PUT /projects/:id/issues/:iid``.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import math
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from lab.config import LabConfig
from lab.model import World
from lab.qa_jobs import Job, Pipeline, QARunner
from lab.repository import REPO_PROJECT_ID, REPO_PROJECT_PATH, Repository

QA_PROJECT_ID = 1
QA_PROJECT_PATH = "gitlab-org/quality/gitlab-qa-runner"
PRODUCTION_PROJECT_ID = 7  # incidents and change requests (issues with labels)
PRODUCTION_PROJECT_PATH = "gitlab-com/gl-infra/production"
SERVER_VERSION = "17.6.0-ee"  # the ops instance's own version, not the fleet's
DEFAULT_PER_PAGE = 20
MAX_PER_PAGE = 100

RUNNER = {"id": 1, "description": "lab-qa-runner", "active": True, "paused": False, "is_shared": False,
          "runner_type": "project_type", "name": "gitlab-runner", "online": True, "status": "online"}


# -- tokens ------------------------------------------------------------------------------
def secrets_file(config: LabConfig) -> Path:
    return config.path("secrets", "gitlab.json")


def ensure_tokens(config: LabConfig) -> dict[str, str]:
    """The lab's GitLab tokens, generated (mode 0600) on first use."""
    file = secrets_file(config)
    if file.exists():
        return load_tokens(config)
    file.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(file.parent, 0o700)
    tokens = {"private_token": "glpat-" + secrets.token_urlsafe(15),
              "trigger_token": "glptt-" + secrets.token_hex(20)}
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f, indent=1)
    os.replace(tmp, file)
    return tokens


def load_tokens(config: LabConfig) -> dict[str, str]:
    """``{"private_token": ..., "trigger_token": ...}`` of a lab that has started."""
    return json.loads(secrets_file(config).read_text())


# -- JSON shapes -------------------------------------------------------------------------
def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sha_of(ref: str) -> str:
    return hashlib.sha1(f"{QA_PROJECT_PATH}@{ref}".encode()).hexdigest()


def user_json(base: str) -> dict:
    return {"id": 1, "username": "liftoff-bot", "name": "liftoff bot", "state": "active", "locked": False,
            "avatar_url": None, "web_url": f"{base}/liftoff-bot", "bot": True, "is_admin": False}


def project_json(base: str) -> dict:
    return {
        "id": QA_PROJECT_ID,
        "name": "gitlab-qa-runner",
        "name_with_namespace": "GitLab.org / quality / gitlab-qa-runner",
        "path": "gitlab-qa-runner",
        "path_with_namespace": QA_PROJECT_PATH,
        "description": "Runs GitLab QA smoke suites against deployed environments (lab).",
        "default_branch": "master",
        "visibility": "private",
        "web_url": f"{base}/{QA_PROJECT_PATH}",
        "http_url_to_repo": f"{base}/{QA_PROJECT_PATH}.git",
        "namespace": {"id": 2, "name": "quality", "path": "quality", "kind": "group",
                      "full_path": "gitlab-org/quality", "web_url": f"{base}/groups/gitlab-org/quality"},
        "created_at": "2024-01-01T00:00:00.000Z",
        "last_activity_at": iso(time.time()),
        "archived": False,
    }


def _detailed_status(status: str, path: str) -> dict:
    label = {"success": "passed", "failed": "failed", "running": "running", "canceled": "canceled"}
    text = label.get(status, status)
    return {"icon": f"status_{status}", "text": text, "label": text, "group": status, "tooltip": text,
            "has_details": True, "details_path": path, "illustration": None,
            "favicon": f"/assets/ci_favicons/favicon_status_{status}.png"}


def pipeline_json(p: Pipeline, base: str) -> dict:
    path = f"/{QA_PROJECT_PATH}/-/pipelines/{p.id}"
    status = p.status
    started, finished = p.started_at, p.finished_at
    return {
        "id": p.id,
        "iid": p.iid,
        "project_id": QA_PROJECT_ID,
        "sha": sha_of(p.ref),
        "ref": p.ref,
        "status": status,
        "source": p.source,
        "created_at": iso(p.created_at),
        "updated_at": iso(p.updated_at),
        "web_url": f"{base}{path}",
        "before_sha": "0" * 40,
        "tag": False,
        "yaml_errors": None,
        "user": user_json(base),
        "started_at": iso(started),
        "finished_at": iso(finished),
        "committed_at": None,
        "duration": round(finished - started) if started and finished else None,
        "queued_duration": round(started - p.created_at, 3) if started else None,
        "coverage": None,
        "name": None,
        "detailed_status": _detailed_status(status, path),
    }


def job_json(job: Job, pipeline: Pipeline, base: str) -> dict:
    data = {
        "id": job.id,
        "status": job.status,
        "stage": job.stage,
        "name": job.name,
        "ref": pipeline.ref,
        "tag": False,
        "coverage": None,
        "allow_failure": False,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "erased_at": None,
        "duration": job.duration,
        "queued_duration": (job.started_at - job.created_at) if job.started_at else None,
        "user": user_json(base),
        "commit": {"id": sha_of(pipeline.ref), "short_id": sha_of(pipeline.ref)[:8],
                   "title": f"QA for {pipeline.ref}", "created_at": iso(pipeline.created_at)},
        "pipeline": {k: v for k, v in pipeline_json(pipeline, base).items()
                     if k in ("id", "iid", "project_id", "sha", "ref", "status", "source",
                              "created_at", "updated_at", "web_url")},
        "web_url": f"{base}/{QA_PROJECT_PATH}/-/jobs/{job.id}",
        "project": {"ci_job_token_scope_enabled": False},
        "artifacts": [],
        "artifacts_expire_at": None,
        "runner": RUNNER,
        "tag_list": ["qa"],
        "retried": job.retried,
    }
    if job.status == "failed":
        data["failure_reason"] = job.failure_reason or "script_failure"
    return data


def _error(status: int, message: str, key: str = "message") -> web.Response:
    return web.json_response({key: message}, status=status)


def _int(value: str | None, default: int) -> int:
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def paginate(request: web.Request, items: list) -> web.Response:
    """One page of ``items`` with GitLab's pagination headers and Link."""
    per_page = min(max(_int(request.query.get("per_page"), DEFAULT_PER_PAGE), 1), MAX_PER_PAGE)
    total = len(items)
    pages = max(1, math.ceil(total / per_page))
    page = max(_int(request.query.get("page"), 1), 1)
    chunk = items[(page - 1) * per_page: page * per_page]
    headers = {"X-Page": str(page), "X-Per-Page": str(per_page), "X-Total": str(total),
               "X-Total-Pages": str(pages), "X-Next-Page": str(page + 1) if page < pages else "",
               "X-Prev-Page": str(page - 1) if page > 1 else ""}
    links = []
    if page > 1:
        links.append(f'<{request.url.update_query(page=page - 1, per_page=per_page)}>; rel="prev"')
    if page < pages:
        links.append(f'<{request.url.update_query(page=page + 1, per_page=per_page)}>; rel="next"')
    links.append(f'<{request.url.update_query(page=1, per_page=per_page)}>; rel="first"')
    links.append(f'<{request.url.update_query(page=pages, per_page=per_page)}>; rel="last"')
    headers["Link"] = ", ".join(links)
    return web.json_response(chunk, headers=headers)


def _scopes(request: web.Request) -> set[str]:
    values = request.query.getall("scope[]", []) + request.query.getall("scope", [])
    return {s for v in values for s in v.split(",") if s}


def parse_variables(data) -> dict[str, str]:
    """Pipeline variables: a JSON object (trigger), a JSON list of ``{"key", "value"}``
    (create pipeline) or form fields ``variables[KEY]=V``."""
    variables: dict[str, str] = {}
    raw = data.get("variables") if hasattr(data, "get") else None
    if isinstance(raw, dict):
        variables.update({str(k): "" if v is None else str(v) for k, v in raw.items()})
    elif isinstance(raw, list):
        for item in raw:
            if not isinstance(item, dict) or not isinstance(item.get("key"), str):
                raise ValueError("variables is invalid")
            value = item.get("value")
            variables[item["key"]] = "" if value is None else str(value)
    elif raw is not None and not isinstance(raw, str):
        raise ValueError("variables is invalid")
    for key in data:
        if isinstance(key, str) and key.startswith("variables[") and key.endswith("]"):
            variables[key[len("variables["):-1]] = str(data[key])
    return variables


def parse_labels(raw) -> list[str]:
    """GitLab's ``labels``: a comma-separated string or a list."""
    items = raw if isinstance(raw, list) else str(raw or "").split(",")
    return [str(x).strip() for x in items if str(x).strip()]


def issue_json(base: str, iid: int, title: str, labels: list[str], description: str, now: str | None) -> dict:
    """An issue of the production project as GitLab's API shows it."""
    return {"id": PRODUCTION_PROJECT_ID * 1000 + iid, "iid": iid, "project_id": PRODUCTION_PROJECT_ID,
            "title": title, "description": description, "state": "opened", "labels": labels,
            "created_at": now, "updated_at": now, "closed_at": None,
            "author": user_json(base), "web_url": f"{base}/{PRODUCTION_PROJECT_PATH}/-/issues/{iid}"}


# -- the server --------------------------------------------------------------------------
class GitlabApi:
    """The QA GitLab instance; ``close()`` stops it and its running jobs."""

    def __init__(self, world: World):
        self.world = world
        self.config = world.config
        self.url = self.config.gitlab_url
        self.tokens = ensure_tokens(self.config)
        self.runner = QARunner(world)
        self.app = web.Application(middlewares=[self._auth])
        self._routes()
        self._runner: web.AppRunner | None = None

    def _routes(self) -> None:
        r = self.app.router
        api = "/api/v4"
        proj = f"{api}/projects/{{project}}"
        r.add_get(f"{api}/user", self.get_user)
        r.add_get(f"{api}/version", self.get_version)
        r.add_get(f"{api}/projects", self.list_projects)
        r.add_get(proj, self.get_project)
        r.add_post(f"{proj}/trigger/pipeline", self.trigger)
        r.add_post(f"{proj}/pipeline", self.create_pipeline)
        r.add_get(f"{proj}/pipelines", self.list_pipelines)
        r.add_get(f"{proj}/pipelines/{{pid}}", self.get_pipeline)
        r.add_get(f"{proj}/pipelines/{{pid}}/jobs", self.list_pipeline_jobs)
        r.add_get(f"{proj}/pipelines/{{pid}}/variables", self.pipeline_variables)
        r.add_post(f"{proj}/pipelines/{{pid}}/cancel", self.cancel_pipeline)
        r.add_post(f"{proj}/pipelines/{{pid}}/retry", self.retry_pipeline)
        r.add_get(f"{proj}/jobs", self.list_jobs)
        r.add_get(f"{proj}/jobs/{{jid}}", self.get_job)
        r.add_get(f"{proj}/jobs/{{jid}}/trace", self.job_trace)
        r.add_post(f"{proj}/jobs/{{jid}}/cancel", self.cancel_job)
        r.add_post(f"{proj}/jobs/{{jid}}/retry", self.retry_job)
        r.add_get(f"/{QA_PROJECT_PATH}/-/pipelines/{{pid}}", self.pipeline_page)
        r.add_get(f"/{QA_PROJECT_PATH}/-/jobs/{{jid}}", self.job_page)
        self._repository_routes(proj)
        self._issue_routes(proj)

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.config.control_addr, self.config.gitlab_port).start()

    async def stop_serving(self) -> None:
        """The API goes away (the fault ``POST /faults/gitlab-api-down``): the port is closed and
        every open connection dropped; pipelines, jobs and issues are kept (GitLab's database)."""
        if self._runner is None:
            return
        for site in list(self._runner.sites):
            await site.stop()
        if self._runner.server is not None:
            for conn in list(self._runner.server.connections):
                conn.force_close()

    async def resume_serving(self) -> None:
        """Back on its port (``POST /faults/gitlab-api-up``)."""
        if self._runner is not None and not self._runner.sites:
            await web.TCPSite(self._runner, self.config.control_addr, self.config.gitlab_port).start()

    @property
    def serving(self) -> bool:
        return self._runner is not None and bool(self._runner.sites)

    async def close(self) -> None:
        await self.runner.close()
        if self._runner:
            await self._runner.cleanup()

    # -- auth and lookups ----------------------------------------------------------------
    @staticmethod
    def _private_token(request: web.Request) -> str:
        token = request.headers.get("PRIVATE-TOKEN") or request.query.get("private_token") or ""
        auth = request.headers.get("Authorization", "")
        if not token and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        return token

    def _authorized(self, request: web.Request) -> bool:
        token = self._private_token(request)
        return bool(token) and hmac.compare_digest(token, self.tokens["private_token"])

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        # As GitLab: a private token that is given but wrong is refused (401) on every API
        # path, the trigger one included; without one, only the trigger (its own token) passes.
        is_trigger = request.method == "POST" and request.path.endswith("/trigger/pipeline")
        open_trigger = is_trigger and not self._private_token(request)
        if request.path.startswith("/api/") and not open_trigger and not self._authorized(request):
            return _error(401, "401 Unauthorized")
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return _error(404, "404 Not Found")
        except web.HTTPBadRequest:
            return _error(400, "body is not a valid JSON object", "error")
        except web.HTTPMethodNotAllowed:
            return _error(405, "405 Method Not Allowed")

    @staticmethod
    def _project_ok(request: web.Request) -> bool:
        return request.match_info["project"] in (str(QA_PROJECT_ID), QA_PROJECT_PATH)

    def _pipeline(self, request: web.Request) -> Pipeline | None:
        if not self._project_ok(request):
            return None
        return self.runner.pipelines.get(_int(request.match_info["pid"], -1))

    def _job(self, request: web.Request) -> Job | None:
        if not self._project_ok(request):
            return None
        return self.runner.jobs.get(_int(request.match_info["jid"], -1))

    def _job_and_pipeline(self, request: web.Request) -> tuple[Job, Pipeline] | None:
        job = self._job(request)
        pipeline = self.runner.pipelines.get(job.pipeline_id) if job else None
        return (job, pipeline) if job and pipeline else None

    # -- handlers ------------------------------------------------------------------------
    async def get_user(self, request: web.Request) -> web.Response:
        return web.json_response(user_json(self.url))

    async def get_version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": SERVER_VERSION, "revision": "0ab19c4f", "enterprise": True})

    async def list_projects(self, request: web.Request) -> web.Response:
        return paginate(request, [project_json(self.url)])

    async def get_project(self, request: web.Request) -> web.Response:
        if not self._project_ok(request):
            return _error(404, "404 Project Not Found")
        return web.json_response(project_json(self.url))

    @staticmethod
    async def _params(request: web.Request) -> dict:
        """Query string, then the JSON or form body, as one dict (GitLab reads both)."""
        data: dict = dict(request.query)
        if request.content_type == "application/json":
            try:
                body = await request.json()
            except ValueError:
                raise web.HTTPBadRequest() from None
            if not isinstance(body, dict):
                raise web.HTTPBadRequest()
            data.update(body)
        elif request.can_read_body:
            data.update(await request.post())
        return data

    async def trigger(self, request: web.Request) -> web.Response:
        """``POST /projects/:id/trigger/pipeline`` with the trigger token."""
        data = await self._params(request)
        token = str(data.get("token") or "")
        if not self._project_ok(request) or not hmac.compare_digest(token, self.tokens["trigger_token"]):
            return _error(404, "404 Not Found")
        return self._run_pipeline(data, "trigger")

    async def create_pipeline(self, request: web.Request) -> web.Response:
        """``POST /projects/:id/pipeline`` (python-gitlab ``pipelines.create``), private token."""
        if not self._project_ok(request):
            return _error(404, "404 Project Not Found")
        return self._run_pipeline(await self._params(request), "api")

    def _run_pipeline(self, data: dict, source: str) -> web.Response:
        ref = data.get("ref")
        if not ref or not isinstance(ref, str):
            return _error(400, "ref is missing", "error")
        try:
            variables = parse_variables(data)
        except ValueError as e:
            return _error(400, str(e), "error")
        pipeline = self.runner.trigger(ref, variables, source)
        return web.json_response(pipeline_json(pipeline, self.url), status=201)

    async def list_pipelines(self, request: web.Request) -> web.Response:
        if not self._project_ok(request):
            return _error(404, "404 Project Not Found")
        q = request.query
        pipelines = list(self.runner.pipelines.values())
        for key in ("status", "ref", "source"):
            if q.get(key):
                pipelines = [p for p in pipelines if getattr(p, key) == q[key]]
        pipelines.sort(key=lambda p: p.id, reverse=q.get("sort", "desc") != "asc")
        return paginate(request, [pipeline_json(p, self.url) for p in pipelines])

    async def get_pipeline(self, request: web.Request) -> web.Response:
        pipeline = self._pipeline(request)
        if pipeline is None:
            return _error(404, "404 Not found")
        return web.json_response(pipeline_json(pipeline, self.url))

    async def list_pipeline_jobs(self, request: web.Request) -> web.Response:
        pipeline = self._pipeline(request)
        if pipeline is None:
            return _error(404, "404 Not found")
        include_retried = request.query.get("include_retried", "").lower() == "true"
        jobs = pipeline.jobs if include_retried else pipeline.current_jobs
        scopes = _scopes(request)
        if scopes:
            jobs = [j for j in jobs if j.status in scopes]
        return paginate(request, [job_json(j, pipeline, self.url) for j in jobs])

    async def pipeline_variables(self, request: web.Request) -> web.Response:
        pipeline = self._pipeline(request)
        if pipeline is None:
            return _error(404, "404 Not found")
        return web.json_response([{"key": k, "value": v, "variable_type": "env_var"}
                                  for k, v in pipeline.variables.items()])

    async def cancel_pipeline(self, request: web.Request) -> web.Response:
        pipeline = self._pipeline(request)
        if pipeline is None:
            return _error(404, "404 Not found")
        self.runner.cancel(pipeline)
        return web.json_response(pipeline_json(pipeline, self.url), status=201)

    async def retry_pipeline(self, request: web.Request) -> web.Response:
        pipeline = self._pipeline(request)
        if pipeline is None:
            return _error(404, "404 Not found")
        self.runner.retry(pipeline)
        return web.json_response(pipeline_json(pipeline, self.url), status=201)

    async def list_jobs(self, request: web.Request) -> web.Response:
        if not self._project_ok(request):
            return _error(404, "404 Project Not Found")
        jobs = sorted(self.runner.jobs.values(), key=lambda j: j.id, reverse=True)
        scopes = _scopes(request)
        if scopes:
            jobs = [j for j in jobs if j.status in scopes]
        pipelines = self.runner.pipelines
        return paginate(request, [job_json(j, pipelines[j.pipeline_id], self.url) for j in jobs
                                  if j.pipeline_id in pipelines])

    async def get_job(self, request: web.Request) -> web.Response:
        found = self._job_and_pipeline(request)
        if found is None:
            return _error(404, "404 Not found")
        return web.json_response(job_json(*found, self.url))

    async def job_trace(self, request: web.Request) -> web.Response:
        found = self._job_and_pipeline(request)
        if found is None:
            return _error(404, "404 Not found")
        return web.Response(text="\n".join(found[0].trace) + "\n", content_type="text/plain")

    async def cancel_job(self, request: web.Request) -> web.Response:
        found = self._job_and_pipeline(request)
        if found is None:
            return _error(404, "404 Not found")
        job, pipeline = found
        self.runner.cancel_job(job)
        return web.json_response(job_json(job, pipeline, self.url), status=201)

    async def retry_job(self, request: web.Request) -> web.Response:
        found = self._job_and_pipeline(request)
        if found is None:
            return _error(404, "404 Not found")
        job, pipeline = found
        if job.status in ("created", "pending", "running"):
            return _error(403, "403 Forbidden - Job is not retryable")
        new = self.runner.retry_job(job)
        return web.json_response(job_json(new, pipeline, self.url), status=201)

    # -- the application repository (lab.repository): compare and commits -----------------
    def _repository_routes(self, proj: str) -> None:
        """``GET /projects/:id/repository/compare?from=&to=``, ``.../repository/commits[/:sha]``
        of ``gitlab-org/gitlab``, whose history holds a commit per lab build (lab.repository)."""
        r = self.app.router
        r.add_get(f"{proj}/repository/compare", self.repository_compare)
        r.add_get(f"{proj}/repository/commits", self.repository_commits)
        r.add_get(f"{proj}/repository/commits/{{sha}}", self.repository_commit)

    def _repository(self, request: web.Request) -> Repository | None:
        if request.match_info["project"] not in (str(REPO_PROJECT_ID), REPO_PROJECT_PATH):
            return None
        return Repository.of_builds(self.world.builds.values())

    async def repository_compare(self, request: web.Request) -> web.Response:
        """Like GitLab: ``commits`` oldest first, ``commit`` the newest, 404 for an unknown ref."""
        repo = self._repository(request)
        if repo is None:
            return _error(404, "404 Project Not Found")
        from_ref, to_ref = request.query.get("from", ""), request.query.get("to", "")
        if not from_ref or not to_ref:
            return _error(400, "from is missing" if not from_ref else "to is missing", "error")
        commits = repo.compare(from_ref, to_ref)
        if commits is None:
            return _error(404, "404 Ref Not Found")
        return web.json_response({
            "commit": commits[-1].to_json(self.url) if commits else None,
            "commits": [c.to_json(self.url) for c in commits],
            "diffs": [], "compare_timeout": False,
            "compare_same_ref": from_ref == to_ref,
            "web_url": f"{self.url}/{REPO_PROJECT_PATH}/-/compare/{from_ref}...{to_ref}",
        })

    async def repository_commits(self, request: web.Request) -> web.Response:
        """The commits reachable from ``ref_name`` (default master), newest first, paginated."""
        repo = self._repository(request)
        if repo is None:
            return _error(404, "404 Project Not Found")
        commits = repo.log(request.query.get("ref_name") or None)
        if commits is None:
            return _error(404, "404 Ref Not Found")
        return paginate(request, [c.to_json(self.url) for c in commits])

    async def repository_commit(self, request: web.Request) -> web.Response:
        repo = self._repository(request)
        index = repo.resolve(request.match_info["sha"]) if repo is not None else None
        if repo is None or index is None:
            return _error(404, "404 Commit Not Found")
        return web.json_response(repo.commits[index].to_json(self.url))

    # -- the production project's issues: incidents and change requests -----------------
    def _issue_routes(self, proj: str) -> None:
        """Issues of ``gitlab-com/gl-infra/production`` (incidents, change requests), in memory:
        ``GET /projects/:id/issues?labels=a,b&state=opened`` (every label must match),
        ``POST /projects/:id/issues`` (title, labels, description), ``GET|PUT .../issues/:iid``
        (``state_event=close|reopen``, ``labels``). Tests open and close them with python-gitlab."""
        self.issues: dict[int, dict] = {}
        r = self.app.router
        r.add_get(f"{proj}/issues", self.list_issues)
        r.add_post(f"{proj}/issues", self.create_issue)
        r.add_get(f"{proj}/issues/{{iid}}", self.get_issue)
        r.add_put(f"{proj}/issues/{{iid}}", self.update_issue)

    @staticmethod
    def _production_ok(request: web.Request) -> bool:
        return request.match_info["project"] in (str(PRODUCTION_PROJECT_ID), PRODUCTION_PROJECT_PATH)

    def _issue(self, request: web.Request) -> dict | None:
        if not self._production_ok(request):
            return None
        return self.issues.get(_int(request.match_info["iid"], -1))

    async def list_issues(self, request: web.Request) -> web.Response:
        if not self._production_ok(request):
            return _error(404, "404 Project Not Found")
        wanted = set(parse_labels(request.query.get("labels")))
        state = request.query.get("state", "all")
        found = [i for i in sorted(self.issues.values(), key=lambda i: -i["iid"])
                 if wanted <= set(i["labels"]) and state in ("all", i["state"])]
        return paginate(request, found)

    async def create_issue(self, request: web.Request) -> web.Response:
        if not self._production_ok(request):
            return _error(404, "404 Project Not Found")
        data = await self._params(request)
        title = data.get("title")
        if not isinstance(title, str) or not title.strip():
            return _error(400, "title is missing", "error")
        iid = max(self.issues, default=0) + 1
        now = iso(time.time())
        self.issues[iid] = issue_json(self.url, iid, title.strip(), parse_labels(data.get("labels")),
                                      str(data.get("description") or ""), now)
        return web.json_response(self.issues[iid], status=201)

    async def get_issue(self, request: web.Request) -> web.Response:
        issue = self._issue(request)
        return web.json_response(issue) if issue else _error(404, "404 Not found")

    async def update_issue(self, request: web.Request) -> web.Response:
        issue = self._issue(request)
        if issue is None:
            return _error(404, "404 Not found")
        data = await self._params(request)
        now = iso(time.time())
        event = data.get("state_event")
        if event in ("close", "reopen"):
            closed = event == "close"
            issue.update(state="closed" if closed else "opened", closed_at=now if closed else None)
        if "labels" in data:
            issue["labels"] = parse_labels(data["labels"])
        issue["updated_at"] = now
        return web.json_response(issue)

    # -- HTML views ----------------------------------------------------------------------
    async def pipeline_page(self, request: web.Request) -> web.Response:
        pipeline = self.runner.pipelines.get(_int(request.match_info["pid"], -1))
        if pipeline is None:
            raise web.HTTPNotFound()
        rows = "".join(
            f'<tr><td><a href="/{QA_PROJECT_PATH}/-/jobs/{j.id}">#{j.id}</a></td>'
            f"<td>{html.escape(j.name)}</td><td>{j.status}</td></tr>"
            for j in pipeline.current_jobs
        )
        variables = html.escape(" ".join(f"{k}={v}" for k, v in pipeline.variables.items()))
        body = (f"<html><head><title>Pipeline #{pipeline.id}</title></head><body>"
                f"<h1>Pipeline #{pipeline.id}: {pipeline.status}</h1><p>ref {html.escape(pipeline.ref)}; "
                f"{variables}</p><table>{rows}</table></body></html>")
        return web.Response(text=body, content_type="text/html")

    async def job_page(self, request: web.Request) -> web.Response:
        job = self.runner.jobs.get(_int(request.match_info["jid"], -1))
        if job is None:
            raise web.HTTPNotFound()
        body = (f"<html><head><title>{html.escape(job.name)} #{job.id}</title></head><body>"
                f"<h1>{html.escape(job.name)} #{job.id}: {job.status}</h1>"
                f"<pre>{html.escape(chr(10).join(job.trace))}</pre></body></html>")
        return web.Response(text=body, content_type="text/html")


async def start(world: World) -> GitlabApi:
    """Serve the QA GitLab API on ``config.control_addr:config.gitlab_port``."""
    api = GitlabApi(world)
    await api._start()
    return api
