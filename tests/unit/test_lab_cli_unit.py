"""``python -m lab``'s usage (``-h``, no command) and the ``build faults`` options, without a lab."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from lab import cli
from lab.config import REPO_ROOT, LabConfig

COMMANDS = ("up", "down", "status", "build", "fault", "rules", "chat", "env")


def lab(*args: str, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env)


def test_dash_h_prints_the_usage_with_every_command_and_exits_0(tmp_path):
    out = lab("-h", cwd=tmp_path)  # from anywhere, not only the checkout
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m lab ") and out.stderr == ""
    for command in COMMANDS:
        assert f"\n    {command} " in out.stdout, command
    assert "``" not in out.stdout


def test_no_command_prints_the_usage_on_stderr_and_exits_2():
    out = lab()
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("usage: python -m lab ")
    for command in COMMANDS:
        assert f"\n    {command} " in out.stderr, command


def test_build_help_lists_faults_with_the_add_fault_options():
    out = lab("build", "-h")
    assert out.returncode == 0 and "faults" in out.stdout and "change the faults of a build" in out.stdout
    faults = lab("build", "faults", "-h").stdout
    for option in ("--error-rate X", "--latency-ms MS", "--install-fails-on HOST", "--no-install-fails",
                   "--qa-fails, --no-qa-fails", "--migration-fails, --no-migration-fails"):
        assert option in faults, option


def test_build_faults_without_a_lab_is_one_line_exit_2(tmp_path):
    out = lab("--lab-dir", str(tmp_path / "nolab"), "build", "faults", "17.7.0-ee.0", "--qa-fails")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"lab: no lab at {tmp_path / 'nolab'} (run: python -m lab up)\n"


def parse(*args: str) -> argparse.Namespace:
    return cli.parser().parse_args(["build", "faults", "17.7.0-ee.0", *args])


def test_faults_body_has_only_the_options_given():
    assert cli.faults_body(parse("--qa-fails")) == {"qa_fails": True}
    assert cli.faults_body(parse("--no-qa-fails", "--error-rate", "0")) == {
        "qa_fails": False, "error_rate": 0.0}
    assert cli.faults_body(parse("--install-fails-on", "a", "--install-fails-on", "b",
                                 "--migration-fails", "--latency-ms", "7")) == {
        "install_fails_on": ["a", "b"], "migration_fails": True, "latency_ms": 7}
    assert cli.faults_body(parse("--no-install-fails")) == {"install_fails_on": []}
    with pytest.raises(cli.UsageError, match="^nothing to change: give --error-rate"):
        cli.faults_body(parse())
    with pytest.raises(cli.UsageError, match="contradict"):
        cli.faults_body(parse("--no-install-fails", "--install-fails-on", "a"))


def test_build_add_keeps_its_fault_defaults_off():
    args = cli.parser().parse_args(["build", "add", "17.7.0-ee.0"])
    body = cli.build_body(args)
    assert (body["qa_fails"], body["migration_fails"], body["install_fails_on"]) == (False, False, [])
    assert "error_rate" not in body and "latency_ms" not in body


@pytest.mark.parametrize(("args", "message"), [
    (("--error-rate", "1.5"), "--error-rate must be within 0..1, got 1.5"),
    (("--error-rate", "nan"), "--error-rate must be within 0..1, got nan"),
    (("--latency-ms", "-3"), "--latency-ms must not be negative, got -3"),
    (("--install-fails-on", "web-99-sv-gstg"), "unknown hosts: web-99-sv-gstg (see: python -m lab status)"),
])
def test_bad_fault_values_are_one_line(tmp_path, args, message):
    with pytest.raises(cli.UsageError) as err:
        cli.check_fault_values(parse(*args), LabConfig(lab_dir=tmp_path))
    assert str(err.value) == message


def test_fault_summary():
    assert cli.fault_summary({"qa_fails": False, "error_rate": 0.0, "install_fails_on": []}) == "none"
    build = {"qa_fails": True, "migration_fails": False, "error_rate": 0.25, "latency_ms": 0,
             "install_fails_on": ["a", "b"]}
    assert cli.fault_summary(build) == "qa_fails error_rate=0.25 install_fails_on=a,b"


def test_the_default_lab_has_three_canary_web_hosts_as_documented(tmp_path):
    from lab.topology import Topology

    topology = Topology(LabConfig(lab_dir=tmp_path))
    assert [h.name for h in topology.env_hosts("gprd-cny", "web")] == [
        "web-cny-01-sv-gprd", "web-cny-02-sv-gprd", "web-cny-03-sv-gprd"]
    sizes = {env: len(topology.env_hosts(env)) for env in ("gstg", "gprd-cny", "gprd")}
    assert (topology.size, sizes) == (32, {"gstg": 9, "gprd-cny": 10, "gprd": 13})
    lab_readme = (REPO_ROOT / "lab" / "README.md").read_text()
    for figure in ("is 32 hosts: `gstg` 9", "`gprd-cny` 10", "web x3, api x2", "`gprd` 13"):
        assert figure in lab_readme, figure
    assert "3 canary web hosts, 32 hosts in all" in (REPO_ROOT / "README.md").read_text()


def test_every_documented_lab_command_parses():
    """Each ``python -m lab ...`` line of a README code block is a command this CLI takes."""
    import re
    import shlex

    lines = []
    for doc in (REPO_ROOT / "README.md", REPO_ROOT / "lab" / "README.md"):
        for block in re.findall(r"^```[^\n]*\n(.*?)^```", doc.read_text(), re.M | re.S):
            for line in block.splitlines():
                for part in re.split(r"&&", line.split(" #")[0]):
                    words = shlex.split(part)
                    if words[:3] == ["python", "-m", "lab"]:
                        lines.append(words[3:])
    assert ["build", "faults", "17.9.0+rnightly.42.abcdef1-0", "--qa-fails", "--install-fails-on",
            "web-cny-03-sv-gprd"] in lines
    for argv in lines:
        cli.parser().parse_args(argv)  # exits (the test fails) on a command or option it does not take
