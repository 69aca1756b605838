"""labd's control API on ``control_addr:control_port`` (used by ``python -m lab``).

``GET /health``, ``GET /status``, ``GET /builds``, ``POST /builds``,
``PATCH /builds/{version}`` (change a build's faults), ``POST /faults/host-down`` and
``POST /faults/host-up`` (``{"host": NAME}``), ``POST /faults/slow-install``
(``{"host": NAME, "seconds": S}``: that host's ``apt-get install`` takes S seconds instead of
``install_seconds``; 0 or no ``seconds`` lifts it), ``POST /faults/gitlab-api-down`` and
``POST /faults/gitlab-api-up`` (the GitLab API's port closed, its connections dropped, its
pipelines and issues kept; back again); the apt repositories of the builds at
``GET /apt/public/...`` and ``GET /apt/internal/...`` (:mod:`lab.apt_repo`).

When a host's reachability changes, every function in :data:`REACHABILITY_HOOKS` is called
with the world (``async def`` on the loop, plain functions in a thread); the first, default
one writes ``<lab_dir>/ssh/denied_addresses``. Add more with :func:`add_reachability_hook`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

from aiohttp import web

from lab import apt_repo
from lab.model import VERSION_RE, Build, HostState, World

log = logging.getLogger("lab.control")

ReachabilityHook = Callable[[World], Awaitable[None] | None]

BUILD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "nightly": bool,
    "error_rate": (int, float),
    "latency_ms": int,
    "install_fails_on": list,
    "migration_fails": bool,
    "qa_fails": bool,
    "includes_patches": list,
    "internal": bool,
    "sha": str,
}
SHA_RE = re.compile(r"^[0-9a-f]{7,40}$")


def denied_addresses_path(world: World) -> Path:
    return world.config.path("ssh", "denied_addresses")


def write_denied_addresses(world: World) -> None:
    """Default hook: one address per line for every unreachable host (atomic write)."""
    path = denied_addresses_path(world)
    path.parent.mkdir(parents=True, exist_ok=True)
    addrs = [state.addr for state in world.hosts.values() if not state.reachable]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{a}\n" for a in addrs))
    os.replace(tmp, path)


REACHABILITY_HOOKS: list[ReachabilityHook] = [write_denied_addresses]
# labd's optional components by name (lab.daemon fills it): the GitLab API's faults use it.
COMPONENTS: dict[str, object] = {}


def add_reachability_hook(hook: ReachabilityHook) -> ReachabilityHook:
    """Register ``hook(world)`` to run after a host goes down or up (e.g. reload sshd)."""
    if hook not in REACHABILITY_HOOKS:
        REACHABILITY_HOOKS.append(hook)
    return hook


async def on_reachability_change(world: World) -> list[str]:
    """Run every hook in order; returns the errors (a failing hook does not stop the others).

    Coroutine hooks run on the event loop, plain functions in a worker thread.
    """
    errors = []
    for hook in list(REACHABILITY_HOOKS):
        try:
            if inspect.iscoroutinefunction(hook):
                await hook(world)
            else:  # a sync hook may block (reloading sshd): keep the event loop free
                result = await asyncio.to_thread(hook, world)
                if inspect.isawaitable(result):
                    await result
        except Exception as exc:
            log.exception("reachability hook %r failed", hook)
            errors.append(f"{getattr(hook, '__name__', hook)}: {exc}")
    return errors


# -- views ---------------------------------------------------------------------------------
def host_json(state: HostState) -> dict:
    """A host as ``HostState.to_json()`` plus ``pids`` and a ``chef`` summary."""
    data = state.to_json()
    data["pids"] = {name: svc.pid for name, svc in state.services.items()}
    data["chef"] = {"running": state.chef_running, "disabled_reason": state.chef_disabled_reason,
                    "last_run": state.chef_last_run}
    return data


def builds_json(world: World) -> list[dict]:
    return [asdict(b) for b in sorted(world.builds.values(), key=lambda b: b.seq)]


def status_json(world: World) -> dict:
    config = world.config
    return {
        "config": {
            "lab_dir": str(config.lab_dir),
            "octet": config.octet,
            "net": config.net,
            "control_addr": config.control_addr,
            "ports": {"ssh": config.ssh_port, "app": config.app_port, "gitlab": config.gitlab_port,
                      "hostsim": config.hostsim_port, "control": config.control_port},
            "install_seconds": config.install_seconds,
            "migration_seconds": config.migration_seconds,
            "chef_interval": config.chef_interval,
            "traffic_rps": config.traffic_rps,
            "user": config.user,
            "size": world.topology.size,
        },
        "labd": {"pid": os.getpid(), "time": time.time()},
        "hosts": {name: host_json(state) for name, state in world.hosts.items()},
        "builds": builds_json(world),
        "databases": world.databases,
        "roles": world.roles,
        "faults": {**world.faults, "hosts_down": world.hosts_down()},
    }


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def validate_build(world: World, data: object, *, new: bool) -> dict:
    """Check a build request; returns the attributes or raises ValueError with the reason."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    attrs = dict(data)
    if new:
        version = attrs.pop("version", None)
        if not isinstance(version, str) or not VERSION_RE.match(version):
            raise ValueError(f"'version' must be a package version like 17.6.0-ee.0, got {version!r}")
        if version in world.builds:
            raise KeyError(f"build {version} already exists")
    unknown = sorted(set(attrs) - set(BUILD_FIELDS))
    if unknown:
        raise ValueError(f"unknown build attributes {unknown}; expected some of {sorted(BUILD_FIELDS)}")
    for name, value in attrs.items():
        kind = BUILD_FIELDS[name]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"{name!r} has the wrong type: {value!r}")
    if not 0 <= attrs.get("error_rate", 0) <= 1:
        raise ValueError("'error_rate' must be within 0..1")
    if attrs.get("latency_ms", 0) < 0:
        raise ValueError("'latency_ms' must be >= 0")
    for name in ("install_fails_on", "includes_patches"):
        if not all(isinstance(item, str) for item in attrs.get(name, [])):
            raise ValueError(f"{name!r} must be a list of strings")
    unknown_hosts = sorted(set(attrs.get("install_fails_on", [])) - set(world.hosts))
    if unknown_hosts:
        raise ValueError(f"'install_fails_on' names unknown hosts: {unknown_hosts}")
    if "sha" in attrs and not SHA_RE.match(attrs["sha"]):
        raise ValueError("'sha' must be 7 to 40 lowercase hex digits")
    if "error_rate" in attrs:
        attrs["error_rate"] = float(attrs["error_rate"])
    if new:
        attrs["version"] = version
    return attrs


async def _json_body(request: web.Request) -> object:
    try:
        return await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"body is not JSON: {exc}"}),
                                 content_type="application/json") from exc


def make_app(world: World) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/health")
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    @routes.get("/status")
    async def status(request: web.Request) -> web.Response:
        return web.json_response(status_json(world))

    @routes.get("/builds")
    async def list_builds(request: web.Request) -> web.Response:
        return web.json_response(builds_json(world))

    @routes.post("/builds")
    async def add_build(request: web.Request) -> web.Response:
        try:
            attrs = validate_build(world, await _json_body(request), new=True)
            build = world.add_build(attrs.pop("version"), **attrs)
        except KeyError as exc:
            return _error(409, exc.args[0])
        except ValueError as exc:
            return _error(400, str(exc))
        log.info("build added: %s", build.version)
        return web.json_response(asdict(build), status=201)

    @routes.patch("/builds/{version}")
    async def change_build(request: web.Request) -> web.Response:
        build: Build | None = world.builds.get(request.match_info["version"])
        if build is None:
            return _error(404, f"no build {request.match_info['version']}")
        try:
            attrs = validate_build(world, await _json_body(request), new=False)
        except ValueError as exc:
            return _error(400, str(exc))
        for name, value in attrs.items():
            setattr(build, name, value)
        world.save_builds()
        log.info("build %s changed: %s", build.version, attrs)
        return web.json_response(asdict(build))

    async def set_reachable(request: web.Request, reachable: bool) -> web.Response:
        data = await _json_body(request)
        name = data.get("host") if isinstance(data, dict) else None
        if not isinstance(name, str):
            return _error(400, 'expected {"host": NAME}')
        if name not in world.hosts:
            return _error(404, f"no host {name!r}")
        world.set_reachable(name, reachable)
        errors = await on_reachability_change(world)
        log.info("host %s is now %s", name, "up" if reachable else "down")
        body = {"host": name, "reachable": reachable, "hosts_down": world.hosts_down()}
        if errors:
            body["hook_errors"] = errors
        return web.json_response(body)

    @routes.post("/faults/host-down")
    async def host_down(request: web.Request) -> web.Response:
        return await set_reachable(request, False)

    @routes.post("/faults/host-up")
    async def host_up(request: web.Request) -> web.Response:
        return await set_reachable(request, True)

    @routes.post("/faults/slow-install")
    async def slow_install(request: web.Request) -> web.Response:
        data = await _json_body(request)
        name = data.get("host") if isinstance(data, dict) else None
        seconds = data.get("seconds", 0) if isinstance(data, dict) else None
        if not isinstance(name, str) or not isinstance(seconds, (int, float)) or isinstance(seconds, bool) \
                or seconds < 0:
            return _error(400, 'expected {"host": NAME, "seconds": S} with S >= 0')
        if name not in world.hosts:
            return _error(404, f"no host {name!r}")
        slow = world.faults.setdefault("slow_install", {})
        if seconds:
            slow[name] = float(seconds)
        else:
            slow.pop(name, None)
        if not slow:
            world.faults.pop("slow_install")
        log.info("slow install on %s: %s", name, f"{seconds} s" if seconds else "lifted")
        return web.json_response({"slow_install": dict(slow)})

    async def gitlab_api(up: bool) -> web.Response:
        api = COMPONENTS.get("gitlab_api")
        if api is None or not hasattr(api, "stop_serving"):
            return _error(409, "the GitLab API does not run in this labd")
        await (api.resume_serving() if up else api.stop_serving())
        if up:
            world.faults.pop("gitlab_api_down", None)
        else:
            world.faults["gitlab_api_down"] = True
        log.info("the GitLab API is %s", "back" if up else "down")
        return web.json_response({"gitlab_api": "up" if up else "down"})

    @routes.post("/faults/gitlab-api-down")
    async def gitlab_api_down(request: web.Request) -> web.Response:
        return await gitlab_api(False)

    @routes.post("/faults/gitlab-api-up")
    async def gitlab_api_up(request: web.Request) -> web.Response:
        return await gitlab_api(True)

    app = web.Application()
    app.add_routes(routes)
    apt_repo.add_routes(app, world)  # GET /apt/{public,internal}/...: the apt repositories
    app["world"] = world
    return app


class ControlServer:
    """The running control API; ``await close()`` stops it."""

    def __init__(self, runner: web.AppRunner):
        self.runner = runner

    async def close(self) -> None:
        await self.runner.cleanup()


async def start(world: World) -> ControlServer:
    runner = web.AppRunner(make_app(world), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, world.config.control_addr, world.config.control_port,
                       reuse_address=True, backlog=512)
    await site.start()
    return ControlServer(runner)
