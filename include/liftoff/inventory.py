"""The inventory: environments, their URLs, load balancers, deploy node and roles in order.

One YAML (or JSON) file per installation, path from ``LIFTOFF_INVENTORY`` by default.
Loading validates everything; any bad field raises :class:`InventoryError` naming the
field path, e.g. ``environments.gstg.roles[1].batch``. Unknown keys are refused too (a
typo must not silently fall back to a default); free-form additions go under ``extra``.

Rounding: ``batch`` is a percentage of the role's hosts rounded down (at least one host)
or an absolute count; ``capacity_floor`` is the share (or count) of hosts that must stay in
service, rounded up, but never so high that no host could be deployed (at most hosts - 1).
A role's ``rollout`` is ``lockstep`` (the default: batch after batch) or ``window`` (at most
a batch's worth of hosts out of service at once, the next drained as soon as one is back; see
liftoff.fleet).
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from liftoff.errors import InvalidInput, InventoryError, LiftoffError
from liftoff.versions import validate_name

DEFAULT_CONNECTIONS: dict[str, str] = {
    "ssh": "liftoff_ssh",
    "gitlab": "liftoff_ops_gitlab",
    "alertmanager": "liftoff_alertmanager",
    "pushgateway": "liftoff_pushgateway",
    "prometheus": "liftoff_prometheus",
    "state": "liftoff_state",
    "builds": "liftoff_builds",
}
DEFAULT_BATCH = "10%"
DEFAULT_CAPACITY_FLOOR = "0%"
ROLLOUT_MODES = ("lockstep", "window")  # how a role's batches move (liftoff.fleet)
DEFAULT_ROLLOUT = "lockstep"
DEFAULT_QA_PROJECT = "gitlab-org/quality/gitlab-qa-runner"
DEFAULT_QA_REF = "main"


@dataclass(frozen=True)
class HostRef:
    name: str
    address: str


@dataclass(frozen=True)
class LoadBalancerRef:
    """A load balancer and its HAProxy runtime API (``admin``) address."""

    name: str
    host: str
    port: int

    @property
    def admin(self) -> str:
        return f"{self.host}:{self.port}"


def _parse_share(value: Any, path: str, *, allow_zero: bool) -> tuple[str, float]:
    """``"10%"`` -> ("percent", 10.0); ``3`` or ``"3"`` -> ("count", 3)."""
    if isinstance(value, bool):
        raise InventoryError(f"{path}: expected a percentage like '10%' or a host count, got {value!r}")
    if isinstance(value, int):
        kind, number = "count", float(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*%\s*", value):
        kind, number = "percent", float(value.strip().rstrip("%").strip())
        if number > 100:
            raise InventoryError(f"{path}: {value!r} is more than 100%")
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        kind, number = "count", float(value)
    else:
        raise InventoryError(f"{path}: expected a percentage like '10%' or a host count, got {value!r}")
    if number < 0 or (number == 0 and not allow_zero):
        least = "at least 0" if allow_zero else "more than 0"
        raise InventoryError(f"{path}: must be {least}, got {value!r}")
    return kind, number


@dataclass(frozen=True)
class Role:
    name: str
    stage: str
    batch: str
    capacity_floor: str
    restart: tuple[str, ...]
    hup: tuple[str, ...]
    hosts: tuple[HostRef, ...]
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    rollout: str = DEFAULT_ROLLOUT  # "lockstep": batch after batch; "window": at most a batch out at once

    def batch_size(self) -> int:
        """Hosts per batch: a percentage (rounded down) or a count, at least 1, at most all."""
        n = len(self.hosts)
        kind, number = _parse_share(self.batch, f"role {self.name} batch", allow_zero=False)
        size = math.floor(n * number / 100) if kind == "percent" else int(number)
        return max(1, min(n, size)) if n else 0

    def min_in_service(self) -> int:
        """Hosts that must stay in service: the floor rounded up, at most hosts - 1."""
        n = len(self.hosts)
        kind, number = _parse_share(self.capacity_floor, f"role {self.name} capacity_floor", allow_zero=True)
        floor = math.ceil(n * number / 100 - 1e-9) if kind == "percent" else int(number)
        return max(0, min(floor, n - 1))

    def max_out_of_service(self) -> int:
        """How many hosts of the role may be out of service at once."""
        return len(self.hosts) - self.min_in_service()

    def host(self, name: str) -> HostRef:
        for h in self.hosts:
            if h.name == name:
                return h
        raise InventoryError(f"role {self.name} has no host {name!r}")


@dataclass(frozen=True)
class Environment:
    name: str
    url: str
    qa_cookie: str | None
    database: str
    canary_of: str | None
    alert_matchers: Mapping[str, str]
    load_balancers: tuple[LoadBalancerRef, ...]
    deploy_node: HostRef
    roles: tuple[Role, ...]
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_canary(self) -> bool:
        return self.canary_of is not None

    def role(self, name: str) -> Role:
        for r in self.roles:
            if r.name == name:
                return r
        known = ", ".join(r.name for r in self.roles)
        raise InventoryError(f"environment {self.name} has no role {name!r} (roles: {known})")

    def roles_in_stage(self, stage: str) -> tuple[Role, ...]:
        return tuple(r for r in self.roles if r.stage == stage)

    def stages(self) -> tuple[str, ...]:
        """Stages in the order their first role appears (e.g. gitaly, fleet)."""
        seen: dict[str, None] = {}
        for r in self.roles:
            seen.setdefault(r.stage, None)
        return tuple(seen)

    def hosts(self) -> tuple[HostRef, ...]:
        """Every host of every role, in role order (the deploy node is separate)."""
        return tuple(h for r in self.roles for h in r.hosts)

    def host(self, name: str) -> HostRef:
        if name == self.deploy_node.name:
            return self.deploy_node
        for h in self.hosts():
            if h.name == name:
                return h
        raise InventoryError(f"environment {self.name} has no host {name!r}")

    def role_of(self, host: str) -> Role:
        for r in self.roles:
            if any(h.name == host for h in r.hosts):
                return r
        raise InventoryError(f"environment {self.name} has no host {host!r}")


@dataclass(frozen=True)
class QAConfig:
    """Where QA pipelines run on the ops instance (None: take the connection's or the default)."""

    project: str | None = None
    ref: str | None = None
    timeout_s: float = 1800.0
    poll_s: float = 10.0


@dataclass(frozen=True)
class Inventory:
    connections: Mapping[str, str]
    environments: Mapping[str, Environment]
    qa: QAConfig = field(default_factory=QAConfig)
    source: str = ""

    def env(self, name: str) -> Environment:
        try:
            return self.environments[name]
        except KeyError:
            known = ", ".join(self.environments) or "none"
            raise InventoryError(
                f"unknown environment {_brief(name)} (inventory {self.source or '?'} has: {known})") from None

    def conn_id(self, purpose: str) -> str:
        """The Airflow connection id for ``ssh``, ``gitlab``, ``alertmanager``, ..."""
        try:
            return self.connections[purpose]
        except KeyError:
            raise InventoryError(f"connections.{purpose}: not set in the inventory") from None


# -- loading --------------------------------------------------------------------------------

def _brief(value: object, limit: int = 40) -> str:
    """A value fit for an error message: quoted and bounded."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(value))} characters)"


def load_inventory(path: str | os.PathLike[str] | None = None) -> Inventory:
    """Read and validate the inventory file (default: env ``LIFTOFF_INVENTORY``)."""
    if path is None:
        path = os.environ.get("LIFTOFF_INVENTORY")
        if not path:
            raise InventoryError("no inventory given and LIFTOFF_INVENTORY is not set")
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise InventoryError(f"cannot read inventory {p}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InventoryError(f"inventory {p} is not valid YAML{where}") from None
    return parse_inventory(data, source=str(p))



DEFAULT_ENVIRONMENTS = ("gstg", "gprd-cny", "gprd")


def environment_names(inventory: Inventory | None = None) -> list[str]:
    """The inventory's environments (GitLab.com's three when no inventory can be read), e.g. for
    a Param's enum at DAG parse time."""
    if inventory is None:
        try:
            inventory = load_inventory()
        except LiftoffError:
            return list(DEFAULT_ENVIRONMENTS)
    return list(inventory.environments)


def parse_inventory(data: Any, source: str = "<data>") -> Inventory:
    """Validate an inventory given as plain data (what the YAML file holds)."""
    top = _mapping(data, "inventory")
    _known_keys(top, "", {"connections", "environments", "qa"})
    connections = dict(DEFAULT_CONNECTIONS)
    for key, value in _mapping(top.get("connections") or {}, "connections").items():
        _name("label", key, f"connections.{key}")
        connections[key] = _name("conn_id", value, f"connections.{key}")
    envs_data = _mapping(top.get("environments"), "environments")
    if not envs_data:
        raise InventoryError("environments: must define at least one environment")
    environments: dict[str, Environment] = {}
    for name, env_data in envs_data.items():
        _name("env", name, f"environments.{name}")
        environments[name] = _environment(name, env_data, f"environments.{name}")
    _check_cross(environments)
    qa = _qa(top.get("qa"), "qa")
    return Inventory(connections, environments, qa, source)


_ENV_KEYS = {"url", "qa_cookie", "database", "canary_of", "alert_matchers", "load_balancers",
             "deploy_node", "roles", "extra"}
_ROLE_KEYS = {"name", "stage", "batch", "capacity_floor", "rollout", "restart", "hup", "hosts", "extra"}


def _environment(name: str, data: Any, path: str) -> Environment:
    d = _mapping(data, path)
    _known_keys(d, path, _ENV_KEYS)
    url = _url(_required(d, "url", path), f"{path}.url")
    cookie = d.get("qa_cookie")
    if cookie is not None and (not isinstance(cookie, str) or
                               not re.fullmatch(r"[A-Za-z0-9_.-]+=[A-Za-z0-9_.-]*", cookie)):
        raise InventoryError(f"{path}.qa_cookie: expected null or one cookie like 'gitlab_canary=true', "
                             f"got {cookie!r}")
    database = _name("database", d.get("database") or name, f"{path}.database")
    canary_of = d.get("canary_of")
    if canary_of is not None:
        canary_of = _name("env", canary_of, f"{path}.canary_of")
        if canary_of == name:
            raise InventoryError(f"{path}.canary_of: an environment cannot be the canary of itself")
    matchers_data = _mapping(_required(d, "alert_matchers", path), f"{path}.alert_matchers")
    if not matchers_data:
        raise InventoryError(f"{path}.alert_matchers: must name at least one label, e.g. {{env: {name}}}")
    matchers: dict[str, str] = {}
    for label, value in matchers_data.items():
        mpath = f"{path}.alert_matchers.{label}"
        _name("label", label, mpath)
        if not isinstance(value, str) or not value or any(c in value for c in '"\\\n\r') or len(value) > 200:
            raise InventoryError(f"{mpath}: expected a plain label value, got {value!r}")
        matchers[label] = value
    lbs = tuple(_load_balancer(lb, f"{path}.load_balancers[{i}]")
                for i, lb in enumerate(_sequence(d.get("load_balancers") or [], f"{path}.load_balancers")))
    _unique([lb.name for lb in lbs], f"{path}.load_balancers", "load balancer")
    deploy_node = _host(_required(d, "deploy_node", path), f"{path}.deploy_node")
    roles_data = _sequence(_required(d, "roles", path), f"{path}.roles")
    if not roles_data:
        raise InventoryError(f"{path}.roles: must list at least one role")
    roles = tuple(_role(r, f"{path}.roles[{i}]") for i, r in enumerate(roles_data))
    _unique([r.name for r in roles], f"{path}.roles", "role")
    names = [h.name for r in roles for h in r.hosts] + [deploy_node.name]
    _unique(names, f"{path}.roles", "host")
    extra = _mapping(d.get("extra") or {}, f"{path}.extra")
    return Environment(name, url, cookie, database, canary_of, matchers, lbs, deploy_node, roles, extra)


def _role(data: Any, path: str) -> Role:
    d = _mapping(data, path)
    _known_keys(d, path, _ROLE_KEYS)
    name = _name("role", _required(d, "name", path), f"{path}.name")
    stage = _name("stage", _required(d, "stage", path), f"{path}.stage")
    batch = d.get("batch", DEFAULT_BATCH)
    _parse_share(batch, f"{path}.batch", allow_zero=False)
    floor = d.get("capacity_floor", DEFAULT_CAPACITY_FLOOR)
    _parse_share(floor, f"{path}.capacity_floor", allow_zero=True)
    rollout = d.get("rollout", DEFAULT_ROLLOUT)
    if rollout not in ROLLOUT_MODES:
        raise InventoryError(f"{path}.rollout: must be one of {', '.join(ROLLOUT_MODES)}, "
                             f"got {_brief(rollout)}")
    restart = tuple(_name("service", s, f"{path}.restart[{i}]")
                    for i, s in enumerate(_sequence(d.get("restart") or [], f"{path}.restart")))
    hup = tuple(_name("service", s, f"{path}.hup[{i}]")
                for i, s in enumerate(_sequence(d.get("hup") or [], f"{path}.hup")))
    both = set(restart) & set(hup)
    if both:
        raise InventoryError(f"{path}.hup: {sorted(both)} also listed under restart")
    hosts_data = _sequence(_required(d, "hosts", path), f"{path}.hosts")
    if not hosts_data:
        raise InventoryError(f"{path}.hosts: must list at least one host")
    hosts = tuple(_host(h, f"{path}.hosts[{i}]") for i, h in enumerate(hosts_data))
    extra = _mapping(d.get("extra") or {}, f"{path}.extra")
    return Role(name, stage, str(batch), str(floor), restart, hup, hosts, extra, rollout)


def _host(data: Any, path: str) -> HostRef:
    d = _mapping(data, path)
    _known_keys(d, path, {"name", "address"})
    name = _name("host", _required(d, "name", path), f"{path}.name")
    address = _address(_required(d, "address", path), f"{path}.address")
    return HostRef(name, address)


def _load_balancer(data: Any, path: str) -> LoadBalancerRef:
    d = _mapping(data, path)
    _known_keys(d, path, {"name", "admin", "host", "port"})
    name = _name("lb", _required(d, "name", path), f"{path}.name")
    if "admin" in d:
        admin = d["admin"]
        if not isinstance(admin, str) or ":" not in admin:
            raise InventoryError(
                f"{path}.admin: expected 'host:port' of the HAProxy runtime API, got {admin!r}")
        host, _, port = admin.rpartition(":")
        host = host.strip("[]")
    else:
        host, port = _required(d, "host", path), _required(d, "port", path)
    host = _address(host, f"{path}.admin")
    return LoadBalancerRef(name, host, _port(port, f"{path}.admin"))


def _qa(data: Any, path: str) -> QAConfig:
    if data is None:
        return QAConfig()
    d = _mapping(data, path)
    _known_keys(d, path, {"project", "ref", "timeout", "poll"})
    project = d.get("project")
    if project is not None and (not isinstance(project, str) or
                                not re.fullmatch(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*|[0-9]+", project)
                                or ".." in project):
        raise InventoryError(
            f"{path}.project: expected a project path like {DEFAULT_QA_PROJECT}, got {project!r}")
    ref = d.get("ref")
    if ref is not None and (not isinstance(ref, str) or ".." in ref
                            or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}", ref)):
        raise InventoryError(f"{path}.ref: expected a branch or tag name, got {ref!r}")
    timeout = _positive(d.get("timeout", QAConfig.timeout_s), f"{path}.timeout")
    poll = _positive(d.get("poll", QAConfig.poll_s), f"{path}.poll")
    return QAConfig(project, ref, timeout, poll)


def _check_cross(environments: dict[str, Environment]) -> None:
    owner: dict[str, str] = {}
    for env in environments.values():
        if env.canary_of is not None:
            target = environments.get(env.canary_of)
            if target is None:
                raise InventoryError(
                    f"environments.{env.name}.canary_of: unknown environment {env.canary_of!r}")
            if target.canary_of is not None:
                raise InventoryError(f"environments.{env.name}.canary_of: {env.canary_of} is itself a canary")
        for h in (*env.hosts(), env.deploy_node):
            if h.name in owner and owner[h.name] != env.name:
                raise InventoryError(f"environments.{env.name}: host {h.name} is also in {owner[h.name]}")
            owner[h.name] = env.name


# -- field helpers ----------------------------------------------------------------------------

def _mapping(value: Any, path: str) -> dict:
    if value is None:
        raise InventoryError(f"{path}: missing")
    if not isinstance(value, dict):
        raise InventoryError(f"{path}: expected a mapping, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise InventoryError(f"{path}: keys must be text, got {key!r}")
    return value


def _sequence(value: Any, path: str) -> list:
    if not isinstance(value, list):
        raise InventoryError(f"{path}: expected a list, got {type(value).__name__}")
    return value


def _required(d: dict, key: str, path: str) -> Any:
    if key not in d or d[key] is None:
        raise InventoryError(f"{path}.{key}: missing")
    return d[key]


def _known_keys(d: dict, path: str, allowed: set[str]) -> None:
    for key in d:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise InventoryError(f"{where}: unknown field (allowed: {', '.join(sorted(allowed))})")


def _name(kind: str, value: Any, path: str) -> str:
    try:
        return validate_name(kind, value)
    except InvalidInput as exc:
        raise InventoryError(f"{path}: {exc}") from None


def _unique(names: list[str], path: str, what: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise InventoryError(f"{path}: {what} {n!r} is listed twice")
        seen.add(n)


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*")


def _address(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise InventoryError(f"{path}: expected an IP address or host name, got {value!r}")
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if len(value) > 253 or not _HOSTNAME_RE.fullmatch(value):
        raise InventoryError(f"{path}: {value!r} is not an IP address or host name")
    return value


def _port(value: Any, path: str) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise InventoryError(f"{path}: port {value!r} is not a number") from None
    if isinstance(value, bool) or not 1 <= port <= 65535:
        raise InventoryError(f"{path}: port {value!r} is out of range 1..65535")
    return port


def _url(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise InventoryError(f"{path}: expected an http(s) URL, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
        raise InventoryError(
            f"{path}: expected an http(s) URL like https://staging.gitlab.com, got {value!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise InventoryError(f"{path}: bad port in {value!r}") from None
    return value.rstrip("/")


def _positive(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise InventoryError(f"{path}: expected a positive number of seconds, got {value!r}")
    return float(value)
