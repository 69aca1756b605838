import shlex

import pytest

from liftoff.commands import (
    apt_install_command,
    build_command,
    chef_disable_command,
    chef_role_set_version_command,
    gitlab_ctl_command,
    installed_version_command,
    migrate_command,
    patch_apply_command,
    shell_quote,
)
from liftoff.errors import InvalidInput, InvalidVersion
from liftoff.versions import is_version, parse_version, validate_name, validate_reason

OFFICIAL = "16.3.0-ee.0"
RC = "16.3.0-rc42.ee.0"
NIGHTLY = "16.3.0+rnightly.308853.0ab19c4f-0"
AUTO = "16.3.202311291200-13bd0cc7c2a.3f6b8fe0f4d"


@pytest.mark.parametrize("text,kind", [(OFFICIAL, "official"), (RC, "rc"), (NIGHTLY, "nightly"),
                                       (AUTO, "auto_deploy"), ("17.5.0-ee.0", "official")])
def test_parses_each_kind_and_keeps_exact_text(text, kind):
    v = parse_version(text)
    assert v.kind == kind
    assert str(v) == text
    assert v.series == text[:4]
    assert parse_version(v) is v


def test_fields():
    rc = parse_version(RC)
    assert (rc.major, rc.minor, rc.patch, rc.rc, rc.revision) == (16, 3, 0, 42, 0)
    n = parse_version(NIGHTLY)
    assert n.pipeline_id == 308853 and n.shas == ("0ab19c4f",) and n.is_prerelease
    a = parse_version(AUTO)
    assert a.timestamp.year == 2023 and a.timestamp.month == 11 and a.shas == ("13bd0cc7c2a", "3f6b8fe0f4d")
    assert not parse_version(OFFICIAL).is_prerelease
    assert parse_version(OFFICIAL).package == "gitlab-ee=16.3.0-ee.0"


def test_ordering_is_total_and_semantic():
    ordered = [
        "16.2.1-ee.0",
        "16.3.0+rnightly.1000.0ab19c4f-0",
        "16.3.0+rnightly.308853.0ab19c4f-0",
        "16.3.202311291100-13bd0cc7c2a.3f6b8fe0f4d",
        "16.3.202311291200-13bd0cc7c2a.3f6b8fe0f4d",
        "16.3.0-rc1.ee.0",
        "16.3.0-rc42.ee.0",
        "16.3.0-ee.0",
        "16.3.0-ee.1",
        "16.3.1-rc1.ee.0",
        "16.3.1-ee.0",
        "16.10.0-ee.0",
        "17.0.0-ee.0",
    ]
    parsed = [parse_version(v) for v in ordered]
    shuffled = list(reversed(parsed))
    assert [str(v) for v in sorted(shuffled)] == ordered
    for a, b in zip(parsed, parsed[1:], strict=False):
        assert a < b and b > a and a != b and a <= b


def test_equality_and_hash_by_text():
    assert parse_version(OFFICIAL) == parse_version(OFFICIAL)
    assert len({parse_version(OFFICIAL), parse_version(OFFICIAL), parse_version(RC)}) == 2


@pytest.mark.parametrize("bad,why", [
    ("", "empty"),
    ("16.3.0", "not an Omnibus package version"),
    ("16.3.0-ce.0", "not an Omnibus package version"),
    ("v16.3.0-ee.0", "not an Omnibus package version"),
    ("16.03.0-ee.0", "not an Omnibus package version"),
    ("16.3.0-ee.0; rm -rf /", "metacharacter ';'"),
    ("16.3.0-ee.0 ", "whitespace"),
    ("16.3.0-ee.0\n", "control character"),
    ("$(reboot)", "metacharacter '$'"),
    ("`id`", "metacharacter '`'"),
    ("../../16.3.0-ee.0", "path separator"),
    ("16.3.0-EE.0", "not an Omnibus package version"),
    ("16.3.202313291200-13bd0cc7c2a.3f6b8fe0f4d", "impossible timestamp"),
    ("16.3.0+rnightly.308853.XYZ-0", "not an Omnibus"),
    ("1" * 101, "too long"),
])
def test_refuses_anything_else(bad, why):
    with pytest.raises(InvalidVersion, match=why.replace("(", r"\(").replace("$", r"\$")):
        parse_version(bad)
    assert not is_version(bad)


def test_refuses_non_text():
    with pytest.raises(InvalidVersion, match="must be text"):
        parse_version(16)
    assert issubclass(InvalidVersion, ValueError)


@pytest.mark.parametrize("kind,value", [
    ("env", "gstg"), ("env", "gprd-cny"), ("host", "web-cny-01-sv-gprd"), ("service", "gitlab-sshd"),
    ("patch", "patch-2023-11-29.fix_1"), ("run_id", "manual__2023-11-29T12:00:00+00:00"),
    ("who", "alice@example.com"), ("role", "web"),
])
def test_valid_names(kind, value):
    assert validate_name(kind, value) == value


@pytest.mark.parametrize("kind,value,why", [
    ("env", "", "empty"),
    ("env", "gstg;id", "metacharacter ';'"),
    ("env", "gs tg", "whitespace"),
    ("env", "GSTG", "not valid"),
    ("host", "../etc/passwd", "path traversal"),
    ("host", "a/b", "path separator"),
    ("patch", "p$(id)", "metacharacter '\\$'"),
    ("role", "w" * 65, "too long"),
    ("service", "puma|nc", "metacharacter '\\|'"),
    ("who", "bob\tsmith", "control character"),
    ("env", 5, "must be text"),
])
def test_invalid_names(kind, value, why):
    with pytest.raises(InvalidInput, match=why):
        validate_name(kind, value)


def test_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown name kind"):
        validate_name("colour", "red")


def test_reasons():
    assert validate_reason("  incident INC-42: see https://gitlab.com/x/y/-/issues/1 ") == \
        "incident INC-42: see https://gitlab.com/x/y/-/issues/1"
    assert validate_name("reason", "ok") == "ok"
    for bad, why in [("", "empty"), ("  ", "empty"), ("a;b", "';'"), ("a\nb", "control"), ("$HOME", "'\\$'"),
                     ("x" * 501, "too long"), ("don't", "\"'\"")]:
        with pytest.raises(InvalidInput, match=why):
            validate_reason(bad)


def test_apt_install_command_quotes_a_validated_version():
    assert apt_install_command(OFFICIAL) == "apt-get install -y gitlab-ee=16.3.0-ee.0"
    assert apt_install_command(NIGHTLY, sudo=True) == f"sudo apt-get install -y gitlab-ee={NIGHTLY}"
    assert shlex.split(apt_install_command(AUTO)) == ["apt-get", "install", "-y", f"gitlab-ee={AUTO}"]
    with pytest.raises(InvalidVersion):
        apt_install_command("16.3.0-ee.0 && reboot")


def test_command_builders_quote_every_argument():
    assert shlex.split(installed_version_command()) == ["dpkg-query", "-W", "-f=${Version}\\n", "gitlab-ee"]
    assert migrate_command(post_deployment=False) == \
        "SKIP_POST_DEPLOYMENT_MIGRATIONS=true gitlab-rake db:migrate"
    assert migrate_command(post_deployment=True) == "gitlab-rake db:migrate"
    assert gitlab_ctl_command("hup", "puma") == "gitlab-ctl hup puma"
    assert gitlab_ctl_command("reconfigure") == "gitlab-ctl reconfigure"
    assert shlex.split(chef_disable_command("deploy 16.3.0-ee.0 by alice")) == \
        ["chef-client-disable", "deploy 16.3.0-ee.0 by alice"]
    assert chef_role_set_version_command(OFFICIAL) == "gitlab-chef-role set-version 16.3.0-ee.0"
    assert patch_apply_command("p-1") == "gitlab-patch apply p-1"
    with pytest.raises(InvalidInput):
        gitlab_ctl_command("restart", "puma; reboot")
    with pytest.raises(InvalidInput):
        gitlab_ctl_command("rm")
    with pytest.raises(InvalidInput):
        chef_disable_command("x'; reboot; echo '")


def test_shell_quote_and_build_command():
    assert shell_quote("a b") == "'a b'"
    assert shell_quote("it's") == "'it'\"'\"'s'"
    assert shlex.split(build_command("echo", "a;b", "$(x)")) == ["echo", "a;b", "$(x)"]
    assert build_command("true", env={"A_B": "x y"}) == "A_B='x y' true"
    for bad in (None, True, "a\x00b", "a\nb"):
        with pytest.raises(InvalidInput):
            shell_quote(bad)
    with pytest.raises(InvalidInput):
        build_command()
    with pytest.raises(InvalidInput):
        build_command("true", env={"a;b": "x"})


def test_a_command_chain_marks_each_step_and_finds_where_it_stopped():
    from liftoff.commands import chained_command, split_step_output

    steps = [("reconfigure", "gitlab-ctl reconfigure"), ("hup-puma", "gitlab-ctl hup puma"),
             ("status", "gitlab-ctl status")]
    line = chained_command(steps)
    mark = "liftoff-step-done:"
    assert shlex.split(line) == ["gitlab-ctl", "reconfigure", "&&", "echo", f"{mark}reconfigure", "&&",
                                 "gitlab-ctl", "hup", "puma", "&&", "echo", f"{mark}hup-puma", "&&",
                                 "gitlab-ctl", "status", "&&", "echo", f"{mark}status"]
    done, stopped = split_step_output(steps, f"Reconfigured!\n{mark}reconfigure\nok: run: puma\n")
    assert done == {"reconfigure": "Reconfigured!\n"} and stopped == "hup-puma"
    out = f"a\n{mark}reconfigure\nb\n{mark}hup-puma\nrun: x\n{mark}status\n"
    assert split_step_output(steps, out) == ({"reconfigure": "a\n", "hup-puma": "b\n", "status": "run: x\n"},
                                             None)
    # a step's last line without a newline still ends at its marker
    assert split_step_output(steps[:1], f"17.5.0{mark}reconfigure\n") == ({"reconfigure": "17.5.0\n"}, None)
    # a marker out of order is output, not progress
    assert split_step_output(steps, "liftoff-step-done:status\n")[1] == "reconfigure"
    from liftoff.commands import chain_steps

    assert chain_steps(line) == steps, "a chain read back from the audit trail"
    assert chain_steps("gitlab-ctl status") is None and chain_steps("a && b") is None
    for bad in ([], [("bad name", "x")], [("ok", "")], [("ok", "a\nb")]):
        with pytest.raises(InvalidInput):
            chained_command(bad)
