"""Each lab LB's runtime API also answers on a Unix socket (level admin, mode 600): what tools
that only speak to a local socket need (Ansible's community.general.haproxy, used by
bench/compare_ansible.py). Against the session lab's real HAProxy processes."""

from __future__ import annotations

import socket
import stat

import pytest

from lab import configs
from lab.cli import parse_show_stat
from tests.labkit import Lab, wait_for

pytestmark = pytest.mark.lab


def unix_command(path, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


def test_every_lb_answers_on_its_unix_socket_at_admin_level(lab: Lab) -> None:
    for lb in lab.topology.lbs:
        path = configs.lb_admin_socket(lab.config, lb)
        assert path is not None and path.parent == lab.config.path("run").absolute()
        mode = path.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
        pid = lab.config.path("run", f"haproxy-{lb.name}.pid").read_text().strip()
        info = unix_command(path, "show info")
        assert "Name: HAProxy" in info and f"Pid: {pid}\n" in info

    # a change made on the Unix socket is the one the TCP runtime API (liftoff's) sees
    lb = lab.topology.lbs_for("gprd")[0]
    host = lab.topology.env_hosts("gprd", "web")[0].name
    path = configs.lb_admin_socket(lab.config, lb)

    def status() -> str:
        return parse_show_stat(lab.haproxy(lb.name, "show stat"))[host]["web"]["status"]

    assert unix_command(path, f"set server web/{host} state drain").strip() == ""
    try:
        assert status() == "DRAIN"
    finally:
        unix_command(path, f"set server web/{host} state ready")
    wait_for(f"{host} UP on {lb.name}", lambda: status() == "UP", timeout=30)
