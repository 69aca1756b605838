"""The lab's world: builds, hosts, databases and Chef roles, kept on disk.

labd is the only writer: it holds one ``World`` in memory and writes every change
through to ``<lab_dir>/state/`` (one JSON file per host, plus builds, databases and
roles), so a restarted labd, ``lab status`` and the tests see the same state.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from lab.config import LabConfig
from lab.topology import DATABASE, ENVIRONMENTS, Host, Topology

BASE_VERSION = "17.5.0-ee.0"
# The services gitlab-ctl manages per role; the first is the one that serves traffic
# and whose version the host reports as running.
SERVICES: dict[str, tuple[str, ...]] = {
    "web": ("puma", "workhorse", "nginx"),
    "api": ("puma", "workhorse", "nginx"),
    "git": ("puma", "workhorse", "nginx", "gitlab-sshd"),
    "sidekiq": ("sidekiq",),
    "gitaly": ("gitaly",),
    "deploy": (),
}
# A lab version: digits, letters and the separators Omnibus versions use.
VERSION_RE = re.compile(r"^[0-9][0-9A-Za-z.+~-]{0,80}$")


def slug(version: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", version).strip("_")


@dataclass
class Build:
    version: str
    seq: int
    nightly: bool = False
    error_rate: float = 0.0
    latency_ms: int = 0
    install_fails_on: list[str] = field(default_factory=list)
    migration_fails: bool = False
    qa_fails: bool = False
    includes_patches: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    internal: bool = False  # an undisclosed security build: in the internal apt repository only
    sha: str | None = None  # the application commit, when the version does not carry it

    @property
    def regular_migration(self) -> str:
        return f"{self.seq:06d}_regular_{slug(self.version)}"

    @property
    def post_migration(self) -> str:
        return f"{self.seq:06d}_post_{slug(self.version)}"


@dataclass
class Service:
    pid: int
    version: str | None
    started: float = field(default_factory=time.time)


@dataclass
class HostState:
    name: str
    env: str
    role: str
    addr: str
    installed: str | None
    services: dict[str, Service]
    chef_running: bool = True
    chef_disabled_reason: str = ""
    chef_last_run: float = 0.0
    patches: list[str] = field(default_factory=list)
    reachable: bool = True

    @property
    def running(self) -> str | None:
        """Version of the service that serves traffic (the package for deploy nodes)."""
        if not self.services:
            return self.installed
        return self.services[SERVICES[self.role][0]].version

    def to_json(self) -> dict:
        data = asdict(self)
        data["running"] = self.running
        return data

    @classmethod
    def from_json(cls, data: dict) -> HostState:
        data = dict(data)
        data.pop("running", None)
        data["services"] = {k: Service(**v) for k, v in data["services"].items()}
        return cls(**data)


_pids = itertools.count(int(time.time()) % 50000 + 1000)
_pid_lock = threading.Lock()


def new_pid() -> int:
    with _pid_lock:
        return next(_pids)


def pids_above(highest: int) -> None:
    """The next PIDs this process hands out are above ``highest``: a process that loads hosts
    another process created (``lab up`` writes them, labd loads them) would otherwise count
    from the same time-based start in the same second and give a restarted service the PID it
    had, which liftoff rightly calls a restart that did not happen ("PIDs did not change")."""
    global _pids
    with _pid_lock:
        nxt = next(_pids)
        _pids = itertools.count(max(nxt, highest + 1))


def write_json(path: Path, data) -> None:
    """Write atomically: a reader never sees half a file."""
    _replace(path, json.dumps(data, indent=1, sort_keys=True).encode())


def _replace(path: Path, text: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(text)
    os.replace(tmp, path)


# A small file rewritten in place is still whole after a kill -9: one write within a page
# completes or does not start.
IN_PLACE_MAX_BYTES = 4096
_overwrite_lock = threading.Lock()


def overwrite_json(path: Path, data) -> None:
    """Rewrite a small, often written file in place: one ``pwrite`` at offset 0, padded with
    spaces (JSON's trailing whitespace) when shorter than what is there, never truncated.

    For the host files, written several times per command chain: :func:`write_json`'s rename
    over the old file makes ext4 flush the new file's data (``auto_da_alloc``), and labd's one
    event loop waited on that ~100 times at the start and end of every batch of a 1,000-host
    rollout, where a real host writes only its own disk. Larger files go through
    :func:`write_json`."""
    text = json.dumps(data, indent=1, sort_keys=True).encode()
    if len(text) > IN_PLACE_MAX_BYTES:
        _replace(path, text)
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with _overwrite_lock:  # the size read and the write together (labd writes from one thread)
            size = os.fstat(fd).st_size
            if size <= IN_PLACE_MAX_BYTES:
                os.pwrite(fd, text.ljust(size, b" "), 0)
                return
    finally:
        os.close(fd)
    _replace(path, text)  # over a page, written whole before: shrink it once


class World:
    """Everything the lab knows; call ``save_*`` after each change."""

    def __init__(self, config: LabConfig):
        self.config = config
        self.topology = Topology(config)
        self.state_dir = config.path("state")
        self.builds: dict[str, Build] = {}
        self.hosts: dict[str, HostState] = {}
        self.databases: dict[str, dict] = {}
        self.roles: dict[str, dict] = {}
        self.faults: dict[str, dict] = {}
        # In memory only: per-host (and per-database) locks, the audit log handle.
        self._locks: dict[str, asyncio.Lock] = {}
        self._audit_file = None

    # -- loading and saving ------------------------------------------------------------
    @classmethod
    def open(cls, config: LabConfig) -> World:
        """Load the world from disk, creating a fresh one on first start."""
        world = cls(config)
        if (world.state_dir / "builds.json").exists():
            world._load()
        else:
            world._create()
        return world

    def _create(self) -> None:
        base = self.add_build(BASE_VERSION)
        for host in self.topology.hosts:
            self.hosts[host.name] = self._fresh_host(host, base.version)
            self.save_host(host.name)
        for db in set(DATABASE.values()):
            self.databases[db] = {
                "applied": [base.regular_migration, base.post_migration],
                "log": [],
            }
            self.save_database(db)
        for env in ENVIRONMENTS:
            self.roles[env] = {"version": base.version, "package_enabled": True, "updated": time.time()}
        self.save_roles()

    def _fresh_host(self, host: Host, version: str) -> HostState:
        services = {s: Service(new_pid(), version) for s in SERVICES[host.role]}
        return HostState(host.name, host.env, host.role, host.addr, version, services)

    def _load(self) -> None:
        builds = json.loads((self.state_dir / "builds.json").read_text())
        self.builds = {v: Build(**b) for v, b in builds.items()}
        for host in self.topology.hosts:
            file = self.state_dir / "hosts" / f"{host.name}.json"
            if file.exists():
                self.hosts[host.name] = HostState.from_json(json.loads(file.read_text()))
            else:
                self.hosts[host.name] = self._fresh_host(host, BASE_VERSION)
        for db in set(DATABASE.values()):
            self.databases[db] = json.loads((self.state_dir / "db" / f"{db}.json").read_text())
        self.roles = json.loads((self.state_dir / "roles.json").read_text())
        pids_above(max((svc.pid for h in self.hosts.values() for svc in h.services.values()), default=0))

    def save_host(self, name: str) -> None:
        overwrite_json(self.state_dir / "hosts" / f"{name}.json", self.hosts[name].to_json())

    def save_builds(self) -> None:
        write_json(self.state_dir / "builds.json", {v: asdict(b) for v, b in self.builds.items()})

    def save_database(self, db: str) -> None:
        write_json(self.state_dir / "db" / f"{db}.json", self.databases[db])

    def save_roles(self) -> None:
        write_json(self.state_dir / "roles.json", self.roles)

    # -- builds and migrations -----------------------------------------------------------
    def add_build(self, version: str, **attrs) -> Build:
        if not VERSION_RE.match(version):
            raise ValueError(f"not a package version: {version!r}")
        if version in self.builds:
            raise ValueError(f"build {version} already exists")
        unknown = set(attrs.get("install_fails_on", [])) - set(self.topology.by_name)
        if unknown:
            raise ValueError(f"unknown hosts: {sorted(unknown)}")
        build = Build(version=version, seq=len(self.builds) + 1, **attrs)
        self.builds[version] = build
        self.save_builds()
        return build

    def migrations(self, version: str) -> tuple[list[str], list[str]]:
        """Regular and post-deployment migrations a package contains (cumulative)."""
        seq = self.builds[version].seq
        older = [b for b in self.builds.values() if b.seq <= seq]
        return [b.regular_migration for b in older], [b.post_migration for b in older]

    def database_of(self, env: str) -> dict:
        return self.databases[DATABASE[env]]

    # -- queries ---------------------------------------------------------------------
    def host_at(self, addr: str) -> HostState | None:
        host = self.topology.by_addr.get(addr)
        return self.hosts.get(host.name) if host else None

    def build_running_on(self, state: HostState) -> Build | None:
        return self.builds.get(state.running or "")

    def hosts_down(self) -> list[str]:
        return [name for name, state in self.hosts.items() if not state.reachable]

    # -- changes (callers save) ----------------------------------------------------------
    def lock(self, key: str) -> asyncio.Lock:
        """The lock serializing work on one host (its name) or database (``db:NAME``)."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def set_installed(self, state: HostState, version: str) -> None:
        """The package is now ``version``; a new package drops hot patches."""
        if state.installed != version:
            state.patches = []
        state.installed = version

    def restart_services(self, state: HostState, services: list[str] | None = None) -> list[str]:
        """Restart services (all by default): new PIDs, running the installed version."""
        names = list(state.services) if services is None else services
        now = time.time()
        for name in names:
            state.services[name] = Service(new_pid(), state.installed, now)
        return names

    def set_reachable(self, name: str, reachable: bool) -> None:
        self.hosts[name].reachable = reachable
        self.save_host(name)

    # -- audit -------------------------------------------------------------------------
    @property
    def audit_path(self) -> Path:
        return self.state_dir / "audit.log"

    def audit(self, host: str, command: str, code: int, duration: float) -> None:
        """Append one line: ISO time, host, exit code, seconds, command (tab separated)."""
        if self._audit_file is None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._audit_file = open(self.audit_path, "a", encoding="utf-8")  # noqa: SIM115
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        command = command.replace("\t", " ").replace("\n", " ")
        self._audit_file.write(f"{stamp}\t{host}\t{code}\t{duration:.3f}\t{command}\n")
        self._audit_file.flush()

    def close(self) -> None:
        if self._audit_file is not None:
            self._audit_file.close()
            self._audit_file = None
