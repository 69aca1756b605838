"""Where a lab lives: its directory, its loopback network and its ports.

Two labs never collide: each owns one 127.<octet>.0.0/16 network and a port range
derived from the octet, and keeps its state under its own directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OCTET = 42


def default_lab_dir() -> Path:
    return Path(os.environ.get("LIFTOFF_LAB_DIR", REPO_ROOT / ".lab"))


@dataclass
class LabConfig:
    """Settings of one lab; written to ``<lab_dir>/lab.json`` by ``lab up``."""

    lab_dir: Path = field(default_factory=default_lab_dir)
    octet: int = DEFAULT_OCTET
    install_seconds: float = 0.5
    migration_seconds: float = 0.3
    chef_interval: float = 5.0
    traffic_rps: float = 4.0
    user: str = field(default_factory=lambda: os.environ.get("USER") or "root")
    hosts: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lab_dir = Path(self.lab_dir)
        if not 2 <= self.octet <= 254:
            raise ValueError(f"lab octet must be within 2..254, got {self.octet}")

    # -- network -----------------------------------------------------------------
    @property
    def net(self) -> str:
        return f"127.{self.octet}"

    @property
    def port_base(self) -> int:
        return 20000 + self.octet * 100

    @property
    def control_addr(self) -> str:
        """labd: host simulator, GitLab API and control endpoints."""
        return f"{self.net}.0.2"

    @property
    def ssh_port(self) -> int:
        return self.port_base + 22

    @property
    def app_port(self) -> int:
        """Port of the simulated GitLab application on every host address."""
        return self.port_base + 1

    @property
    def gitlab_port(self) -> int:
        return self.port_base + 2

    @property
    def hostsim_port(self) -> int:
        return self.port_base + 7

    @property
    def control_port(self) -> int:
        return self.port_base + 8

    @property
    def prometheus_addr(self) -> str:
        return f"{self.net}.0.3:{self.port_base + 3}"

    @property
    def alertmanager_addr(self) -> str:
        return f"{self.net}.0.4:{self.port_base + 4}"

    @property
    def pushgateway_addr(self) -> str:
        return f"{self.net}.0.5:{self.port_base + 5}"

    @property
    def chat_addr(self) -> str:
        """The chat receiver (a Slack-style incoming webhook, lab/chat.py)."""
        return f"{self.net}.0.6:{self.port_base + 6}"

    @property
    def lb_http_port(self) -> int:
        return self.port_base + 10

    @property
    def lb_canary_port(self) -> int:
        return self.port_base + 11

    @property
    def lb_stats_port(self) -> int:
        return self.port_base + 12

    @property
    def lb_admin_port(self) -> int:
        return self.port_base + 13

    @property
    def gitlab_url(self) -> str:
        return f"http://{self.control_addr}:{self.gitlab_port}"

    # -- paths ---------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.lab_dir.joinpath(*parts)

    @property
    def config_file(self) -> Path:
        return self.path("lab.json")

    def save(self) -> None:
        self.lab_dir.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        data["lab_dir"] = str(self.lab_dir)
        self.config_file.write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, lab_dir: Path | None = None) -> LabConfig:
        lab_dir = Path(lab_dir) if lab_dir else default_lab_dir()
        file = lab_dir / "lab.json"
        if not file.exists():
            raise FileNotFoundError(f"no lab at {lab_dir} (run: python -m lab up)")
        data = json.loads(file.read_text())
        data["lab_dir"] = lab_dir
        return cls(**data)
