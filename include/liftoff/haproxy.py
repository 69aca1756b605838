"""HAProxy runtime API over every load balancer of an environment.

Each LB exposes its admin socket on TCP ``host:port``. HAProxy's non-interactive CLI runs
one line per connection; several commands go on that line joined by ``;`` and their
answers come back in order, each ended by an empty line. A change to a server is applied
in every backend that holds it, on every LB, with one connection per LB (long batches
are split into a few lines).

Before changing anything every LB is read (``show stat`` + ``show servers state``); an
unreachable LB raises :class:`HAProxyError` naming it and nothing is changed. If an LB
fails after others were changed, :class:`PartialApplication` says which LBs hold the change
and which do not. Async methods (``a*``) are the real implementation; the plain ones run
them with ``asyncio.run`` for callers outside an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

from liftoff.errors import HAProxyError, InvalidInput
from liftoff.inventory import Environment, LoadBalancerRef
from liftoff.versions import validate_name

log = logging.getLogger(__name__)

STATUSES = ("UP", "DOWN", "MAINT", "DRAIN", "NOLB")
ADMIN_STATES = ("ready", "drain", "maint")
# srv_admin_state bits (HAProxy src/server.h): forced/inherited/config/resolution/hostname maint,
# forced/inherited drain.
_ADMF_MAINT = 0x01 | 0x02 | 0x04 | 0x20 | 0x40
_ADMF_DRAIN = 0x08 | 0x10
MAX_LINE = 8000  # bytes per CLI line (HAProxy's buffer is 16 kB by default)


class PartialApplication(HAProxyError):
    """A change reached some load balancers but not all; both lists are named."""

    def __init__(self, action: str, applied: dict[str, list[str]], failed: dict[str, str]):
        self.action = action
        self.applied = applied
        self.failed = failed
        ok = ", ".join(sorted(applied)) or "none"
        bad = "; ".join(f"{lb}: {err}" for lb, err in sorted(failed.items()))
        super().__init__(f"{action} applied only partly: done on {ok}; NOT done on {bad}")


class ServerState(NamedTuple):
    """One server line of one backend on one LB (a named tuple: a 1,000-server LB is read
    several times a batch, and a frozen dataclass costs three times as much to build)."""

    lb: str
    backend: str
    server: str
    status: str  # UP, DOWN, MAINT, DRAIN, NOLB
    admin: str  # ready, drain, maint
    weight: int
    sessions: int
    address: str = ""
    raw_status: str = ""

    @property
    def in_service(self) -> bool:
        return self.status == "UP" and self.admin == "ready"


@dataclass
class ChangeResult:
    """What a drain/ready/maint/weight change did: ``backend/server`` per LB, hosts found nowhere."""

    action: str
    applied: dict[str, list[str]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Disagreement:
    """The same server reported differently by two or more LBs."""

    backend: str
    server: str
    states: dict[str, str]  # lb -> "STATUS/admin/weight"; "absent" when an LB lacks it


@functools.lru_cache(maxsize=256)
def base_status(raw: str) -> str:
    """``UP 1/3`` -> UP, ``MAINT (via x/y)`` -> MAINT, ``no check`` -> UP."""
    text = raw.strip()
    if text.lower() == "no check":
        return "UP"
    word = text.split(" ", 1)[0].split("(", 1)[0].upper()
    return word if word in STATUSES else "DOWN"


def admin_state(bits: int) -> str:
    if bits & _ADMF_MAINT:
        return "maint"
    if bits & _ADMF_DRAIN:
        return "drain"
    return "ready"


def split_answers(text: str, count: int) -> list[str]:
    """Cut the output of ``count`` ``;``-joined commands into one answer each.

    Every answer ends with an empty line and never contains one. Raises HAProxyError when
    fewer than ``count`` answers arrived (the LB closed the connection early)."""
    lines = text.split("\n")
    lines.pop()  # what follows the last newline: "" for a complete answer
    answers: list[str] = []
    current: list[str] = []
    for line in lines:
        if line == "":
            answers.append("\n".join(current))
            current = []
            if len(answers) == count:
                break
        else:
            current.append(line)
    if len(answers) < count:
        raise HAProxyError(f"incomplete answer: {len(answers)} of {count} command(s) answered")
    return answers


def _csv_rows(lines: Iterable[str]) -> Iterator[list[str]]:
    """CSV rows; a line without quotes (nearly every HAProxy line) is split without the csv
    module, which costs a fifth as much: a 1,000-server LB is read several times a batch."""
    for line in lines:
        if not line or line.isspace():
            continue
        yield next(csv.reader([line])) if '"' in line else line.split(",")


def _stat_rows(text: str, only: Collection[str] | None = None) -> tuple[list[str], Iterator[list[str]]]:
    """The header and the rows of a ``show stat`` answer; with ``only``, the rows of those
    servers (and any quoted row, which the caller sorts out): a batch's read of a 1,000-server
    LB splits a hundred rows, not a thousand."""
    lines = text.split("\n")
    first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
    if first is None or not lines[first].startswith("# "):
        raise HAProxyError(f"unexpected 'show stat' answer: {text[:120]!r}")
    header = lines[first][2:].rstrip("\r").split(",")
    body: Iterable[str] = (ln.rstrip("\r") for ln in lines[first + 1:])
    if only is not None and "svname" in header:
        sv = header.index("svname")
        body = (ln for ln in body if '"' in ln or _field(ln, ",", sv) in only)
    return header, _csv_rows(body)


def _field(line: str, sep: str | None, index: int) -> str | None:
    """Field ``index`` of a line without splitting the rest of it (None when it is short)."""
    parts = line.split(sep, index + 1)
    return parts[index] if len(parts) > index else None


def _admin_of(text: str, only: Collection[str] | None = None
              ) -> dict[tuple[str, str], tuple[str, str | None, str | None]]:
    """``show servers state`` -> {(backend, server): (srv_admin_state, srv_uweight, srv_op_state)},
    the last two None when the header lacks them; with ``only``, those servers' lines."""
    out: dict[tuple[str, str], tuple[str, str | None, str | None]] = {}
    cols: tuple[int, int, int, int | None, int | None] | None = None
    need = 0
    for line in text.split("\n"):
        if line.startswith("# "):
            header = line[2:].split()
            if not {"be_name", "srv_name", "srv_admin_state"} <= set(header):
                cols = None
                continue
            cols = (header.index("be_name"), header.index("srv_name"), header.index("srv_admin_state"),
                    header.index("srv_uweight") if "srv_uweight" in header else None,
                    header.index("srv_op_state") if "srv_op_state" in header else None)
            need = max(c for c in cols if c is not None)
        elif cols is not None:
            if only is not None and _field(line, None, cols[1]) not in only:
                continue
            values = line.split()
            if len(values) <= need:
                continue
            b, s, a, w, o = cols
            out[(values[b], values[s])] = (values[a], None if w is None else values[w],
                                           None if o is None else values[o])
    return out


def process_of(info: str) -> str | None:
    """``Pid@Start_time_sec`` of a ``show info`` answer; None when it does not give both."""
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in info.splitlines())}
    pid, start = fields.get("Pid", ""), fields.get("Start_time_sec", "")
    return f"{pid}@{start}" if pid.isdigit() and start.isdigit() else None


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def server_states(lb: str, stat: str, state: str, only: Collection[str] | None = None) -> list[ServerState]:
    """Merge ``show stat`` (status, sessions) with ``show servers state`` (admin, user weight);
    with ``only``, the lines of those servers alone."""
    admin_rows = _admin_of(state, only)
    header, rows = _stat_rows(stat, only)
    if "pxname" not in header or "svname" not in header:
        raise HAProxyError(f"unexpected 'show stat' header: {','.join(header)[:120]!r}")
    width = len(header)
    # an absent column is index -1: a short row (or any row, when a column is absent) is padded
    # to the header's width plus one "" at the end
    cols = [header.index(f) if f in header else -1
            for f in ("pxname", "svname", "type", "status", "weight", "scur", "addr")]
    px, sv, ty, st, wt, sc, ad = cols
    complete = -1 not in cols
    out = []
    for values in rows:
        if len(values) <= max(px, sv):
            continue
        if not complete or len(values) < width:
            values = [*values[:width], *[""] * (width - min(len(values), width)), ""]
        server = values[sv]
        if server in ("FRONTEND", "BACKEND") or values[ty] not in ("2", "") or (only is not None
                                                                               and server not in only):
            continue
        backend = values[px]
        raw = values[st]
        status = base_status(raw)
        extra = admin_rows.get((backend, server))
        if extra is not None:
            admin = admin_state(_int(extra[0]))
            weight = _int(extra[1], _int(values[wt]))
        else:
            admin = "maint" if status == "MAINT" else "drain" if status == "DRAIN" else "ready"
            weight = _int(values[wt])
        if admin == "drain" and status == "UP":
            status = "DRAIN"
        out.append(ServerState(lb, backend, server, status, admin, weight, _int(values[sc]), values[ad], raw))
    return out


def admin_states(lb: str, state: str) -> list[ServerState]:
    """Server lines from ``show servers state`` alone: admin state and user weight (what the
    reconcile compares), the status from the operational state (``srv_op_state`` 2: running),
    no session count. About a quarter of a ``show stat`` read's cost."""
    out = []
    for (backend, server), (bits, weight, op) in _admin_of(state).items():
        admin = admin_state(_int(bits))
        status = ("MAINT" if admin == "maint" else "DOWN" if op != "2"
                  else "DRAIN" if admin == "drain" else "UP")
        out.append(ServerState(lb, backend, server, status, admin, _int(weight), 0))
    return out


def _chunks(commands: Sequence[str], limit: int = MAX_LINE) -> list[list[str]]:
    out: list[list[str]] = []
    current: list[str] = []
    size = 0
    for cmd in commands:
        if current and size + len(cmd) + 1 > limit:
            out.append(current)
            current, size = [], 0
        current.append(cmd)
        size += len(cmd) + 1
    if current:
        out.append(current)
    return out


class HAProxy:
    """Every LB of one environment, addressed as one."""

    def __init__(self, lbs: Sequence[LoadBalancerRef], *, timeout: float = 10.0, poll: float = 0.5):
        self.lbs = tuple(lbs)
        self.timeout = timeout
        self.poll = poll
        self.marks: dict[str, dict[str, str | None]] = {}  # amark(): LB processes under a key
        # LB commands that failed or were refused so far: an LB may hold part of a change
        # (liftoff.fleet reconciles it in full at its next batch boundary)
        self.failures = 0

    @classmethod
    def for_env(cls, env: Environment, **kwargs) -> HAProxy:
        return cls(env.load_balancers, **kwargs)

    # -- transport -----------------------------------------------------------------------------
    async def asend(self, lb: LoadBalancerRef, commands: Sequence[str]) -> list[str]:
        """Run commands on one LB (one connection per ``;``-joined line); one answer per command."""
        answers: list[str] = []
        try:
            for chunk in _chunks(commands):
                answers.extend(await self._send_line(lb, chunk))
        except HAProxyError as exc:
            self.failures += 1
            if answers:
                raise HAProxyError(f"{exc} (after {len(answers)} of {len(commands)} command(s) were answered "
                                   "on earlier connections)") from None
            raise
        return answers

    async def _send_line(self, lb: LoadBalancerRef, chunk: list[str]) -> list[str]:
        """One connection, one ``;``-joined line."""
        line = ";".join(chunk)
        if "\n" in line or "\r" in line:
            raise InvalidInput("HAProxy command contains a newline")
        try:
            opening = asyncio.open_connection(lb.host, lb.port)
            reader, writer = await asyncio.wait_for(opening, self.timeout)
        except (OSError, TimeoutError) as exc:
            raise HAProxyError(f"load balancer {lb.name} ({lb.admin}) is unreachable: "
                               f"{type(exc).__name__}: {exc}") from None
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), self.timeout)
        except (OSError, TimeoutError) as exc:
            raise HAProxyError(f"load balancer {lb.name} ({lb.admin}) failed during "
                               f"'{chunk[0][:60]}': {type(exc).__name__}: {exc}") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        try:
            return split_answers(data.decode("utf-8", errors="replace"), len(chunk))
        except HAProxyError as exc:
            raise HAProxyError(f"load balancer {lb.name} ({lb.admin}): {exc}") from None

    async def _read(self, lb: LoadBalancerRef, only: Collection[str] | None = None) -> list[ServerState]:
        stat, state = await self.asend(lb, ["show stat -1 4 -1", "show servers state"])
        return server_states(lb.name, stat, state, only)

    # -- reading ---------------------------------------------------------------------------------
    async def _every_lb(self, read: Callable[[LoadBalancerRef], Any]) -> dict[str, Any]:
        """``read(lb)`` on every LB at once; HAProxyError naming each LB that failed."""
        results = await asyncio.gather(*(read(lb) for lb in self.lbs), return_exceptions=True)
        errors = [str(r) for r in results if isinstance(r, BaseException)]
        if errors:
            raise HAProxyError("; ".join(errors))
        return {lb.name: r for lb, r in zip(self.lbs, results, strict=True)}

    async def asnapshot(self, only: Collection[str] | None = None) -> dict[str, list[ServerState]]:
        """Every server line of every LB (with ``only``: of those servers); raises HAProxyError
        naming each unreachable LB."""
        return await self._every_lb(lambda lb: self._read(lb, only))

    async def aadmin_snapshot(self) -> dict[str, list[ServerState]]:
        """Every server line's admin state and user weight on every LB (:func:`admin_states`,
        no session counts): the reconcile's read."""

        async def read(lb: LoadBalancerRef) -> list[ServerState]:
            return admin_states(lb.name, (await self.asend(lb, ["show servers state"]))[0])

        return await self._every_lb(read)

    async def aservers(self, host_name: str | None = None) -> dict[str, list[ServerState]]:
        """``{lb: [ServerState]}`` for one host (every backend it is in), or for every server."""
        return await self.asnapshot(None if host_name is None else {host_name})

    async def aprocesses(self) -> dict[str, str | None]:
        """Which HAProxy process each LB runs (``show info``: ``Pid@Start_time_sec``; None when it
        does not say): another one after a restart, which lost every runtime change when it had no
        server-state file. HAProxyError naming an LB that cannot be read."""
        infos = await self._every_lb(lambda lb: self.asend(lb, ["show info"]))
        return {name: process_of(answers[0]) for name, answers in infos.items()}

    async def amark(self, key: str) -> None:
        """Remember each LB's process under ``key`` (see :meth:`arestarted_since`)."""
        self.marks[key] = await self.aprocesses()

    async def arestarted_since(self, key: str) -> list[str]:
        """The LBs running another HAProxy process than at :meth:`amark` ``key`` (the mark is
        dropped); [] without a mark or where an LB does not say."""
        before = self.marks.pop(key, None)
        if not before:
            return []
        now = await self.aprocesses()
        return sorted(lb for lb, p in now.items() if p is not None and before.get(lb) not in (None, p))

    async def adisagreements(self) -> list[Disagreement]:
        """Servers whose status, admin state or weight differ between LBs."""
        snap = await self.asnapshot()
        return disagreements(snap)

    # -- changing --------------------------------------------------------------------------------
    async def _apply(self, action: str, hosts: Iterable[str], make: Callable[[str], str],
                     backends: Iterable[str] | None = None,
                     snapshot: dict[str, list[ServerState]] | None = None,
                     label: str | None = None) -> ChangeResult:
        """``label`` (e.g. ``batch 2 of web``) stands for the host names in the log line."""
        names = [validate_name("server", h) for h in hosts]
        wanted = set(names)
        only = None if backends is None else set(backends)
        # every LB must answer before anything changes (a caller may pass a snapshot it has just
        # taken of every LB)
        snap = snapshot if snapshot is not None and set(snapshot) == {lb.name for lb in self.lbs} \
            else await self.asnapshot(wanted)
        targets: dict[str, list[str]] = {}
        for lb in self.lbs:
            here = [f"{validate_name('backend', s.backend)}/{s.server}"
                    for s in snap[lb.name] if s.server in wanted and (only is None or s.backend in only)]
            if here:
                targets[lb.name] = here
        found = {t.split("/", 1)[1] for ts in targets.values() for t in ts}
        result = ChangeResult(action, missing=[h for h in names if h not in found])
        commands = {n: [make(t) for t in ts] for n, ts in targets.items()}
        result.applied = await self._send_each(action, commands, targets)
        if names:
            if label:
                log.info("haproxy %s: %s, %d host(s) on %d LB(s)", action, label, len(names),
                         len(result.applied))
            else:
                log.info("haproxy %s: %s on %d LB(s)", action, ", ".join(names), len(result.applied))
        return result

    async def adrain(self, hosts: Iterable[str], backends: Iterable[str] | None = None, *,
                     snapshot: dict[str, list[ServerState]] | None = None,
                     label: str | None = None) -> ChangeResult:
        """Drain the hosts in every backend (or only ``backends``) on every LB."""
        return await self._apply("drain", hosts, lambda t: f"set server {t} state drain", backends, snapshot,
                                 label)

    async def aready(self, hosts: Iterable[str], backends: Iterable[str] | None = None, *,
                     label: str | None = None) -> ChangeResult:
        return await self._apply("ready", hosts, lambda t: f"set server {t} state ready", backends,
                                 label=label)

    async def amaint(self, hosts: Iterable[str], backends: Iterable[str] | None = None) -> ChangeResult:
        return await self._apply("maint", hosts, lambda t: f"set server {t} state maint", backends)

    async def aset_weight(self, hosts: Iterable[str], weight: int,
                          backends: Iterable[str] | None = None) -> ChangeResult:
        """Set the weight in every backend holding the hosts, or only in ``backends`` (a canary
        server weighs 5 in the main backend and 100 in its canary backend)."""
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 256:
            raise InvalidInput(f"HAProxy weight must be an integer 0..256, got {weight!r}")
        return await self._apply(f"weight {weight}", hosts, lambda t: f"set weight {t} {weight}", backends)

    async def aput_back(self, commands: dict[str, list[str]], action: str = "reconcile") -> list[str]:
        """Run ``set server``/``set weight`` commands on the named LBs (liftoff.lbstate builds them
        from a snapshot); the LBs done. PartialApplication when an LB failed or refused one."""
        todo = {name: cmds for name, cmds in commands.items() if cmds}
        return list(await self._send_each(action, todo, todo))

    async def _send_each(self, action: str, commands: dict[str, list[str]],
                         shown: dict[str, list[str]]) -> dict[str, list[str]]:
        """Each LB's commands at once; ``{lb: shown[lb]}`` of the LBs that took every one (an
        answer is an error; ``shown`` names the commands in errors). PartialApplication when an LB
        failed or refused one."""
        lb_by_name = {lb.name: lb for lb in self.lbs}

        async def one(name: str) -> None:
            answers = await self.asend(lb_by_name[name], commands[name])
            errors = [f"{t}: {a.strip()}" for t, a in zip(shown[name], answers, strict=True) if a.strip()]
            if errors:
                self.failures += 1
                raise HAProxyError("; ".join(errors))

        todo = list(commands)
        outcomes = await asyncio.gather(*(one(n) for n in todo), return_exceptions=True)
        failed = {n: str(o) for n, o in zip(todo, outcomes, strict=True) if isinstance(o, BaseException)}
        applied = {n: shown[n] for n in todo if n not in failed}
        if failed:
            raise PartialApplication(action, applied, failed)
        return applied

    # -- waiting ---------------------------------------------------------------------------------
    async def await_sessions_zero(self, hosts: Iterable[str], timeout: float) -> dict[str, int]:
        """Wait (at most ``timeout`` s) until the hosts hold no session on any LB.

        Returns the hosts still holding sessions (empty when all are idle)."""
        names = set(hosts)
        deadline = time.monotonic() + timeout
        while True:
            snap = await self.asnapshot(names)
            left: dict[str, int] = {}
            for states in snap.values():
                for s in states:
                    if s.server in names and s.sessions:
                        left[s.server] = left.get(s.server, 0) + s.sessions
            if not left or time.monotonic() >= deadline:
                return left
            await asyncio.sleep(min(self.poll, max(0.0, deadline - time.monotonic())))

    async def await_up(self, hosts: Iterable[str], timeout: float) -> dict[str, dict[str, str]]:
        """Wait (at most ``timeout`` s) until every LB reports each host UP (and ready) in every
        backend. Returns ``{host: {lb: status}}`` for those that are not (empty: all UP)."""
        names = set(hosts)
        deadline = time.monotonic() + timeout
        while True:
            snap = await self.asnapshot(names)
            bad: dict[str, dict[str, str]] = {}
            for lb, states in snap.items():
                for s in states:
                    if s.server in names and not s.in_service:
                        bad.setdefault(s.server, {})[lb] = f"{s.backend}:{s.raw_status or s.status}/{s.admin}"
            if not bad or time.monotonic() >= deadline:
                return bad
            await asyncio.sleep(min(self.poll, max(0.0, deadline - time.monotonic())))

    # -- sync API --------------------------------------------------------------------------------
    def servers(self, host_name: str | None = None) -> dict[str, list[ServerState]]:
        return asyncio.run(self.aservers(host_name))

    def snapshot(self) -> dict[str, list[ServerState]]:
        return asyncio.run(self.asnapshot())

    def drain(self, hosts: Iterable[str], backends: Iterable[str] | None = None) -> ChangeResult:
        return asyncio.run(self.adrain(list(hosts), backends))

    def ready(self, hosts: Iterable[str], backends: Iterable[str] | None = None) -> ChangeResult:
        return asyncio.run(self.aready(list(hosts), backends))

    def maint(self, hosts: Iterable[str], backends: Iterable[str] | None = None) -> ChangeResult:
        return asyncio.run(self.amaint(list(hosts), backends))

    def set_weight(self, hosts: Iterable[str], weight: int,
                   backends: Iterable[str] | None = None) -> ChangeResult:
        return asyncio.run(self.aset_weight(list(hosts), weight, backends))

    def wait_sessions_zero(self, hosts: Iterable[str], timeout: float) -> dict[str, int]:
        return asyncio.run(self.await_sessions_zero(list(hosts), timeout))

    def wait_up(self, hosts: Iterable[str], timeout: float) -> dict[str, dict[str, str]]:
        return asyncio.run(self.await_up(list(hosts), timeout))

    def disagreements(self) -> list[Disagreement]:
        return asyncio.run(self.adisagreements())


def disagreements(snap: dict[str, list[ServerState]]) -> list[Disagreement]:
    """Servers reported differently (status, admin state, weight, or absent) across LBs."""
    if len(snap) < 2:
        return []
    seen: dict[tuple[str, str], dict[str, str]] = {}
    for lb, states in snap.items():
        for s in states:
            seen.setdefault((s.backend, s.server), {})[lb] = f"{s.status}/{s.admin}/{s.weight}"
    out = []
    for (backend, server), by_lb in sorted(seen.items()):
        full = {lb: by_lb.get(lb, "absent") for lb in snap}
        if len(set(full.values())) > 1:
            out.append(Disagreement(backend, server, full))
    return out


def out_of_service(snap: dict[str, list[ServerState]]) -> dict[str, str]:
    """Servers not in service on some LB: ``{server: "lb backend STATUS/admin"}`` (first seen)."""
    out: dict[str, str] = {}
    for lb, states in snap.items():
        for s in states:
            if not s.in_service and s.server not in out:
                out[s.server] = f"{lb} {s.backend} {s.raw_status or s.status}/{s.admin}"
    return out


def lb_hosts(snap: dict[str, list[ServerState]]) -> set[str]:
    """Every server name present on any LB."""
    return {s.server for states in snap.values() for s in states}
