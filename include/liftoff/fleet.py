"""Rolling a role: the per-host deploy flow, in batches, behind every load balancer.

One flow, :func:`host_flow`, says what happens to a host, in order; the rollout runs it and
the dry run (:func:`plan`) shows it, so the two cannot drift. Per host (ARCHITECTURE.md
section 4): inspect (skip if already at the target and in service) -> record the drain
(write-ahead) -> drain on every LB -> wait for sessions to end (bounded) -> one session: stop
chef, install the package, re-apply the pending post-deployment patches of the host's role
(unless the build includes them), reconfigure, HUP/restart the role's services (their PIDs
must change) -> verify the running version -> health check -> ready on every LB -> wait
until every LB reports it UP -> clear the drain record -> start chef. A batch runs each of
these phases across its hosts (the host's own steps concurrently, LB changes batched).

Rules: batches of ``role.batch_size()``; roles of one stage run in parallel; a batch that
would take a role below its capacity floor is refused before anything is touched (hosts
already out of service count); the rollout stops after a batch with a failed host; a failed
host stays drained and recorded; a re-run skips finished hosts and repairs those left
drained. LB changes are batched (one connection per LB per batch); while a batch runs, the
next one is inspected (read-only) so its connections and version checks are ready.

Rollout mode (a role's ``rollout`` in the inventory, or ``options.rollout_mode`` for every
role): ``lockstep`` (the default, as above: batch after batch) or ``window``, a sliding window
like Kubernetes' maxUnavailable: at most the batch size of the role's hosts out of service at
once, the next host drained as soon as one is back UP on every LB and cleared. Hosts start in
groups (the slots free at that moment: one drain per LB), run the same phases, and past the
drain the hosts of a group whose own steps end together go on together, so a slow host holds
only itself. After a failed host nothing new is drained; the hosts in flight finish.

Chef (``options.chef_start``): ``"host"`` (default) starts chef on each host as soon as it
is back in service, but only when the environment's chef role already holds the target
version (checked once); ``"role"`` does the same at the end of a successful role;
``"cleanup"`` leaves it to :func:`liftoff.chef.finish`. Hosts left with chef stopped are
listed in the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from liftoff import chef as chef_mod
from liftoff import lbstate
from liftoff.commands import (
    apt_install_command,
    chained_command,
    chef_disable_command,
    chef_enable_command,
    gitlab_ctl_command,
    installed_version_command,
    patch_apply_command,
    split_step_output,
)
from liftoff.errors import CapacityError, HAProxyError, InvalidInput, LiftoffError
from liftoff.haproxy import HAProxy, ServerState, lb_hosts, out_of_service
from liftoff.inventory import ROLLOUT_MODES, Environment, HostRef, Role
from liftoff.remote import Remote
from liftoff.versions import parse_version, validate_name
from liftoff.window import WindowRollout

log = logging.getLogger(__name__)

PATCH_REAPPLY_STATUSES = ("applied", "pending")
CHEF_START_MODES = ("host", "role", "cleanup")
_STATUS_LINE = re.compile(r"^(?:ok: )?(run|down|fail|warning): ([A-Za-z0-9_.-]+):(?: \(pid (\d+)\))?")


SUMMARY_MAX_NAMES = 20  # host names a summary lists per role (and failed hosts); beyond: counts
SUMMARY_REASON_CHARS = 300


def _short(text: str, limit: int = SUMMARY_REASON_CHARS) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
    included_patches: tuple[str, ...] = ()  # patches the build being installed includes: not re-applied
    rollout_mode: str | None = None  # "lockstep" or "window" for every role; None: each role's own
    window_step: int = 0  # a window drains at least this many hosts at once; 0: 1/WINDOW_STEPS of its batch

    def __post_init__(self) -> None:
        if self.chef_start not in CHEF_START_MODES:
            raise InvalidInput(f"chef_start must be one of {', '.join(CHEF_START_MODES)}, "
                               f"got {self.chef_start!r}")
        if not isinstance(self.window_step, int) or self.window_step < 0:
            raise InvalidInput(f"window_step must be a number of hosts (0: automatic), "
                               f"got {self.window_step!r}")
        if self.rollout_mode is not None and self.rollout_mode not in ROLLOUT_MODES:
            raise InvalidInput(f"rollout_mode must be one of {', '.join(ROLLOUT_MODES)} (or unset), "
                               f"got {self.rollout_mode!r}")
        if isinstance(self.included_patches, str):
            raise InvalidInput("included_patches must be a list of patch ids, not one string")
        self.included_patches = tuple(validate_name("patch", p) for p in self.included_patches)
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
    mode: str = ""  # lockstep or window, once the role has started


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

    def summary(self, where: dict | None = None, max_names: int = SUMMARY_MAX_NAMES) -> dict:
        """What a task returns (its XCom): a few hundred bytes however big the fleet. Per role its
        status, host counts and batches (the host names of each batch when the role has at most
        ``max_names`` hosts, else each batch's host count); the failed hosts with their reasons
        (at most ``max_names``); ``where``: where the full report (:meth:`to_json`) is kept."""
        roles = {}
        for name, rr in self.roles.items():
            hosts = [h for h in self.hosts.values() if h.role == name]
            counts: dict[str, int] = {}
            for h in hosts:
                counts[h.status] = counts.get(h.status, 0) + 1
            small = len(hosts) <= max_names
            roles[name] = {"status": rr.status, "counts": counts, **({"mode": rr.mode} if rr.mode else {}),
                           "batches": [list(b) if small else len(b) for b in rr.batches],
                           **({"error": _short(rr.error)} if rr.error else {})}
        failed = self.failed_hosts
        chef_stopped = self.chef_stopped
        out = {"env": self.env, "version": self.version, "run_id": self.run_id, "rollout": self.rollout,
               "status": self.status, "duration": round(self.duration, 1), "counts": self.counts(),
               "roles": roles,
               "failed_hosts": {h: _short(r) for h, r in list(failed.items())[:max_names]},
               "chef_stopped": chef_stopped if len(chef_stopped) <= max_names else len(chef_stopped)}
        if len(failed) > max_names:
            out["failed_hosts_more"] = len(failed) - max_names
        if self.error:
            out["error"] = _short(self.error)
        if where is not None:
            out["report"] = where
        return out

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
    commands: list[str] = field(default_factory=list)  # the commands run on the host, one by one, in order

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


# -- post-deployment patches to apply again ------------------------------------------------------------

ALL_ROLES = "*"  # a patch record naming neither roles nor hosts (older records): every role


def _record_roles(rec: Any, env: Environment | str) -> tuple[str, ...]:
    """Where one patch record applies: its detail's ``roles`` (``patches.patch_detail``), else its
    hosts (mapped to their roles when the Environment is given; :func:`patches_for_role` matches
    a host name against the role holding it), else every role."""
    try:
        detail = json.loads(rec.detail) if rec.detail else {}
    except ValueError:
        detail = {}
    roles = detail.get("roles") if isinstance(detail, dict) else None
    if isinstance(roles, list) and roles:
        return tuple(dict.fromkeys(str(r) for r in roles))
    if rec.hosts:
        role_of = {} if isinstance(env, str) else {h.name: r.name for r in env.roles for h in r.hosts}
        return tuple(dict.fromkeys(role_of.get(h, h) for h in rec.hosts))
    return (ALL_ROLES,)


def pending_patches(store: Any, env: Environment | str) -> dict[str, tuple[str, ...]]:
    """Post-deployment patches recorded for ``env`` whose latest record is applied/pending (a new
    package drops them, so they are applied again), oldest first: {patch id: its roles}.

    A patch's roles are those of its records back to the last one that is neither applied,
    pending nor failed (a revert), each attempt (run) counted by its latest record and failed
    attempts (nothing applied) left out. A record without roles counts its hosts' roles (its
    host names when only the environment's name is given)."""
    if store is None:
        return {}
    history: dict[str, list[Any]] = {}
    for rec in store.patches(env if isinstance(env, str) else env.name):  # newest first
        history.setdefault(rec.patch_id, []).append(rec)
    out: dict[str, tuple[str, ...]] = {}
    for patch_id in reversed(list(history)):
        records = history[patch_id]
        if records[0].status not in PATCH_REAPPLY_STATUSES:
            continue
        roles: list[str] = []
        seen_runs: set[str] = set()
        for rec in records:
            if rec.status not in (*PATCH_REAPPLY_STATUSES, "failed"):
                break
            if rec.run_id in seen_runs or rec.status == "failed":
                seen_runs.add(rec.run_id)
                continue
            seen_runs.add(rec.run_id)
            roles[:0] = [r for r in _record_roles(rec, env) if r not in roles]  # oldest attempt first
        out[patch_id] = tuple(roles)
    return out


def patches_for_role(patches: Mapping[str, Sequence[str]], role: Role | str,
                     included: Iterable[str] = ()) -> list[str]:
    """The pending patches (:func:`pending_patches`) to apply again on a host of ``role`` after its
    install, in order: those applied to the role (named, or one of its hosts named, or every
    role), unless the build being installed includes them."""
    names = {role} if isinstance(role, str) else {role.name, *(h.name for h in role.hosts)}
    skip = set(included)
    return [p for p, where in patches.items()
            if p not in skip and (ALL_ROLES in where or not names.isdisjoint(where))]


def _patch_roles(patches: Mapping[str, Sequence[str]] | Iterable[str]) -> dict[str, tuple[str, ...]]:
    """{patch id: roles}; a plain list of patch ids (the older shape) means every role."""
    if isinstance(patches, Mapping):
        return {p: (r,) if isinstance(r, str) else tuple(r) for p, r in patches.items()}
    return {p: (ALL_ROLES,) for p in patches}


# -- the flow: one host's steps, run by the rollout and shown by the plan -------------------------------

FLOW_KINDS = ("inspect", "record", "drain", "sessions", "run", "verify", "health", "ready", "up", "clear",
              "chef")
HOST_KINDS = frozenset({"run", "verify", "health"})  # each host's own steps (concurrent within a batch)


@dataclass(frozen=True)
class Step:
    """One step of a host's flow (:func:`host_flow`): the rollout runs it, the plan shows ``text``."""

    kind: str  # one of FLOW_KINDS
    name: str  # "chef-stop", "install", "patch-<id>", "hup-<service>", ...; else the kind
    text: str  # the plan's line
    commands: tuple[tuple[str, str], ...] = ()  # (name, command) run on the host, in one session
    url: str = ""  # HTTP checks: what to GET


def inspect_step(version: str) -> Step:
    """The read-only first step: installed version and service PIDs, in one session."""
    return Step("inspect", "inspect",
                f"check: {installed_version_command()} && {gitlab_ctl_command('status')} "
                f"(one session; skip if {version} and in service)", INSPECT_STEPS)


def host_flow(env: Environment, role: Role, host: HostRef, version: str, *, reason: str,
              options: RolloutOptions, install: bool = True, patches: Iterable[str] = ()) -> list[Step]:
    """Every step of ``host``'s deploy, in order: the rollout runs exactly these, the plan shows them.

    ``install`` is False for a host already holding ``version`` (drained, being repaired);
    ``patches`` are the patches to apply again on it (:func:`patches_for_role`)."""
    return role_flow(env, role, version, reason=reason, options=options, install=install,
                     patches=patches)(host)


def role_flow(env: Environment, role: Role, version: str, *, reason: str, options: RolloutOptions,
              install: bool = True, patches: Iterable[str] = ()) -> Callable[[HostRef], list[Step]]:
    """:func:`host_flow` for the hosts of ``role``: the steps common to them built once."""
    lbs = ", ".join(lb.name for lb in env.load_balancers) or "no LB"
    port = app_port_for(env, role, options.app_port)
    drained = host_steps(reason, version if install else None, role, patches)
    pids = f" (PIDs of {', '.join(role.hup + role.restart) or '-'} changed, every service running)"
    last = len(drained) - 1
    session = [Step("run", name, f"run: {cmd}" + (pids if i == last else ONE_SESSION if i == 0 else ""),
                    ((name, cmd),)) for i, (name, cmd) in enumerate(drained)]
    inspect = inspect_step(version)
    sessions = Step("sessions", "sessions",
                    f"haproxy: wait until its sessions end (at most {options.drain_timeout:.0f}s)")
    verify = Step("verify", "verify", f"run: {installed_version_command()} == {version}",
                  (("version", installed_version_command()),))
    up = Step("up", "up", f"haproxy: wait until every LB reports it UP (at most {options.up_timeout:.0f}s)")
    tail = [] if options.chef_start == "cleanup" else [
        Step("chef", "chef-start", f"run: {chef_enable_command()} ({options.chef_start} end, "
             f"if the chef role holds {version})", (("chef-start", chef_enable_command()),))]

    def flow(host: HostRef) -> list[Step]:
        if port:
            base = f"http://{host.address}:{port}"
            checks = [Step("verify", "verify", f"http: GET {base}/api/v4/version == {version}",
                           url=f"{base}/api/v4/version"),
                      Step("health", "health", f"http: GET {base}/-/readiness == 200",
                           url=f"{base}/-/readiness")]
        else:
            checks = [verify]
        return [
            inspect,
            Step("record", "record", f"store: record {host.name} drained (write-ahead)"),
            Step("drain", "drain", f"haproxy: drain {host.name} in every backend on every LB ({lbs})"),
            sessions, *session, *checks,
            Step("ready", "ready", f"haproxy: ready {host.name} on every LB ({lbs})"),
            up,
            Step("clear", "clear", f"store: clear the drain record of {host.name}; status done"),
            *tail,
        ]

    return flow


def flow_commands(flow: Iterable[Step]) -> list[str]:
    """The commands a flow runs on its host, one by one (a session's commands each), in order."""
    return [command for step in flow for _, command in step.commands]


def batch_phases(flow: Sequence[Step]) -> list[str]:
    """The phases a batch runs for a flow, in order: its kinds after the inspection (which decided
    the batch's work), the host's own steps (HOST_KINDS) together as one ``host`` phase."""
    phases: list[str] = []
    for step in flow:
        kind = "host" if step.kind in HOST_KINDS else step.kind
        if kind != "inspect" and not (kind == "host" and phases and phases[-1] == "host"):
            phases.append(kind)
    return phases


def role_mode(role: Role, options: RolloutOptions) -> str:
    """``lockstep`` or ``window``: the options' choice, else the role's (inventory)."""
    return options.rollout_mode or role.rollout


# -- plan (dry run) ----------------------------------------------------------------------------------

def plan(env: Environment, roles: Iterable[str] | None, version: str, *, run_id: str = "dry-run",
         options: RolloutOptions | None = None,
         patches: Mapping[str, Sequence[str]] | Sequence[str] = (),
         out_of_service: Iterable[str] = ()) -> list[HostPlan]:
    """Every host's flow (:func:`host_flow`) in order, batch by batch, touching nothing.

    ``patches``: the pending patches and their roles (:func:`pending_patches`; a list of patch
    ids means every role); ``options.included_patches`` are left out. Raises like the real run
    would: InvalidVersion, InventoryError for an unknown role, CapacityError for a batch below
    the floor (hosts in ``out_of_service`` counted)."""
    options = options or RolloutOptions()
    version = str(parse_version(version))
    reason = options.reason or chef_mod.deploy_reason(run_id)
    patch_roles = _patch_roles(patches)
    out = set(out_of_service)
    plans: list[HostPlan] = []
    for role in select_roles(env, roles):
        batches = make_batches(order_hosts(role, out), role.batch_size())
        check_capacity(env, role, batches, out)
        flow_of = role_flow(env, role, version, reason=reason, options=options,
                            patches=patches_for_role(patch_roles, role, options.included_patches))
        for i, batch in enumerate(batches):
            for h in batch:
                flow = flow_of(h)
                plans.append(HostPlan(role.name, role.stage, i + 1, h.name, h.address,
                                      [s.text for s in flow], flow_commands(flow)))
    return plans


# -- the rollout -----------------------------------------------------------------------------------------

@dataclass
class _Inspection:
    installed: str | None = None
    pids: dict[str, int | None] | None = None
    error: str = ""


@dataclass
class _Batch:
    """One batch while its phases run (:meth:`_Rollout._batch`)."""

    role: Role
    index: int
    hosts: list[HostRef]
    insp: dict[str, _Inspection]
    phase: dict[str, float]  # seconds per phase (the role report's batch_phases)
    installing_started: Callable[[], None]
    total: int = 0  # the role's number of batches (for the log)
    mark: float = field(default_factory=time.monotonic)
    work: list[HostRef] = field(default_factory=list)  # hosts to deploy (not skipped, not failed)
    flows: dict[str, list[Step]] = field(default_factory=dict)  # their flows
    statuses: list[tuple[str, str, str]] = field(default_factory=list)  # rows of skipped/failed hosts
    failed_early: bool = False  # a host failed its inspection
    lb_work: list[str] = field(default_factory=list)  # the work hosts the LBs know
    draining: asyncio.Task | None = None  # writing the "draining" statuses
    t0: float = 0.0  # when the drain started
    good: list[HostRef] = field(default_factory=list)  # work hosts still fine
    not_up: dict[str, dict[str, str]] = field(default_factory=dict)  # host -> {LB: why not UP}
    kind: str = "batch"  # "window group" in a sliding-window rollout (liftoff.window)
    # told after classifying and after each phase; False after classifying: start nothing
    on_phase: Callable[[str, _Batch], bool] | None = None

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.phase[name] = self.phase.get(name, 0.0) + now - self.mark
        self.mark = now

    @property
    def label(self) -> str:
        """``batch 2 of web`` (``window group 7 of web``): what the LB log lines say instead of
        the host names."""
        return f"{self.kind} {self.index} of {self.role.name}"

    @property
    def position(self) -> str:
        """``batch 2 of 5`` (``window group 7``)."""
        return f"{self.kind} {self.index} of {self.total}" if self.total else f"{self.kind} {self.index}"

    def tell(self, phase: str) -> bool:
        return self.on_phase is None or self.on_phase(phase, self)


class _LBPhases:
    """The batch phases on the load balancers and the records: drain, the sessions' end, the
    reconcile before the install, ready, UP, clear (a part of :class:`_Rollout`)."""

    async def _drain(self, b: _Batch) -> bool:
        """Drain the batch on every LB at once; if that fails, the batch fails (hosts stay recorded)."""
        for h in b.work:
            self.report.hosts[h.name].step = "drain"
        try:
            async with self.lb_turn:  # never while a reconcile reads the LBs and the records
                try:
                    if b.lb_work:
                        await self.haproxy.adrain(b.lb_work, snapshot=self.last_snapshot, label=b.label)
                finally:
                    self.unsettled.difference_update(h.name for h in b.work)
        except HAProxyError as exc:
            return await self._fail_batch(b, f"drain failed: {exc}")
        b.lap("drain")
        return True

    async def _fail_batch(self, b: _Batch, reason: str) -> bool:
        """Every host of the batch failed at its drain (they stay recorded); False."""
        for h in b.work:
            self._fail(h, "drain", reason)
        if b.draining is not None:
            await b.draining
        await self._set_statuses([(h.name, "failed", self.report.hosts[h.name].reason) for h in b.work])
        return False

    async def _wait_sessions(self, b: _Batch) -> bool:
        """Wait (bounded) until the drained hosts' sessions end; those still open are noted. Then,
        right before the install, every LB is read again: one that lost liftoff's state (an LB
        restarted since the drain) gets it back (:mod:`liftoff.lbstate`), or the batch fails."""
        timeout = self.options.drain_timeout
        left = await self.haproxy.await_sessions_zero(b.lb_work, timeout) if b.lb_work else {}
        b.lap("sessions")
        for name, n in (left or {}).items():
            self.report.hosts[name].notes.append(
                f"{n} session(s) still open after {timeout:.0f}s")
        try:
            if b.lb_work:
                await self.haproxy.amark(b.label)  # a restart from now on is noticed (_wait_up)
            fixed = await self._reconcile(f"{b.label}, before its install", self.haproxy.marks.get(b.label))
        except HAProxyError as exc:
            return await self._fail_batch(b, f"could not check every LB before the install: {exc}")
        for lb, counts in fixed.changed.items():
            what = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))
            for name in b.lb_work:
                self.report.hosts[name].notes.append(f"{lb} had lost liftoff's state before the install "
                                                     f"(restarted?): put back ({what} server line(s))")
        return True

    async def _reconcile(self, why: str,
                         processes: dict[str, str | None] | None = None) -> lbstate.Reconciled:
        """Put liftoff's recorded LB state back on an LB that lost it. This rollout's hosts in
        the middle of a change are left alone: those being put back in service (ready, not yet
        cleared) and those recorded but not drained yet (another batch, role or window group of
        this run drains them in a moment). A drain waits for the reconcile (``lb_turn``): what the
        reconcile reads of the LBs and of the records is not changed by this run meanwhile.

        An LB loses state by restarting (HAProxy keeps runtime changes while its process lives):
        when every LB runs the process it ran at this rollout's last full reconcile, and no LB
        command failed or was refused since (an LB may hold part of a change), nothing was lost
        and the reconcile is one ``show info`` per LB instead of every LB's every server and the
        records (a batch's cost no longer grows with the fleet). The first reconcile of a
        rollout is always full, as is the door's (:mod:`liftoff.guard`) before it. ``processes``:
        the LBs' processes just read (the batch's mark), not read again."""
        if self.store is None or not self.env.load_balancers:
            return lbstate.Reconciled()
        def changing() -> set[str]:  # asked once the LBs and the records are read
            readying = {n for n, hr in self.report.hosts.items()
                        if hr.status == "done" or (hr.step == "ready" and hr.status != "failed")}
            return readying | self.unsettled

        async with self.lb_turn:
            processes = processes or await self.haproxy.aprocesses()
            seen = (processes, self.haproxy.failures)
            if seen == self.lb_settled and None not in processes.values():
                return lbstate.Reconciled()
            done = await lbstate.areconcile(self.haproxy, self.store, self.env.name, self.run_id, "liftoff",
                                            skip=changing, why=why)
            self.lb_settled = seen
            return done

    async def _note_restarts(self, b: _Batch) -> None:
        """LBs running another HAProxy process than before the batch's install (marked in
        :meth:`_wait_sessions`): restarted, they came back with their config's states, the batch's
        hosts in service while being upgraded. Said in the report, the log and the lock history."""
        try:
            restarted = await self.haproxy.arestarted_since(b.label)
        except HAProxyError:
            return  # the next read of every LB fails closed
        if not restarted or not b.lb_work:
            return
        what = ", ".join(restarted)
        sentence = (f"{what} restarted during the install of {b.label} ({len(b.lb_work)} host(s)): they may "
                    "have been in service there while being upgraded")
        log.warning("haproxy: %s", sentence)
        for name in b.lb_work:
            self.report.hosts[name].notes.append(f"{what} restarted during its install: it may have been in "
                                                 "service there while it was upgraded")
        if self.store is not None:
            await self._db(self.store.record_event, self.env.name, "lb_restarted", self.run_id, "liftoff",
                           sentence)

    async def _host_flows(self, b: _Batch) -> bool:
        """Each host's own steps (:meth:`_host`), concurrently; the next batch's inspection starts
        once every host here is installing."""
        waiting_to_start = len(b.work)

        def host_started() -> None:
            nonlocal waiting_to_start
            waiting_to_start -= 1
            if waiting_to_start == 0:
                b.installing_started()

        if b.draining is not None:
            await b.draining
        installing = self._set_statuses([(h.name, "installing", f"batch {b.index}") for h in b.work])
        flows = asyncio.gather(*(self._host(b.role, h, b.flows[h.name], b.insp[h.name], host_started)
                                 for h in b.work))
        _, errors = await asyncio.gather(installing, flows)
        b.lap("hosts")
        b.good = [h for h, e in zip(b.work, errors, strict=True) if e is None]
        for h, e in zip(b.work, errors, strict=True):
            if e is not None:
                self._fail(h, self.report.hosts[h.name].step, e)
        return True

    async def _ready(self, b: _Batch) -> bool:
        """Back in service: ready on every LB (the hosts the LBs know)."""
        good_lb = [h.name for h in b.good if h.name in self.lb_names]
        if good_lb:
            for name in good_lb:
                self.report.hosts[name].step = "ready"
            try:
                await self.haproxy.aready(good_lb, label=b.label)
                b.lap("ready")
            except HAProxyError as exc:
                b.not_up = {name: {"*": f"ready failed: {exc}"} for name in good_lb}
        return True

    async def _wait_up(self, b: _Batch) -> bool:
        """Wait until every LB reports the hosts UP; those that are not fail and are drained again.
        An LB restarted during the batch (its hosts may have been in service there while they
        were upgraded) is said in the report, the log and the lock history."""
        await self._note_restarts(b)
        good_lb = [h.name for h in b.good if h.name in self.lb_names]
        if good_lb and not b.not_up:
            try:
                b.not_up = await self.haproxy.await_up(good_lb, self.options.up_timeout)
                b.lap("up")
            except HAProxyError as exc:
                b.not_up = {name: {"*": f"ready failed: {exc}"} for name in good_lb}
        if not b.not_up:
            return True
        for name, where in b.not_up.items():
            detail = "; ".join(f"{lb}: {s}" for lb, s in where.items())
            self._fail(self.env.host(name), "up", f"not UP on every LB after "
                       f"{self.options.up_timeout:.0f}s: {detail}")
        try:  # a failed host stays drained
            await self.haproxy.adrain(list(b.not_up), label=f"{b.label} (not UP)")
        except HAProxyError as exc:
            for name in b.not_up:
                self.report.hosts[name].notes.append(f"could not drain it again: {exc}")
        b.good = [h for h in b.good if h.name not in b.not_up]
        return True

    async def _clear(self, b: _Batch) -> bool:
        """The hosts back in service are done: their drain records go, every host's status is written."""
        reports = self.report.hosts
        now = time.monotonic()
        for h in b.good:
            hr = reports[h.name]
            hr.status, hr.step, hr.duration = "done", "done", round(now - b.t0, 3)
            log.info("%s: %s -> %s in %.1f s (%s%s)", h.name, hr.from_version or "?", self.version,
                     hr.duration, b.position, ", repaired" if hr.repaired else "")

        def finish() -> None:
            self.store.clear_drained_many(self.env.name, [h.name for h in b.good])
            self.store.forget_lb_state([h.name for h in b.good])  # in service now, whatever was set before
            self._statuses([(h.name, reports[h.name].status, reports[h.name].reason or
                             ("repaired" if reports[h.name].repaired else "")) for h in b.work])

        if self.store is not None:
            await asyncio.to_thread(finish)
        try:  # an LB restarted during the batch gets liftoff's state back (the next read fails closed)
            await self._reconcile(f"after {b.label}")
        except HAProxyError as exc:
            log.warning("could not check every LB after %s: %s", b.label, exc)
        return True


class _HostSteps:
    """One host's own steps once drained: its SSH session of commands, the PID check, the HTTP
    or command checks (a part of :class:`_Rollout`)."""

    # -- one host --------------------------------------------------------------------------------
    async def _host(self, role: Role, h: HostRef, flow: list[Step], insp: _Inspection,
                    started: Callable[[], None] = lambda: None) -> str | None:
        """The host's own steps of its flow, in order: consecutive commands in one SSH session
        (:meth:`_session_steps`), then the checks (:meth:`_checks`). None when it is ready to go
        back in service, else why not."""
        own = (s for s in flow if s.kind in HOST_KINDS)
        for is_session, group in itertools.groupby(own, key=lambda s: s.kind == "run"):
            steps = list(group)
            if is_session:
                commands = [c for s in steps for c in s.commands]
                err = await self._session_steps(role, h, commands, insp, started)
                started = _no_callback  # once per host: when its first session runs
            else:
                err = await self._checks(h, steps)
            if err:
                return err
        return None

    async def _session_steps(self, role: Role, h: HostRef, steps: list[tuple[str, str]], insp: _Inspection,
                             started: Callable[[], None]) -> str | None:
        """Chef stop, install, patches, reconfigure, HUP/restarts, status: one SSH session, stopping
        at the first step that fails; then the restarted services' PIDs must have changed."""
        hr = self.report.hosts[h.name]
        hr.step = STEP_KIND[steps[0][0].split("-", 1)[0]]
        limit = self.options.install_timeout + self.options.command_timeout * len(steps)
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
        return self._pids_changed(role, insp, done["status"]) if "status" in done else None

    @staticmethod
    def _pids_changed(role: Role, insp: _Inspection, status: str) -> str | None:
        after = parse_pids(status)
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
        return None

    async def _checks(self, h: HostRef, steps: list[Step]) -> str | None:
        """The version and health checks: over HTTP (retried until health_timeout, for them all)
        or the installed version by command."""
        hr = self.report.hosts[h.name]
        deadline = time.monotonic() + self.options.health_timeout
        for step in steps:
            hr.step = step.kind
            if step.url:
                err = await self._http_check(step, deadline)
                if err:
                    return err
                continue
            r = await self.remote.run(h, step.commands[0][1], self.options.command_timeout)
            if not r.ok or r.stdout.strip() != self.version:
                return f"installed version is {r.stdout.strip() or '?'} after install, not {self.version}"
        return None

    # -- HTTP checks -----------------------------------------------------------------------------
    async def _session(self) -> Any:
        if self._http is None:
            import aiohttp

            # a host's checks follow each other on one kept-alive connection (it is idle after)
            connector = aiohttp.TCPConnector(limit=256, keepalive_timeout=2.0)
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5), connector=connector)
        return self._http

    async def _close_http(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _http_check(self, step: Step, deadline: float) -> str | None:
        """GET the step's URL until it answers as wanted (``verify``: the running version from
        /api/v4/version; ``health``: 200 from /-/readiness), retried until ``deadline``."""
        session = await self._session()
        path = urlsplit(step.url).path
        last = ""
        while True:
            try:
                async with session.get(step.url) as resp:
                    if step.kind == "verify":
                        body = await resp.json(content_type=None) if resp.status == 200 else {}
                        running = body.get("version") if isinstance(body, dict) else None
                        if running == self.version:
                            return None
                        last = f"GET {path}: HTTP {resp.status}, running {running!r}, want {self.version}"
                    else:
                        if resp.status == 200:
                            return None
                        last = f"GET {path}: HTTP {resp.status}"
            except Exception as exc:  # refused, reset, timeout, bad JSON
                last = f"GET {path}: {type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                return f"{'version check' if step.kind == 'verify' else 'health check'} failed: {last}"
            await asyncio.sleep(0.5)


class _Rollout(_LBPhases, _HostSteps, WindowRollout):
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
        self.unsettled: set[str] = set()  # drain recorded, drain not applied yet (see _reconcile)
        self.lb_turn = asyncio.Lock()  # a drain and a reconcile take turns (see _reconcile)
        self.last_snapshot: dict[str, list[ServerState]] | None = None
        # each LB's process and the LB failures at the last full reconcile (see _reconcile)
        self.lb_settled: tuple[dict[str, str | None], int] | None = None
        self.patches: dict[str, tuple[str, ...]] = {}  # pending patches and their roles
        self.previous: dict[str, str] = {}  # host statuses of earlier runs of this rollout
        self.reason = options.reason or chef_mod.deploy_reason(run_id)
        self.inspect_step = inspect_step(version)
        self.flows: dict[str, list[Step]] = {}  # the flow of every host deployed
        self._role_flows: dict[tuple[str, bool], Callable[[HostRef], list[Step]]] = {}
        self._chef_role_ok: asyncio.Task | None = None
        self._http: Any = None
        self._closable: list[HostRef] = []  # hosts of ended batches whose connections are still open
        self._closing: set[asyncio.Task] = set()

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
        # the first batches' SSH connections open (no command runs) while the LBs and the records
        # are read: at 1,000 hosts, connecting a batch is the longest wait of the first batch
        first = [h for r in stage_groups(roles)[0] for h in r.hosts[:r.batch_size()]] if roles else []
        warm = asyncio.create_task(self.remote.prepare(first))
        try:
            return await self._run(roles)
        finally:
            warm.cancel()
            await asyncio.gather(warm, return_exceptions=True)

    async def _run(self, roles: list[Role]) -> RolloutReport:
        out, _ = await self._out_of_service()  # every LB must answer before anything changes
        plans: dict[str, list[list[HostRef]]] = {}
        for role in roles:
            batches = make_batches(order_hosts(role, out), role.batch_size())
            check_capacity(self.env, role, batches, out)
            plans[role.name] = batches
        self.patches = await self._db(pending_patches, self.store, self.env) or {}
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
        rr.mode = role_mode(role, self.options)
        try:
            if rr.mode == "window":
                await self._window(role, [h for batch in batches for h in batch])
            else:
                await self._lockstep(role, batches)
            if rr.status != "running":
                return
            rr.status = "success"
            if self.options.chef_start == "role":
                done = [h for h in role.hosts if self.report.hosts[h.name].status == "done"]
                await self._start_chef(done)
        finally:
            await asyncio.gather(*self._closing, return_exceptions=True)
            await asyncio.gather(*(self.remote.close_host(h) for h in role.hosts), return_exceptions=True)

    async def _lockstep(self, role: Role, batches: list[list[HostRef]]) -> None:
        """Batch after batch (each inspected while the one before installs); stops after a batch
        with a failed host (role failed) or when another role failed (role stopped)."""
        rr = self.report.roles[role.name]
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
                    self._close_pending()
                    if hosts is not None and prefetch is None:
                        prefetch = asyncio.create_task(self._inspect_all(hosts))

                started = time.monotonic()
                rr.batches.append([h.name for h in batch])
                try:
                    ok = await self._batch(role, i + 1, batch, inspections, phase, start_prefetch,
                                           total=len(batches))
                except LiftoffError as exc:
                    rr.error = str(exc)
                    ok = False
                rr.batch_durations.append(round(time.monotonic() - started, 3))
                rr.batch_phases.append({k: round(v, 3) for k, v in phase.items()})
                if not ok:
                    self._role_failed(role, f"batch {i + 1}")
                    return
        finally:
            if prefetch is not None:
                prefetch.cancel()
                await asyncio.gather(prefetch, return_exceptions=True)

    def _role_failed(self, role: Role, where: str) -> None:
        """The role failed (``where``: its batch or window group); every role stops."""
        rr = self.report.roles[role.name]
        rr.status = "failed"
        if not rr.error:
            bad = [h.name for h in role.hosts if self.report.hosts[h.name].status == "failed"]
            rr.error = f"{where} failed on {', '.join(bad)}"
        self.stop.set()

    # -- sliding window ------------------------------------------------------------------------------
    async def _inspect_all(self, hosts: list[HostRef]) -> dict[str, _Inspection]:
        results = await asyncio.gather(*(self._inspect(h) for h in hosts))
        return {h.name: r for h, r in zip(hosts, results, strict=True)}

    async def _inspect(self, host: HostRef) -> _Inspection:
        """The flow's first step: installed version and service PIDs, in one session (read-only)."""
        steps = self.inspect_step.commands
        r = await self.remote.run(host, chained_command(steps), self.options.command_timeout)
        if r.exit_code is None:
            return _Inspection(error=f"unreachable: {r.describe()}")
        done, _ = split_step_output(steps, r.stdout)
        installed = done.get("version", "").strip() or None
        return _Inspection(installed, parse_pids(done["status"]) if "status" in done else {})

    # -- one batch -----------------------------------------------------------------------------
    async def _batch(self, role: Role, index: int, hosts: list[HostRef], insp: dict[str, _Inspection],
                     phase: dict[str, float], installing_started: Callable[[], None] = lambda: None,
                     total: int = 0, on_phase: Callable[[str, _Batch], bool] | None = None) -> bool:
        """Classify the batch's hosts by their inspection, then run the phases of their flows
        (:func:`host_flow`, :func:`batch_phases`) in order across the batch. False when a host
        failed or a phase stopped the batch. ``on_phase`` (a window's group) is told after
        classifying (False: touch nothing) and after each phase; a group's hosts go on apart
        after their drain (:meth:`_window_hosts`)."""
        b = _Batch(role, index, hosts, insp, phase, installing_started, total,
                   kind="batch" if on_phase is None else "window group", on_phase=on_phase)
        await self._classify(b)
        if not b.tell("classify"):
            await self._set_statuses(b.statuses)
            await self._close(hosts)
            return False
        if not b.work:
            installing_started()
            await self._set_statuses(b.statuses)
            await self._close(hosts)
            return not b.failed_early
        handlers = {"record": self._write_ahead, "drain": self._drain, "sessions": self._wait_sessions,
                    "host": self._host_flows, "ready": self._ready, "up": self._wait_up,
                    "clear": self._clear, "chef": self._chef_at_batch_end}
        phases = self._phases(b)
        for i, kind in enumerate(phases):
            if kind == "host" and b.on_phase is not None:
                ok = await self._window_hosts(b, handlers, phases[i + 1:])
                await self._close(hosts)
                return ok and not b.failed_early
            if not await handlers[kind](b):
                return False
            b.tell(kind)
        b.lap("finish")
        self._closable.extend(hosts)  # closed once the next batch installs (_close_pending)
        return not b.failed_early and len(b.good) == len(b.work)

    def _flow(self, role: Role, host: HostRef, install: bool) -> list[Step]:
        """The host's flow (:func:`host_flow`); the steps common to a role built once."""
        key = (role.name, install)
        if key not in self._role_flows:
            patches = patches_for_role(self.patches, role, self.options.included_patches)
            self._role_flows[key] = role_flow(self.env, role, self.version, reason=self.reason,
                                              options=self.options, install=install, patches=patches)
        return self._role_flows[key](host)

    @staticmethod
    def _phases(b: _Batch) -> list[str]:
        phases = {tuple(batch_phases(flow)) for flow in b.flows.values()}
        if len(phases) != 1:  # cannot happen: flows differ only in their commands
            raise LiftoffError(f"batch {b.index} of {b.role.name}: its hosts' flows differ: {sorted(phases)}")
        return list(phases.pop())

    async def _classify(self, b: _Batch) -> None:
        """Hosts whose inspection failed fail; those at the target and in service are skipped;
        the others (those out of service are repaired) get their flow. Refuses (CapacityError) a
        batch that would leave the role below its floor."""
        out, why = await self._out_of_service()
        b.lap("lb_check")
        for h in b.hosts:
            hr = self.report.hosts[h.name]
            hr.batch = b.index
            i = b.insp[h.name]
            hr.from_version = i.installed
            if i.error:
                hr.status, hr.step, hr.reason = "failed", "inspect", i.error
                b.statuses.append((h.name, "failed", i.error))
                b.failed_early = True
            elif i.installed == self.version and h.name not in out:
                hr.status, hr.step = "skipped", "inspect"
                log.info("%s: already at %s and in service, skipped (%s)", h.name, self.version, b.position)
                if self.previous.get(h.name) != "done":  # keep "done" from an earlier run of this rollout
                    b.statuses.append((h.name, "skipped", f"already at {self.version} and in service"))
            else:
                hr.repaired = h.name in out
                if hr.repaired:
                    hr.notes.append(f"was out of service: {why.get(h.name, '')}")
                b.work.append(h)
                b.flows[h.name] = self.flows[h.name] = self._flow(b.role, h, i.installed != self.version)
        check_capacity(self.env, b.role, [b.work], out & {h.name for h in b.role.hosts})
        b.lb_work = [h.name for h in b.work if h.name in self.lb_names]

    async def _write_ahead(self, b: _Batch) -> bool:
        """Record the drains: the records exist before any LB is touched."""
        self.unsettled.update(h.name for h in b.work)  # recorded, not drained yet: not reconciled
        if self.store is not None:
            why = f"liftoff deploy {self.version} (batch {b.index} of {b.role.name})"
            await asyncio.to_thread(self.store.record_drained_many, self.env.name, [h.name for h in b.work],
                                    self.run_id, why)
        b.lap("write_ahead")
        b.draining = asyncio.create_task(self._set_statuses(
            b.statuses + [(h.name, "draining", f"batch {b.index}") for h in b.work]))
        b.t0 = time.monotonic()
        return True


    async def _chef_at_batch_end(self, b: _Batch) -> bool:
        """Chef starts on the done hosts now (``chef_start="host"``; "role": at the role's end)."""
        if self.options.chef_start == "host":
            await self._start_chef(b.good)
        return True

    def _fail(self, host: HostRef, step: str, reason: str) -> None:
        hr = self.report.hosts[host.name]
        hr.status, hr.step, hr.reason = "failed", step, reason
        log.warning("%s failed at step %s: %s", host.name, step, reason)

    async def _close(self, hosts: list[HostRef]) -> None:
        await asyncio.gather(*(self.remote.close_host(h) for h in hosts), return_exceptions=True)

    def _close_pending(self) -> None:
        """The connections of the batches that ended close now, while a batch installs: closing
        a hundred between two batches held the next drain, and the hosts' sshd ended them while
        the next batch's sessions started (the role's end closes whatever is left)."""
        if self._closable:
            hosts, self._closable = self._closable, []
            task = asyncio.create_task(self._close(hosts))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)


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
        """The chef step of the hosts' flows, if the chef role holds the target version."""
        steps = {h.name: s for h in hosts for s in self.flows.get(h.name, ()) if s.kind == "chef"}
        hosts = [h for h in hosts if h.name in steps]
        if not hosts:
            return
        if not await self._chef_role_at_target():
            for h in hosts:
                self.report.hosts[h.name].notes.append(
                    f"chef left stopped: the {self.env.name} chef role does not hold {self.version} yet")
            return
        results = await asyncio.gather(*(self.remote.run(h, steps[h.name].commands[0][1],
                                                         self.options.command_timeout) for h in hosts))
        for h, r in zip(hosts, results, strict=True):
            hr = self.report.hosts[h.name]
            if r.ok:
                hr.chef = "started"
            else:
                hr.notes.append(f"could not start chef: {r.describe()}")


def _no_callback() -> None:
    pass


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
        with _startup_objects_frozen():
            return await _Rollout(env, version, run_id, store, remote, haproxy, options).run(selected)
    finally:
        if own_remote:
            await remote.close()


# while a rollout runs, the young generation is collected every this many new objects (default 700)
GC_YOUNG_THRESHOLD = 20_000
_gc_quiet_depth = 0  # rollouts running in this process: the first sets, the last one to end restores
_gc_threshold = gc.get_threshold()  # the thresholds before the first of them


@contextlib.contextmanager
def _startup_objects_frozen():
    """While the rollout runs, the objects alive at its start (imported modules, Airflow's and the
    task's state) are left out of the garbage collector's scans (``gc.freeze``) and the young
    generation is collected less often (:data:`GC_YOUNG_THRESHOLD`): at 1,000 hosts the
    collections cost 0.8 ms of CPU per host (14%, bench/fleet_rollout.py). Nothing is lost: the
    objects are scanned again and the thresholds are back once the last running rollout ends."""
    global _gc_quiet_depth, _gc_threshold
    if _gc_quiet_depth == 0:
        _gc_threshold = gc.get_threshold()
        gc.freeze()
        gc.set_threshold(max(_gc_threshold[0], GC_YOUNG_THRESHOLD), *_gc_threshold[1:])
    _gc_quiet_depth += 1
    try:
        yield
    finally:
        _gc_quiet_depth -= 1
        if _gc_quiet_depth == 0:
            gc.set_threshold(*_gc_threshold)
            gc.unfreeze()


def run_rollout(env: Environment, version: str, **kwargs) -> RolloutReport:
    """Synchronous :func:`rollout` (for a plain Airflow task)."""
    return asyncio.run(rollout(env, version, **kwargs))
