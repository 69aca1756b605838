"""QA pipelines: real smoke checks against an environment's front end.

A triggered pipeline gets three jobs in stage ``qa`` that run in parallel as asyncio
tasks in labd (``created`` -> ``running`` -> ``success``/``failed``/``canceled``):

- ``qa-smoke-health``: ``GET /-/health`` a few times;
- ``qa-smoke-pages``: ``GET /``, ``/explore``, ``/help``, ``/api/v4/projects``, twice;
- ``qa-smoke-version``: ``GET /api/v4/version`` and ``/``; every answer must carry
  ``X-Gitlab-Version`` = ``QA_EXPECTED_VERSION`` (when given).

Variables: ``QA_ENVIRONMENT`` (gstg, gprd-cny, gprd), ``QA_URL`` (front end; defaults to
the environment's), ``QA_EXPECTED_VERSION``, ``QA_CANARY`` (``true`` sends the
``gitlab_canary=true`` cookie; the default for gprd-cny), ``QA_COOKIES`` (a Cookie header
to send, as GitLab QA reads it). A job fails on any non-2xx
answer, connection error or version mismatch, and when an answer comes from a build with
``qa_fails`` (the suite "finds a bug"). Pipelines persist under ``state/qa/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from lab.model import World, write_json
from lab.topology import ENVIRONMENTS

log = logging.getLogger("lab.qa")

STAGE = "qa"
CANARY_COOKIE = "gitlab_canary=true"
JOB_NAMES = ("qa-smoke-health", "qa-smoke-pages", "qa-smoke-version")
HEALTH_CHECKS = 5
PAGE_ROUNDS = 2
REQUEST_TIMEOUT = 5.0
JOB_TIMEOUT = 30.0
REQUEST_GAP = 0.1  # pause between requests: a job runs about a second
ACTIVE = ("created", "pending", "running")
FINISHED = ("success", "failed", "canceled")
KEEP_PIPELINES = 1000  # in memory; older ones stay on disk only


@dataclass
class Job:
    id: int
    pipeline_id: int
    name: str
    stage: str = STAGE
    status: str = "created"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    failure_reason: str | None = None
    retried: bool = False
    trace: list[str] = field(default_factory=list)

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        return (self.finished_at or time.time()) - self.started_at


@dataclass
class Pipeline:
    id: int
    ref: str
    variables: dict[str, str]
    source: str = "trigger"
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    jobs: list[Job] = field(default_factory=list)

    @property
    def iid(self) -> int:
        return self.id

    @property
    def current_jobs(self) -> list[Job]:
        return [j for j in self.jobs if not j.retried]

    @property
    def status(self) -> str:
        return pipeline_status([j.status for j in self.current_jobs])

    @property
    def started_at(self) -> float | None:
        times = [j.started_at for j in self.jobs if j.started_at is not None]
        return min(times) if times else None

    @property
    def finished_at(self) -> float | None:
        if self.status not in FINISHED:
            return None
        times = [j.finished_at for j in self.current_jobs if j.finished_at is not None]
        return max(times) if times else self.updated_at

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Pipeline:
        data = dict(data)
        data["jobs"] = [Job(**j) for j in data.get("jobs", [])]
        return cls(**data)


def pipeline_status(statuses: list[str]) -> str:
    """A pipeline's status from its jobs' statuses, as GitLab derives it."""
    if not statuses:
        return "created"
    if "running" in statuses:
        return "running"
    if any(s in ACTIVE for s in statuses):
        return "running" if any(s in FINISHED for s in statuses) else statuses[0]
    if "failed" in statuses:
        return "failed"
    if "canceled" in statuses:
        return "canceled"
    return "success"


@dataclass
class QASettings:
    """What a pipeline's variables ask for."""

    url: str | None
    environment: str | None
    expected_version: str | None
    canary: bool
    cookies: str = ""  # the Cookie header QA sends

    @classmethod
    def from_variables(cls, variables: dict[str, str], world: World | None = None) -> QASettings:
        env = variables.get("QA_ENVIRONMENT") or None
        url = variables.get("QA_URL") or None
        if not url and env in ENVIRONMENTS and world is not None:
            url = world.topology.env_url(env)
        canary_var = variables.get("QA_CANARY", "").strip().lower()
        canary = canary_var in ("true", "1", "yes") or (not canary_var and env == "gprd-cny")
        expected = variables.get("QA_EXPECTED_VERSION") or None
        cookies = "".join(c for c in variables.get("QA_COOKIES", "") if c not in "\r\n").strip()
        if canary and "gitlab_canary=" not in cookies:
            cookies = "; ".join(c for c in (cookies, CANARY_COOKIE) if c)
        return cls(url.rstrip("/") if url else None, env, expected, canary, cookies)


class SmokeCheck:
    """Makes a job's requests, logs each to the trace and collects failures."""

    def __init__(self, world: World, session: aiohttp.ClientSession, settings: QASettings, trace: list[str]):
        self.world = world
        self.session = session
        self.settings = settings
        self.trace = trace
        self.failures: list[str] = []
        self.requests = 0

    def fail(self, message: str) -> None:
        self.failures.append(message)
        self.trace.append(f"  FAILED: {message}")

    async def get(self, path: str) -> tuple[int, str, dict] | None:
        """GET ``path`` on the front end; checks status, version and QA faults."""
        url = f"{self.settings.url}{path}"
        headers = {"User-Agent": "gitlab-qa/lab"}
        if self.settings.cookies:
            headers["Cookie"] = self.settings.cookies
        self.requests += 1
        started = time.monotonic()
        try:
            async with self.session.get(url, headers=headers, allow_redirects=False) as resp:
                body = await resp.text(errors="replace")
                resp_headers = resp.headers.copy()  # keeps case-insensitive lookup
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            self.trace.append(f"GET {url} -> connection error: {type(e).__name__}: {e}")
            self.fail(f"GET {path}: {type(e).__name__}: {e}")
            return None
        ms = (time.monotonic() - started) * 1000
        version = resp_headers.get("X-Gitlab-Version")
        host = resp_headers.get("X-Lab-Host", "?")
        self.trace.append(f"GET {url} -> {status} ({ms:.0f} ms) host={host} version={version}")
        if not 200 <= status < 300:
            self.fail(f"GET {path} returned HTTP {status} (host {host})")
        expected = self.settings.expected_version
        if expected and version != expected:
            self.fail(f"GET {path}: X-Gitlab-Version is {version}, expected {expected} (host {host})")
        build = self.world.builds.get(version or "")
        if build is not None and build.qa_fails:
            self.fail(f"smoke spec failed against GitLab {version} (host {host}): "
                      "expected the page to render without errors")
        return status, body, resp_headers

    async def pause(self) -> None:
        await asyncio.sleep(REQUEST_GAP)


async def smoke_health(check: SmokeCheck) -> None:
    for _ in range(HEALTH_CHECKS):
        result = await check.get("/-/health")
        if result and result[0] == 200 and "GitLab OK" not in result[1]:
            check.fail(f"/-/health answered {result[1][:40]!r}")
        await check.pause()


async def smoke_pages(check: SmokeCheck) -> None:
    for _ in range(PAGE_ROUNDS):
        for path in ("/", "/explore", "/help", "/api/v4/projects"):
            result = await check.get(path)
            if result and result[0] == 200 and path == "/api/v4/projects":
                try:
                    if not isinstance(json.loads(result[1]), list):
                        check.fail("/api/v4/projects did not return a list")
                except ValueError:
                    check.fail("/api/v4/projects did not return JSON")
            await check.pause()


async def smoke_version(check: SmokeCheck) -> None:
    expected = check.settings.expected_version
    for path in ("/api/v4/version", "/", "/api/v4/version", "/", "/api/v4/version"):
        result = await check.get(path)
        if result and result[0] == 200 and path == "/api/v4/version":
            try:
                reported = json.loads(result[1]).get("version")
            except (ValueError, AttributeError):
                reported = None
            if expected and reported != expected:
                check.fail(f"/api/v4/version reports {reported}, expected {expected}")
        await check.pause()


CHECKS = {"qa-smoke-health": smoke_health, "qa-smoke-pages": smoke_pages, "qa-smoke-version": smoke_version}


async def run_check(world: World, name: str, variables: dict[str, str], trace: list[str]) -> bool:
    """Run one smoke job, appending to ``trace``; True when it passed."""
    settings = QASettings.from_variables(variables, world)
    trace.append("Running with gitlab-runner 17.5.0 (lab)")
    trace.append("  on lab-qa-runner (shell)")
    env_line = " ".join(f"{k}={variables[k]}" for k in sorted(variables) if k.startswith("QA_"))
    trace.append(f"$ export {env_line}" if env_line else "$ export")
    trace.append(f"$ bundle exec bin/qa Test::Instance::Smoke {settings.url or '$QA_URL'} --job {name}")
    if not settings.url:
        trace.append("ERROR: QA_URL is not set and QA_ENVIRONMENT names no environment")
        return False
    if settings.cookies:
        trace.append(f"Using cookies: {settings.cookies}")
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=2, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        check = SmokeCheck(world, session, settings, trace)
        await CHECKS[name](check)
    if check.failures:
        trace.append(f"{check.requests} requests, {len(check.failures)} failures:")
        trace.extend(f"  - {f}" for f in check.failures)
        return False
    trace.append(f"{check.requests} requests, 0 failures")
    return True


class QARunner:
    """Keeps QA pipelines, runs their jobs and saves them under ``state/qa/``."""

    def __init__(self, world: World, state_dir: Path | None = None):
        self.world = world
        self.state_dir = state_dir or world.state_dir / "qa"
        self.pipelines: dict[int, Pipeline] = {}
        self.jobs: dict[int, Job] = {}
        self._tasks: dict[int, asyncio.Task] = {}  # job id -> task
        self._next_pipeline = 1
        self._next_job = 1
        self._closing = False
        self._load()

    # -- persistence -------------------------------------------------------------------
    def _load(self) -> None:
        files = sorted(self.state_dir.glob("pipeline-*.json"), key=lambda p: int(p.stem.split("-")[1]))
        for file in files:
            try:
                pipeline = Pipeline.from_json(json.loads(file.read_text()))
            except (ValueError, TypeError, KeyError) as e:
                log.warning("skipping unreadable %s: %s", file, e)
                continue
            self._next_pipeline = max(self._next_pipeline, pipeline.id + 1)
            interrupted = False
            for job in pipeline.jobs:
                self._next_job = max(self._next_job, job.id + 1)
                if job.status in ACTIVE:  # labd stopped while it ran
                    job.trace.append("ERROR: Job failed: labd stopped while the job ran")
                    self._finish(job, "failed", "runner_system_failure")
                    interrupted = True
            self._remember(pipeline)
            if interrupted:
                self.save(pipeline)

    def _remember(self, pipeline: Pipeline) -> None:
        self.pipelines[pipeline.id] = pipeline
        for job in pipeline.jobs:
            self.jobs[job.id] = job
        while len(self.pipelines) > KEEP_PIPELINES:
            oldest = min(self.pipelines)
            if self.pipelines[oldest].status in ACTIVE:
                break
            for job in self.pipelines.pop(oldest).jobs:
                self.jobs.pop(job.id, None)

    def save(self, pipeline: Pipeline) -> None:
        pipeline.updated_at = time.time()
        write_json(self.state_dir / f"pipeline-{pipeline.id}.json", pipeline.to_json())

    # -- running -----------------------------------------------------------------------
    def trigger(self, ref: str, variables: dict[str, str], source: str = "trigger") -> Pipeline:
        """Create a pipeline and start its jobs."""
        pipeline = Pipeline(self._next_pipeline, ref, {k: str(v) for k, v in variables.items()}, source)
        self._next_pipeline += 1
        for name in JOB_NAMES:
            pipeline.jobs.append(self._new_job(pipeline, name))
        self._remember(pipeline)
        self.save(pipeline)
        for job in pipeline.jobs:
            self._start(pipeline, job)
        return pipeline

    def _new_job(self, pipeline: Pipeline, name: str) -> Job:
        job = Job(self._next_job, pipeline.id, name)
        self._next_job += 1
        self.jobs[job.id] = job
        return job

    def _start(self, pipeline: Pipeline, job: Job) -> None:
        task = asyncio.create_task(self._run(pipeline, job), name=f"qa-job-{job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda _t, jid=job.id: self._tasks.pop(jid, None))

    async def _run(self, pipeline: Pipeline, job: Job) -> None:
        job.status = "running"
        job.started_at = time.time()
        self.save(pipeline)
        try:
            passed = await asyncio.wait_for(
                run_check(self.world, job.name, pipeline.variables, job.trace), JOB_TIMEOUT
            )
        except TimeoutError:
            job.trace.append(f"ERROR: Job failed: execution took longer than {JOB_TIMEOUT:.0f}s")
            self._finish(job, "failed", "job_execution_timeout")
        except asyncio.CancelledError:
            if job.status == "running" and self._closing:
                job.trace.append("ERROR: Job failed: labd stopped while the job ran")
                self._finish(job, "failed", "runner_system_failure")
            elif job.status == "running":
                job.trace.append("Job was canceled")
                self._finish(job, "canceled", None)
            self.save(pipeline)
            raise
        except Exception as e:  # a bug in a check must fail the job, not kill labd
            log.exception("QA job %s crashed", job.id)
            job.trace.append(f"ERROR: Job failed (system failure): {type(e).__name__}: {e}")
            self._finish(job, "failed", "runner_system_failure")
        else:
            if passed:
                job.trace.append("Job succeeded")
                self._finish(job, "success", None)
            else:
                job.trace.append("ERROR: Job failed: exit code 1")
                self._finish(job, "failed", "script_failure")
        self.save(pipeline)

    @staticmethod
    def _finish(job: Job, status: str, reason: str | None) -> None:
        job.status = status
        job.failure_reason = reason
        job.finished_at = time.time()

    def cancel_job(self, job: Job) -> None:
        """Cancel one unfinished job."""
        if job.status not in ACTIVE:
            return
        task = self._tasks.get(job.id)
        if task:
            task.cancel()
        job.trace.append("Job was canceled")
        self._finish(job, "canceled", None)
        pipeline = self.pipelines.get(job.pipeline_id)
        if pipeline:
            self.save(pipeline)

    def cancel(self, pipeline: Pipeline) -> None:
        """Cancel the pipeline's unfinished jobs."""
        for job in pipeline.current_jobs:
            self.cancel_job(job)

    def retry_job(self, job: Job) -> Job:
        """Run a finished job again as a new job; the old one is marked retried."""
        pipeline = self.pipelines[job.pipeline_id]
        if job.status in ACTIVE or job.retried:
            return job
        job.retried = True
        new = self._new_job(pipeline, job.name)
        pipeline.jobs.append(new)
        self.save(pipeline)
        self._start(pipeline, new)
        return new

    def retry(self, pipeline: Pipeline) -> None:
        """Retry the pipeline's failed and canceled jobs."""
        for job in list(pipeline.current_jobs):
            if job.status in ("failed", "canceled"):
                self.retry_job(job)

    async def wait(self, pipeline: Pipeline) -> str:
        """Wait for a pipeline's jobs to finish (for labd and tests)."""
        while True:
            tasks = [self._tasks[j.id] for j in pipeline.current_jobs if j.id in self._tasks]
            if not tasks:
                return pipeline.status
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
