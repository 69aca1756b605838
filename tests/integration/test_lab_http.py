"""The lab's HTTP side, in process: the app on host addresses, the QA GitLab API driven by
real python-gitlab, QA jobs over real HTTP, and background traffic.

No HAProxy here: QA_URL points straight at a host address, and front ends are stood in
for by small recording servers on the LB addresses. Octet 52, lab dirs /tmp/labhttp-*.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import stat
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import gitlab
import pytest
from aiohttp import web

import lab.app
import lab.gitlab_api
import lab.traffic
from lab.config import LabConfig
from lab.gitlab_api import QA_PROJECT_ID, QA_PROJECT_PATH
from lab.model import BASE_VERSION, World

OCTET = 52


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    """Run an async test body (no pytest-asyncio here)."""
    asyncio.run(asyncio.wait_for(coro_fn(), 90))


@pytest.fixture
def config():
    lab_dir = Path(tempfile.mkdtemp(prefix="labhttp-", dir="/tmp"))
    yield LabConfig(lab_dir=lab_dir, octet=OCTET)
    shutil.rmtree(lab_dir, ignore_errors=True)


@contextlib.asynccontextmanager
async def serving(world: World) -> AsyncIterator[tuple[lab.app.AppServer, lab.gitlab_api.GitlabApi]]:
    app = await lab.app.start(world)
    api = await lab.gitlab_api.start(world)
    try:
        yield app, api
    finally:
        await api.close()
        await app.close()


def run_version(world: World, host: str, version: str) -> None:
    """Make ``host`` run ``version`` (what install + restart would do)."""
    state = world.hosts[host]
    state.installed = version
    for service in state.services.values():
        service.version = version


def web_host(world: World, env: str = "gstg", index: int = 0):
    return world.topology.env_hosts(env, "web")[index]


def app_url(world: World, host) -> str:
    return f"http://{host.addr}:{world.config.app_port}"


async def fetch(session: aiohttp.ClientSession, url: str) -> tuple[int, dict, str]:
    async with session.get(url) as resp:
        return resp.status, dict(resp.headers), await resp.text()


def metric(text: str, name_and_labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name_and_labels + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- the app ---------------------------------------------------------------------------------
def test_app_answers_as_the_dialled_host(config):
    async def body():
        world = World.open(config)
        a, b = web_host(world, "gstg", 0), web_host(world, "gprd", 1)
        async with serving(world), aiohttp.ClientSession() as s:
            for host in (a, b):
                status, headers, text = await fetch(s, app_url(world, host) + "/-/health")
                assert (status, text) == (200, "GitLab OK")
                assert headers["X-Lab-Host"] == host.name
                assert headers["X-Gitlab-Version"] == BASE_VERSION
            status, _, text = await fetch(s, app_url(world, a) + "/-/readiness")
            assert status == 200 and json.loads(text)["status"] == "ok"
            status, _, text = await fetch(s, app_url(world, a) + "/-/liveness")
            assert status == 200 and json.loads(text)["status"] == "ok"
            status, _, text = await fetch(s, app_url(world, a) + "/api/v4/version")
            assert status == 200 and json.loads(text)["version"] == BASE_VERSION
            for path in ("/", "/explore", "/help"):
                status, headers, text = await fetch(s, app_url(world, a) + path)
                assert status == 200 and "GitLab" in text and headers["Content-Type"].startswith("text/html")
            status, _, text = await fetch(s, app_url(world, a) + "/api/v4/projects")
            assert status == 200 and isinstance(json.loads(text), list)
            status, headers, _ = await fetch(s, app_url(world, a) + "/no/such/page")
            assert status == 404 and headers["X-Lab-Host"] == a.name
            # deploy and gitaly hosts answer too: every host address serves the app
            gitaly = world.topology.env_hosts("gprd", "gitaly")[0]
            status, headers, _ = await fetch(s, app_url(world, gitaly) + "/-/health")
            assert status == 200 and headers["X-Lab-Host"] == gitaly.name

            _, _, text = await fetch(s, app_url(world, a) + "/metrics")
            assert metric(text, 'http_requests_total{method="GET",handler="/",status="200"}') == 1
            projects = 'http_requests_total{method="GET",handler="/api/v4/projects",status="200"}'
            assert metric(text, projects) == 1
            assert metric(text, 'http_requests_total{method="GET",handler="other",status="404"}') == 1
            assert "/-/health" not in text and 'handler="/metrics"' not in text
            assert metric(text, 'http_request_duration_seconds_count{method="GET",handler="/help"}') == 1
            assert metric(text, f'gitlab_build_info{{version="{BASE_VERSION}"}}') == 1
            assert metric(text, "gitlab_host_patches") == 0
            _, _, other = await fetch(s, app_url(world, b) + "/metrics")
            assert 'handler="/"' not in other  # metrics are per host

    run(body)


def test_app_follows_the_running_build_faults(config):
    async def body():
        world = World.open(config)
        world.add_build("17.6.0-ee.0", error_rate=1.0)
        world.add_build("17.6.1-ee.0", latency_ms=300)
        bad, slow = web_host(world, "gstg", 0), web_host(world, "gstg", 1)
        run_version(world, bad.name, "17.6.0-ee.0")
        run_version(world, slow.name, "17.6.1-ee.0")
        world.hosts[slow.name].patches = ["p1", "p2"]
        async with serving(world), aiohttp.ClientSession() as s:
            for _ in range(3):
                status, headers, _ = await fetch(s, app_url(world, bad) + "/explore")
                assert status == 500 and headers["X-Gitlab-Version"] == "17.6.0-ee.0"
            status, _, _ = await fetch(s, app_url(world, bad) + "/-/health")
            assert status == 200  # health checks are not pages: the fault does not touch them
            _, _, text = await fetch(s, app_url(world, bad) + "/metrics")
            assert metric(text, 'http_requests_total{method="GET",handler="/explore",status="500"}') == 3
            assert metric(text, 'gitlab_build_info{version="17.6.0-ee.0"}') == 1

            status, _, _ = await fetch(s, app_url(world, slow) + "/help")
            assert status == 200
            _, _, text = await fetch(s, app_url(world, slow) + "/metrics")
            labels = 'method="GET",handler="/help"'
            assert metric(text, f'http_request_duration_seconds_bucket{{{labels},le="0.25"}}') == 0
            assert metric(text, f'http_request_duration_seconds_bucket{{{labels},le="+Inf"}}') == 1
            assert metric(text, f"http_request_duration_seconds_sum{{{labels}}}") >= 0.25
            assert metric(text, "gitlab_host_patches") == 2

    run(body)


def test_host_without_running_version_fails_health(config):
    async def body():
        world = World.open(config)
        host = web_host(world)
        for service in world.hosts[host.name].services.values():
            service.version = None
        async with serving(world), aiohttp.ClientSession() as s:
            for path in ("/-/health", "/-/readiness", "/-/liveness"):
                status, headers, _ = await fetch(s, app_url(world, host) + path)
                assert status == 503 and "X-Gitlab-Version" not in headers
            status, _, _ = await fetch(s, app_url(world, host) + "/")
            assert status == 502

    run(body)


def test_unreachable_host_does_not_answer(config):
    async def body():
        world = World.open(config)
        host = web_host(world)
        world.hosts[host.name].reachable = False
        async with serving(world) as (app, _), aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientConnectionError):
                await fetch(s, app_url(world, host) + "/-/health")
            world.hosts[host.name].reachable = True
            await app.sync()
            status, _, _ = await fetch(s, app_url(world, host) + "/-/health")
            assert status == 200
            # a connection opened before the host went down is reset at its next request
            reader, writer = await asyncio.open_connection(host.addr, config.app_port)
            world.hosts[host.name].reachable = False
            writer.write(b"GET /-/health HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            with pytest.raises(ConnectionResetError):
                await reader.read(1024)
            writer.close()
            # and new connections are refused
            world.hosts[host.name].reachable = False
            await app.sync()
            for _ in range(2):
                with pytest.raises(aiohttp.ClientConnectionError):
                    await fetch(s, app_url(world, host) + "/-/health")
            # the poll loop picks up changes labd makes without calling sync()
            world.hosts[host.name].reachable = True
            deadline = time.monotonic() + 10
            while True:
                try:
                    status, _, _ = await fetch(s, app_url(world, host) + "/-/health")
                    break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline, "host never came back"
                    await asyncio.sleep(0.1)
            assert status == 200

    run(body)


# -- the GitLab API and QA -------------------------------------------------------------------
def gl_client(config: LabConfig, token: str) -> gitlab.Gitlab:
    return gitlab.Gitlab(config.gitlab_url, private_token=token, retry_transient_errors=False)


def wait_pipeline(project, pipeline_id: int, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        pipeline = project.pipelines.get(pipeline_id)
        if pipeline.status in ("success", "failed", "canceled"):
            return pipeline
        assert time.monotonic() < deadline, f"pipeline {pipeline_id} still {pipeline.status}"
        time.sleep(0.2)


def run_qa(config: LabConfig, tokens: dict, variables: dict) -> tuple[str, dict[str, tuple[str, str]]]:
    """Trigger QA like liftoff will, follow it; status and {job name: (status, trace)}."""
    gl = gl_client(config, tokens["private_token"])
    gl.auth()
    project = gl.projects.get(QA_PROJECT_PATH)
    triggered = project.trigger_pipeline("master", tokens["trigger_token"], variables=variables)
    assert triggered.status in ("created", "running")
    pipeline = wait_pipeline(project, triggered.id)
    jobs = {}
    for job in pipeline.jobs.list(get_all=True):
        assert job.stage == "qa" and job.pipeline["id"] == pipeline.id
        jobs[job.name] = (job.status, project.jobs.get(job.id).trace().decode())
    return pipeline.status, jobs


def test_api_needs_the_private_token(config):
    async def body():
        world = World.open(config)
        async with serving(world) as (_, api):
            def check():
                with pytest.raises(urllib.error.HTTPError) as err:
                    urllib.request.urlopen(f"{config.gitlab_url}/api/v4/user", timeout=5)
                assert err.value.code == 401
                assert json.loads(err.value.read()) == {"message": "401 Unauthorized"}
                with pytest.raises(gitlab.GitlabAuthenticationError):
                    gl_client(config, "glpat-wrong").auth()
                with pytest.raises(gitlab.GitlabAuthenticationError) as get_err:
                    gl_client(config, "glpat-wrong").projects.get(QA_PROJECT_ID)
                assert get_err.value.response_code == 401

                gl = gl_client(config, api.tokens["private_token"])
                gl.auth()
                assert gl.user.username == "liftoff-bot"
                assert gl.version()[0] != "unknown"
                project = gl.projects.get(QA_PROJECT_ID)
                assert project.path_with_namespace == QA_PROJECT_PATH
                with pytest.raises(gitlab.GitlabGetError) as missing:
                    gl.projects.get("gitlab-org/nope")
                assert missing.value.response_code == 404
                # the trigger token, not the private token, triggers; GitLab answers 404
                with pytest.raises(gitlab.GitlabCreateError) as trig:
                    project.trigger_pipeline("master", api.tokens["private_token"])
                assert trig.value.response_code == 404
                assert project.pipelines.list(get_all=True) == []

            await asyncio.to_thread(check)

    run(body)


def test_tokens_are_generated_once_and_private(config):
    async def body():
        world = World.open(config)
        async with serving(world) as (_, api):
            first = api.tokens
        file = config.path("secrets", "gitlab.json")
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        assert json.loads(file.read_text()) == first
        assert first["private_token"] != first["trigger_token"]
        async with serving(world) as (_, api):
            assert api.tokens == first

    run(body)


def test_qa_passes_on_a_healthy_build(config):
    async def body():
        world = World.open(config)
        host = web_host(world)
        async with serving(world) as (_, api):
            variables = {"QA_ENVIRONMENT": "gstg", "QA_URL": app_url(world, host),
                         "QA_EXPECTED_VERSION": BASE_VERSION}
            status, jobs = await asyncio.to_thread(run_qa, config, api.tokens, variables)
        assert status == "success"
        assert set(jobs) == {"qa-smoke-health", "qa-smoke-pages", "qa-smoke-version"}
        for name, (job_status, trace) in jobs.items():
            assert job_status == "success", trace
            assert trace.rstrip().endswith("Job succeeded"), name
            assert f"GET {app_url(world, host)}/" in trace and f"host={host.name}" in trace
        assert "/explore -> 200" in jobs["qa-smoke-pages"][1]

    run(body)


def test_qa_fails_on_server_errors(config):
    async def body():
        world = World.open(config)
        world.add_build("17.6.0-ee.0", error_rate=1.0)
        host = web_host(world)
        run_version(world, host.name, "17.6.0-ee.0")
        async with serving(world) as (_, api):
            variables = {"QA_ENVIRONMENT": "gstg", "QA_URL": app_url(world, host)}
            status, jobs = await asyncio.to_thread(run_qa, config, api.tokens, variables)
        assert status == "failed"
        assert jobs["qa-smoke-health"][0] == "success"  # health is not hit by page errors
        pages_status, trace = jobs["qa-smoke-pages"]
        assert pages_status == "failed"
        assert "returned HTTP 500" in trace and "ERROR: Job failed: exit code 1" in trace

    run(body)


def test_qa_fails_on_a_build_whose_qa_finds_a_bug(config):
    async def body():
        world = World.open(config)
        world.add_build("17.6.0-ee.0", qa_fails=True)
        host = web_host(world)
        run_version(world, host.name, "17.6.0-ee.0")
        async with serving(world) as (_, api):
            variables = {"QA_URL": app_url(world, host), "QA_EXPECTED_VERSION": "17.6.0-ee.0"}
            status, jobs = await asyncio.to_thread(run_qa, config, api.tokens, variables)
        assert status == "failed"
        for job_status, trace in jobs.values():
            assert job_status == "failed"
            assert "smoke spec failed against GitLab 17.6.0-ee.0" in trace

    run(body)


def test_qa_fails_on_a_version_mismatch_and_unreachable_front_end(config):
    async def body():
        world = World.open(config)
        host = web_host(world)
        async with serving(world) as (_, api):
            variables = {"QA_URL": app_url(world, host), "QA_EXPECTED_VERSION": "17.7.0-ee.0"}
            status, jobs = await asyncio.to_thread(run_qa, config, api.tokens, variables)
            assert status == "failed"
            assert "expected 17.7.0-ee.0" in jobs["qa-smoke-version"][1]
            # nothing listens on the LB address in this test: connection errors fail QA
            variables = {"QA_ENVIRONMENT": "gstg"}  # QA_URL defaults to the environment's
            status, jobs = await asyncio.to_thread(run_qa, config, api.tokens, variables)
            assert status == "failed"
            trace = jobs["qa-smoke-health"][1]
            assert world.topology.env_url("gstg") in trace and "connection error" in trace

    run(body)


@contextlib.asynccontextmanager
async def recorder(addr: str, port: int, version: str = BASE_VERSION):
    """A stand-in front end that records each request's path and cookie."""
    seen: list[tuple[str, str]] = []

    async def handle(request: web.BaseRequest) -> web.Response:
        seen.append((request.path, request.headers.get("Cookie", "")))
        headers = {"X-Gitlab-Version": version, "X-Lab-Host": "fe"}
        if request.path == "/api/v4/projects":
            return web.json_response([], headers=headers)
        if request.path == "/api/v4/version":
            return web.json_response({"version": version}, headers=headers)
        return web.Response(text="GitLab OK", headers=headers)

    server = web.Server(handle, access_log=None)
    listener = await asyncio.get_running_loop().create_server(server, addr, port)
    try:
        yield seen
    finally:
        listener.close()
        await server.shutdown(1)


def test_qa_canary_cookie_and_form_trigger(config):
    async def body():
        world = World.open(config)
        url = world.topology.env_url("gprd-cny")
        parsed = urllib.parse.urlsplit(url)
        async with serving(world) as (_, api), recorder(parsed.hostname, parsed.port) as seen:
            def trigger_with_curl_style_form() -> int:
                form = urllib.parse.urlencode({
                    "token": api.tokens["trigger_token"], "ref": "master",
                    "variables[QA_ENVIRONMENT]": "gprd-cny", "variables[QA_CANARY]": "true",
                }).encode()
                path = urllib.parse.quote(QA_PROJECT_PATH, safe="")
                with urllib.request.urlopen(
                    f"{config.gitlab_url}/api/v4/projects/{path}/trigger/pipeline", data=form, timeout=5
                ) as resp:
                    assert resp.status == 201
                    return json.loads(resp.read())["id"]

            pipeline_id = await asyncio.to_thread(trigger_with_curl_style_form)
            assert await api.runner.wait(api.runner.pipelines[pipeline_id]) == "success"

            def check():
                project = gl_client(config, api.tokens["private_token"]).projects.get(QA_PROJECT_ID)
                pipeline = project.pipelines.get(pipeline_id)
                variables = {v.key: v.value for v in pipeline.variables.list(get_all=True)}
                assert variables == {"QA_ENVIRONMENT": "gprd-cny", "QA_CANARY": "true"}
                assert [p.id for p in project.pipelines.list(get_all=True)] == [pipeline_id]
                # python-gitlab's pipelines.create (private token, variables as a list), with
                # the cookie given the way liftoff's QA client passes it
                created = project.pipelines.create({"ref": "main", "variables": [
                    {"key": "QA_URL", "value": url}, {"key": "QA_CANARY", "value": "true"},
                    {"key": "QA_COOKIES", "value": "gitlab_canary=true"}]})
                assert created.source == "api" and created.ref == "main"
                return created.id

            created_id = await asyncio.to_thread(check)
            assert await api.runner.wait(api.runner.pipelines[created_id]) == "success"
        assert len(seen) >= 30  # all six jobs went to the canary front end
        assert all(cookie == "gitlab_canary=true" for _, cookie in seen)
        assert {"/-/health", "/", "/explore", "/help", "/api/v4/projects", "/api/v4/version"} <= {
            p for p, _ in seen}

    run(body)


def test_control_api_hook_applies_host_down_at_once(config):
    async def body():
        from lab import control

        world = World.open(config)
        host = web_host(world)
        async with serving(world) as (app, _), aiohttp.ClientSession() as s:
            app._sync_task.cancel()  # only the hook may close the listener now
            world.set_reachable(host.name, False)
            await control.on_reachability_change(world)
            with pytest.raises(aiohttp.ClientConnectorError):
                await fetch(s, app_url(world, host) + "/-/health")
            world.set_reachable(host.name, True)
            await control.on_reachability_change(world)
            status, _, _ = await fetch(s, app_url(world, host) + "/-/health")
            assert status == 200
        assert app.on_reachability_change not in control.REACHABILITY_HOOKS

    run(body)


def test_cancel_retry_and_restart(config):
    async def body():
        world = World.open(config)
        world.add_build("17.6.0-ee.0", latency_ms=1500)
        host = web_host(world)
        run_version(world, host.name, "17.6.0-ee.0")
        async with serving(world) as (_, api):
            def cancel_then_retry() -> int:
                gl = gl_client(config, api.tokens["private_token"])
                project = gl.projects.get(QA_PROJECT_PATH)
                pipeline = project.trigger_pipeline(
                    "master", api.tokens["trigger_token"], variables={"QA_URL": app_url(world, host)})
                pipeline.cancel()
                assert wait_pipeline(project, pipeline.id).status == "canceled"
                run_version(world, host.name, BASE_VERSION)  # "fix" the environment, then retry
                pipeline.retry()
                assert wait_pipeline(project, pipeline.id).status == "success"
                current = project.pipelines.get(pipeline.id).jobs.list(get_all=True)
                every = project.pipelines.get(pipeline.id).jobs.list(get_all=True, include_retried=True)
                assert len(current) == 3 and len(every) == 6
                return pipeline.id

            pipeline_id = await asyncio.to_thread(cancel_then_retry)
        # a restarted API still knows its pipelines and numbers new ones after them
        async with serving(world) as (_, api):
            assert api.runner.pipelines[pipeline_id].status == "success"
            again = api.runner.trigger("master", {"QA_URL": app_url(world, host)})
            assert again.id == pipeline_id + 1
            assert await api.runner.wait(again) == "success"

    run(body)


# -- traffic ---------------------------------------------------------------------------------
def test_traffic_reaches_every_front_end_and_survives_errors(config):
    async def body():
        world = World.open(config)
        ends = lab.traffic.front_ends(world)
        assert [fe.name for fe in ends] == ["gstg", "gprd:fe-01-lb-gprd", "gprd:fe-02-lb-gprd", "gprd-cny"]
        listening, refused = ends[:3], ends[3]
        async with contextlib.AsyncExitStack() as stack:
            seen = {}
            for fe in listening:
                parsed = urllib.parse.urlsplit(fe.url)
                seen[fe.name] = await stack.enter_async_context(recorder(parsed.hostname, parsed.port))
            traffic = await lab.traffic.start(world, rps=20)
            try:
                deadline = time.monotonic() + 20
                while min(len(s) for s in seen.values()) < 5 or traffic.stats()[refused.name]["failed"] < 3:
                    assert time.monotonic() < deadline, traffic.stats()
                    await asyncio.sleep(0.1)
            finally:
                await traffic.close()
        stats = traffic.stats()
        for fe in listening:
            assert stats[fe.name]["ok"] >= 5 and stats[fe.name]["failed"] == 0
            assert {p for p, _ in seen[fe.name]} <= set(lab.traffic.PAGES)
            assert all(cookie == "" for _, cookie in seen[fe.name])
        assert stats[refused.name]["ok"] == 0 and stats[refused.name]["last_error"]

    run(body)


def test_canary_traffic_carries_the_canary_cookie(config):
    async def body():
        world = World.open(config)
        parsed = urllib.parse.urlsplit(world.topology.env_url("gprd-cny"))
        async with recorder(parsed.hostname, parsed.port) as seen:
            traffic = await lab.traffic.start(world, rps=20)
            try:
                deadline = time.monotonic() + 20
                while len(seen) < 5:
                    assert time.monotonic() < deadline, traffic.stats()
                    await asyncio.sleep(0.1)
            finally:
                await traffic.close()
        assert all(cookie == "gitlab_canary=true" for _, cookie in seen)

    run(body)
