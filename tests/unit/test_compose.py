"""docker-compose.yml, validated without a Docker engine: what it declares, it must be able to do.

This machine runs no Docker, so the file is checked for everything that does not need one:
the YAML and the keys Compose knows, the service graph (Airflow 3's official shape, no cycle,
no default service depending on a profile-only one, the lab in the worker's network), the
names of every Airflow option and liftoff variable set, every mounted path and every COPY
source, that the images install liftoff the way the Makefile does, the shell and Python
embedded in it (``bash -n``, ``compile``), Compose's ``$`` interpolation, and the lab
connections snippet run for real against a lab directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"

AIRFLOW_SERVICES = {  # service -> the airflow command it runs
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "celery worker",
}
BASE_SERVICES = {"postgres", "redis", "airflow-init", *AIRFLOW_SERVICES}
LAB_SERVICES = {"lab", "lab-demo"}
# Runtime directories Compose or airflow-init create (never code): git-ignored or generated.
RUNTIME_DIRS = {"logs", "config"}
# Variables the file may take from the shell or .env (documented in its header).
VARIABLES = {"POSTGRES_PASSWORD", "AIRFLOW_UID", "LIFTOFF_IMAGE", "LIFTOFF_LAB_IMAGE", "LIFTOFF_INVENTORY",
             "LIFTOFF_CONNECTIONS", "LIFTOFF_CANARY_CRON", "LIFTOFF_AIRFLOW_API_PASSWORD"}
# Top-level and service keys of the Compose specification (a typo is otherwise ignored by nobody).
TOP_KEYS = {"version", "name", "services", "networks", "volumes", "configs", "secrets", "include", "models"}
SERVICE_KEYS = {
    "annotations", "attach", "build", "blkio_config", "cap_add", "cap_drop", "cgroup", "cgroup_parent",
    "command", "configs", "container_name", "cpu_count", "cpu_percent", "cpu_shares", "cpu_quota",
    "cpu_period", "cpu_rt_period", "cpu_rt_runtime", "cpus", "cpuset", "credential_spec", "depends_on",
    "deploy", "develop", "device_cgroup_rules", "devices", "dns", "dns_opt", "dns_search", "domainname",
    "entrypoint", "env_file", "environment", "expose", "extends", "external_links", "extra_hosts", "gpus",
    "group_add", "healthcheck", "hostname", "image", "init", "ipc", "isolation", "labels", "links",
    "logging", "mac_address", "mem_limit", "mem_reservation", "mem_swappiness", "memswap_limit",
    "network_mode", "networks", "oom_kill_disable", "oom_score_adj", "pid", "pids_limit", "platform",
    "ports", "privileged", "profiles", "pull_policy", "read_only", "restart", "runtime", "scale",
    "secrets", "security_opt", "shm_size", "stdin_open", "stop_grace_period", "stop_signal", "storage_opt",
    "sysctls", "tmpfs", "tty", "ulimits", "user", "userns_mode", "uts", "volumes", "volumes_from",
    "working_dir", "models", "use_api_socket",
}
BUILD_KEYS = {"context", "dockerfile", "dockerfile_inline", "args", "ssh", "cache_from", "cache_to",
              "additional_contexts", "extra_hosts", "isolation", "labels", "network", "no_cache", "platforms",
              "privileged", "pull", "secrets", "shm_size", "tags", "target", "ulimits", "entitlements"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
EMBEDDED_CODE = ("LIFTOFF_CREATE_STATE_DB", "LIFTOFF_LAB_CONNECTIONS_PY")  # code in variables, not settings


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict) -> dict[str, dict]:
    return compose["services"]


def in_lab_profile(svc: dict) -> bool:
    return "lab" in (svc.get("profiles") or [])


def env_of(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping, please"
    return {k: "" if v is None else str(v) for k, v in env.items()}


def interpolate(text: str) -> str:
    """Compose's interpolation with every variable unset: ``$$`` -> ``$``, ``${X:-d}``/``${X-d}`` ->
    ``d``, ``${X}``/``$X`` -> ``''``."""
    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        default = m.group("default")
        return default if default is not None else ""

    return re.sub(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?::?[-?])(?P<default>[^}]*))?\}"
                  r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)", one, text)


def dockerfile(svc: dict) -> str:
    return svc["build"]["dockerfile_inline"]


def dockerfile_steps(text: str) -> list[str]:
    return [ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip()]


# -- the file and its keys -------------------------------------------------------------------------

def test_yaml_parses_with_only_compose_keys(compose: dict, services: dict):
    extra = {k for k in compose if not k.startswith("x-")} - TOP_KEYS
    assert extra == set()
    for name, svc in services.items():
        assert set(svc) - SERVICE_KEYS == set(), name
        if "build" in svc:
            assert set(svc["build"]) - BUILD_KEYS == set(), name
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: named volume {source} is not declared"


def test_services_are_airflow_3_s_official_shape(services: dict):
    assert set(services) == BASE_SERVICES | LAB_SERVICES
    for name in BASE_SERVICES:
        assert not in_lab_profile(services[name]), f"{name} must run without a profile"
    for name in LAB_SERVICES:
        assert services[name]["profiles"] == ["lab"], name
    for name, command in AIRFLOW_SERVICES.items():
        assert services[name]["command"] == command, name
        assert services[name]["image"] == services["airflow-init"]["image"], name
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")


def test_airflow_commands_exist_in_this_airflow():
    from airflow.cli.cli_parser import get_parser

    parser = get_parser()
    for argv in (["api-server"], ["scheduler"], ["dag-processor"], ["triggerer"], ["db", "migrate"],
                 ["config", "list"], ["version"],
                 ["jobs", "check", "--job-type", "DagProcessorJob", "--local"],
                 ["jobs", "check", "--job-type", "TriggererJob", "--local"]):
        parser.parse_args(argv)  # exits on an unknown command


def test_every_airflow_service_shares_one_configuration(services: dict):
    """Same env, same airflow.cfg (where airflow-init generated the secrets), same executor."""
    base = env_of(services["airflow-init"])
    for name in AIRFLOW_SERVICES:
        env = env_of(services[name])
        for key in ("AIRFLOW_CONFIG", "AIRFLOW__CORE__EXECUTOR", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC",
                    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW__CORE__AUTH_MANAGER",
                    "AIRFLOW__CELERY__BROKER_URL", "LIFTOFF_STATE_URL", "LIFTOFF_INVENTORY"):
            assert env.get(key) == base.get(key), (name, key)
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        config = env["AIRFLOW_CONFIG"]
        assert any(config.startswith(v.split(":")[1] + "/") for v in services[name]["volumes"]
                   if v.startswith("./config:")), f"{name}: {config} is not on the shared ./config mount"


def test_execution_api_url_reaches_the_api_server(services: dict):
    api = services["airflow-apiserver"]
    [mapping] = api["ports"]
    host_ip, host_port, container_port = mapping.split(":")
    assert host_ip == "127.0.0.1", "the API is published on loopback only"
    for name in AIRFLOW_SERVICES:
        url = env_of(services[name])["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]
        assert url == f"http://airflow-apiserver:{container_port}/execution/", name


def test_airflow_option_names_exist(services: dict):
    from airflow.configuration import conf

    described = conf.configuration_description
    # the celery provider's, which the apache/airflow image has
    provider_options = {("celery", "broker_url"), ("celery", "result_backend")}
    for name, svc in services.items():
        for key in env_of(svc):
            m = re.fullmatch(r"AIRFLOW__([A-Z0-9_]+?)__([A-Z0-9_]+)", key)
            if not m:
                continue
            section, option = m.group(1).lower(), m.group(2).lower()
            option = option.removesuffix("_cmd")
            known = (option in described.get(section, {}).get("options", {})
                     or (section, option) in provider_options)
            assert known, f"{name}: {key} is not an Airflow 3.3 option"


def test_liftoff_variable_names_are_read_by_liftoff(services: dict):
    code = "\n".join(p.read_text() for d in ("include", "plugins", "dags", "lab")
                     for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    for name, svc in services.items():
        for key in env_of(svc):
            if key.startswith("LIFTOFF_") and key not in EMBEDDED_CODE:
                assert f'"{key}"' in code, f"{name}: nothing reads {key}"


def test_secrets_are_generated_not_written_here(services: dict):
    text = COMPOSE.read_text()
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API__SECRET_KEY",
                "SIMPLE_AUTH_MANAGER_ALL_ADMINS", "_AIRFLOW_WWW_USER_PASSWORD"):
        assert key not in text, f"{key}: a secret (or auth switched off) belongs in the generated airflow.cfg"
    env = env_of(services["airflow-apiserver"])
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"].startswith("/opt/airflow/config/")
    init = " ".join(services["airflow-init"]["command"])
    assert init.index("airflow config list") < init.index("chown"), "the generated airflow.cfg is handed over"


# -- the service graph ------------------------------------------------------------------------------

def edges(services: dict) -> dict[str, dict[str, str]]:
    """service -> {dependency: condition}, network_mode ``service:X`` included."""
    out: dict[str, dict[str, str]] = {}
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        out[name] = {d: spec.get("condition", "service_started") for d, spec in deps.items()}
        mode = svc.get("network_mode", "")
        if mode.startswith("service:"):
            out[name].setdefault(mode.split(":", 1)[1], "service_started")
    return out


def test_dependencies_exist_and_form_no_cycle(services: dict):
    graph = edges(services)
    for name, deps in graph.items():
        for dep, condition in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert condition in CONDITIONS, (name, dep, condition)
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy: no check"
            if not in_lab_profile(services[name]):
                assert not in_lab_profile(services[dep]), f"{name} (no profile) depends on lab-only {dep}"
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> None:
        assert state.get(node) != "open", f"dependency cycle: {' -> '.join(path + [node])}"
        if state.get(node) == "done":
            return
        state[node] = "open"
        for dep in graph[node]:
            visit(dep, path + [node])
        state[node] = "done"

    for name in services:
        visit(name, [])


def test_start_order(services: dict):
    graph = edges(services)
    for name in AIRFLOW_SERVICES:
        assert graph[name].get("airflow-init") == "service_completed_successfully", name
        assert graph[name].get("postgres") == "service_healthy", name
        assert graph[name].get("redis") == "service_healthy", name
    assert graph["airflow-init"] == {"postgres": "service_healthy", "redis": "service_healthy"}
    assert graph["airflow-worker"]["airflow-apiserver"] == "service_healthy"
    assert graph["lab-demo"]["lab"] == "service_healthy"


def test_the_lab_shares_the_network_of_what_must_reach_it(services: dict):
    """Tasks (worker) and deferred gates (triggerer) talk to the lab's loopback addresses."""
    anchor = "service:airflow-worker"
    assert "network_mode" not in services["airflow-worker"]
    for name in ("airflow-triggerer", "lab", "lab-demo"):
        svc = services[name]
        assert svc["network_mode"] == anchor, name
        assert "ports" not in svc and "networks" not in svc, f"{name}: not allowed with network_mode"
    assert "deploy" not in services["airflow-worker"], "one worker: the lab lives in its network namespace"


def test_healthchecks_are_well_formed(services: dict):
    for name, svc in services.items():
        check = svc.get("healthcheck")
        if check is None:
            continue
        test = check["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL", "NONE"), name
        if test[0] == "CMD-SHELL":
            assert len(test) == 2, name
            bash_n(interpolate(test[1]), f"{name} healthcheck")


# -- paths ---------------------------------------------------------------------------------------

def test_bind_mounts_exist_and_match_the_env(services: dict):
    for name, svc in services.items():
        targets = {}
        for vol in svc.get("volumes", []):
            source, target, *_ = vol.split(":")
            targets[target] = source
            if source.startswith("./"):
                rel = source[2:].rstrip("/")
                assert (ROOT / rel).exists() or rel in RUNTIME_DIRS, f"{name}: {source} does not exist"
        env = env_of(svc)
        for key, source in (("AIRFLOW__CORE__DAGS_FOLDER", "./dags"),
                            ("AIRFLOW__CORE__PLUGINS_FOLDER", "./plugins")):
            if key in env and name in AIRFLOW_SERVICES:
                assert targets.get(env[key]) == source, (name, key)
        if name in AIRFLOW_SERVICES:
            for entry in env["PYTHONPATH"].split(":"):
                assert entry in targets, f"{name}: PYTHONPATH entry {entry} is not mounted"
            assert {targets[e] for e in env["PYTHONPATH"].split(":")} == {"./include", "./plugins"}
        lab_dir = next((t for t, s in targets.items() if s == "lab-state"), None)
        for key in ("LIFTOFF_INVENTORY", "LIFTOFF_CONNECTIONS", "LIFTOFF_LAB_DIR"):
            if key in env:
                assert lab_dir is not None, f"{name}: {key} points into the lab volume, not mounted here"
                value = interpolate(env[key])
                assert value.startswith(lab_dir + "/") or value == lab_dir, key


def test_runtime_directories_are_not_code(services: dict):
    for rel in RUNTIME_DIRS:
        assert not (ROOT / rel).exists() or not any((ROOT / rel).rglob("*.py")), rel


def test_copy_sources_exist(services: dict):
    for name, svc in services.items():
        if "build" not in svc:
            continue
        assert svc["build"]["context"] == "."
        for step in dockerfile_steps(dockerfile(svc)):
            if step.startswith("COPY"):
                args = [a for a in shlex.split(step)[1:] if not a.startswith("--")]
                for source in args[:-1]:
                    assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file"


# -- consistency with the Makefile path --------------------------------------------------------------

def makefile_apt_packages() -> set[str]:
    m = re.search(r"^LAB_PACKAGES := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "LAB_PACKAGES not found in the Makefile"
    return set(m.group(1).split())


def test_images_are_the_pinned_airflow_on_the_project_s_python(services: dict):
    pins = dict(ln.split("==") for ln in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in ln and not ln.startswith("#"))
    target = re.search(r'target-version = "py(\d)(\d+)"', (ROOT / "pyproject.toml").read_text())
    python = f"{target.group(1)}.{target.group(2)}"
    expected = f"FROM apache/airflow:{pins['apache-airflow']}-python{python}"
    for name in ("airflow-init", "lab"):
        assert dockerfile_steps(dockerfile(services[name]))[0] == expected, name


def test_images_install_liftoff_like_make_setup(services: dict):
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q -r requirements.txt -c constraints.txt" in makefile
    assert "pip install -q --no-deps -e ." in makefile
    for name in ("airflow-init", "lab"):
        steps = " ".join(dockerfile_steps(dockerfile(services[name])))
        pinned = r"pip install --no-cache-dir -r \S*requirements\.txt -c \S*constraints\.txt"
        assert re.search(pinned, steps), name
        assert re.search(r"pip install --no-cache-dir --no-deps /opt/liftoff/src", steps), name
        copy = "COPY --chown=airflow:0 requirements.txt constraints.txt pyproject.toml /opt/liftoff/src/"
        assert copy in steps, name


def test_lab_image_has_the_makefile_s_debian_packages(services: dict):
    steps = " ".join(dockerfile_steps(dockerfile(services["lab"])))
    m = re.search(r"apt-get install -y --no-install-recommends ([a-z0-9 .+-]+?) &&", steps)
    assert m, steps
    assert makefile_apt_packages() <= set(m.group(1).split())


def test_environment_mirrors_scripts_env_sh(services: dict):
    envsh = (ROOT / "scripts/env.sh").read_text()
    assert 'AIRFLOW__CORE__LOAD_EXAMPLES=False' in envsh
    assert '$_liftoff_root/include:$_liftoff_root/plugins' in envsh
    for name in AIRFLOW_SERVICES:
        env = env_of(services[name])
        assert env["AIRFLOW__CORE__LOAD_EXAMPLES"].lower() == "false"
        assert env["PYTHONPATH"].split(":")[:2] == ["/opt/airflow/include", "/opt/airflow/plugins"]


def test_lab_starts_like_make_lab_up(services: dict):
    makefile = (ROOT / "Makefile").read_text()
    assert "python -m lab up" in makefile
    script = services["lab"]["command"][0]
    assert re.search(r"^python -m lab (--\S+ \S+ )*up$", script, re.M), script
    assert "python -m lab down" in script, "the lab is brought down when the container stops"
    env = env_of(services["lab"])
    assert env["USER"] == "airflow" and services["lab"]["user"] == services["airflow-worker"]["user"]
    from lab.config import DEFAULT_OCTET

    assert int(env["LIFTOFF_LAB_OCTET"]) == DEFAULT_OCTET


# -- embedded shell and Python -------------------------------------------------------------------

def bash_n(script: str, what: str) -> None:
    out = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"{what}: {out.stderr}"


def scripts(services: dict) -> list[tuple[str, str]]:
    found = []
    for name, svc in services.items():
        command = svc.get("command")
        entry = svc.get("entrypoint")
        entry = entry if isinstance(entry, list) else [entry] if entry else []
        if isinstance(command, list) and (command[:1] == ["-c"] or entry[-1:] == ["-c"]):
            found.append((name, command[-1]))
    return found


def test_embedded_shell_scripts_parse(services: dict):
    found = scripts(services)
    assert {n for n, _ in found} == {"airflow-init", "lab", "lab-demo"}
    for name, script in found:
        assert "set -euo pipefail" in script, name
        bash_n(interpolate(script), name)


def test_embedded_python_compiles(services: dict):
    for name, svc in services.items():
        for key, value in env_of(svc).items():
            if key.endswith(("_PY", "_DB")) and "\n" in value:
                compile(interpolate(value), f"{name}:{key}", "exec")


def test_dollar_signs_are_escaped_for_compose(services: dict):
    """Compose interpolates ``$X``/``${X}`` everywhere: a shell variable must be written ``$$X``."""
    text = COMPOSE.read_text()
    names = set()
    for m in re.finditer(r"(?<!\$)(?:\$\$)*\$(\{?)([A-Za-z_][A-Za-z0-9_]*)", text):
        if m.group(0).startswith("$$"):
            continue
        names.add(m.group(2))
    assert names <= VARIABLES, f"interpolated by Compose, not by the shell: {sorted(names - VARIABLES)}"
    assert {"POSTGRES_PASSWORD", "AIRFLOW_UID"} <= names


def test_lab_connections_snippet_writes_what_liftoff_reads(services: dict, tmp_path, monkeypatch):
    """Run the lab container's snippet against a lab directory; liftoff.settings must then find
    every connection the lab defines, with its host key file, in the 0600 file it wrote."""
    from lab.config import LabConfig
    from lab.liftoff_env import CONNECTIONS
    from liftoff.settings import resolve_connection

    lab_dir = tmp_path / "lab"
    config = LabConfig(lab_dir=lab_dir, octet=49)
    config.save()
    (lab_dir / "secrets").mkdir()
    (lab_dir / "secrets" / "gitlab.json").write_text(json.dumps({"private_token": "glpat-unit",
                                                                  "trigger_token": "glptt-unit"}))
    env = env_of(services["lab"])
    target = tmp_path / "connections.yaml"
    monkeypatch.setenv("LIFTOFF_LAB_DIR", str(lab_dir))
    monkeypatch.setenv("LIFTOFF_CONNECTIONS", str(target))
    monkeypatch.setenv("LIFTOFF_STATE_URL", interpolate(env["LIFTOFF_STATE_URL"]))
    snippet = compile(interpolate(env["LIFTOFF_LAB_CONNECTIONS_PY"]), "lab:connections", "exec")
    exec(snippet, {})
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    monkeypatch.setenv("LIFTOFF_NO_AIRFLOW", "true")
    for key in [k for k in os.environ if k.startswith("AIRFLOW_CONN_")]:
        monkeypatch.delenv(key)
    found = {purpose: resolve_connection(conn_id) for purpose, conn_id in CONNECTIONS.items()}
    assert found["ssh"].extra_dejson["known_hosts"].startswith(str(lab_dir))
    assert found["gitlab"].password == "glpat-unit"
    assert found["state"].extra_dejson["url"] == "postgresql+psycopg2://airflow:airflow@postgres/liftoff"
    assert env_of(services["airflow-worker"])["LIFTOFF_CONNECTIONS"] == "${LIFTOFF_CONNECTIONS:-" + \
        env["LIFTOFF_CONNECTIONS"] + "}"


def test_the_state_db_airflow_init_creates_is_the_one_liftoff_uses(services: dict):
    init = env_of(services["airflow-init"])
    assert 'CREATE DATABASE liftoff' in init["LIFTOFF_CREATE_STATE_DB"]
    for name in (*AIRFLOW_SERVICES, "lab"):
        assert interpolate(env_of(services[name])["LIFTOFF_STATE_URL"]).endswith("@postgres/liftoff"), name


HEARTBEAT_TIMEOUT = "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"


def test_stuck_tasks_fail_after_a_minute_everywhere_liftoff_documents(services: dict, tmp_path):
    """README "Stuck tasks": a task whose worker died is failed after 60 s (Airflow: 300), in
    Compose, scripts/env.sh and the CI stack alike, and `liftoff watch` quotes the same number."""
    from airflow.configuration import conf

    option = conf.configuration_description["scheduler"]["options"]["task_instance_heartbeat_timeout"]
    assert option["type"] == "integer" and option["default"] == "300"
    for name in (*AIRFLOW_SERVICES, "airflow-init"):  # the worker's supervisor reads it too
        assert env_of(services[name]).get(HEARTBEAT_TIMEOUT) == "60", name
    shell = subprocess.run(["bash", "-c", f'unset {HEARTBEAT_TIMEOUT}; source scripts/env.sh; '
                            f'echo "${HEARTBEAT_TIMEOUT}"'], cwd=ROOT, capture_output=True, text=True,
                           check=True, env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert shell.stdout.strip() == "60"
    from liftoff.chatops import cli
    from tests.airflow_stack import airflow_env

    stack = airflow_env(tmp_path, "sqlite:///x.db", 8080, tmp_path / "passwords.json", "unit", {})
    assert stack[HEARTBEAT_TIMEOUT] == "60"
    assert cli.HEARTBEAT_TIMEOUT_S == 60 and cli.HEARTBEAT_WARN_S < cli.HEARTBEAT_TIMEOUT_S
    readme = (ROOT / "README.md").read_text()
    assert "### Stuck tasks" in readme and f"{HEARTBEAT_TIMEOUT}=60" in readme
