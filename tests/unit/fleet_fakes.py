"""Fakes for the fleet unit tests: a HAProxy runtime API over TCP and a Remote.

``FakeLB`` is a small asyncio TCP server speaking the subset of HAProxy's admin CLI liftoff
uses (``show stat -1 4 -1``, ``show servers state``, ``set server B/S state X``,
``set weight B/S W``, ``;``-joined, one line per connection, each answer ended by an empty
line). ``FakeRemote`` has ``Remote``'s interface and simulates Omnibus hosts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lab.hostsim import split_chain
from liftoff.inventory import HostRef, parse_inventory
from liftoff.remote import CommandFailed, CommandResult

STAT_HEADER = ("# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,"
               "wredis,status,weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,"
               "lbtot,tracked,type,rate,rate_lim,rate_max,check_status,addr")
STATE_HEADER = ("# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
                "srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health "
                "srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord")


@dataclass
class FakeServer:
    addr: str
    weight: int = 100
    admin: str = "ready"  # ready, drain, maint
    health: bool = True
    sessions: int = 0


_PIDS = itertools.count(4000)


class FakeLB:
    """One load balancer: ``backends[backend][server] = FakeServer``."""

    def __init__(self, name: str, host: str = "127.0.0.1"):
        self.name = name
        self.host = host
        self.port = 0
        self.backends: dict[str, dict[str, FakeServer]] = {}
        self.lines: list[str] = []  # every command line received
        self.server: asyncio.Server | None = None
        self.refuse = False  # close connections at once (an LB that fails mid-change)
        self.sessions_drop_after: dict[str, int] = {}  # server -> polls until sessions reach 0
        self.pid = next(_PIDS)  # the HAProxy process ("show info"); a restart runs another

    def add(self, backend: str, server: str, addr: str, weight: int = 100) -> None:
        self.backends.setdefault(backend, {})[server] = FakeServer(addr, weight)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    def status(self, s: FakeServer) -> str:
        if s.admin == "maint":
            return "MAINT"
        if not s.health:
            return "DOWN"
        return "DRAIN" if s.admin == "drain" else "UP"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode().strip()
        if self.refuse:
            writer.close()
            return
        self.lines.append(line)
        out = []
        for cmd in [c.strip() for c in line.split(";")]:
            out.append(self.execute(cmd))
        writer.write("".join(a + "\n" for a in out).encode())
        await writer.drain()
        writer.close()

    def execute(self, cmd: str) -> str:
        """One command's answer (without the terminating empty line)."""
        if cmd == "show stat -1 4 -1":
            rows = [STAT_HEADER]
            for b, servers in self.backends.items():
                for name, s in servers.items():
                    polls = self.sessions_drop_after.get(name)
                    if polls is not None:
                        self.sessions_drop_after[name] = polls - 1
                        s.sessions = 0 if polls <= 0 else s.sessions
                    fields = [b, name, "0", "0", str(s.sessions)] + ["0"] * 12
                    fields += [self.status(s), str(s.weight)] + ["0"] * 13
                    fields += ["2"] + ["0"] * 3 + ["L7OK", s.addr]
                    rows.append(",".join(fields))
            return "\n".join(rows) + "\n"
        if cmd == "show servers state":
            rows = ["1", STATE_HEADER]
            for bi, (b, servers) in enumerate(self.backends.items()):
                for si, (name, s) in enumerate(servers.items()):
                    bits = {"ready": 0, "drain": 8, "maint": 1}[s.admin]
                    op = 2 if s.health and s.admin != "maint" else 0
                    rows.append(f"{bi + 2} {b} {si + 1} {name} {s.addr.split(':')[0]} {op} {bits} {s.weight} "
                                f"{s.weight} 0 6 3 4 6 0 0 0 - 80 -")
            return "\n".join(rows) + "\n"
        m = re.fullmatch(r"set server (\S+)/(\S+) state (\S+)", cmd)
        if m:
            s = self.backends.get(m.group(1), {}).get(m.group(2))
            if s is None:
                return "No such server.\n"
            if m.group(3) not in ("ready", "drain", "maint"):
                return "'set server <srv> state' expects 'ready', 'drain' and 'maint'.\n"
            s.admin = m.group(3)
            return ""
        m = re.fullmatch(r"set weight (\S+)/(\S+) (\S+)", cmd)
        if m:
            s = self.backends.get(m.group(1), {}).get(m.group(2))
            if s is None:
                return "No such server.\n"
            s.weight = int(m.group(3))
            return ""
        if cmd == "show info":
            return f"Name: HAProxy\nPid: {self.pid}\nStart_time_sec: 1796321166\n"
        return "Unknown command.\n"

    def restarted(self) -> None:
        """Another HAProxy process from now on (what a kill -9 and start gives)."""
        self.pid = next(_PIDS)

    def server_state(self, name: str) -> list[FakeServer]:
        return [servers[name] for servers in self.backends.values() if name in servers]


@dataclass
class FakeHost:
    name: str
    role: str
    installed: str
    services: dict[str, int]
    running: str = ""
    chef_running: bool = True
    chef_reason: str = ""
    patches: list[str] = field(default_factory=list)
    reachable: bool = True

    def __post_init__(self) -> None:
        self.running = self.running or self.installed


SERVICES = {"web": ["puma", "workhorse", "nginx"], "api": ["puma", "workhorse", "nginx"],
            "git": ["puma", "workhorse", "nginx"], "gitaly": ["gitaly"], "sidekiq": ["sidekiq"], "deploy": []}


class FakeFleet:
    """Omnibus hosts as the host simulator sees them (commands are parsed like a shell)."""

    def __init__(self):
        self.hosts: dict[str, FakeHost] = {}
        self.builds: set[str] = set()
        self.install_fails_on: dict[str, set[str]] = {}  # version -> hosts
        self.hup_keeps_pid: set[str] = set()  # hosts whose HUP does not restart anything
        self.chef_stop_fails: set[str] = set()  # hosts whose chef-client-disable fails
        self.cut_install_session: set[str] = set()  # hosts whose install session is cut (no output)
        self.chef_role: str = ""
        self._pid = 1000

    def pid(self) -> int:
        self._pid += 1
        return self._pid

    def add(self, name: str, role: str, installed: str) -> None:
        self.hosts[name] = FakeHost(name, role, installed, {s: self.pid() for s in SERVICES[role]})
        self.builds.add(installed)

    def execute(self, name: str, command: str) -> tuple[int, str, str]:
        """Run a command or an ``A && B`` chain (stopping at the first failure, like a shell)."""
        code, outs, errs = 0, [], []
        for argv in split_chain(command):
            code, out, err = self._execute_one(name, argv, shlex.join(argv))
            outs.append(out)
            errs.append(err)
            if code != 0:
                break
        return code, "".join(outs), "".join(errs)

    def _execute_one(self, name: str, argv: list[str], command: str) -> tuple[int, str, str]:
        h = self.hosts[name]
        if argv and argv[0] == "echo":
            return 0, " ".join(argv[1:]) + "\n", ""
        if argv[:2] == ["dpkg-query", "-W"]:
            return 0, h.installed, ""
        if argv[0] == "chef-client-disable" and name in self.chef_stop_fails:
            return 1, "", "chef-client-disable: cannot write the disable file\n"
        if argv[0] == "chef-client-disable":
            h.chef_running, h.chef_reason = False, argv[1]
            return 0, "", ""
        if argv == ["chef-client-enable"]:
            h.chef_running, h.chef_reason = True, ""
            return 0, "", ""
        if argv[:3] == ["apt-get", "install", "-y"] and len(argv) == 4 and argv[3].startswith("gitlab-ee="):
            version = argv[3].split("=", 1)[1]
            if version not in self.builds or name in self.install_fails_on.get(version, set()):
                return 100, "", "E: Sub-process /usr/bin/dpkg returned an error code (1)\n"
            if h.installed != version:
                h.patches = []
            h.installed = version
            return 0, f"Setting up gitlab-ee ({version}) ...\n", ""
        if argv == ["gitlab-ctl", "reconfigure"]:
            return 0, "gitlab Reconfigured!\n", ""
        if argv[:2] == ["gitlab-ctl", "status"]:
            lines = [f"run: {s}: (pid {p}) 5s; run: log: (pid 99) 5s" for s, p in h.services.items()]
            return 0, "\n".join(lines) + "\n", ""
        if argv[:2] in (["gitlab-ctl", "restart"], ["gitlab-ctl", "hup"]) and len(argv) == 3:
            svc = argv[2]
            if svc not in h.services:
                return 1, "", f"fail: {svc}: runsv not running\n"
            if not (argv[1] == "hup" and name in self.hup_keeps_pid):
                h.services[svc] = self.pid()
            h.running = h.installed
            return 0, f"ok: run: {svc}: (pid {h.services[svc]}) 0s\n", ""
        if argv[:2] == ["gitlab-patch", "apply"]:
            h.patches.append(argv[2])
            return 0, f"patch {argv[2]} applied\n", ""
        if argv == ["gitlab-chef-role", "show"]:
            return 0, json.dumps({"version": self.chef_role, "package_enabled": True}) + "\n", ""
        if argv[:2] == ["gitlab-chef-role", "set-version"]:
            self.chef_role = argv[2]
            return 0, json.dumps({"version": self.chef_role}) + "\n", ""
        return 127, "", f"lab: unknown command: {command}\n"


class FakeRemote:
    """``liftoff.remote.Remote``'s interface over a FakeFleet; keeps every command."""

    def __init__(self, fleet: FakeFleet, delay: float = 0.0):
        self.fleet = fleet
        self.delay = delay
        self.log: list[tuple[str, str, int | None]] = []
        self.closed: list[str] = []
        self.running = 0
        self.max_running = 0

    async def run(self, host: HostRef, command: str, timeout: float | None = None,
                  started: Callable[[], None] | None = None) -> CommandResult:
        assert timeout is None or timeout >= 30, f"timeout {timeout} too short for {command}"
        if started is not None:
            started()
        start = time.monotonic()
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            h = self.fleet.hosts.get(host.name)
            if h is None or not h.reachable:
                result = CommandResult(None, "", "", 0.0, host.name, command, "cannot connect: refused")
            else:
                code, out, err = self.fleet.execute(host.name, command)
                result = CommandResult(code, out, err, time.monotonic() - start, host.name, command)
                if "apt-get install" in command and host.name in self.fleet.cut_install_session:
                    result = CommandResult(None, "", "", 0.0, host.name, command, "connection lost: reset")
        finally:
            self.running -= 1
        self.log.append((host.name, command, result.exit_code))
        return result

    async def check(self, host: HostRef, command: str, timeout: float | None = None) -> CommandResult:
        r = await self.run(host, command, timeout)
        if not r.ok:
            raise CommandFailed(r)
        return r

    async def close_host(self, host) -> None:
        self.closed.append(host if isinstance(host, str) else host.name)

    async def prepare(self, hosts) -> None:
        pass

    async def flush_audit(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def commands(self, host: str | None = None) -> list[str]:
        """The command lines sent (one per SSH session)."""
        return [c for h, c, _ in self.log if host is None or h == host]

    def steps(self, host: str | None = None) -> list[str]:
        """The commands sent, ``&&`` chains split and their step markers left out."""
        return [part for c in self.commands(host) for part in c.split(" && ")
                if not part.startswith("echo liftoff-step-done:")]


def make_env(lbs: list[FakeLB], roles: dict[str, dict], name: str = "gprd", extra: dict | None = None):
    """An Environment whose LBs are the fake ones; ``roles[name] = {hosts: n, batch, floor, lb}``."""
    role_list = []
    seq = 1
    for role, spec in roles.items():
        hosts = []
        for i in range(1, spec["hosts"] + 1):
            address = f"127.0.{seq // 250}.{seq % 250 + 1}"
            hosts.append({"name": f"{role}-{i:02d}-sv-{name}", "address": address})
            seq += 1
        role_list.append({
            "name": role, "stage": spec.get("stage", "fleet"), "batch": spec.get("batch", "10%"),
            "capacity_floor": spec.get("floor", "50%"),
            "restart": spec.get("restart", ["workhorse", "nginx"]), "hup": spec.get("hup", ["puma"]),
            "hosts": hosts,
        })
    env = {
        "url": "http://127.0.0.1:1", "alert_matchers": {"env": name},
        "load_balancers": [{"name": lb.name, "admin": f"{lb.host}:{lb.port}"} for lb in lbs],
        "deploy_node": {"name": f"deploy-01-sv-{name}", "address": "127.0.9.1"},
        "roles": role_list,
    }
    if extra:
        env["extra"] = extra
    inv = parse_inventory({"environments": {name: env}})
    return inv.env(name)


def wire(env, fleet: FakeFleet, lbs: list[FakeLB], version: str, lb_roles=("web", "api")) -> None:
    """Put every host of ``env`` in the fleet at ``version`` and LB roles in every LB."""
    for role in env.roles:
        for h in role.hosts:
            fleet.add(h.name, role.name, version)
            if role.name in lb_roles:
                for lb in lbs:
                    lb.add(role.name, h.name, f"{h.address}:8080")
    fleet.add(env.deploy_node.name, "deploy", version)


class LBThread:
    """Fake LBs served from their own event loop in a thread, so tests can use both the sync
    API (``asyncio.run`` in the test thread) and the async one."""

    def __init__(self, *names: str):
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.lbs = [FakeLB(n) for n in names]
        for lb in self.lbs:
            asyncio.run_coroutine_threadsafe(lb.start(), self.loop).result(5)

    def __enter__(self) -> LBThread:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stop_lb(self, lb: FakeLB) -> None:
        asyncio.run_coroutine_threadsafe(lb.stop(), self.loop).result(5)

    def close(self) -> None:
        for lb in self.lbs:
            self.stop_lb(lb)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
