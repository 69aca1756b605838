"""The lab's GitLab.com: environments, roles, hosts, load balancers and their addresses.

Host names follow GitLab.com (``web-01-sv-gprd``, ``web-cny-01-sv-gprd``,
``gitaly-01-stor-gstg``); every host owns one loopback address.
"""

from __future__ import annotations

from dataclasses import dataclass

from lab.config import LabConfig

ENVIRONMENTS = ("gstg", "gprd-cny", "gprd")
ROLES = ("deploy", "gitaly", "web", "api", "git", "sidekiq")
# Roles that take HTTP traffic behind HAProxy; gitaly, sidekiq and deploy do not.
LB_ROLES = ("web", "api", "git")
# Environments sharing one database: canary uses production's.
DATABASE = {"gstg": "gstg", "gprd-cny": "gprd", "gprd": "gprd"}
CANARY_WEIGHT = 5
MAIN_WEIGHT = 100

DEFAULT_HOSTS: dict[str, dict[str, int]] = {
    "gstg": {"deploy": 1, "gitaly": 1, "web": 2, "api": 2, "git": 2, "sidekiq": 1},
    "gprd-cny": {"deploy": 1, "gitaly": 1, "web": 3, "api": 2, "git": 2, "sidekiq": 1},
    "gprd": {"deploy": 1, "gitaly": 2, "web": 3, "api": 3, "git": 2, "sidekiq": 2},
}
# Share of hosts per (env, role) when scaling to N hosts.
SCALE_WEIGHTS: dict[str, dict[str, float]] = {
    "gstg": {"gitaly": 1, "web": 2, "api": 2, "git": 2, "sidekiq": 1},
    "gprd-cny": {"gitaly": 1, "web": 2, "api": 2, "git": 2, "sidekiq": 1},
    "gprd": {"gitaly": 8, "web": 40, "api": 30, "git": 12, "sidekiq": 10},
}


@dataclass(frozen=True)
class Host:
    name: str
    env: str
    role: str
    addr: str

    @property
    def canary(self) -> bool:
        return self.env == "gprd-cny"

    @property
    def tier(self) -> str:
        return "gstg" if self.env == "gstg" else "gprd"


@dataclass(frozen=True)
class LoadBalancer:
    name: str
    tier: str  # gstg or gprd; a gprd LB carries gprd and gprd-cny servers
    addr: str


def host_counts(scale: int | None = None, overrides: dict[str, dict[str, int]] | None = None):
    """Hosts per env and role: the default size, or about ``scale`` hosts in all."""
    counts = {env: dict(roles) for env, roles in DEFAULT_HOSTS.items()}
    if scale:
        fixed = len(ENVIRONMENTS)  # one deploy node per env
        total_weight = sum(sum(w.values()) for w in SCALE_WEIGHTS.values())
        for env, weights in SCALE_WEIGHTS.items():
            for role, w in weights.items():
                counts[env][role] = max(1, round((scale - fixed) * w / total_weight))
    for env, roles in (overrides or {}).items():
        if env not in ENVIRONMENTS:
            raise ValueError(f"unknown environment {env!r}; expected one of {ENVIRONMENTS}")
        for role, n in roles.items():
            if role not in ROLES or n < 1:
                raise ValueError(f"bad host count {env}:{role}={n}")
            counts[env][role] = n
    return counts


def host_name(env: str, role: str, index: int) -> str:
    tier = "gstg" if env == "gstg" else "gprd"
    cny = "-cny" if env == "gprd-cny" else ""
    kind = "stor" if role == "gitaly" else "sv"
    return f"{role}{cny}-{index:02d}-{kind}-{tier}"


class Topology:
    """Every host and LB of a lab, with its address."""

    def __init__(self, config: LabConfig):
        self.config = config
        counts = config.hosts or host_counts()
        self.hosts: list[Host] = []
        seq = 0
        for env in ENVIRONMENTS:
            for role in ROLES:
                for i in range(1, counts[env].get(role, 0) + 1):
                    addr = f"{config.net}.{10 + seq // 250}.{1 + seq % 250}"
                    self.hosts.append(Host(host_name(env, role, i), env, role, addr))
                    seq += 1
        self.by_name = {h.name: h for h in self.hosts}
        self.by_addr = {h.addr: h for h in self.hosts}
        self.lbs = [
            LoadBalancer("fe-01-lb-gstg", "gstg", f"{config.net}.1.1"),
            LoadBalancer("fe-01-lb-gprd", "gprd", f"{config.net}.1.2"),
            LoadBalancer("fe-02-lb-gprd", "gprd", f"{config.net}.1.3"),
        ]

    def env_hosts(self, env: str, role: str | None = None) -> list[Host]:
        return [h for h in self.hosts if h.env == env and (role is None or h.role == role)]

    def lbs_for(self, env: str) -> list[LoadBalancer]:
        tier = "gstg" if env == "gstg" else "gprd"
        return [lb for lb in self.lbs if lb.tier == tier]

    def deploy_node(self, env: str) -> Host:
        return self.env_hosts(env, "deploy")[0]

    def env_url(self, env: str) -> str:
        """Front end QA and users reach the environment on (canary: its front end)."""
        lb = self.lbs_for(env)[0]
        port = self.config.lb_canary_port if env == "gprd-cny" else self.config.lb_http_port
        return f"http://{lb.addr}:{port}"

    @property
    def size(self) -> int:
        return len(self.hosts)
