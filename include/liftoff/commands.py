"""The command lines liftoff runs on hosts, each argument validated and quoted.

Every builder quotes each argument with :func:`shlex.quote` after validating it (versions
with :func:`liftoff.versions.parse_version`, names and reasons with the validators there), so
a value can never be read by the remote shell as more than one word. A chain
(:func:`chained_command`) runs several steps in one SSH session and says how far it got.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence

from liftoff.errors import InvalidInput
from liftoff.versions import _CONTROL, PACKAGE, parse_version, validate_name, validate_reason


def shell_quote(value: object) -> str:
    """Quote one argument for a POSIX shell (``shlex.quote``); refuses non-text and NUL/newlines."""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise InvalidInput(f"command argument must be text or a number, got {type(value).__name__}")
    text = str(value)
    if any(ch in _CONTROL for ch in text):
        raise InvalidInput(f"command argument {text[:40]!r} contains a control character")
    return shlex.quote(text)


def build_command(*argv: object, env: dict[str, str] | None = None, sudo: bool = False) -> str:
    """Join arguments into one shell command line, each quoted; ``env`` adds ``NAME=value`` first."""
    if not argv:
        raise InvalidInput("empty command")
    parts: list[str] = []
    for name, value in (env or {}).items():
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
            raise InvalidInput(f"bad environment variable name {name!r}")
        parts.append(f"{name}={shell_quote(value)}")
    if sudo:
        parts.append("sudo")
    parts.extend(shell_quote(a) for a in argv)
    return " ".join(parts)


def apt_install_command(version: object, *, sudo: bool = False) -> str:
    """``apt-get install -y gitlab-ee=<version>`` for a validated version."""
    v = parse_version(version)
    return build_command("apt-get", "install", "-y", v.package, sudo=sudo)


def installed_version_command() -> str:
    """Print the installed gitlab-ee package version (one line)."""
    return build_command("dpkg-query", "-W", "-f=${Version}\\n", PACKAGE)


STEP_MARK = "liftoff-step-done:"
_STEP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}$")


def chained_command(steps: Sequence[tuple[str, str]]) -> str:
    """Several commands in one SSH session: ``A && echo MARK:a && B && echo MARK:b ...``.

    The chain stops at the first failing command, like a shell does; the ``echo`` after each
    step tells :func:`split_step_output` how far it got and which output is whose. One
    session instead of one per step saves a round trip per step on every host."""
    if not steps:
        raise InvalidInput("empty command chain")
    parts: list[str] = []
    for name, command in steps:
        if not _STEP_NAME.match(name):
            raise InvalidInput(f"bad step name {name!r}")
        if not command or "\n" in command:
            raise InvalidInput(f"step {name}: empty or multi-line command")
        parts += [command, build_command("echo", STEP_MARK + name)]
    return " && ".join(parts)


def chain_steps(line: str) -> list[tuple[str, str]] | None:
    """The steps of a line built by :func:`chained_command` (e.g. read back from the audit
    trail); None for any other command line."""
    parts = line.split(" && ")
    if len(parts) < 2 or len(parts) % 2:
        return None
    steps = []
    for command, mark in zip(parts[::2], parts[1::2], strict=True):
        words = shlex.split(mark)
        if len(words) != 2 or words[0] != "echo" or not words[1].startswith(STEP_MARK):
            return None
        steps.append((words[1][len(STEP_MARK):], command))
    return steps


def split_step_output(steps: Sequence[tuple[str, str]], stdout: str) -> tuple[dict[str, str], str | None]:
    """Each finished step's stdout, and the first step that did not finish (None: all did)."""
    done: dict[str, str] = {}
    names = [name for name, _ in steps]
    current: list[str] = []
    for line in stdout.splitlines():
        i = len(done)
        mark = STEP_MARK + names[i] if i < len(names) else None
        if mark is not None and line.endswith(mark):
            head = line[: -len(mark)]
            if head:
                current.append(head)
            done[names[i]] = "".join(f"{ln}\n" for ln in current)
            current = []
        else:
            current.append(line)
    unfinished = next((n for n in names if n not in done), None)
    return done, unfinished


GITLAB_CTL_ACTIONS = ("reconfigure", "restart", "hup", "status", "start", "stop")


def gitlab_ctl_command(action: str, service: str | None = None, *, sudo: bool = False) -> str:
    """``gitlab-ctl ACTION [SERVICE]`` (reconfigure, restart, hup, status, start, stop)."""
    if action not in GITLAB_CTL_ACTIONS:
        raise InvalidInput(f"gitlab-ctl action {action!r} is not one of {', '.join(GITLAB_CTL_ACTIONS)}")
    if action == "reconfigure" and service:
        raise InvalidInput("gitlab-ctl reconfigure takes no service")
    args: list[str] = ["gitlab-ctl", action]
    if service is not None:
        args.append(validate_name("service", service))
    return build_command(*args, sudo=sudo)


def migrate_command(*, post_deployment: bool, sudo: bool = False) -> str:
    """Regular migrations skip post-deployment ones; post-deployment runs them all."""
    env = {} if post_deployment else {"SKIP_POST_DEPLOYMENT_MIGRATIONS": "true"}
    return build_command("gitlab-rake", "db:migrate", env=env, sudo=sudo)


def migrate_status_command(*, sudo: bool = False) -> str:
    return build_command("gitlab-rake", "db:migrate:status", sudo=sudo)


def chef_disable_command(reason: str, *, sudo: bool = False) -> str:
    """Stop chef with a reason (``chef-client-disable 'REASON'``)."""
    return build_command("chef-client-disable", validate_reason(reason), sudo=sudo)


def chef_enable_command(*, sudo: bool = False) -> str:
    return build_command("chef-client-enable", sudo=sudo)


def chef_run_command(*, sudo: bool = False) -> str:
    return build_command("chef-client", sudo=sudo)


def chef_role_show_command() -> str:
    return build_command("gitlab-chef-role", "show")


def chef_role_set_version_command(version: object) -> str:
    return build_command("gitlab-chef-role", "set-version", str(parse_version(version)))


def patch_apply_command(patch_id: str, *, sudo: bool = False) -> str:
    return build_command("gitlab-patch", "apply", validate_name("patch", patch_id), sudo=sudo)


def patch_list_command() -> str:
    return build_command("gitlab-patch", "list")
