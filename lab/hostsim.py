"""The host simulator: what an Omnibus host does with the commands liftoff sends over SSH.

sshd's ``ForceCommand`` (:func:`relay_script`) relays ``SSH_CONNECTION`` and
``SSH_ORIGINAL_COMMAND`` to labd over TCP; labd finds the host by the address that was
dialled and runs the command with :func:`run_command` against the in-memory world,
writing the touched host (or database, or role) through to disk.

Wire protocol on ``control_addr:hostsim_port``: the client sends two lines,
``$SSH_CONNECTION`` and the command; the server answers ``o TEXT`` (stdout) and
``e TEXT`` (stderr) lines, then ``x CODE``, and closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shlex
import time
import zlib
from collections.abc import Awaitable, Callable

from lab.config import LabConfig
from lab.model import HostState, World
from lab.topology import DATABASE

log = logging.getLogger("lab.hostsim")

Result = tuple[int, str, str]
PACKAGE = "gitlab-ee"
ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")
SHELL_OPERATORS = {"||", ";", "|", "&", ">", ">>", "<", "2>&1", "2>", "$(", "`"}
TRUE_VALUES = {"1", "true", "yes", "on"}
READ_TIMEOUT = 30.0


def _ok(out: str = "") -> Result:
    return 0, out, ""


def _fail(code: int, err: str, out: str = "") -> Result:
    return code, out, err


def _lines(*lines: str) -> str:
    return "".join(f"{line}\n" for line in lines)


# -- parsing -------------------------------------------------------------------------------
def parse(command: str) -> tuple[dict[str, str], list[str]]:
    """Split a command into its environment assignments and argv (``sudo``/``env`` dropped)."""
    return parse_words(shlex.split(command))


def split_chain(command: str) -> list[list[str]]:
    """A command line's words, split into the commands of an ``A && B && C`` chain.

    Raises ValueError for unbalanced quotes or an empty command around ``&&``."""
    chain: list[list[str]] = [[]]
    for word in shlex.split(command):
        if word == "&&":
            chain.append([])
        else:
            chain[-1].append(word)
    if len(chain) > 1 and not all(chain):
        raise ValueError("syntax error near unexpected token `&&'")
    return chain


def parse_words(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """Environment assignments and argv of one command's words (``sudo``/``env`` dropped)."""
    argv = list(words)
    env: dict[str, str] = {}
    while argv:
        head = argv[0]
        if head in ("sudo", "env", "/usr/bin/sudo", "/usr/bin/env"):
            argv.pop(0)
            while argv and argv[0].startswith("-") and argv[0] != "--":
                flag = argv.pop(0)
                if flag in ("-u", "-g") and argv:
                    argv.pop(0)  # sudo -u USER
            if argv and argv[0] == "--":
                argv.pop(0)
        elif ENV_ASSIGN.match(head):
            name, _, value = argv.pop(0).partition("=")
            env[name] = value
        else:
            break
    if argv and argv[0].startswith("/"):
        argv[0] = argv[0].rsplit("/", 1)[1]  # /usr/bin/gitlab-ctl
    return env, argv


# -- apt / dpkg ----------------------------------------------------------------------------
async def apt_install(world: World, state: HostState, version: str) -> Result:
    """Install ``gitlab-ee=version`` on a host (the caller holds the host lock and saves)."""
    build = world.builds.get(version)
    if build is None:
        return _fail(100, _lines(f"E: Version '{version}' for '{PACKAGE}' was not found"),
                     _lines("Reading package lists...", "Building dependency tree..."))
    if state.installed == version:
        return _ok(_lines("Reading package lists...", "Building dependency tree...",
                          f"{PACKAGE} is already the newest version ({version}).",
                          "0 upgraded, 0 newly installed, 0 to remove and 0 not upgraded."))
    # a slow install on this host (POST /faults/slow-install): its seconds instead of the lab's
    await asyncio.sleep(world.faults.get("slow_install", {}).get(state.name, world.config.install_seconds))
    out = [
        "Reading package lists...",
        "Building dependency tree...",
        f"The following packages will be upgraded:\n  {PACKAGE}",
        f"Unpacking {PACKAGE} ({version}) over ({state.installed or 'none'}) ...",
        f"Setting up {PACKAGE} ({version}) ...",
    ]
    if state.name in build.install_fails_on:
        return _fail(100, _lines(
            f"dpkg: error processing package {PACKAGE} (--configure):",
            " installed gitlab-ee package post-installation script subprocess returned error exit status 1",
            "Errors were encountered while processing:",
            f" {PACKAGE}",
            "E: Sub-process /usr/bin/dpkg returned an error code (1)",
        ), _lines(*out))
    world.set_installed(state, version)
    return _ok(_lines(*out, f"Thank you for installing GitLab {version}!"))


async def _apt_get(world: World, state: HostState, env: dict, args: list[str]) -> Result:
    if not args or args[0] != "install":
        # `apt-get install` is the only form the lab knows.
        return _unknown(" ".join(["apt-get", *args]))
    yes = False
    packages = []
    rest = args[1:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("-y", "--yes", "--assume-yes", "-qy", "-yq"):
            yes = True
        elif arg == "-o":
            i += 1  # -o Option=value
        elif not arg.startswith("-"):
            packages.append(arg)
        i += 1
    if len(packages) != 1:
        return _fail(100, _lines("E: the lab installs exactly one package: gitlab-ee=VERSION"))
    name, _, version = packages[0].partition("=")
    if name != PACKAGE:
        return _fail(100, _lines(f"E: Unable to locate package {name}"))
    if not version:
        return _fail(100, _lines(f"E: the lab needs a pinned version: {PACKAGE}=VERSION"))
    if not yes:
        return _fail(1, _lines("Do you want to continue? [Y/n] Abort."))
    code, out, err = await apt_install(world, state, version)
    if code == 0:
        world.save_host(state.name)
    return code, out, err


def _dpkg_query(world: World, state: HostState, env: dict, args: list[str]) -> Result:
    fmt = "${Package}\t${Version}\n"
    packages = []
    show = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-W", "--show"):
            show = True
        elif arg.startswith("-f=") or arg.startswith("--showformat="):
            fmt = arg.split("=", 1)[1]
        elif arg in ("-f", "--showformat") and i + 1 < len(args):
            i += 1
            fmt = args[i]
        elif not arg.startswith("-"):
            packages.append(arg)
        i += 1
    if not show or packages != [PACKAGE]:
        return _unknown(" ".join(["dpkg-query", *args]))
    if not state.installed:
        return _fail(1, _lines(f"dpkg-query: no packages found matching {PACKAGE}"))
    text = fmt.replace("${Version}", state.installed).replace("${Package}", PACKAGE)
    text = text.replace("${Status}", "install ok installed").replace("\\n", "\n").replace("\\t", "\t")
    return _ok(text)


# -- gitlab-ctl ----------------------------------------------------------------------------
def _log_pid(host: str, service: str) -> int:
    return 300 + zlib.crc32(f"{host}/{service}".encode()) % 700


def _status_line(state: HostState, name: str, now: float, prefix: str = "") -> str:
    svc = state.services[name]
    up = max(0, int(now - svc.started))
    return (f"{prefix}run: {name}: (pid {svc.pid}) {up}s; "
            f"run: log: (pid {_log_pid(state.name, name)}) {up}s")


def _gitlab_ctl(world: World, state: HostState, env: dict, args: list[str]) -> Result:
    if not args or args[0] not in ("reconfigure", "restart", "hup", "status"):
        return _unknown(" ".join(["gitlab-ctl", *args]))
    action, names = args[0], args[1:]
    if not state.installed:
        return _fail(1, _lines("gitlab-ctl: gitlab-ee is not installed"))
    if action == "reconfigure":
        if names:
            return _fail(1, _lines("gitlab-ctl reconfigure takes no argument"))
        if state.installed not in world.builds:
            return _fail(1, _lines(f"gitlab-ctl: installed package {state.installed} is unknown"))
        return _ok(_lines("Starting Chef Infra Client, version 18.3.0", "Chef Infra Client finished",
                          "gitlab Reconfigured!"))
    if len(names) > 1:
        return _fail(1, _lines(f"gitlab-ctl {action} takes at most one service"))
    unknown = [n for n in names if n not in state.services]
    if unknown:
        return _fail(1, _lines(f"fail: {unknown[0]}: runsv not running (no such service on {state.name})"))
    now = time.time()
    if action == "status":
        return _ok(_lines(*(_status_line(state, n, now) for n in (names or state.services))))
    restarted = world.restart_services(state, names or None)
    world.save_host(state.name)
    return _ok(_lines(*(_status_line(state, n, now, "ok: ") for n in restarted)))


# -- gitlab-rake ---------------------------------------------------------------------------
async def _gitlab_rake(world: World, state: HostState, env: dict, args: list[str]) -> Result:
    if args not in (["db:migrate"], ["db:migrate:status"]):
        return _unknown(" ".join(["gitlab-rake", *args]))
    if not state.installed or state.installed not in world.builds:
        return _fail(1, _lines(f"gitlab-rake: gitlab-ee is not installed on {state.name}"))
    build = world.builds[state.installed]
    regular, post = world.migrations(state.installed)
    db_name = DATABASE[state.env]
    db = world.database_of(state.env)
    if args == ["db:migrate:status"]:
        names = sorted(set(regular) | set(post) | set(db["applied"]),
                       key=lambda n: (n.split("_", 1)[0], "_post_" in n, n))
        applied = set(db["applied"])
        out = [f"database: gitlabhq_production ({db_name})", "",
               " Status   Migration ID", "-" * 50]
        out += [f" {'up' if n in applied else 'down':<6} {n}" for n in names]
        return _ok(_lines(*out))
    skip_post = env.get("SKIP_POST_DEPLOYMENT_MIGRATIONS", "").lower() in TRUE_VALUES
    wanted = regular if skip_post else regular + post
    failing = {build.regular_migration, build.post_migration} if build.migration_fails else set()
    out: list[str] = []
    async with world.lock(f"db:{db_name}"):
        pending = [m for m in wanted if m not in db["applied"]]
        if not pending:
            return _ok(_lines("No pending migrations" + (" (post-deployment skipped)" if skip_post else "")))
        for name in pending:
            out.append(f"== {name}: migrating " + "=" * 20)
            await asyncio.sleep(world.config.migration_seconds)
            if name in failing:
                return _fail(1, _lines(
                    "rake aborted!",
                    "StandardError: An error has occurred, this and all later migrations canceled:",
                    "",
                    f"PG::QueryCanceled: ERROR:  canceling statement due to statement timeout ({name})",
                    f"Tasks: TOP => db:migrate (migration {name} failed)",
                ), _lines(*out))
            db["applied"].append(name)
            db.setdefault("log", []).append(
                {"time": time.time(), "host": state.name, "migration": name, "version": state.installed})
            world.save_database(db_name)
            out.append(f"== {name}: migrated ({world.config.migration_seconds:.4f}s) " + "=" * 10)
    return _ok(_lines(*out))


# -- chef ----------------------------------------------------------------------------------
def _chef_disable(world: World, state: HostState, env: dict, args: list[str]) -> Result:
    reason = " ".join(args).strip()
    if not reason:
        return _fail(1, _lines("Usage: chef-client-disable 'REASON'"))
    state.chef_running = False
    state.chef_disabled_reason = reason
    world.save_host(state.name)
    return _ok(_lines(f"chef-client disabled: {reason}"))


def _chef_enable(world: World, state: HostState, env: dict, args: list[str]) -> Result:
    if args:
        return _unknown(" ".join(["chef-client-enable", *args]))
    state.chef_running = True
    state.chef_disabled_reason = ""
    world.save_host(state.name)
    return _ok(_lines("chef-client enabled"))


def _systemctl(world: World, state: HostState, env: dict, args: list[str]) -> Result:
    unit = args[1].removesuffix(".service") if len(args) == 2 else ""
    if len(args) != 2 or args[0] not in ("stop", "start") or unit != "chef-client":
        return _unknown(" ".join(["systemctl", *args]))
    state.chef_running = args[0] == "start"
    world.save_host(state.name)
    if state.chef_running and state.chef_disabled_reason:
        return _ok("", _lines(f"warning: chef-client is disabled ({state.chef_disabled_reason}); "
                              "its runs are skipped until chef-client-enable"))
    return _ok()


async def _chef_client(world: World, state: HostState, env: dict, args: list[str]) -> Result:
    from lab.chef import converge

    if args:
        return _unknown(" ".join(["chef-client", *args]))
    if state.chef_disabled_reason:
        reason = state.chef_disabled_reason
        return _fail(1, _lines(f"chef-client is disabled: {reason} (run chef-client-enable)"))
    return await converge(world, state)


def _chef_role(world: World, state: HostState, env: dict, args: list[str]) -> Result:
    if not args or args[0] not in ("show", "set-version") or (args[0] == "show" and len(args) != 1) \
            or (args[0] == "set-version" and len(args) != 2):
        return _fail(1, _lines("Usage: gitlab-chef-role show | gitlab-chef-role set-version VERSION"))
    if state.role != "deploy":
        return _fail(1, _lines(f"gitlab-chef-role: runs on the deploy node only ({state.name} is a "
                               f"{state.role} node)"))
    role = world.roles[state.env]
    if args[0] == "set-version":
        version = args[1]
        if version not in world.builds:
            return _fail(1, _lines(f"gitlab-chef-role: unknown version {version!r} (no such package)"))
        role["version"] = version
        role["updated"] = time.time()
        world.save_roles()
    return _ok(json.dumps({"env": state.env, **role}, sort_keys=True) + "\n")


# -- patches -------------------------------------------------------------------------------
def _gitlab_patch(world: World, state: HostState, env: dict, args: list[str]) -> Result:
    if args == ["list"]:
        return _ok(_lines(*state.patches))
    if len(args) != 2 or args[0] != "apply":
        return _unknown(" ".join(["gitlab-patch", *args]))
    patch = args[1]
    if not PATCH_ID.match(patch):
        return _fail(1, _lines(f"gitlab-patch: bad patch id {patch!r}"))
    if not state.installed:
        return _fail(1, _lines("gitlab-patch: gitlab-ee is not installed"))
    build = world.builds.get(state.installed)
    if build and patch in build.includes_patches:
        return _ok(_lines(f"patch {patch} is already included in {state.installed}"))
    if patch in state.patches:
        return _ok(_lines(f"patch {patch} is already applied"))
    state.patches.append(patch)
    world.save_host(state.name)
    return _ok(_lines(f"patch {patch} applied to {PACKAGE} {state.installed}"))


# -- dispatch ------------------------------------------------------------------------------
Handler = Callable[[World, HostState, dict, list[str]], "Result | Awaitable[Result]"]
# name -> (handler, takes the host lock)
COMMANDS: dict[str, tuple[Handler, bool]] = {
    "apt-get": (_apt_get, True),
    "dpkg-query": (_dpkg_query, False),
    "gitlab-ctl": (_gitlab_ctl, True),
    "gitlab-rake": (_gitlab_rake, True),
    "chef-client-disable": (_chef_disable, False),
    "chef-client-enable": (_chef_enable, False),
    "systemctl": (_systemctl, False),
    "chef-client": (_chef_client, True),
    "gitlab-chef-role": (_chef_role, True),
    "gitlab-patch": (_gitlab_patch, True),
}


def _echo(world: World, state: HostState, env: dict, args: list[str]) -> Result:
    return _ok(_lines(" ".join(args)))


COMMANDS["echo"] = (_echo, False)


def _unknown(command: str) -> Result:
    return _fail(127, _lines(f"lab: unknown command: {command}"))


async def _dispatch(world: World, state: HostState, command: str) -> tuple[Result, bool]:
    """Run a command or an ``&&`` chain: its result, and whether it was audited already (each
    command of a chain is, as it runs; :func:`run_command` audits the rest)."""
    if not state.reachable:
        port = world.config.ssh_port
        return _fail(255, _lines(f"ssh: connect to host {state.addr} port {port}: Connection refused")), False
    if not command.strip():
        return _fail(1, _lines(f"lab: {state.name} runs commands only (no interactive shell)")), False
    try:
        chain = split_chain(command)
    except ValueError as exc:
        return _fail(2 if "syntax" in str(exc) else 127, _lines(f"lab: {command}: {exc}")), False
    if len(chain) == 1:
        return await _dispatch_one(world, state, command, chain[0]), False
    outs: list[str] = []
    errs: list[str] = []
    code = 0
    for words in chain:  # like a shell: stop at the first command that fails
        if not state.reachable:  # the host went down during the chain: nothing more runs
            code = 255
            errs.append(_lines(f"Connection to {state.addr} closed by remote host."))
            break
        start = time.monotonic()
        one = shlex.join(words)
        code, out, err = await _dispatch_one(world, state, one, words)
        if words[0] != "echo":  # the audit log keeps each command of a chain, not step markers
            world.audit(state.name, one, code, time.monotonic() - start)
        outs.append(out)
        errs.append(err)
        if code != 0:
            break
    return (code, "".join(outs), "".join(errs)), True


async def _dispatch_one(world: World, state: HostState, command: str, words: list[str]) -> Result:
    env, argv = parse_words(words)
    if not argv or argv[0] not in COMMANDS:
        return _unknown(command)
    if any(arg in SHELL_OPERATORS for arg in argv):
        return _fail(127, _lines(f"lab: unknown command: {command} (shell operators are not supported)"))
    handler, locked = COMMANDS[argv[0]]
    if locked:
        async with world.lock(state.name):
            result = handler(world, state, env, argv[1:])
            return await result if asyncio.iscoroutine(result) else result
    result = handler(world, state, env, argv[1:])
    return await result if asyncio.iscoroutine(result) else result


async def run_command(world: World, host_state: HostState, command: str) -> Result:
    """Run one command (or ``&&`` chain) on a host: ``(exit code, stdout, stderr)``; each
    command audited, state saved."""
    start = time.monotonic()
    try:
        (code, out, err), audited = await _dispatch(world, host_state, command)
    except Exception as exc:  # a simulator bug must not look like a host success
        log.exception("command failed on %s: %s", host_state.name, command)
        (code, out, err), audited = (70, "", _lines(f"lab: internal error: {exc}")), False
    if not audited:
        world.audit(host_state.name, command, code, time.monotonic() - start)
    return code, out, err


# -- TCP server ----------------------------------------------------------------------------
def _encode(code: int, out: str, err: str) -> bytes:
    parts = [f"o {line}\n" for line in out.splitlines()]
    parts += [f"e {line}\n" for line in err.splitlines()]
    parts.append(f"x {code}\n")
    return "".join(parts).encode("utf-8", errors="replace")


async def handle(world: World, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve one relayed SSH command."""
    try:
        connection = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
        command = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
        fields = connection.decode("utf-8", errors="replace").split()
        addr = fields[2] if len(fields) >= 3 else ""
        state = world.host_at(addr)
        if state is None:
            log.warning("no host at %r (SSH_CONNECTION=%r)", addr, connection)
            result: Result = (255, "", f"lab: no host at {addr or '(no SSH_CONNECTION)'}\n")
        else:
            text = command.decode("utf-8", errors="replace").rstrip("\r\n")
            result = await run_command(world, state, text)
        writer.write(_encode(*result))
        await writer.drain()
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError) as exc:
        log.warning("hostsim connection dropped: %r", exc)
    finally:
        writer.close()


async def start(world: World) -> asyncio.Server:
    """Listen on ``control_addr:hostsim_port``; close with ``server.close()``."""
    config = world.config
    return await asyncio.start_server(
        lambda r, w: handle(world, r, w), config.control_addr, config.hostsim_port,
        reuse_address=True, backlog=1024)


# -- sshd ForceCommand ---------------------------------------------------------------------
def relay_script(config: LabConfig) -> str:
    """The bash ForceCommand that relays one SSH command to labd and returns its result."""
    addr, port = config.control_addr, config.hostsim_port
    return f"""#!/bin/bash
# liftoff lab: sshd ForceCommand. Relays SSH_CONNECTION and SSH_ORIGINAL_COMMAND to
# labd's host simulator at {addr}:{port} and replays its stdout, stderr and exit code.
if ! {{ exec 3<>"/dev/tcp/{addr}/{port}"; }} 2>/dev/null; then
    echo "lab: labd is not reachable at {addr}:{port} (is the lab up? try: python -m lab status)" >&2
    exit 255
fi
cmd="${{SSH_ORIGINAL_COMMAND//$'\\n'/ }}"
printf '%s\\n%s\\n' "${{SSH_CONNECTION:-}}" "$cmd" >&3
code=
while IFS= read -r line <&3 || [ -n "$line" ]; do
    case "$line" in
        "o "*) printf '%s\\n' "${{line:2}}" ;;
        "e "*) printf '%s\\n' "${{line:2}}" >&2 ;;
        "x "*) code="${{line:2}}"; break ;;
    esac
done
exec 3<&-
if [ -z "$code" ]; then
    echo "lab: labd closed the connection without an exit code" >&2
    exit 255
fi
exit "$code"
"""
