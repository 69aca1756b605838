"""Configuration of the lab's external processes: sshd, HAProxy, Prometheus, Alertmanager.

Everything is generated from ``LabConfig`` + ``Topology`` into ``<lab_dir>``; nothing binds
outside 127.0.0.0/8 except sshd, which listens on the wildcard (to answer on every host
address) and refuses peers outside loopback.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import yaml

from lab.config import LabConfig
from lab.topology import CANARY_WEIGHT, LB_ROLES, MAIN_WEIGHT, LoadBalancer, Topology

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")
CANARY_COOKIE = "gitlab_canary"
# Backends on every LB whose emptiness is an outage (BackendNoServers).
LB_BACKENDS = LB_ROLES + tuple(f"canary_{r}" for r in LB_ROLES)


class ConfigError(RuntimeError):
    """A generated configuration did not validate."""


# -- paths ---------------------------------------------------------------------------------
def ssh_dir(config: LabConfig) -> Path:
    return config.path("ssh")


def sshd_config_file(config: LabConfig) -> Path:
    return config.path("ssh", "sshd_config")


# ECDSA P-256 keys and ECDH P-256 key exchange: OpenSSH computes them with OpenSSL's optimised
# code, while its bundled ed25519/curve25519 reference code costs about 7 ms of sshd CPU per
# connection; the lab's one sshd answers for up to 1,000 hosts (production hosts each run their
# own). liftoff itself accepts any key type the SSH provider does.
KEY_TYPE = ("ecdsa", "256")
HOST_KEY = "ssh_host_ecdsa_key"
KEX_ALGORITHMS = "ecdh-sha2-nistp256"


def client_key(config: LabConfig) -> Path:
    return config.path("ssh", "id_ecdsa")


def known_hosts_file(config: LabConfig) -> Path:
    return config.path("ssh", "known_hosts")


def denied_file(config: LabConfig) -> Path:
    """Addresses of unreachable hosts, one per line (written by labd)."""
    return config.path("ssh", "denied_addresses")


def haproxy_config_file(config: LabConfig, lb: LoadBalancer) -> Path:
    return config.path("haproxy", f"{lb.name}.cfg")


# HAProxy binds a Unix socket through a temporary "<path>.<pid>.tmp" name and refuses paths
# longer than about 97 bytes.
UNIX_SOCKET_MAX = 90


def lb_admin_socket(config: LabConfig, lb: LoadBalancer) -> Path | None:
    """The LB's runtime API as a Unix socket as well (level admin, mode 600), for tools that
    only speak to a local socket (Ansible's ``community.general.haproxy``); None when the lab
    directory's path is too long for one."""
    path = config.path("run", f"haproxy-{lb.name}.sock").absolute()
    return path if len(str(path).encode()) <= UNIX_SOCKET_MAX else None


def prometheus_config_file(config: LabConfig) -> Path:
    return config.path("prometheus", "prometheus.yml")


def alertmanager_config_file(config: LabConfig) -> Path:
    return config.path("alertmanager", "alertmanager.yml")


def pid_file(config: LabConfig, name: str) -> Path:
    return config.path("run", f"{name}.pid")


# -- scaling -------------------------------------------------------------------------------
def lb_servers(topology: Topology, lb: LoadBalancer) -> int:
    """Server lines on one LB (canary hosts count twice: main and canary backends)."""
    n = 0
    for host in topology.hosts:
        if host.role in LB_ROLES and host.tier == lb.tier:
            n += 2 if host.canary else 1
    return n


def check_interval_ms(servers: int) -> int:
    """1 s below 100 servers, growing linearly to 10 s at 1,000: the lab's one app process
    answers every LB's health checks for every host (2,000 servers x 2 LBs at 5 s were 400
    checks a second, a fifth of a core)."""
    if servers <= 100:
        return 1000
    return min(10000, int(1000 + 9000 * (servers - 100) / 900))


def scrape_interval_s(hosts: int) -> int:
    """Fast scrapes for test-sized labs; at fleet scale a production-like 30 s, so that
    scraping 1,000 app targets does not take a quarter of a small machine's CPU."""
    if hosts <= 100:
        return 1
    if hosts <= 300:
        return 2
    return 30


# -- ssh -----------------------------------------------------------------------------------
def ensure_keys(config: LabConfig) -> None:
    """Host key and client key (kept across restarts), authorized_keys."""
    d = ssh_dir(config)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for key in (d / HOST_KEY, client_key(config)):
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", KEY_TYPE[0], "-b", KEY_TYPE[1], "-N", "", "-C",
                 f"liftoff-lab-{config.octet}", "-f", str(key)],
                check=True, stdin=subprocess.DEVNULL,
            )
    pub = Path(f"{client_key(config)}.pub").read_text().strip()
    auth = d / "authorized_keys"
    auth.write_text(pub + "\n")
    os.chmod(auth, 0o600)


def known_hosts(config: LabConfig, topology: Topology) -> str:
    """One verified entry per host address: ``[addr]:port ecdsa-sha2-nistp256 KEY``."""
    key = " ".join(config.path("ssh", f"{HOST_KEY}.pub").read_text().split()[:2])
    return "".join(f"[{h.addr}]:{config.ssh_port} {key}\n" for h in topology.hosts)


def denied_addresses(config: LabConfig) -> list[str]:
    file = denied_file(config)
    if not file.exists():
        return []
    return sorted({line.strip() for line in file.read_text().splitlines() if line.strip()})


def _sshd_check(*flags: str, option: str = "") -> subprocess.CompletedProcess:
    """Run this sshd on a throwaway config (a fresh host key, plus ``option``) with ``flags``."""
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp, "k")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True, stdin=subprocess.DEVNULL)
        cfg = Path(tmp, "c")
        cfg.write_text(f"HostKey {key}\nListenAddress 127.0.0.1:1\n{option}\n")
        return subprocess.run([SSHD, *flags, "-f", str(cfg)], capture_output=True, text=True)


@functools.cache
def sshd_supports(option: str) -> bool:
    """Whether the installed sshd knows a config keyword (PerSourcePenalties came in 9.8)."""
    return "Bad configuration option" not in _sshd_check("-T", option=option).stderr


@functools.cache
def sshd_flags() -> tuple[str, ...]:
    """Extra sshd flags: ``-r`` (no re-exec per connection) where this sshd accepts it.

    The lab's one sshd answers for up to 1,000 hosts on a few cores; re-executing itself for
    every connection roughly doubles its CPU per connection (27 -> 16 ms measured). Each
    production host runs its own sshd, so this only keeps the lab from being the bottleneck."""
    return ("-r",) if _sshd_check("-t", "-r").returncode == 0 else ()


def force_command(config: LabConfig) -> str:
    """sshd runs ForceCommand with the user's shell: bash sources the relay (one exec less per
    SSH command than running it as a script); any other shell runs the script."""
    script = ssh_dir(config) / "hostsim.sh"
    try:
        shell = pwd.getpwnam(config.user).pw_shell
    except KeyError:
        shell = ""
    return f". {script}" if shell.endswith("/bash") else str(script)


def sshd_config(config: LabConfig, denied: list[str] | None = None) -> str:
    d = ssh_dir(config)
    lines = [
        "# Generated by lab/configs.py; regenerated on every lab up and fault.",
        f"ListenAddress 0.0.0.0:{config.ssh_port}",
        f"HostKey {d / HOST_KEY}",
        f"KexAlgorithms {KEX_ALGORITHMS}",
        f"PidFile {pid_file(config, 'sshd')}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}",
        f"AllowUsers {config.user}@127.0.0.0/8",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitTTY no",
        "PermitUserRC no",
        "PermitUserEnvironment no",
        "AllowTcpForwarding no",
        "AllowAgentForwarding no",
        "AllowStreamLocalForwarding no",
        "X11Forwarding no",
        "PermitTunnel no",
        "GatewayPorts no",
        "PrintMotd no",
        "PrintLastLog no",
        "UseDNS no",
        "MaxStartups 2000:30:4000",
        "MaxSessions 200",
        "MaxAuthTries 3",
        "LoginGraceTime 30",
        "ClientAliveInterval 30",
        "LogLevel ERROR",
        f"ForceCommand {force_command(config)}",
        # sshd runs ForceCommand through the user's shell; Debian's bash sources ~/.bashrc
        # when started by sshd at SHLVL < 2 (slow rc files cost every command). Not so at 2.
        "SetEnv SHLVL=1",
    ]
    if sshd_supports("PerSourcePenalties no"):
        lines.append("PerSourcePenalties no")
    # Unreachable hosts (host-down fault): refuse every login on their address.
    denied = denied_addresses(config) if denied is None else denied
    for i in range(0, len(denied), 50):
        lines += [f"Match LocalAddress {','.join(denied[i:i + 50])}", "    DenyUsers *"]
    return "\n".join(lines) + "\n"


def write_sshd_config(config: LabConfig) -> Path:
    file = sshd_config_file(config)
    tmp = file.with_name(file.name + ".new")
    tmp.write_text(sshd_config(config))
    check_sshd(config, tmp)
    os.replace(tmp, file)
    return file


def sshd_in_sync(config: LabConfig) -> bool:
    """Whether sshd_config reflects ``ssh/denied_addresses``."""
    file = sshd_config_file(config)
    return file.exists() and file.read_text() == sshd_config(config)


def ensure_privsep_dir() -> None:
    """sshd run by root (even ``sshd -t``) refuses to work without /run/sshd, which only
    the distribution's sshd service creates."""
    if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)


def check_sshd(config: LabConfig, file: Path | None = None) -> None:
    ensure_privsep_dir()
    out = subprocess.run([SSHD, "-t", "-f", str(file or sshd_config_file(config))],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"sshd -t: {out.stderr.strip()}")


def reload_sshd(config: LabConfig, timeout: float = 10.0) -> None:
    """Regenerate sshd_config from ``ssh/denied_addresses`` and reload sshd (SIGHUP).

    sshd re-executes itself on SIGHUP (same PID) and writes its pid file again; return
    once it has done so and its port answers.
    """
    with _reload_lock:
        _reload_sshd(config, timeout)


_reload_lock = threading.Lock()


def _reload_sshd(config: LabConfig, timeout: float) -> None:
    write_sshd_config(config)
    pidf = pid_file(config, "sshd")
    pid = int(pidf.read_text().strip())
    before = pidf.stat().st_mtime_ns
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    from lab.processes import tcp_answers  # noqa: PLC0415 - processes imports this module

    while time.monotonic() < deadline:
        if pidf.exists() and pidf.stat().st_mtime_ns != before and tcp_answers(
            config.control_addr, config.ssh_port, banner=b"SSH-"
        ):
            return
        time.sleep(0.05)
    raise TimeoutError(f"sshd (pid {pid}) did not come back after SIGHUP")


def write_ssh(config: LabConfig, topology: Topology) -> None:
    from lab.hostsim import relay_script  # noqa: PLC0415 - written by another module owner

    ensure_keys(config)
    known_hosts_file(config).write_text(known_hosts(config, topology))
    script = ssh_dir(config) / "hostsim.sh"
    script.write_text(relay_script(config))
    os.chmod(script, 0o755)
    write_sshd_config(config)


# -- haproxy -------------------------------------------------------------------------------
def haproxy_config(config: LabConfig, topology: Topology, lb: LoadBalancer) -> str:
    inter = check_interval_ms(lb_servers(topology, lb))
    gprd = lb.tier == "gprd"
    main_env = lb.tier
    out = [
        f"# {lb.name}: generated by lab/configs.py",
        "global",
        "    maxconn 5000",
        "    nbthread 1",
        f"    stats socket ipv4@{lb.addr}:{config.lb_admin_port} level admin",
        *([f"    stats socket {sock} mode 600 level admin"] if (sock := lb_admin_socket(config, lb)) else []),
        "    stats timeout 30s",
        "",
        "defaults",
        "    mode http",
        "    balance roundrobin",
        "    option redispatch",
        "    retries 1",
        "    timeout connect 1s",
        "    timeout client 15s",
        "    timeout server 15s",
        "    timeout http-request 5s",
        "    timeout queue 5s",
        "    timeout check 2s",
        "    option httpchk GET /-/readiness",
        "    http-check expect status 200",
        f"    default-server inter {inter} fastinter {inter} downinter {inter} rise 1 fall 2",
        "",
        "frontend stats",
        f"    bind {lb.addr}:{config.lb_stats_port}",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "    stats enable",
        "    stats uri /stats",
        "    stats refresh 5s",
        "",
        "frontend main",
        f"    bind {lb.addr}:{config.lb_http_port}",
        "    acl is_api path /api",
        "    acl is_api path_beg /api/",
        "    acl is_git path_sub .git/",
        "    acl is_git path_beg /git",
    ]
    if gprd:
        out += [
            f"    acl canary req.cook({CANARY_COOKIE}) -m str true",
            "    use_backend canary_api if canary is_api",
            "    use_backend canary_git if canary is_git",
            "    use_backend canary_web if canary",
        ]
    out += ["    use_backend api if is_api", "    use_backend git if is_git", "    default_backend web", ""]
    if gprd:
        out += [
            "frontend canary",
            f"    bind {lb.addr}:{config.lb_canary_port}",
            "    acl is_api path /api",
            "    acl is_api path_beg /api/",
            "    acl is_git path_sub .git/",
            "    acl is_git path_beg /git",
            "    use_backend canary_api if is_api",
            "    use_backend canary_git if is_git",
            "    default_backend canary_web",
            "",
        ]
    for role in LB_ROLES:
        out.append(f"backend {role}")
        for h in topology.env_hosts(main_env, role):
            out.append(f"    server {h.name} {h.addr}:{config.app_port} check weight {MAIN_WEIGHT}")
        if gprd:
            for h in topology.env_hosts("gprd-cny", role):
                out.append(f"    server {h.name} {h.addr}:{config.app_port} check weight {CANARY_WEIGHT}")
        out.append("")
    if gprd:
        for role in LB_ROLES:
            out.append(f"backend canary_{role}")
            for h in topology.env_hosts("gprd-cny", role):
                out.append(f"    server {h.name} {h.addr}:{config.app_port} check weight {MAIN_WEIGHT}")
            out.append("")
    return "\n".join(out)


def check_haproxy(file: Path) -> None:
    out = subprocess.run(["haproxy", "-c", "-q", "-f", str(file)], capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"haproxy -c -f {file}: {(out.stdout + out.stderr).strip()}")


def write_haproxy(config: LabConfig, topology: Topology) -> list[Path]:
    files = []
    for lb in topology.lbs:
        file = haproxy_config_file(config, lb)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(haproxy_config(config, topology, lb))
        check_haproxy(file)
        files.append(file)
    return files


# -- prometheus ----------------------------------------------------------------------------
def app_targets(config: LabConfig, topology: Topology) -> list[dict]:
    return [
        {"targets": [f"{h.addr}:{config.app_port}"], "labels": {"env": h.env, "role": h.role, "host": h.name}}
        for h in topology.hosts
    ]


def prometheus_config(config: LabConfig, topology: Topology) -> dict:
    interval = scrape_interval_s(topology.size)
    evaluation = 1 if interval <= 2 else 5
    prom_dir = config.path("prometheus")
    return {
        "global": {
            "scrape_interval": f"{interval}s",
            "scrape_timeout": f"{interval}s",
            "evaluation_interval": f"{evaluation}s",
        },
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [config.alertmanager_addr]}]}]},
        "rule_files": [str(prom_dir / "rules.yml"), str(prom_dir / "rules.d" / "*.yml")],
        "scrape_configs": [
            {
                "job_name": "app",
                "metrics_path": "/metrics",
                "file_sd_configs": [
                    {"files": [str(prom_dir / "targets" / "app.json")], "refresh_interval": "5s"}
                ],
            },
            {
                "job_name": "haproxy",
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [f"{lb.addr}:{config.lb_stats_port}"],
                     "labels": {"lb": lb.name, "tier": lb.tier}}
                    for lb in topology.lbs
                ],
            },
            {"job_name": "pushgateway", "honor_labels": True,
             "static_configs": [{"targets": [config.pushgateway_addr]}]},
            {"job_name": "prometheus", "static_configs": [{"targets": [config.prometheus_addr]}]},
            {"job_name": "alertmanager", "static_configs": [{"targets": [config.alertmanager_addr]}]},
        ],
    }


def alert_rules(config: LabConfig, topology: Topology) -> dict:
    """Lab alert rules: short timings, every alert with ``env`` and ``severity``."""
    interval = scrape_interval_s(topology.size)
    window = f"{max(20, 4 * interval)}s"
    canary = "|".join(f"canary_{r}" for r in LB_ROLES)
    main = "|".join(LB_ROLES)
    rules = [
        {
            "alert": "HighErrorRatio",
            "expr": (
                f'sum by (env) (rate(http_requests_total{{job="app",status=~"5.."}}[{window}]))'
                f' / sum by (env) (rate(http_requests_total{{job="app"}}[{window}])) > 0.05'
            ),
            "for": "5s",
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": "{{ $labels.env }}: {{ $value | humanizePercentage }} of requests fail",
                "description": f"5xx ratio over {window} above 5% in {{{{ $labels.env }}}}",
            },
        },
        {
            "alert": "HostDown",
            "expr": 'up{job="app"} == 0',
            "for": "3s",
            "labels": {"severity": "critical"},
            "annotations": {"summary": "{{ $labels.host }} ({{ $labels.env }}) does not answer"},
        },
        {
            "alert": "BackendNoServers",
            # A canary_* backend on a gprd LB is gprd-cny's; the others belong to the LB's tier.
            "expr": (
                f'label_replace(haproxy_backend_active_servers{{job="haproxy",tier="gprd",proxy=~"{canary}"}}'
                ' == 0, "env", "gprd-cny", "", "")'
                f' or label_replace(haproxy_backend_active_servers{{job="haproxy",proxy=~"{main}"}}'
                ' == 0, "env", "$1", "tier", "(.*)")'
            ),
            "for": "3s",
            "labels": {"severity": "critical"},
            "annotations": {"summary": "{{ $labels.lb }}: backend {{ $labels.proxy }} has no active server"},
        },
        {
            "alert": "HighLatency",
            "expr": (
                "histogram_quantile(0.95, sum by (env, le) "
                f'(rate(http_request_duration_seconds_bucket{{job="app"}}[{window}]))) > 1'
            ),
            "for": "5s",
            "labels": {"severity": "warning"},
            "annotations": {"summary": "{{ $labels.env }}: p95 latency {{ $value | humanizeDuration }}"},
        },
        {
            # GitLab's deployment health, as liftoff's production checks read it: per environment
            # and service (the role), 1 when every host of it is up, 0 when one is not.
            "record": "gitlab_deployment_health:service",
            "expr": 'min by (env, type) (label_replace(up{job="app"}, "type", "$1", "role", "(.*)"))',
        },
    ]
    return {"groups": [{"name": "lab", "rules": rules}]}


def check_prometheus(config: LabConfig) -> None:
    promtool = shutil.which("promtool")
    if not promtool:
        return
    out = subprocess.run([promtool, "check", "config", str(prometheus_config_file(config))],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"promtool check config: {(out.stdout + out.stderr).strip()}")


def add_rules(config: LabConfig, source: Path, name: str) -> Path:
    """Install an extra Prometheus rule file (e.g. liftoff's synthetic traffic alerts) as
    ``prometheus/rules.d/NAME.yml``; checked with promtool first (a bad file is refused and
    changes nothing). The caller reloads Prometheus."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,60}", name):
        raise ConfigError(f"bad rules name {name!r} (lowercase letters, digits, - and _)")
    try:
        text = source.read_text()
        yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read rules from {source}: {exc}") from None
    target_dir = config.path("prometheus", "rules.d")
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = target_dir / f".{name}.yml.tmp"
    tmp.write_text(text)
    promtool = shutil.which("promtool")
    if promtool:
        out = subprocess.run([promtool, "check", "rules", str(tmp)], capture_output=True, text=True)
        if out.returncode != 0:
            tmp.unlink()
            raise ConfigError(f"promtool check rules {source}: {(out.stdout + out.stderr).strip()}")
    target = target_dir / f"{name}.yml"
    os.replace(tmp, target)
    return target


def reload_prometheus(config: LabConfig) -> None:
    """SIGHUP: Prometheus re-reads its config and rule files."""
    pid = int(pid_file(config, "prometheus").read_text())
    os.kill(pid, signal.SIGHUP)


def write_prometheus(config: LabConfig, topology: Topology) -> Path:
    prom_dir = config.path("prometheus")
    (prom_dir / "targets").mkdir(parents=True, exist_ok=True)
    (prom_dir / "data").mkdir(exist_ok=True)
    (prom_dir / "rules.d").mkdir(exist_ok=True)
    targets = prom_dir / "targets" / "app.json"
    tmp = targets.with_name(".app.json.tmp")
    tmp.write_text(json.dumps(app_targets(config, topology), indent=1))
    os.replace(tmp, targets)
    (prom_dir / "rules.yml").write_text(yaml.safe_dump(alert_rules(config, topology), sort_keys=False))
    file = prometheus_config_file(config)
    file.write_text(yaml.safe_dump(prometheus_config(config, topology), sort_keys=False))
    check_prometheus(config)
    return file


# -- alertmanager and pushgateway ----------------------------------------------------------------
def alertmanager_config() -> dict:
    return {
        "route": {
            "receiver": "null",
            "group_by": ["alertname", "env"],
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "1m",
        },
        "receivers": [{"name": "null"}],
    }


def write_alertmanager(config: LabConfig) -> Path:
    file = alertmanager_config_file(config)
    file.parent.mkdir(parents=True, exist_ok=True)
    (file.parent / "data").mkdir(exist_ok=True)
    file.write_text(yaml.safe_dump(alertmanager_config(), sort_keys=False))
    amtool = shutil.which("amtool")
    if amtool:
        out = subprocess.run([amtool, "check-config", str(file)], capture_output=True, text=True)
        if out.returncode != 0:
            raise ConfigError(f"amtool check-config: {(out.stdout + out.stderr).strip()}")
    return file


def write_all(config: LabConfig, topology: Topology) -> None:
    """Generate and validate every process's configuration."""
    for sub in ("log", "run", "pushgateway"):
        config.path(sub).mkdir(parents=True, exist_ok=True)
    write_ssh(config, topology)
    write_haproxy(config, topology)
    write_alertmanager(config)
    write_prometheus(config, topology)
