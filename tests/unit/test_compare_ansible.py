"""bench/compare_ansible.py without running Ansible: the playbook, the generated inventory and
ansible.cfg, the command chain the playbook runs, the parsers of ansible-playbook's output and
the result table. The timings themselves belong to the benchmark."""

from __future__ import annotations

import argparse
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bench.compare_ansible import (
    COLUMNS,
    PLAYBOOK,
    ansible_cfg,
    extra_vars,
    format_table,
    hosts_failed,
    install_command,
    inventory,
    parse_batches,
    parse_recap,
    parse_sizes,
    parse_task_times,
    table_row,
)
from lab import configs
from lab.config import LabConfig
from lab.liftoff_env import inventory as lab_inventory
from lab.topology import Topology, host_counts
from liftoff.commands import chain_steps
from liftoff.inventory import parse_inventory

VERSION = "17.9.4242-ee.0"

# What ansible-playbook prints (default callback + profile_tasks), trimmed: two batches of two
# hosts, the second batch with an unreachable host, then the recap and the task summary.
OUTPUT = """
PLAY [Roll out 17.9.4242-ee.0] *************************************************

TASK [Drain on every LB and wait for its sessions to end] **********************
Thursday 03 December 2026  13:36:44 +0000 (0:00:00.041)       0:00:00.041 *****
changed: [web-01-sv-gprd -> fe-01-lb-gprd] => (item=fe-01-lb-gprd)
changed: [web-02-sv-gprd -> fe-01-lb-gprd] => (item=fe-01-lb-gprd)

TASK [Install (chef stop, apt-get install, reconfigure, restarts, status)] *****
Thursday 03 December 2026  13:37:09 +0000 (0:00:04.740)       0:00:04.782 *****
changed: [web-01-sv-gprd]
changed: [web-02-sv-gprd]

PLAY [Roll out 17.9.4242-ee.0] *************************************************

TASK [Install (chef stop, apt-get install, reconfigure, restarts, status)] *****
fatal: [web-03-sv-gprd]: UNREACHABLE! => {"changed": false, "msg": "Failed to connect", "unreachable": true}
changed: [web-04-sv-gprd]

PLAY RECAP *********************************************************************
web-01-sv-gprd  : ok=3  changed=3  unreachable=0  failed=0  skipped=0  rescued=0  ignored=0
web-02-sv-gprd  : ok=3  changed=3  unreachable=0  failed=0  skipped=0  rescued=0  ignored=0
web-03-sv-gprd  : ok=1  changed=1  unreachable=1  failed=0  skipped=0  rescued=0  ignored=0
web-04-sv-gprd  : ok=2  changed=2  unreachable=0  failed=1  skipped=0  rescued=0  ignored=0

Thursday 03 December 2026  13:37:12 +0000 (0:00:03.187)       0:00:27.969 *****
===============================================================================
Drain on every LB and wait for its sessions to end --------------------- 24.74s
Install (chef stop, apt-get install, reconfigure, restarts, status) ----- 3.19s
Ready on every LB and wait for UP --------------------------------------- 10.00s
"""


@pytest.fixture
def config() -> Iterator[LabConfig]:
    """A lab dir with a short path: HAProxy's Unix socket paths must stay under 90 bytes, which
    pytest's own tmp paths (under xdist: .../popen-gwN/<test name>) do not."""
    short = Path(tempfile.mkdtemp(prefix="lo-cmp-"))
    try:
        yield LabConfig(lab_dir=short, octet=73, hosts=host_counts())
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def web(config: LabConfig):
    return parse_inventory(lab_inventory(config)).env("gprd").role("web")


def test_playbook_is_the_rolling_update_a_user_writes():
    [play] = yaml.safe_load(PLAYBOOK.read_text())
    assert play["hosts"] == "rollout"
    assert play["serial"].startswith("{{ rollout_serial | default('10%') }}")
    assert play["gather_facts"] is False and play["max_fail_percentage"] == 0
    drain, install, ready = play["tasks"]
    for task, state in ((drain, "drain"), (ready, "enabled")):
        args = task["community.general.haproxy"]
        assert args["state"] == state and args["wait"] is True
        assert args["host"] == "{{ inventory_hostname }}" and args["backend"] == "{{ haproxy_backend }}"
        assert args["socket"] == "{{ hostvars[item].haproxy_socket }}"
        assert task["delegate_to"] == "{{ item }}" and task["loop"] == "{{ groups['lbs'] }}"
    assert drain["community.general.haproxy"]["drain"] is True  # waits for the sessions to end
    assert install == {"name": install["name"], "ansible.builtin.raw": "{{ install_command }}"}


def test_inventory_reaches_hosts_like_liftoff_and_lbs_by_their_unix_socket(config: LabConfig):
    topology = Topology(config)
    hosts = [(h.name, h.addr) for h in topology.env_hosts("gprd", "web")]
    lbs = [(lb.name, configs.lb_admin_socket(config, lb)) for lb in topology.lbs_for("gprd")]
    inv = inventory(config, hosts, lbs)["all"]
    assert inv["vars"]["ansible_user"] == config.user
    assert inv["vars"]["ansible_port"] == config.ssh_port
    assert inv["vars"]["ansible_ssh_private_key_file"] == str(configs.client_key(config))
    args = shlex.split(inv["vars"]["ansible_ssh_common_args"])
    assert f"UserKnownHostsFile={configs.known_hosts_file(config)}" in args
    assert "StrictHostKeyChecking=yes" in args
    assert inv["vars"]["ansible_ssh_use_tty"] is False
    rollout = inv["children"]["rollout"]["hosts"]
    assert list(rollout) == [name for name, _ in hosts]
    assert all(v["ansible_host"].startswith("127.73.") for v in rollout.values())
    lb_group = inv["children"]["lbs"]
    assert lb_group["vars"]["ansible_connection"] == "local"
    assert {name: v["haproxy_socket"] for name, v in lb_group["hosts"].items()} == {
        "fe-01-lb-gprd": str(config.path("run", "haproxy-fe-01-lb-gprd.sock").absolute()),
        "fe-02-lb-gprd": str(config.path("run", "haproxy-fe-02-lb-gprd.sock").absolute()),
    }
    yaml.safe_load(yaml.safe_dump(inv))  # what run_playbook writes


def test_the_playbook_runs_liftoffs_command_chain(web):
    steps = chain_steps(install_command(web, VERSION, f"ansible rollout of {VERSION}"))
    assert [name for name, _ in steps] == ["chef-stop", "install", "reconfigure", "hup-puma",
                                           "restart-workhorse", "restart-nginx", "status"]
    assert dict(steps)["install"] == f"apt-get install -y gitlab-ee={VERSION}"
    assert extra_vars(web, VERSION, "r")["haproxy_backend"] == "web"


def test_ansible_cfg_forks_and_timings(tmp_path: Path):
    text = ansible_cfg(100, tmp_path / "cp", tmp_path / "tmp")
    assert "forks = 100\n" in text
    assert "callbacks_enabled = ansible.posix.profile_tasks" in text
    assert "pipelining = True" in text and f"control_path_dir = {tmp_path / 'cp'}" in text


def test_recap_and_failed_hosts():
    recap = parse_recap(OUTPUT)
    assert list(recap) == ["web-01-sv-gprd", "web-02-sv-gprd", "web-03-sv-gprd", "web-04-sv-gprd"]
    assert recap["web-01-sv-gprd"] == {"ok": 3, "changed": 3, "unreachable": 0, "failed": 0, "skipped": 0,
                                       "rescued": 0, "ignored": 0}
    names = [*recap, "web-05-sv-gprd"]  # never ran (the play stopped before its batch)
    assert hosts_failed(recap, names) == ["web-03-sv-gprd", "web-04-sv-gprd", "web-05-sv-gprd"]
    assert parse_recap("no recap here") == {}


def test_task_times_come_from_the_summary_only():
    assert parse_task_times(OUTPUT) == {
        "Drain on every LB and wait for its sessions to end": 24.74,
        "Install (chef stop, apt-get install, reconfigure, restarts, status)": 3.19,
        "Ready on every LB and wait for UP": 10.0,
    }


def test_table():
    liftoff = {"wall_s": 21.94, "ideal_s": 20.0, "ratio": 1.097, "cpu_s": 1.73, "cpu_ms_per_host": 17.3,
               "lab_cpu_s": {"sshd": 2.5, "labd": 1.9}, "out_of_service": 0, "failed_count": 0}
    ansible = {**liftoff, "wall_s": 512.41, "ratio": 25.621, "cpu_s": 161.71, "cpu_ms_per_host": 1617.1,
               "out_of_service": 3, "failed_count": 1}
    rows = [table_row(100, "liftoff", liftoff), table_row(1000, "ansible", ansible)]
    assert rows[0] == ("100", "liftoff", "21.9 s", "20 s", "1.10", "1.7 s (17.3 ms/host)", "4.4 s", "0", "0")
    assert rows[1][0] == "1,000" and rows[1][4] == "25.62" and rows[1][7:] == ("3", "1")
    lines = format_table(rows).splitlines()
    assert len(lines) == 4 and lines[0].split("  ")[0] == COLUMNS[0]
    assert set(lines[1]) == {"-", " "}
    # every column starts where its header does; numbers end where it ends
    starts = [lines[0].index(c) for c in ("orchestrator", "wall/ideal")]
    assert lines[2][starts[0]:].startswith("liftoff") and lines[3][starts[0]:].startswith("ansible")
    end = starts[1] + len("wall/ideal")
    assert lines[2][:end].endswith("1.10") and lines[3][:end].endswith("25.62")


def test_sizes_and_partial_batches():
    assert parse_sizes("100,1000") == [100, 1000] and parse_sizes("1_000") == [1000]
    assert parse_batches("1000:2") == {1000: 2}
    for bad in ("", "5", "100,x"):
        with pytest.raises((argparse.ArgumentTypeError, ValueError)):
            parse_sizes(bad)
    for bad in ("1000", "1000:0", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_batches(bad)


def test_lab_haproxy_offers_a_unix_admin_socket(config: LabConfig, tmp_path: Path):
    topology = Topology(config)
    lb = topology.lbs[0]
    text = configs.haproxy_config(config, topology, lb)
    sock = configs.lb_admin_socket(config, lb)
    assert sock is not None and f"    stats socket {sock} mode 600 level admin\n" in text
    long = LabConfig(lab_dir=tmp_path / ("x" * 90), octet=73, hosts=host_counts())
    assert configs.lb_admin_socket(long, lb) is None
    assert "stats socket /" not in configs.haproxy_config(long, Topology(long), lb)
