"""labd: the simulated Omnibus fleet in one asyncio process.

``python -m lab.daemon --lab-dir DIR`` loads the lab's config and world and serves, until
SIGTERM or SIGINT: the host simulator behind sshd (:mod:`lab.hostsim`), the control API
(:mod:`lab.control`), chef runs (:mod:`lab.chef`) and, when present, the GitLab app on
every host address (``lab.app``), the GitLab API (``lab.gitlab_api``) and user traffic
(``lab.traffic``): each of those modules has ``async def start(world)`` returning an object
with an async ``close()``, or None.

Writes ``<lab_dir>/run/labd.pid`` and logs to ``<lab_dir>/log/labd.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import logging
import os
import signal
import sys
from pathlib import Path
from types import ModuleType

from lab import chef, control, hostsim
from lab.config import LabConfig
from lab.model import World

log = logging.getLogger("lab.daemon")

OPTIONAL_COMPONENTS = ("app", "gitlab_api", "traffic")
# Modules that may define ``on_reachability_change(world)`` (e.g. to reload sshd).
HOOK_MODULES = ("lab.sshd", "lab.configs", "lab.processes")


class _ServerCloser:
    def __init__(self, server: asyncio.Server):
        self.server = server

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


def _optional(name: str) -> ModuleType | None:
    module = f"lab.{name}"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        log.warning("%s is not there: labd runs without it", module)
        return None
    if not callable(getattr(mod, "start", None)):
        log.warning("%s has no start(world): labd runs without it", module)
        return None
    return mod


def _register_hooks() -> None:
    for module in HOOK_MODULES:
        try:
            if importlib.util.find_spec(module) is None:
                continue
            hook = getattr(importlib.import_module(module), "on_reachability_change", None)
        except Exception:
            log.exception("cannot import %s for its reachability hook", module)
            continue
        if callable(hook):
            control.add_reachability_hook(hook)
            log.info("reachability hook: %s.on_reachability_change", module)


def pid_file(config: LabConfig) -> Path:
    return config.path("run", "labd.pid")


async def serve(config: LabConfig, skip: tuple[str, ...] = ()) -> None:
    """Run labd until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    world = World.open(config)
    control.write_denied_addresses(world)  # before sshd's config is generated from it
    _register_hooks()
    closers: list = []
    try:
        closers.append(_ServerCloser(await hostsim.start(world)))
        closers.append(await control.start(world))
        closers.append(await chef.start(world))
        for name in OPTIONAL_COMPONENTS:
            if name in skip:
                log.info("lab.%s skipped", name)
                continue
            mod = _optional(name)
            if mod is None:
                continue
            result = mod.start(world)
            closer = await result if inspect.isawaitable(result) else result
            if closer is not None:
                closers.append(closer)
                control.COMPONENTS[name] = closer  # for the control API's faults (gitlab-api-down)
            log.info("lab.%s started", name)
        log.info("labd ready: %d hosts, hostsim %s:%d, control %s:%d", world.topology.size,
                 config.control_addr, config.hostsim_port, config.control_addr, config.control_port)
        await stop.wait()
        log.info("labd stopping")
    finally:
        for closer in reversed(closers):
            try:
                await closer.close()
            except Exception:
                log.exception("error closing %r", closer)
        world.close()


def _setup_logging(config: LabConfig) -> None:
    log_dir = config.path("log")
    log_dir.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_dir / "labd.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(file_handler)
    if not _same_file(sys.stderr, log_dir / "labd.log"):  # lab up sends stderr to labd.log
        err_handler = logging.StreamHandler(sys.stderr)
        err_handler.setLevel(logging.WARNING)
        root.addHandler(err_handler)


def _same_file(stream, path: Path) -> bool:
    try:
        a, b = os.fstat(stream.fileno()), os.stat(path)
    except (OSError, ValueError, AttributeError):
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _run(coro) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.daemon", description=__doc__.splitlines()[0])
    parser.add_argument("--lab-dir", type=Path, default=None, help="the lab directory (holds lab.json)")
    parser.add_argument("--skip", action="append", default=[], choices=OPTIONAL_COMPONENTS,
                        help="do not start this optional component (repeatable)")
    args = parser.parse_args(argv)
    config = LabConfig.load(args.lab_dir)
    _setup_logging(config)
    pid_path = pid_file(config)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    pid_path.write_text(f"{os.getpid()}\n")
    log.info("labd starting (pid %d, lab %s, octet %d)", os.getpid(), config.lab_dir, config.octet)
    try:
        _run(serve(config, tuple(args.skip)))
    except Exception:
        log.exception("labd failed")
        return 1
    finally:
        if pid_path.exists() and pid_path.read_text().strip() == str(os.getpid()):
            pid_path.unlink()
        log.info("labd stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
