"""Background user traffic through every front end, so error and latency alerts have data.

Each front end (gstg's LB, the main front end of both gprd LBs, and the canary front
end) gets ``config.traffic_rps`` page requests a second, a mix of ``/``, ``/explore``,
``/api/v4/projects`` and ``/help``. Requests in flight per front end are bounded (a tick
that finds the bound reached is skipped), each has a timeout, and errors are counted,
never raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field

import aiohttp

from lab.model import World

log = logging.getLogger("lab.traffic")

PAGES = ("/", "/explore", "/api/v4/projects", "/help")
WEIGHTS = (4, 2, 3, 1)
TIMEOUT = 5.0
LOG_EVERY = 60.0  # seconds between two logged errors of one front end


@dataclass
class FrontEnd:
    name: str
    url: str
    canary: bool = False
    sent: int = 0
    ok: int = 0
    http_errors: int = 0  # answered with a status >= 500
    failed: int = 0  # connection errors and timeouts
    skipped: int = 0  # ticks dropped because the in-flight bound was reached
    in_flight: int = 0
    last_error: str = ""
    _last_log: float = field(default=0.0, repr=False)

    def stats(self) -> dict:
        return {"url": self.url, "sent": self.sent, "ok": self.ok, "http_errors": self.http_errors,
                "failed": self.failed, "skipped": self.skipped, "in_flight": self.in_flight,
                "last_error": self.last_error}


def front_ends(world: World) -> list[FrontEnd]:
    """gstg's front end, each gprd LB's main front end, and the canary front end."""
    topo, config = world.topology, world.config
    ends = [FrontEnd("gstg", topo.env_url("gstg"))]
    for lb in topo.lbs_for("gprd"):
        ends.append(FrontEnd(f"gprd:{lb.name}", f"http://{lb.addr}:{config.lb_http_port}"))
    ends.append(FrontEnd("gprd-cny", topo.env_url("gprd-cny"), canary=True))
    return ends


class Traffic:
    """Sends the traffic until ``close()``."""

    def __init__(self, world: World, rps: float | None = None, max_in_flight: int | None = None):
        self.world = world
        self.rps = world.config.traffic_rps if rps is None else rps
        self.max_in_flight = max_in_flight or max(8, int(self.rps * 4))
        self.front_ends = front_ends(world)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self._requests: set[asyncio.Task] = set()

    async def _start(self) -> None:
        if self.rps <= 0:
            return
        connector = aiohttp.TCPConnector(
            limit=self.max_in_flight * len(self.front_ends), keepalive_timeout=2.0
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=TIMEOUT),
            headers={"User-Agent": "lab-traffic"},
        )
        for fe in self.front_ends:
            self._tasks.append(asyncio.create_task(self._drive(fe), name=f"lab.traffic.{fe.name}"))

    async def _drive(self, fe: FrontEnd) -> None:
        interval = 1.0 / self.rps
        loop = asyncio.get_running_loop()
        next_at = loop.time() + random.uniform(0, interval)  # spread the front ends
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += interval * random.uniform(0.8, 1.2)
            if loop.time() - next_at > 5 * interval:  # fell behind (suspended?): do not burst
                next_at = loop.time() + interval
            if fe.in_flight >= self.max_in_flight:
                fe.skipped += 1
                continue
            task = asyncio.create_task(self._request(fe))
            self._requests.add(task)
            task.add_done_callback(self._requests.discard)

    async def _request(self, fe: FrontEnd) -> None:
        path = random.choices(PAGES, WEIGHTS)[0]
        headers = {"Cookie": "gitlab_canary=true"} if fe.canary else None
        fe.in_flight += 1
        fe.sent += 1
        try:
            assert self._session is not None
            async with self._session.get(fe.url + path, headers=headers, allow_redirects=False) as resp:
                await resp.read()
                if resp.status >= 500:
                    fe.http_errors += 1
                    self._note(fe, f"GET {path} -> {resp.status}")
                else:
                    fe.ok += 1
        except asyncio.CancelledError:
            raise
        except Exception as e:  # connection refused, reset, timeout, ...: count, never raise
            fe.failed += 1
            self._note(fe, f"GET {path}: {type(e).__name__}: {e}")
        finally:
            fe.in_flight -= 1

    def _note(self, fe: FrontEnd, error: str) -> None:
        fe.last_error = error
        now = time.monotonic()
        if now - fe._last_log >= LOG_EVERY:
            fe._last_log = now
            log.info("traffic to %s (%s): %s", fe.name, fe.url, error)

    def stats(self) -> dict[str, dict]:
        return {fe.name: fe.stats() for fe in self.front_ends}

    async def close(self) -> None:
        for task in self._tasks + list(self._requests):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, *self._requests, return_exceptions=True)
        self._tasks.clear()
        if self._session:
            await self._session.close()
            self._session = None


async def start(world: World, rps: float | None = None) -> Traffic:
    """Start sending background traffic to every front end (``rps`` overrides the config)."""
    traffic = Traffic(world, rps)
    await traffic._start()
    return traffic
