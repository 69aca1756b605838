"""What points liftoff at a lab: ``<lab>/inventory.yaml`` and ``<lab>/liftoff.env``.

The env file holds shell exports: Airflow connections as JSON (``AIRFLOW_CONN_*``), the
inventory path and the lab directory. It carries tokens, so it is mode 0600.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import yaml

from lab import apt_repo, chat, configs
from lab.config import LabConfig
from lab.topology import DATABASE, ENVIRONMENTS, Topology

CONNECTIONS = {
    "ssh": "liftoff_ssh",
    "gitlab": "liftoff_ops_gitlab",
    "alertmanager": "liftoff_alertmanager",
    "pushgateway": "liftoff_pushgateway",
    "prometheus": "liftoff_prometheus",
    "state": "liftoff_state",
    "builds": "liftoff_builds",
    "builds_internal": "liftoff_builds_internal",
    "chat": "liftoff_chat",
}
QA_PROJECT = "gitlab-org/quality/gitlab-qa-runner"
QA_REF = "main"
CANARY_QA_COOKIE = f"{configs.CANARY_COOKIE}=true"
# Deploy order: gitaly first, then the fleet in parallel.
ROLE_PLAN: list[dict] = [
    {"name": "gitaly", "stage": "gitaly", "batch": "10%", "capacity_floor": "0%",
     "restart": ["gitaly"], "hup": []},
    {"name": "web", "stage": "fleet", "batch": "10%", "capacity_floor": "50%",
     "restart": ["workhorse", "nginx"], "hup": ["puma"]},
    {"name": "api", "stage": "fleet", "batch": "10%", "capacity_floor": "50%",
     "restart": ["workhorse", "nginx"], "hup": ["puma"]},
    {"name": "git", "stage": "fleet", "batch": "10%", "capacity_floor": "50%",
     "restart": ["workhorse", "nginx", "gitlab-sshd"], "hup": ["puma"]},
    {"name": "sidekiq", "stage": "fleet", "batch": "10%", "capacity_floor": "0%",
     "restart": [], "hup": ["sidekiq"]},
]


def inventory_file(config: LabConfig) -> Path:
    return config.path("inventory.yaml")


def env_file(config: LabConfig) -> Path:
    return config.path("liftoff.env")


def gitlab_secrets(config: LabConfig) -> dict:
    """Tokens labd wrote on its first start (``secrets/gitlab.json``)."""
    file = config.path("secrets", "gitlab.json")
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing: labd writes it on its first start (python -m lab up)")
    return json.loads(file.read_text())


# The canary judge at the lab's pace (Prometheus scrapes every second; the lab's user traffic
# reaches canary with its cookie): 20 s windows, two weight steps. Off by default so that the
# pipelines' other tests do not wait for it; a test or a person turns it on in inventory.yaml.
LAB_ANALYSIS = {"enabled": False, "window_s": 20, "step_s": 2, "rate_window_s": 10, "min_requests": 40,
                "steps": [5, 25], "interval_s": 20}


def inventory(config: LabConfig, topology: Topology | None = None) -> dict:
    topology = topology or Topology(config)
    envs = {}
    for env in ENVIRONMENTS:
        deploy = topology.deploy_node(env)
        roles = []
        for plan in ROLE_PLAN:
            hosts = topology.env_hosts(env, plan["name"])
            roles.append({**plan, "hosts": [{"name": h.name, "address": h.addr} for h in hosts]})
        envs[env] = {
            "url": topology.env_url(env),
            "qa_cookie": CANARY_QA_COOKIE if env == "gprd-cny" else None,
            "database": DATABASE[env],
            "canary_of": "gprd" if env == "gprd-cny" else None,
            "alert_matchers": {"env": env},
            "load_balancers": [
                {"name": lb.name, "admin": f"{lb.addr}:{config.lb_admin_port}"}
                for lb in topology.lbs_for(env)
            ],
            "deploy_node": {"name": deploy.name, "address": deploy.addr},
            "roles": roles,
            # Lab alert rules fire within ~10 s, so a short window still catches a bad build.
            "extra": {"quiet_period": {"window_s": 20, "interval_s": 2}, "app_port": config.app_port},
        }
        if env == "gprd-cny":
            envs[env]["extra"]["analysis"] = dict(LAB_ANALYSIS)
    # The lab's QA jobs finish in seconds: poll often, give up early.
    qa = {"project": QA_PROJECT, "ref": QA_REF, "timeout": 300, "poll": 1}
    return {"connections": dict(CONNECTIONS), "environments": envs, "qa": qa}


def exports(config: LabConfig) -> dict[str, str]:
    """Environment variables that point liftoff (and Airflow) at this lab."""
    secrets = gitlab_secrets(config)
    ssh = {
        "conn_type": "ssh",
        "login": config.user,
        "port": config.ssh_port,
        "extra": {
            "key_file": str(configs.client_key(config)),
            "known_hosts": str(configs.known_hosts_file(config)),
        },
    }
    gitlab = {
        "conn_type": "http",
        "host": config.gitlab_url,
        "password": secrets["private_token"],
        "extra": {"trigger_token": secrets["trigger_token"], "qa_project": QA_PROJECT, "qa_ref": QA_REF},
    }
    conns = {
        "AIRFLOW_CONN_LIFTOFF_SSH": ssh,
        "AIRFLOW_CONN_LIFTOFF_OPS_GITLAB": gitlab,
        "AIRFLOW_CONN_LIFTOFF_ALERTMANAGER": {"conn_type": "http", "host": f"http://{config.alertmanager_addr}"},
        "AIRFLOW_CONN_LIFTOFF_PUSHGATEWAY": {"conn_type": "http", "host": f"http://{config.pushgateway_addr}"},
        "AIRFLOW_CONN_LIFTOFF_PROMETHEUS": {"conn_type": "http", "host": f"http://{config.prometheus_addr}"},
    }
    # The build source: the lab's apt repositories (lab.apt_repo), the internal one (internal
    # builds only) behind the credentials in secrets/apt.json.
    apt = apt_repo.ensure_credentials(config)
    conns["AIRFLOW_CONN_LIFTOFF_BUILDS"] = {
        "conn_type": "http", "host": apt_repo.repo_url(config, "public"), "extra": {"suite": apt_repo.SUITE},
    }
    conns["AIRFLOW_CONN_LIFTOFF_BUILDS_INTERNAL"] = {
        "conn_type": "http", "host": apt_repo.repo_url(config, "internal"), "login": apt["login"],
        "password": apt["password"], "extra": {"suite": apt_repo.SUITE},
    }
    # The state store (locks, drain records, audit): a SQLite file in the lab unless
    # LIFTOFF_STATE_URL points elsewhere (PostgreSQL in the distributed setup).
    conns["AIRFLOW_CONN_LIFTOFF_STATE"] = {
        "conn_type": "generic",
        "extra": {"url": os.environ.get("LIFTOFF_STATE_URL") or f"sqlite:///{config.path('liftoff-state.db')}"},
    }
    # ChatOps notifications: the lab's chat receiver, the webhook's token path as the password.
    conns["AIRFLOW_CONN_LIFTOFF_CHAT"] = {
        "conn_type": "http", "host": f"http://{config.chat_addr}", "password": chat.webhook_path(config),
        "extra": {"timeout": 5},
    }
    out = {name: json.dumps(value, separators=(",", ":")) for name, value in conns.items()}
    out["LIFTOFF_INVENTORY"] = str(inventory_file(config))
    out["LIFTOFF_LAB_DIR"] = str(config.lab_dir)
    return out


def shell(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def write(config: LabConfig, topology: Topology | None = None) -> dict[str, str]:
    """Write inventory.yaml and liftoff.env (0600); returns the exports."""
    inventory_file(config).write_text(yaml.safe_dump(inventory(config, topology), sort_keys=False))
    env = exports(config)
    file = env_file(config)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# liftoff pointed at the lab in " + str(config.lab_dir) + " (source this file)\n")
        f.write(shell(env))
    os.chmod(file, 0o600)
    return env
