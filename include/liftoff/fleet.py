"""Rolling a role: the per-host deploy flow, in batches, behind every load balancer.

Per batch, per host, concurrently within the batch (ARCHITECTURE.md section 4):
skip if already at the target and in service -> record the drain (write-ahead) -> drain on
every LB -> wait for sessions to end (bounded) -> stop chef -> install the package ->
re-apply pending post-deployment patches -> reconfigure -> HUP/restart the role's services
and check their PIDs changed -> verify the running version -> health check -> ready on
every LB -> wait until every LB reports it UP -> clear the drain record.

Rules: batches of ``role.batch_size()``; roles of one stage run in parallel; a batch that
would take a role below its capacity floor is refused before anything is touched (hosts
already out of service count); the rollout stops after a batch with a failed host; a failed
host stays drained and recorded; a re-run skips finished hosts and repairs those left
drained. LB changes are batched (one connection per LB per batch); while a batch runs, the
next one is inspected (read-only) so its connections and version checks are ready.

Chef (``options.chef_start``): ``"host"`` (default) starts chef on each host as soon as it
is back in service, but only when the environment's chef role already holds the target
version (checked once); ``"role"`` does the same at the end of a successful role;
``"cleanup"`` leaves it to :func:`liftoff.chef.finish`. Hosts left with chef stopped are
listed in the report.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from liftoff import chef as chef_mod
from liftoff.errors import CapacityError, HAProxyError, InvalidInput, LiftoffError
from liftoff.haproxy import HAProxy, ServerState, lb_hosts, out_of_service
from liftoff.inventory import Environment, HostRef, Role
from liftoff.remote import Remote
from liftoff.versions import (
    apt_install_command,
    chained_command,
    chef_disable_command,
    chef_enable_command,
    gitlab_ctl_command,
    installed_version_command,
    parse_version,
    patch_apply_command,
    split_step_output,
    validate_name,
)

log = logging.getLogger(__name__)

PATCH_REAPPLY_STATUSES = ("applied", "pending")
CHEF_START_MODES = ("host", "role", "cleanup")
_STATUS_LINE = re.compile(r"^(?:ok: )?(run|down|fail|warning): ([A-Za-z0-9_.-]+):(?: \(pid (\d+)\))?")


class RolloutFailed(LiftoffError):
    """A rollout finished with failed hosts (or stopped); ``report`` has the details."""

    def __init__(self, report: RolloutReport):
        self.report = report
        failed = report.failed_hosts
        names = ", ".join(f"{h} ({r})" for h, r in list(failed.items())[:5])
        more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        tail = f"; {report.error}" if report.error else ""
        super().__init__(f"rollout of {report.version} to {report.env} {report.status}: "
                         f"{len(failed)} host(s) failed: {names}{more}{tail}")


@dataclass
class RolloutOptions:
    """Timeouts (seconds) and choices of one rollout."""

    drain_timeout: float = 60.0  # wait for sessions to end after draining
    up_timeout: float = 120.0  # wait for every LB to report the host UP
    install_timeout: float = 1800.0  # apt-get install
    command_timeout: float = 600.0  # every other host command
    health_timeout: float = 60.0  # HTTP version and readiness checks (retried until then)
    app_port: int | None = None  # default: role.extra.app_port, then env.extra.app_port
    chef_start: str = "host"
    prefetch: bool = True  # inspect the next batch while this one runs
    reason: str = ""  # chef-client-disable reason (default: liftoff deploy <run_id>)

    def __post_init__(self) -> None:
        if self.chef_start not in CHEF_START_MODES:
            raise InvalidInput(f"chef_start must be one of {', '.join(CHEF_START_MODES)}, "
                               f"got {self.chef_start!r}")
        for name in ("drain_timeout", "up_timeout", "install_timeout", "command_timeout", "health_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise InvalidInput(f"{name} must be a positive number of seconds, got {value!r}")


@dataclass
class HostReport:
    host: str
    role: str
    batch: int | None = None
    status: str = "pending"  # pending, skipped, done, failed
    from_version: str | None = None
    repaired: bool = False  # it was out of service (drained) when its batch started
    step: str = ""  # the last step reached (the failing one for a failed host)
    reason: str = ""
    duration: float = 0.0
    chef: str = ""  # "stopped", "started" or "" (untouched)
    notes: list[str] = field(default_factory=list)


@dataclass
class RoleReport:
    role: str
    stage: str
    status: str = "pending"  # pending, running, success, failed, stopped
    batches: list[list[str]] = field(default_factory=list)
    batch_durations: list[float] = field(default_factory=list)
    batch_phases: list[dict[str, float]] = field(default_factory=list)  # seconds per phase of each batch
    error: str = ""


@dataclass
class RolloutReport:
    env: str
    version: str
    run_id: str
    rollout: str
    status: str = "running"  # running, success, failed
    started: float = field(default_factory=time.time)
    finished: float | None = None
    duration: float = 0.0
    roles: dict[str, RoleReport] = field(default_factory=dict)
    hosts: dict[str, HostReport] = field(default_factory=dict)
    error: str = ""

    @property
    def failed_hosts(self) -> dict[str, str]:
        return {h.host: h.reason for h in self.hosts.values() if h.status == "failed"}

    @property
    def chef_stopped(self) -> list[str]:
        """Hosts where this rollout stopped chef (or may have: ``unknown``) and did not start it."""
        return sorted(h.host for h in self.hosts.values() if h.chef in ("stopped", "unknown"))

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for h in self.hosts.values():
            out[h.status] = out.get(h.status, 0) + 1
        return out

    def to_dict(self) -> dict:
        data = asdict(self)
        data["failed_hosts"] = self.failed_hosts
        data["chef_stopped"] = self.chef_stopped
        data["counts"] = self.counts()
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> RolloutReport:
        data = {k: v for k, v in data.items() if k not in ("failed_hosts", "chef_stopped", "counts")}
        data["roles"] = {k: RoleReport(**v) for k, v in data.get("roles", {}).items()}
        data["hosts"] = {k: HostReport(**v) for k, v in data.get("hosts", {}).items()}
        return cls(**data)

    def raise_for_failure(self) -> None:
        if self.status != "success":
            raise RolloutFailed(self)


@dataclass
class HostPlan:
    """What a rollout would do on one host, in order (``plan`` touches nothing)."""

    role: str
    stage: str
    batch: int
    host: str
    address: str
    steps: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


# -- helpers -------------------------------------------------------------------------------------------

def app_port_for(env: Environment, role: Role, override: int | None = None) -> int | None:
    """The app's HTTP port for version/health checks: override, role.extra, env.extra."""
    for value in (override, role.extra.get("app_port"), env.extra.get("app_port")):
        if value not in (None, ""):
            try:
                port = int(value)
            except (TypeError, ValueError):
                raise InvalidInput(f"app_port {value!r} is not a port number") from None
            if not 1 <= port <= 65535:
                raise InvalidInput(f"app_port {value!r} is out of range")
            return port
    return None


INSPECT_STEPS = (("version", installed_version_command()), ("status", gitlab_ctl_command("status")))
STEP_KIND = {"chef": "chef_stop", "install": "install", "patch": "patches", "reconfigure": "reconfigure",
             "hup": "restart", "restart": "restart", "status": "restart"}
STEP_LABELS = {"chef-stop": "chef stop", "status": "gitlab-ctl status"}


def host_steps(reason: str, install: str | None, role: Role,
               patches: Iterable[str] = ()) -> list[tuple[str, str]]:
    """A host's steps once drained, in order, as (step name, command): chef stop, the install
    (``install`` is the version, None when already installed) and :func:`after_install_steps`."""
    steps = [("chef-stop", chef_disable_command(reason))]
    if install is not None:
        steps.append(("install", apt_install_command(install)))
    return steps + after_install_steps(role, patches)


ONE_SESSION = " (one session for this and the next steps, stopping at the first failure)"


def after_install_steps(role: Role, patches: Iterable[str] = ()) -> list[tuple[str, str]]:
    """The steps after the package install, in order, as (step name, command)."""
    return [
        *((f"patch-{p}", patch_apply_command(p)) for p in patches),
        ("reconfigure", gitlab_ctl_command("reconfigure")),
        *((f"hup-{s}", gitlab_ctl_command("hup", s)) for s in role.hup),
        *((f"restart-{s}", gitlab_ctl_command("restart", s)) for s in role.restart),
        ("status", gitlab_ctl_command("status")),
    ]


def step_label(step: str) -> str:
    """``hup-puma`` -> ``hup puma``; ``status`` -> ``gitlab-ctl status``."""
    return STEP_LABELS.get(step) or step.replace("-", " ", 1)


def parse_pids(status_output: str) -> dict[str, int | None]:
    """``gitlab-ctl status`` -> {service: pid, or None when it is down}."""
    out: dict[str, int | None] = {}
    for line in status_output.splitlines():
        m = _STATUS_LINE.match(line.strip())
        if m:
            out[m.group(2)] = int(m.group(3)) if m.group(1) == "run" and m.group(3) else None
    return out


def select_roles(env: Environment, roles: Iterable[str] | None) -> list[Role]:
    """Roles to roll in the environment's deploy order (all when ``roles`` is None)."""
    if roles is None:
        return list(env.roles)
    wanted = [validate_name("role", r) for r in roles]
    for r in wanted:
        env.role(r)  # raises InventoryError naming the role
    return [r for r in env.roles if r.name in wanted]


def stage_groups(roles: Sequence[Role]) -> list[list[Role]]:
    """Roles grouped by stage, stages in order of first appearance."""
    groups: dict[str, list[Role]] = {}
    for r in roles:
        groups.setdefault(r.stage, []).append(r)
    return list(groups.values())


def order_hosts(role: Role, out: set[str]) -> list[HostRef]:
    """Hosts already out of service first (repairing them gives capacity back), then the rest."""
    return [h for h in role.hosts if h.name in out] + [h for h in role.hosts if h.name not in out]


def make_batches(hosts: Sequence[HostRef], size: int) -> list[list[HostRef]]:
    size = max(1, size)
    return [list(hosts[i:i + size]) for i in range(0, len(hosts), size)]


def check_capacity(env: Environment, role: Role, batches: Sequence[Sequence[HostRef]], out: set[str]) -> None:
    """Refuse (CapacityError) if any batch would leave fewer than the floor in service.

    Hosts out of service now stay out until their batch brings them back."""
    names = {h.name for h in role.hosts}
    still_out = set(out) & names
    total = len(role.hosts)
    floor = role.min_in_service()
    for i, batch in enumerate(batches):
        taken = {h.name for h in batch}
        after = still_out | taken
        if total - len(after) < floor:
            already = sorted(still_out - taken)
            raise CapacityError(
                f"{env.name} role {role.name}: batch {i + 1} of {len(batch)} host(s) would leave "
                f"{total - len(after)} of {total} in service, below the capacity floor "
                f"({role.capacity_floor} = {floor} host(s))"
                + (f"; already out of service: {', '.join(already[:10])}"
                   + (f" and {len(already) - 10} more" if len(already) > 10 else "") if already else "")
                + f". Use a smaller batch (now {role.batch}) or bring hosts back first. Nothing was changed.")
        still_out -= taken


def pending_patches(store: Any, env: str) -> list[str]:
    """Post-deployment patches recorded for ``env`` whose latest record is applied/pending
    (a new package drops them, so they are applied again), oldest first."""
    if store is None:
        return []
    latest: dict[str, str] = {}
    order: list[str] = []
    for rec in store.patches(env):  # newest first
        if rec.patch_id not in latest:
            latest[rec.patch_id] = rec.status
            order.append(rec.patch_id)
    return [p for p in reversed(order) if latest[p] in PATCH_REAPPLY_STATUSES]


# -- plan (dry run) ----------------------------------------------------------------------------------

def plan(env: Environment, roles: Iterable[str] | None, version: str, *, run_id: str = "dry-run",
         options: RolloutOptions | None = None, patches: Sequence[str] = (),
         out_of_service: Iterable[str] = ()) -> list[HostPlan]:
    """Every host's steps in order, batch by batch, touching nothing.

    Raises like the real run would: InvalidVersion, InventoryError for an unknown role,
    CapacityError for a batch below the floor (hosts in ``out_of_service`` counted)."""
    options = options or RolloutOptions()
    version = str(parse_version(version))
    reason = options.reason or chef_mod.deploy_reason(run_id)
    lbs = ", ".join(lb.name for lb in env.load_balancers) or "no LB"
    out = set(out_of_service)
    plans: list[HostPlan] = []
    for role in select_roles(env, roles):
        batches = make_batches(order_hosts(role, out), role.batch_size())
        check_capacity(env, role, batches, out)
        port = app_port_for(env, role, options.app_port)
        drained_steps = host_steps(reason, version, role, patches)  # the same for every host of the role
        for i, batch in enumerate(batches):
            for h in batch:
                steps = [
                    f"check: {installed_version_command()} && {gitlab_ctl_command('status')} (one session; "
                    f"skip if {version} and in service)",
                    f"store: record {h.name} drained (write-ahead)",
                    f"haproxy: drain {h.name} in every backend on every LB ({lbs})",
                    f"haproxy: wait until its sessions end (at most {options.drain_timeout:.0f}s)",
                    *(f"run: {cmd}" + (ONE_SESSION if i == 0 else "")
                      for i, (_, cmd) in enumerate(drained_steps[:-1])),
                    f"run: {drained_steps[-1][1]} (PIDs of "
                    f"{', '.join(role.hup + role.restart) or '-'} changed, every service running)",
                ]
                if port:
                    steps += [f"http: GET http://{h.address}:{port}/api/v4/version == {version}",
                              f"http: GET http://{h.address}:{port}/-/readiness == 200"]
                else:
                    steps += [f"run: {installed_version_command()} == {version}"]
                steps += [
                    f"haproxy: ready {h.name} on every LB ({lbs})",
                    f"haproxy: wait until every LB reports it UP (at most {options.up_timeout:.0f}s)",
                    f"store: clear the drain record of {h.name}; status done",
                ]
                if options.chef_start != "cleanup":
                    steps.append(f"run: {chef_enable_command()} ({options.chef_start} end, if the chef role "
                                 f"holds {version})")
                plans.append(HostPlan(role.name, role.stage, i + 1, h.name, h.address, steps))
    return plans


# -- the rollout -----------------------------------------------------------------------------------------

@dataclass
class _Inspection:
    installed: str | None = None
    pids: dict[str, int | None] | None = None
    error: str = ""


class _Rollout:
    def __init__(self, env: Environment, version: str, run_id: str, store: Any, remote: Remote,
                 haproxy: HAProxy, options: RolloutOptions):
        self.env = env
        self.version = version
        self.run_id = run_id
        self.store = store
        self.remote = remote
        self.haproxy = haproxy
        self.options = options
        self.rollout = f"{env.name}:{version}"
        self.report = RolloutReport(env.name, version, run_id, self.rollout)
        self.stop = asyncio.Event()
        self.lb_names: set[str] = set()
        self.last_snapshot: dict[str, list[ServerState]] | None = None
        self.patches: list[str] = []
        self.previous: dict[str, str] = {}  # host statuses of earlier runs of this rollout
        self.reason = options.reason or chef_mod.deploy_reason(run_id)
        self._chef_role_ok: asyncio.Task | None = None
        self._http: Any = None

    # -- store (off the event loop) ------------------------------------------------------------
    async def _db(self, fn, *args) -> Any:
        if self.store is None:
            return None
        return await asyncio.to_thread(fn, *args)

    def _statuses(self, rows: list[tuple[str, str, str]]) -> None:
        self.store.set_host_statuses(self.rollout, self.env.name, rows, self.version)

    async def _set_statuses(self, rows: list[tuple[str, str, str]]) -> None:
        if rows:
            await self._db(self._statuses, rows)

    # -- LB state ----------------------------------------------------------------------------------
    async def _snapshot(self) -> dict[str, list[ServerState]]:
        if not self.env.load_balancers:
            return {}
        return await self.haproxy.asnapshot()

    async def _out_of_service(self) -> tuple[set[str], dict[str, str]]:
        """Hosts out of service (LB not UP/ready anywhere, or a drain record) and why."""
        snap = self.last_snapshot = await self._snapshot()
        self.lb_names |= lb_hosts(snap)
        why = dict(out_of_service(snap))
        records = await self._db(self.store.drained, self.env.name) if self.store is not None else []
        for rec in records or []:
            why.setdefault(rec.host, f"drain record of run {rec.run_id}")
        return set(why), why

    # -- main ------------------------------------------------------------------------------------
    async def run(self, roles: list[Role]) -> RolloutReport:
        out, _ = await self._out_of_service()  # every LB must answer before anything changes
        plans: dict[str, list[list[HostRef]]] = {}
        for role in roles:
            batches = make_batches(order_hosts(role, out), role.batch_size())
            check_capacity(self.env, role, batches, out)
            plans[role.name] = batches
        self.patches = await self._db(pending_patches, self.store, self.env.name) or []
        if self.store is not None:
            prev = await self._db(self.store.host_statuses, self.rollout)
            self.previous = {h: p.status for h, p in prev.items()}
        for role in roles:
            self.report.roles[role.name] = RoleReport(role.name, role.stage)
            for h in role.hosts:
                self.report.hosts[h.name] = HostReport(h.name, role.name)
        try:
            for group in stage_groups(roles):
                await asyncio.gather(*(self._role(r, plans[r.name]) for r in group))
                if self.stop.is_set():
                    break
        finally:
            await self._close_http()
            await self.remote.flush_audit()
        rep = self.report
        failed_roles = [r for r in rep.roles.values() if r.status != "success"]
        rep.status = "failed" if failed_roles else "success"
        if failed_roles and not rep.error:
            rep.error = "; ".join(f"role {r.role}: {r.status}" + (f" ({r.error})" if r.error else "")
                                  for r in failed_roles)
        rep.finished = time.time()
        rep.duration = rep.finished - rep.started
        return rep

    async def _role(self, role: Role, batches: list[list[HostRef]]) -> None:
        rr = self.report.roles[role.name]
        rr.status = "running"
        prefetch: asyncio.Task | None = None
        try:
            for i, batch in enumerate(batches):
                if self.stop.is_set():
                    rr.status = "stopped"
                    rr.error = rr.error or "stopped: another role failed"
                    return
                if prefetch is None:
                    prefetch = asyncio.create_task(self._inspect_all(batch))
                waited = time.monotonic()
                inspections = await prefetch
                phase = {"inspect_wait": time.monotonic() - waited}
                prefetch = None
                upcoming = batches[i + 1] if self.options.prefetch and i + 1 < len(batches) else None

                def start_prefetch(hosts: list[HostRef] | None = upcoming) -> None:
                    # called once this batch's hosts are installing (the quiet part of the batch)
                    nonlocal prefetch
                    if hosts is not None and prefetch is None:
                        prefetch = asyncio.create_task(self._inspect_all(hosts))

                started = time.monotonic()
                rr.batches.append([h.name for h in batch])
                try:
                    ok = await self._batch(role, i + 1, batch, inspections, phase, start_prefetch)
                except LiftoffError as exc:
                    rr.error = str(exc)
                    ok = False
                rr.batch_durations.append(round(time.monotonic() - started, 3))
                rr.batch_phases.append({k: round(v, 3) for k, v in phase.items()})
                if not ok:
                    rr.status = "failed"
                    if not rr.error:
                        bad = [h.name for h in batch if self.report.hosts[h.name].status == "failed"]
                        rr.error = f"batch {i + 1} failed on {', '.join(bad)}"
                    self.stop.set()
                    return
            rr.status = "success"
            if self.options.chef_start == "role":
                done = [h for h in role.hosts if self.report.hosts[h.name].status == "done"]
                await self._start_chef(done)
        finally:
            if prefetch is not None:
                prefetch.cancel()
                await asyncio.gather(prefetch, return_exceptions=True)
            await asyncio.gather(*(self.remote.close_host(h) for h in role.hosts), return_exceptions=True)

    # -- inspection (read-only) ----------------------------------------------------------------
    async def _inspect_all(self, hosts: list[HostRef]) -> dict[str, _Inspection]:
        results = await asyncio.gather(*(self._inspect(h) for h in hosts))
        return {h.name: r for h, r in zip(hosts, results, strict=True)}

    async def _inspect(self, host: HostRef) -> _Inspection:
        """Installed version and service PIDs, in one session (read-only)."""
        r = await self.remote.run(host, chained_command(INSPECT_STEPS), self.options.command_timeout)
        if r.exit_code is None:
            return _Inspection(error=f"unreachable: {r.describe()}")
        done, _ = split_step_output(INSPECT_STEPS, r.stdout)
        installed = done.get("version", "").strip() or None
        return _Inspection(installed, parse_pids(done["status"]) if "status" in done else {})

    # -- one batch -----------------------------------------------------------------------------
    async def _batch(self, role: Role, index: int, hosts: list[HostRef], insp: dict[str, _Inspection],
                     phase: dict[str, float], installing_started: Callable[[], None] = lambda: None) -> bool:
        reports = self.report.hosts
        mark = time.monotonic()

        def lap(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            phase[name] = phase.get(name, 0.0) + now - mark
            mark = now

        out, why = await self._out_of_service()
        lap("lb_check")
        work: list[HostRef] = []
        statuses: list[tuple[str, str, str]] = []
        failed_early = False
        for h in hosts:
            hr = reports[h.name]
            hr.batch = index
            i = insp[h.name]
            hr.from_version = i.installed
            if i.error:
                hr.status, hr.step, hr.reason = "failed", "inspect", i.error
                statuses.append((h.name, "failed", i.error))
                failed_early = True
            elif i.installed == self.version and h.name not in out:
                hr.status, hr.step = "skipped", "inspect"
                if self.previous.get(h.name) != "done":  # keep "done" from an earlier run of this rollout
                    statuses.append((h.name, "skipped", f"already at {self.version} and in service"))
            else:
                hr.repaired = h.name in out
                if hr.repaired:
                    hr.notes.append(f"was out of service: {why.get(h.name, '')}")
                work.append(h)
        role_names = {h.name for h in role.hosts}
        check_capacity(self.env, role, [work], out & role_names)
        if not work:
            installing_started()
            await self._set_statuses(statuses)
            await self._close([h for h in hosts])
            return not failed_early

        # write-ahead: the drain records exist before any LB is touched
        def write_ahead() -> None:
            self.store.record_drained_many(self.env.name, [h.name for h in work], self.run_id,
                                           f"liftoff deploy {self.version} (batch {index} of {role.name})")

        if self.store is not None:
            await asyncio.to_thread(write_ahead)
        lap("write_ahead")
        draining = asyncio.create_task(self._set_statuses(
            statuses + [(h.name, "draining", f"batch {index}") for h in work]))
        t0 = time.monotonic()
        lb_work = [h.name for h in work if h.name in self.lb_names]
        for h in work:
            reports[h.name].step = "drain"
        try:
            if lb_work:
                await self.haproxy.adrain(lb_work, snapshot=self.last_snapshot)
        except HAProxyError as exc:
            for h in work:
                self._fail(h, "drain", f"drain failed: {exc}")
            await draining
            await self._set_statuses([(h.name, "failed", reports[h.name].reason) for h in work])
            return False

        waiting = (self.haproxy.await_sessions_zero(lb_work, self.options.drain_timeout) if lb_work
                   else _nothing())
        lap("drain")
        left = await waiting
        lap("sessions")
        for name, n in (left or {}).items():
            reports[name].notes.append(f"{n} session(s) still open after {self.options.drain_timeout:.0f}s")
        waiting_to_start = len(work)

        def host_started() -> None:
            # the next batch's read-only inspection waits until every install here runs
            nonlocal waiting_to_start
            waiting_to_start -= 1
            if waiting_to_start == 0:
                installing_started()

        await draining
        installing = self._set_statuses([(h.name, "installing", f"batch {index}") for h in work])
        flows = asyncio.gather(*(self._host(role, h, insp[h.name], host_started) for h in work))
        _, errors = await asyncio.gather(installing, flows)
        lap("hosts")
        good = [h for h, e in zip(work, errors, strict=True) if e is None]
        for h, e in zip(work, errors, strict=True):
            if e is not None:
                self._fail(h, reports[h.name].step, e)

        # back in service: ready on every LB, then wait until every LB says UP
        good_lb = [h.name for h in good if h.name in self.lb_names]
        if good_lb:
            for name in good_lb:
                reports[name].step = "ready"
            try:
                await self.haproxy.aready(good_lb)
                lap("ready")
                not_up = await self.haproxy.await_up(good_lb, self.options.up_timeout)
                lap("up")
            except HAProxyError as exc:
                not_up = {name: {"*": f"ready failed: {exc}"} for name in good_lb}
            if not_up:
                for name, where in not_up.items():
                    detail = "; ".join(f"{lb}: {s}" for lb, s in where.items())
                    self._fail(self.env.host(name), "up", f"not UP on every LB after "
                               f"{self.options.up_timeout:.0f}s: {detail}")
                try:  # a failed host stays drained
                    await self.haproxy.adrain(list(not_up))
                except HAProxyError as exc:
                    for name in not_up:
                        reports[name].notes.append(f"could not drain it again: {exc}")
                good = [h for h in good if h.name not in not_up]
        now = time.monotonic()
        for h in good:
            hr = reports[h.name]
            hr.status, hr.step, hr.duration = "done", "done", round(now - t0, 3)
        if self.options.chef_start == "host" and good:
            await self._start_chef(good)

        def finish() -> None:
            self.store.clear_drained_many(self.env.name, [h.name for h in good])
            self._statuses([(h.name, reports[h.name].status, reports[h.name].reason or
                             ("repaired" if reports[h.name].repaired else "")) for h in work])

        if self.store is not None:
            await asyncio.to_thread(finish)
        lap("finish")
        await self._close(hosts)
        return not failed_early and len(good) == len(work)

    def _fail(self, host: HostRef, step: str, reason: str) -> None:
        hr = self.report.hosts[host.name]
        hr.status, hr.step, hr.reason = "failed", step, reason
        log.warning("%s failed at step %s: %s", host.name, step, reason)

    async def _close(self, hosts: list[HostRef]) -> None:
        await asyncio.gather(*(self.remote.close_host(h) for h in hosts), return_exceptions=True)

    # -- one host --------------------------------------------------------------------------------
    async def _host(self, role: Role, h: HostRef, insp: _Inspection,
                    started: Callable[[], None] = lambda: None) -> str | None:
        """The host's steps after the drain; None when it is ready to go back, else why not."""
        hr = self.report.hosts[h.name]
        timeout = self.options.command_timeout
        # chef stop, install (unless there already), patches, reconfigure, HUP/restarts, status:
        # one SSH session for the host, stopping at the first step that fails
        steps = host_steps(self.reason, self.version if insp.installed != self.version else None,
                           role, self.patches)
        hr.step = "chef_stop"
        limit = self.options.install_timeout + timeout * len(steps)
        r = await self.remote.run(h, chained_command(steps), limit, started=started)
        done, unfinished = split_step_output(steps, r.stdout)
        if "chef-stop" in done:
            hr.chef = "stopped"
        if unfinished is not None or not r.ok:
            failed = unfinished or steps[-1][0]
            hr.step = STEP_KIND[failed.split("-", 1)[0]]
            what = dataclasses.replace(r, command=dict(steps)[failed]).describe()  # the step, not the chain
            if r.exit_code is None:  # cut off: the host's output (and so its progress) never came back
                if not done:
                    hr.chef = "unknown"
                    hr.notes.append("the session was cut before the host reported: chef may be stopped")
                return f"{step_label(failed)} (or a later step) did not finish: {what}"
            if failed == "chef-stop":
                return f"could not stop chef: {what}"
            return f"{step_label(failed)} failed: {what}"
        after = parse_pids(done["status"])
        before = insp.pids or {}
        down = sorted(s for s, pid in after.items() if pid is None)
        if down:
            return f"services down after restart: {', '.join(down)}"
        same = [s for s in (*role.hup, *role.restart)
                if after.get(s) is not None and after.get(s) == before.get(s)]
        missing = [s for s in (*role.hup, *role.restart) if s not in after]
        if same or missing:
            return ("PIDs did not change for " + ", ".join(same) if same else
                    "services missing from gitlab-ctl status: " + ", ".join(missing))
        port = app_port_for(self.env, role, self.options.app_port)
        if port:
            hr.step = "verify"
            err = await self._http_check(h, port)
            if err:
                return err
        else:
            hr.step = "verify"
            r = await self.remote.run(h, installed_version_command(), timeout)
            if not r.ok or r.stdout.strip() != self.version:
                return f"installed version is {r.stdout.strip() or '?'} after install, not {self.version}"
        return None

    # -- HTTP checks -----------------------------------------------------------------------------
    async def _session(self) -> Any:
        if self._http is None:
            import aiohttp

            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5),
                                               connector=aiohttp.TCPConnector(limit=256, force_close=True))
        return self._http

    async def _close_http(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _http_check(self, h: HostRef, port: int) -> str | None:
        """Running version from /api/v4/version, then /-/readiness; retried until health_timeout."""
        session = await self._session()
        base = f"http://{h.address}:{port}"
        deadline = time.monotonic() + self.options.health_timeout
        last = ""
        hr = self.report.hosts[h.name]
        for path in ("/api/v4/version", "/-/readiness"):
            hr.step = "verify" if path == "/api/v4/version" else "health"
            while True:
                try:
                    async with session.get(base + path) as resp:
                        if path == "/api/v4/version":
                            body = await resp.json(content_type=None) if resp.status == 200 else {}
                            running = body.get("version") if isinstance(body, dict) else None
                            if running == self.version:
                                break
                            last = f"GET {path}: HTTP {resp.status}, running {running!r}, want {self.version}"
                        else:
                            if resp.status == 200:
                                break
                            last = f"GET {path}: HTTP {resp.status}"
                except Exception as exc:  # refused, reset, timeout, bad JSON
                    last = f"GET {path}: {type(exc).__name__}: {exc}"
                if time.monotonic() >= deadline:
                    return f"{'version check' if 'version' in path else 'health check'} failed: {last}"
                await asyncio.sleep(0.5)
        return None

    # -- chef --------------------------------------------------------------------------------------
    async def _chef_role_at_target(self) -> bool:
        if self._chef_role_ok is None:
            self._chef_role_ok = asyncio.create_task(self._query_chef_role())
        return await asyncio.shield(self._chef_role_ok)

    async def _query_chef_role(self) -> bool:
        try:
            return await chef_mod.role_version(self.remote, self.env) == self.version
        except LiftoffError as exc:
            log.warning("cannot read the chef role of %s: %s", self.env.name, exc)
            return False

    async def _start_chef(self, hosts: list[HostRef]) -> None:
        if not hosts:
            return
        if not await self._chef_role_at_target():
            for h in hosts:
                self.report.hosts[h.name].notes.append(
                    f"chef left stopped: the {self.env.name} chef role does not hold {self.version} yet")
            return
        command = chef_enable_command()
        results = await asyncio.gather(*(self.remote.run(h, command, self.options.command_timeout)
                                         for h in hosts))
        for h, r in zip(hosts, results, strict=True):
            hr = self.report.hosts[h.name]
            if r.ok:
                hr.chef = "started"
            else:
                hr.notes.append(f"could not start chef: {r.describe()}")


async def _nothing() -> dict:
    return {}


async def rollout(env: Environment, version: str, *, run_id: str, store: Any,
                  roles: Iterable[str] | None = None, remote: Remote | None = None,
                  haproxy: HAProxy | None = None, options: RolloutOptions | None = None,
                  ssh_conn_id: str = "liftoff_ssh") -> RolloutReport:
    """Roll ``version`` onto the environment's roles (all, or those named), stage by stage.

    Refuses before touching anything (raises): a bad version or run id, an unknown role, an
    unreachable LB, a batch below a capacity floor. Otherwise returns the report; a failed
    rollout has ``status == "failed"`` (``report.raise_for_failure()`` raises)."""
    options = options or RolloutOptions()
    version = str(parse_version(version))
    validate_name("run_id", run_id)
    selected = select_roles(env, roles)
    own_remote = remote is None
    if remote is None:
        remote = Remote(ssh_conn_id, store=store, run_id=run_id, env=env.name,
                        timeout=max(options.command_timeout, 30.0))
    haproxy = haproxy or HAProxy.for_env(env)
    try:
        return await _Rollout(env, version, run_id, store, remote, haproxy, options).run(selected)
    finally:
        if own_remote:
            await remote.close()


def run_rollout(env: Environment, version: str, **kwargs) -> RolloutReport:
    """Synchronous :func:`rollout` (for a plain Airflow task)."""
    return asyncio.run(rollout(env, version, **kwargs))
