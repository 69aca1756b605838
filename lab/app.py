"""The simulated GitLab application: one HTTP server answering on every host address.

One aiohttp low-level server (no router, no access log) is shared by one listening
socket per host address at ``config.app_port``. A request learns its host from the
address it was dialled on and behaves as that host's running build dictates.

A host with ``reachable=False`` does not answer: its listening socket is closed
(connection refused) and requests still arriving on kept-alive connections are reset.
Listeners follow the world every ``SYNC_INTERVAL`` seconds, and at once when labd's
control API runs its reachability hooks (``lab.control.add_reachability_hook``).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import json
import logging
import random
import resource
import socket
import struct
import time

from aiohttp import web

from lab.model import Build, HostState, World

log = logging.getLogger("lab.app")

SYNC_INTERVAL = 0.25
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HEALTH_PATHS = ("/-/health", "/-/readiness", "/-/liveness")
PAGE_PATHS = ("/", "/explore", "/help", "/api/v4/projects")
OTHER_HANDLER = "other"

_PAGE_TITLES = {"/": "Projects", "/explore": "Explore projects", "/help": "Help"}
_PROJECTS = [
    {"id": 278964, "path_with_namespace": "gitlab-org/gitlab", "name": "GitLab", "star_count": 4700},
    {"id": 250833, "path_with_namespace": "gitlab-org/gitlab-runner", "name": "GitLab Runner",
     "star_count": 2400},
    {"id": 20699, "path_with_namespace": "gitlab-org/omnibus-gitlab", "name": "Omnibus GitLab",
     "star_count": 900},
]
_ERROR_PAGE = (
    "<!DOCTYPE html><html><head><title>Something went wrong (500)</title></head>"
    "<body><h1>500</h1><h3>We're sorry. Something went wrong on our end.</h3></body></html>"
)


def revision(version: str) -> str:
    """A stable fake git revision for a version."""
    return hashlib.sha1(version.encode()).hexdigest()[:11]


def page_body(path: str, host: str, version: str) -> tuple[str, str]:
    """Body and content type of a page."""
    if path == "/api/v4/projects":
        return json.dumps(_PROJECTS), "application/json"
    title = _PAGE_TITLES.get(path, "GitLab")
    body = (
        f"<!DOCTYPE html><html><head><title>{title} · GitLab</title>"
        f'<meta name="gitlab-version" content="{version}"></head>'
        f"<body><header>GitLab</header><main><h1>{title}</h1>"
        f"<p>Served by {host}, GitLab {version}</p></main></body></html>"
    )
    return body, "text/html"


def _labels(**labels: str) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return "{" + inner + "}"


ERROR_STATUSES = ("500", "502")  # what a host's app answers when it fails (502: puma down)


class HostMetrics:
    """Page traffic of one host, rendered as Prometheus text (no client library: cheap)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        # (method, handler) -> [per-bucket counts (+Inf last), sum of seconds]
        self.durations: dict[tuple[str, str], list] = {}

    def observe(self, method: str, handler: str, status: int, seconds: float) -> None:
        key = (method, handler, str(status))
        hist = self.durations.get((method, handler))
        if hist is None:
            hist = self.durations[(method, handler)] = [[0] * (len(BUCKETS) + 1), 0.0]
            # the error series exist from the handler's first request, at 0, as an instrumented
            # app initialises its labels: a series born at its first error hides that error from
            # rate() (a sparse 2% error rate read as 0 by the canary judge)
            for code in ERROR_STATUSES:
                self.requests.setdefault((method, handler, code), 0)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist[0][bisect.bisect_left(BUCKETS, seconds)] += 1
        hist[1] += seconds

    def render(self, state: HostState) -> str:
        out = [
            "# HELP http_requests_total Page requests served, by method, handler and status.",
            "# TYPE http_requests_total counter",
        ]
        for (method, handler, status), n in sorted(self.requests.items()):
            out.append(f"http_requests_total{_labels(method=method, handler=handler, status=status)} {n}")
        out += [
            "# HELP http_request_duration_seconds Page request duration.",
            "# TYPE http_request_duration_seconds histogram",
        ]
        for (method, handler), (counts, total) in sorted(self.durations.items()):
            cumulative = 0
            for le, n in zip((*BUCKETS, "+Inf"), counts, strict=True):
                cumulative += n
                labels = _labels(method=method, handler=handler, le=str(le))
                out.append(f"http_request_duration_seconds_bucket{labels} {cumulative}")
            labels = _labels(method=method, handler=handler)
            out.append(f"http_request_duration_seconds_sum{labels} {total:.6f}")
            out.append(f"http_request_duration_seconds_count{labels} {cumulative}")
        out += [
            "# HELP gitlab_build_info Version of GitLab the host runs.",
            "# TYPE gitlab_build_info gauge",
        ]
        if state.running:
            out.append(f"gitlab_build_info{_labels(version=state.running)} 1")
        out += [
            "# HELP gitlab_host_patches Post-deployment patches applied on the host.",
            "# TYPE gitlab_host_patches gauge",
            f"gitlab_host_patches {len(state.patches)}",
        ]
        return "\n".join(out) + "\n"


def _reset(transport) -> None:
    """Drop a connection with a TCP reset (an unreachable host answers nothing)."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def raise_fd_limit(wanted: int = 65536) -> None:
    """~1,000 listening sockets plus their connections need more than 1,024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class AppServer:
    """The GitLab app on every host address; ``close()`` stops it."""

    def __init__(self, world: World):
        self.world = world
        self.port = world.config.app_port
        self.metrics: dict[str, HostMetrics] = {name: HostMetrics() for name in world.topology.by_name}
        self.listeners: dict[str, asyncio.Server] = {}  # addr -> listening server
        self._server = web.Server(self.handle, access_log=None)
        self._sync_task: asyncio.Task | None = None
        self._sync_lock = asyncio.Lock()
        self._bind_errors: dict[str, str] = {}

    async def _start(self) -> None:
        raise_fd_limit()
        await self.sync()
        self._sync_task = asyncio.create_task(self._sync_loop(), name="lab.app.sync")
        try:  # labd's control API then applies host-down/up before it answers
            from lab import control

            control.add_reachability_hook(self.on_reachability_change)
        except (ImportError, AttributeError):
            pass

    async def on_reachability_change(self, world: World) -> None:
        await self.sync()

    async def sync(self) -> None:
        """Listen on the address of every reachable host, and only those."""
        async with self._sync_lock:
            loop = asyncio.get_running_loop()
            for host in self.world.topology.hosts:
                state = self.world.hosts.get(host.name)
                wanted = state is not None and state.reachable
                listener = self.listeners.get(host.addr)
                if wanted and listener is None:
                    try:
                        self.listeners[host.addr] = await loop.create_server(
                            self._server, host=host.addr, port=self.port, reuse_address=True, backlog=256
                        )
                        self._bind_errors.pop(host.addr, None)
                    except OSError as e:
                        if self._bind_errors.get(host.addr) != str(e):
                            log.error("cannot listen on %s:%s: %s", host.addr, self.port, e)
                            self._bind_errors[host.addr] = str(e)
                elif not wanted and listener is not None:
                    listener.close()
                    del self.listeners[host.addr]

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(SYNC_INTERVAL)
            try:
                await self.sync()
            except Exception:  # never let the app die on one bad sync
                log.exception("listener sync failed")

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        transport = request.transport
        sockname = transport.get_extra_info("sockname") if transport else None
        state = self.world.host_at(sockname[0]) if sockname else None
        if state is None or not state.reachable:
            _reset(transport)
            raise asyncio.CancelledError  # nothing is written to a reset connection
        version = state.running
        headers = {"X-Lab-Host": state.name}
        if version:
            headers["X-Gitlab-Version"] = version
        path = request.path
        if path in HEALTH_PATHS:
            return self._health(path, version, headers)
        if path == "/metrics":
            return web.Response(
                text=self.metrics[state.name].render(state),
                content_type="text/plain",
                charset="utf-8",
                headers=headers,
            )
        if path == "/api/v4/version":
            if not version:
                return web.json_response({"message": "502 Bad Gateway"}, status=502, headers=headers)
            body = {"version": version, "revision": revision(version), "enterprise": True}
            return web.json_response(body, headers=headers)
        if request.method == "OPTIONS":  # HAProxy's default httpchk
            return web.Response(status=200 if version else 503, headers=headers)
        return await self._page(request, state, self.world.build_running_on(state), headers)

    @staticmethod
    def _health(path: str, version: str | None, headers: dict) -> web.Response:
        ok = version is not None
        if path == "/-/health":
            text = "GitLab OK" if ok else "GitLab is not responding"
            return web.Response(text=text, status=200 if ok else 503, headers=headers)
        if path == "/-/readiness":
            status = "ok" if ok else "failed"
            body = {"status": status, "master_check": [{"status": status}]}
        else:
            body = {"status": "ok" if ok else "failed"}
        return web.json_response(body, status=200 if ok else 503, headers=headers)

    async def _page(
        self, request: web.BaseRequest, state: HostState, build: Build | None, headers: dict
    ) -> web.Response:
        started = time.monotonic()
        method = request.method
        handler = request.path if request.path in PAGE_PATHS else OTHER_HANDLER
        version = state.running
        if not version:
            # puma is down: nginx answers for it
            response = web.Response(text="502 Bad Gateway", status=502, headers=headers)
        elif method not in ("GET", "HEAD"):
            response = web.Response(text="405 Method Not Allowed", status=405, headers=headers)
        else:
            if build and build.latency_ms > 0:
                await asyncio.sleep(build.latency_ms / 1000)
            if build and build.error_rate > 0 and random.random() < build.error_rate:
                response = web.Response(text=_ERROR_PAGE, status=500, content_type="text/html",
                                        headers=headers)
            elif handler == OTHER_HANDLER:
                response = web.Response(text="404 Not Found", status=404, headers=headers)
            else:
                body, ctype = page_body(handler, state.name, version)
                response = web.Response(text=body, content_type=ctype, headers=headers)
        self.metrics[state.name].observe(method, handler, response.status, time.monotonic() - started)
        return response

    async def close(self) -> None:
        with contextlib.suppress(ImportError, AttributeError, ValueError):
            from lab import control

            control.REACHABILITY_HOOKS.remove(self.on_reachability_change)
        if self._sync_task:
            self._sync_task.cancel()
            await asyncio.gather(self._sync_task, return_exceptions=True)
        async with self._sync_lock:
            for listener in self.listeners.values():
                listener.close()
            self.listeners.clear()
        await self._server.shutdown(timeout=1.0)


async def start(world: World) -> AppServer:
    """Serve the GitLab app on every reachable host address."""
    app = AppServer(world)
    await app._start()
    return app
