"""The lab's external processes and command line, against real sshd, HAProxy, Prometheus,
Alertmanager and Pushgateway (the session ``lab`` fixture), plus config checks that need
no running lab."""

from __future__ import annotations

import json
import os
import random
import re
import stat
import urllib.request
from pathlib import Path

import pytest
import yaml

from lab import configs, processes
from lab.cli import parse_show_stat
from lab.config import LabConfig
from lab.topology import CANARY_WEIGHT, MAIN_WEIGHT, Topology, host_counts
from liftoff.inventory import load_inventory

GPRD_LBS = ("fe-01-lb-gprd", "fe-02-lb-gprd")


# -- configs (no processes) ------------------------------------------------------------------
@pytest.mark.parametrize("scale", [None, 1000])
def test_generated_configs_validate_and_stay_on_loopback(tmp_path: Path, scale: int | None) -> None:
    config = LabConfig(lab_dir=tmp_path, octet=44, hosts=host_counts(scale))
    topology = Topology(config)
    configs.write_all(config, topology)  # validates with haproxy -c, sshd -t, promtool, amtool

    for lb in topology.lbs:
        text = configs.haproxy_config_file(config, lb).read_text()
        binds = re.findall(r"^\s*bind (\S+)", text, re.M) + re.findall(r"stats socket ipv4@(\S+)", text)
        assert binds and all(b.startswith(f"{lb.addr}:") for b in binds), binds
        assert ("frontend canary" in text) == (lb.tier == "gprd")
    sshd = configs.sshd_config_file(config).read_text()
    assert f"AllowUsers {config.user}@127.0.0.0/8" in sshd
    assert "PasswordAuthentication no" in sshd and "Match LocalAddress" not in sshd
    prom = yaml.safe_load(configs.prometheus_config_file(config).read_text())
    targets = json.loads(config.path("prometheus", "targets", "app.json").read_text())
    assert len(targets) == topology.size
    assert {t["labels"]["env"] for t in targets} == {"gstg", "gprd-cny", "gprd"}
    assert [j["job_name"] for j in prom["scrape_configs"]] == [
        "app", "haproxy", "pushgateway", "prometheus", "alertmanager"]
    known = configs.known_hosts_file(config).read_text().splitlines()
    assert len(known) == topology.size
    assert known[0].startswith(f"[{topology.hosts[0].addr}]:{config.ssh_port} ecdsa-sha2-nistp256 ")


def test_gprd_lbs_weigh_canary_in_main_backends(tmp_path: Path) -> None:
    config = LabConfig(lab_dir=tmp_path, octet=44, hosts=host_counts())
    topology = Topology(config)
    lb = topology.lbs_for("gprd")[0]
    text = configs.haproxy_config(config, topology, lb)
    backends = dict(re.findall(r"^backend (\S+)\n((?:    server .*\n)+)", text + "\n", re.M))
    assert set(backends) == {"web", "api", "git", "canary_web", "canary_api", "canary_git"}
    for host in topology.env_hosts("gprd-cny", "web"):
        line = f"server {host.name} {host.addr}:{config.app_port} check weight"
        assert f"{line} {CANARY_WEIGHT}\n" in backends["web"]
        assert f"{line} {MAIN_WEIGHT}\n" in backends["canary_web"]
    for host in topology.env_hosts("gprd", "web"):
        line = f"server {host.name} {host.addr}:{config.app_port} check weight"
        assert f"{line} {MAIN_WEIGHT}\n" in backends["web"]
    assert all(h.name not in text for h in topology.env_hosts("gstg"))


def test_denied_addresses_become_a_match_block(tmp_path: Path) -> None:
    config = LabConfig(lab_dir=tmp_path, octet=44, hosts=host_counts())
    configs.ensure_keys(config)
    configs.denied_file(config).write_text("127.43.10.7\n127.43.10.9\n")
    text = configs.sshd_config(config)
    assert "Match LocalAddress 127.43.10.7,127.43.10.9\n    DenyUsers *" in text
    configs.sshd_config_file(config).write_text(text)
    configs.check_sshd(config)


def test_cli_refuses_bad_input_and_missing_lab(tmp_path: Path, lab_cli) -> None:
    run_lab_cli = lab_cli
    missing = run_lab_cli(tmp_path / "nolab", "status")
    assert missing.returncode == 2 and "no lab at" in missing.stderr
    for bad in (["up", "--hosts", "gprd:web=0"], ["up", "--hosts", "prod:web=3"], ["up", "--scale", "0"],
                ["--octet", "300", "up"], ["up", "--install-seconds", "-1"]):
        out = run_lab_cli(tmp_path / "bad", *bad)
        assert out.returncode == 2, (bad, out.stderr)
        assert out.stderr.startswith("lab: ")
    assert not (tmp_path / "bad" / "run").exists()  # nothing was started


# -- the running lab -------------------------------------------------------------------------
def test_drain_on_both_gprd_lbs_shows_in_show_stat(lab) -> None:
    server = "web/web-01-sv-gprd"
    try:
        for lb in GPRD_LBS:
            assert lab.haproxy(lb, f"set server {server} state drain").strip() == ""
        for lb in GPRD_LBS:
            stats = parse_show_stat(lab.haproxy(lb, "show stat"))
            assert stats["web-01-sv-gprd"]["web"]["status"] == "DRAIN"
            assert stats["web-02-sv-gprd"]["web"]["status"] == "UP"
        host = lab.host_status("web-01-sv-gprd")
        assert {lb: s["web"]["status"] for lb, s in host["lbs"].items()} == dict.fromkeys(GPRD_LBS, "DRAIN")
    finally:
        for lb in GPRD_LBS:
            lab.haproxy(lb, f"set server {server} state ready")
    for lb in GPRD_LBS:
        assert parse_show_stat(lab.haproxy(lb, "show stat"))["web-01-sv-gprd"]["web"]["status"] == "UP"


def test_pushed_metric_is_queryable_in_prometheus(lab) -> None:
    value = random.randint(1000, 10**6)
    body = f"liftoff_lab_test_value {value}\n".encode()
    url = f"http://{lab.config.pushgateway_addr}/metrics/job/liftoff_lab_test/env/gstg"
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="PUT"), timeout=10) as resp:
        assert resp.status in (200, 202)

    def scraped():
        result = lab.prometheus_query('liftoff_lab_test_value{job="liftoff_lab_test"}')
        return result if result and float(result[0]["value"][1]) == value else None

    result = lab.wait_for("the pushed metric in Prometheus", scraped, timeout=60)
    assert result[0]["metric"]["env"] == "gstg"  # honor_labels keeps the pushed labels


def test_ssh_reads_the_installed_version(lab) -> None:
    host = "gitaly-01-stor-gstg"
    out = lab.ssh(host, "dpkg-query -W -f='${Version}' gitlab-ee")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == lab.host_status(host)["installed"]  # the relay ends lines with \n


def test_unknown_ssh_command_is_refused(lab) -> None:
    out = lab.ssh("deploy-01-sv-gstg", "cat /etc/shadow")
    assert out.returncode == 127
    assert "unknown command" in out.stderr


def test_ssh_install_changes_exactly_the_dialled_host(lab) -> None:
    target = "sidekiq-02-sv-gprd"
    version = "17.6.1-ee.0"
    lab.build_add(version)
    before = {h["name"]: h["installed"] for e in lab.status()["environments"].values() for h in e["hosts"]}
    assert lab.ssh(target, "sudo chef-client-disable 'lab test: install'").returncode == 0
    try:
        out = lab.ssh(target, f"sudo apt-get install -y gitlab-ee={version}")
        assert out.returncode == 0, out.stderr
        after = {h["name"]: h["installed"] for e in lab.status()["environments"].values() for h in e["hosts"]}
        assert after[target] == version
        del after[target], before[target]
        assert after == before
    finally:
        lab.ssh(target, "sudo chef-client-enable")
    _wait_converged(lab, [target])


def test_host_down_fault_refuses_ssh_to_that_host_only(lab) -> None:
    down, other = "git-01-sv-gprd", "git-02-sv-gprd"
    addr = lab.topology.by_name[down].addr
    query = "dpkg-query -W -f='${Version}' gitlab-ee"

    def lb_states() -> set[str]:
        return {s["git"]["status"].split()[0] for s in lab.host_status(down)["lbs"].values()}

    lab.fault("host-down", down)
    try:
        sshd_config = configs.sshd_config_file(lab.config).read_text()
        assert f"Match LocalAddress {addr}\n    DenyUsers *" in sshd_config
        refused = lab.ssh(down, query)
        assert refused.returncode == 255 and "Permission denied" in refused.stderr  # sshd refuses
        assert lab.ssh(other, query).returncode == 0
        assert lab.host_status(down)["reachable"] is False
        lab.wait_for(f"{down} DOWN on every gprd LB", lambda: lb_states() == {"DOWN"}, 30)
    finally:
        lab.fault("host-up", down)
    assert lab.ssh(down, query).returncode == 0
    assert "Match LocalAddress" not in configs.sshd_config_file(lab.config).read_text()
    lab.wait_for(f"{down} UP again on every gprd LB", lambda: lb_states() == {"UP"}, 30)
    lab.wait_for("no HostDown alert for it", lambda: not lab.alerts(alertname="HostDown", host=down), 60)


def test_lb_routes_by_path_and_canary_cookie(lab) -> None:
    lb = lab.topology.lbs_for("gprd")[0]
    base = f"http://{lb.addr}:{lab.config.lb_http_port}"

    def served_by(path: str, cookie: str | None = None) -> str:
        req = urllib.request.Request(base + path, headers={"Cookie": cookie} if cookie else {})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.headers["X-Lab-Host"]

    assert served_by("/api/v4/projects").startswith("api-")
    assert served_by("/explore", "gitlab_canary=true").startswith("web-cny-")
    assert served_by("/api/v4/projects", "gitlab_canary=true").startswith("api-cny-")
    canary_url = lab.topology.env_url("gprd-cny") + "/help"
    with urllib.request.urlopen(canary_url, timeout=10) as resp:
        assert resp.headers["X-Lab-Host"].startswith("web-cny-")


def test_liftoff_env_points_at_the_lab(lab, lab_env: dict[str, str]) -> None:
    env_file = lab.config.path("liftoff.env")
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert os.environ["LIFTOFF_LAB_DIR"] == str(lab.config.lab_dir)
    ssh = json.loads(os.environ["AIRFLOW_CONN_LIFTOFF_SSH"])
    assert ssh["port"] == lab.config.ssh_port and Path(ssh["extra"]["known_hosts"]).exists()
    gitlab = json.loads(os.environ["AIRFLOW_CONN_LIFTOFF_OPS_GITLAB"])
    assert gitlab["host"] == lab.config.gitlab_url and gitlab["password"] and gitlab["extra"]["trigger_token"]
    for name in ("ALERTMANAGER", "PUSHGATEWAY", "PROMETHEUS"):
        host = json.loads(os.environ[f"AIRFLOW_CONN_LIFTOFF_{name}"])["host"]
        assert processes.http_ok(host + "/-/ready")
    inventory = yaml.safe_load(Path(os.environ["LIFTOFF_INVENTORY"]).read_text())
    cny = inventory["environments"]["gprd-cny"]
    assert (cny["qa_cookie"], cny["database"], cny["canary_of"]) == ("gitlab_canary=true", "gprd", "gprd")
    assert [lb["name"] for lb in cny["load_balancers"]] == list(GPRD_LBS)
    assert [r["name"] for r in cny["roles"]] == ["gitaly", "web", "api", "git", "sidekiq"]
    gstg = inventory["environments"]["gstg"]
    addr, port = gstg["load_balancers"][0]["admin"].split(":")
    assert "Name: HAProxy" in processes.haproxy_command(addr, int(port), "show info")
    web = next(r for r in gstg["roles"] if r["name"] == "web")
    gstg_web = lab.topology.env_hosts("gstg", "web")
    assert web["hosts"] == [{"name": h.name, "address": h.addr} for h in gstg_web]
    engine = load_inventory()  # the engine's own loader accepts what the lab wrote
    assert [lb.admin for lb in engine.env("gprd").load_balancers] == [
        lb["admin"] for lb in inventory["environments"]["gprd"]["load_balancers"]]
    assert engine.env("gprd-cny").is_canary and engine.conn_id("ssh") == "liftoff_ssh"
    printed = lab.cli("env")
    assert printed.returncode == 0
    assert f"export LIFTOFF_INVENTORY={os.environ['LIFTOFF_INVENTORY']}\n" in printed.stdout


def test_status_command(lab) -> None:
    status = json.loads(lab.cli("status", "--json").stdout)
    assert status["up"] and all(p["alive"] for p in status["processes"].values())
    cny = {h["name"]: h for h in status["environments"]["gprd-cny"]["hosts"]}
    assert set(cny["web-cny-01-sv-gprd"]["lbs"]) == set(GPRD_LBS)
    assert cny["web-cny-01-sv-gprd"]["lbs"]["fe-02-lb-gprd"]["web"]["weight"] == CANARY_WEIGHT
    assert cny["web-cny-01-sv-gprd"]["lbs"]["fe-02-lb-gprd"]["canary_web"]["weight"] == MAIN_WEIGHT
    assert status["environments"]["gprd"]["migrations"] == status["environments"]["gprd-cny"]["migrations"]
    assert status["environments"]["gstg"]["migrations"]
    assert isinstance(status["alerts"], list)
    human = lab.cli("status")
    assert human.returncode == 0 and "web-cny-01-sv-gprd" in human.stdout and "cny:UP/100" in human.stdout


def _wait_converged(lab, hosts: list[str]) -> None:
    """Leave the shared lab as found: chef brings the hosts back to their role's version."""
    def converged() -> bool:
        status = lab.status()
        states = {h["name"]: (env, h) for env, e in status["environments"].items() for h in e["hosts"]}
        return all(h["installed"] == h["running"] == status["environments"][env]["chef_role"]["version"]
                   for env, h in (states[n] for n in hosts))

    lab.wait_for("chef to converge the hosts back", converged, 60)


def _roll(lab, hosts: list[str], version: str) -> None:
    for host in hosts:
        out = lab.ssh(host, f"sudo apt-get install -y gitlab-ee={version}")
        assert out.returncode == 0, out.stderr
        out = lab.ssh(host, "sudo gitlab-ctl restart")
        assert out.returncode == 0, out.stderr


def test_error_build_fires_high_error_ratio_and_a_good_build_resolves_it(lab) -> None:
    hosts = [h.name for role in ("web", "api", "git") for h in lab.topology.env_hosts("gstg", role)]
    lab.build_add("17.6.2-ee.0", error_rate=0.5)
    lab.build_add("17.6.3-ee.0")
    for host in hosts:
        assert lab.ssh(host, "sudo chef-client-disable 'lab test: error ratio'").returncode == 0
    try:
        _roll(lab, hosts, "17.6.2-ee.0")
        firing = lab.wait_for("HighErrorRatio for gstg",
                              lambda: lab.alerts(alertname="HighErrorRatio", env="gstg"), 90)[0]
        assert firing["labels"]["severity"] == "critical"
        assert not lab.alerts(alertname="HighErrorRatio", env="gprd")
        _roll(lab, hosts, "17.6.3-ee.0")
        lab.wait_for("HighErrorRatio for gstg to resolve",
                 lambda: not lab.alerts(alertname="HighErrorRatio", env="gstg"), 90)
    finally:
        for host in hosts:
            lab.ssh(host, "sudo chef-client-enable")
    _wait_converged(lab, hosts)


@pytest.fixture(scope="module")
def private_lab(tmp_path_factory: pytest.TempPathFactory, lab_cli, lab_test_octet: int):
    """A second lab (octet LIFTOFF_TEST_LAB_DOWN_OCTET, default the session's + 1) for tests
    that must not leave builds in the shared lab or that bring a lab down."""
    lab_dir = tmp_path_factory.mktemp("lab-private")
    octet = int(os.environ.get("LIFTOFF_TEST_LAB_DOWN_OCTET", lab_test_octet + 1))
    up = lab_cli(lab_dir, "--octet", str(octet), "up", "--traffic-rps", "1")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield lab_dir
    finally:
        lab_cli(lab_dir, "down")


def test_build_and_fault_commands(private_lab: Path, lab_cli) -> None:
    def cli(*args: str):
        return lab_cli(private_lab, *args)

    added = cli("build", "add", "17.7.0-rc1.ee.0", "--nightly", "--latency-ms", "5",
                "--install-fails-on", "web-02-sv-gstg", "--includes-patch", "p-1")
    assert added.returncode == 0, added.stderr
    again = cli("build", "add", "17.7.0-rc1.ee.0")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert cli("build", "add", "17.7.1-ee.0", "--error-rate", "2").returncode == 2
    assert cli("build", "add", "17.7.1-ee.0", "--install-fails-on", "nohost").returncode == 2
    assert cli("build", "add", "not a version").returncode == 2
    listed = json.loads(cli("build", "list", "--json").stdout)
    build = next(b for b in listed if b["version"] == "17.7.0-rc1.ee.0")
    assert build["nightly"] and build["latency_ms"] == 5 and build["install_fails_on"] == ["web-02-sv-gstg"]
    assert build["includes_patches"] == ["p-1"] and not build["qa_fails"]
    assert "17.7.0-rc1.ee.0" in cli("build", "list").stdout
    assert cli("fault", "host-down", "nohost").returncode == 2
    assert cli("fault", "host-sideways", "web-01-sv-gstg").returncode == 2


def test_down_leaves_no_process_of_the_lab(private_lab: Path, lab_cli) -> None:
    config = LabConfig.load(private_lab)
    pids = processes.liveness(config)
    assert all(pids.values()), pids
    again = lab_cli(private_lab, "up")  # idempotent: nothing restarted
    assert again.returncode == 0 and "already up" in again.stdout
    assert processes.liveness(config) == pids
    other = lab_cli(private_lab, "up", "--scale", "50")
    assert other.returncode == 2 and "other settings" in other.stderr

    down = lab_cli(private_lab, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    mentioning = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if processes.alive(int(proc.name)) and any(str(private_lab) in a for a in argv):
                mentioning.append((proc.name, argv))
    assert mentioning == []
    assert list(private_lab.joinpath("run").glob("*.pid")) == []
    status = lab_cli(private_lab, "status")
    assert status.returncode == 2 and "not up" in status.stderr


def test_extra_rule_files_are_checked_then_loaded(lab, tmp_path: Path) -> None:
    """``python -m lab rules FILE``: promtool refuses a bad file (nothing installed), a good one is
    loaded into the running Prometheus."""
    rules_dir = lab.config.path("prometheus", "rules.d")
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "up ==="}]}]}))
    out = lab.cli("rules", str(bad), "--name", "bad")
    assert out.returncode == 1 and "promtool check rules" in out.stderr
    assert not (rules_dir / "bad.yml").exists()
    assert lab.cli("rules", str(bad), "--name", "../escape").returncode == 1
    good = tmp_path / "good.yml"
    good.write_text(yaml.safe_dump({"groups": [{"name": "lab_test_extra", "rules": [
        {"alert": "LabTestNeverFires", "expr": "vector(0) > 1", "labels": {"severity": "info"}}]}]}))
    out = lab.cli("rules", str(good), "--name", "lab-test")
    assert out.returncode == 0, out.stderr

    def groups() -> list[str]:
        url = f"http://{lab.config.prometheus_addr}/api/v1/rules"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return [g["name"] for g in json.load(resp)["data"]["groups"]]

    lab.wait_for("the extra rule group", lambda: "lab_test_extra" in groups(), timeout=30)
    assert "lab" in groups(), "the lab's own rules stay"
