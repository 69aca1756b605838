"""``python -m lab``: bring a lab up or down, show it, add builds, inject faults."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from lab import chat, configs, liftoff_env, processes
from lab.config import DEFAULT_OCTET, LabConfig, default_lab_dir
from lab.processes import LabError
from lab.topology import DATABASE, ENVIRONMENTS, ROLES, Topology, host_counts


class UsageError(Exception):
    """Bad input, or a lab that is not there: exit code 2."""


# -- resolving the lab -----------------------------------------------------------------------
def lab_dir_of(args: argparse.Namespace) -> Path:
    return Path(args.lab_dir or default_lab_dir()).resolve()


def octet_of(args: argparse.Namespace) -> int | None:
    raw = args.octet if args.octet is not None else os.environ.get("LIFTOFF_LAB_OCTET")
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"bad lab octet {raw!r}") from None


def load(args: argparse.Namespace) -> LabConfig:
    """The config of an existing lab (``lab.json``)."""
    lab_dir = lab_dir_of(args)
    try:
        config = LabConfig.load(lab_dir)
    except FileNotFoundError:
        raise UsageError(f"no lab at {lab_dir} (run: python -m lab up)") from None
    octet = args.octet  # LIFTOFF_LAB_OCTET only chooses the octet of a new lab
    if octet is not None and octet != config.octet:
        raise UsageError(f"the lab at {lab_dir} uses octet {config.octet}, not {octet}")
    return config


def require_up(config: LabConfig) -> None:
    if not processes.running_pid(config, "labd"):
        raise UsageError(f"the lab at {config.lab_dir} is not up (run: python -m lab up)")


def parse_hosts(specs: list[str]) -> dict[str, dict[str, int]]:
    """``gprd:web=1000`` (repeatable, or comma separated) -> ``{"gprd": {"web": 1000}}``."""
    out: dict[str, dict[str, int]] = {}
    for spec in specs:
        for item in filter(None, spec.split(",")):
            try:
                env_role, n = item.split("=")
                env, role = env_role.split(":")
                count = int(n)
            except ValueError:
                raise UsageError(f"bad --hosts {item!r}: expected ENV:ROLE=N, e.g. gprd:web=10") from None
            if env not in ENVIRONMENTS or role not in ROLES or count < 1:
                raise UsageError(f"bad --hosts {item!r}: environments {', '.join(ENVIRONMENTS)}; "
                                 f"roles {', '.join(ROLES)}; N >= 1")
            out.setdefault(env, {})[role] = count
    return out


def config_for_up(args: argparse.Namespace) -> LabConfig:
    """The saved config of this lab dir (if any), with the options given on the command line."""
    lab_dir = lab_dir_of(args)
    try:
        try:
            config = LabConfig.load(lab_dir)
            octet = args.octet  # LIFTOFF_LAB_OCTET only chooses the octet of a new lab
        except FileNotFoundError:
            octet = octet_of(args)
            config = LabConfig(lab_dir=lab_dir, octet=octet or DEFAULT_OCTET)
        if octet is not None:
            config.octet = octet
            config.__post_init__()
        if args.scale is not None and args.scale < 1:
            raise ValueError("--scale must be at least 1")
        if args.scale or args.hosts:
            config.hosts = host_counts(args.scale, parse_hosts(args.hosts or []))
        elif not config.hosts:
            config.hosts = host_counts()
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name in ("install_seconds", "migration_seconds", "chef_interval", "traffic_rps"):
        value = getattr(args, name)
        if value is not None:
            if value < 0:
                raise UsageError(f"--{name.replace('_', '-')} must not be negative")
            setattr(config, name, value)
    return config


# -- status ----------------------------------------------------------------------------------
def parse_show_stat(text: str) -> dict[str, dict[str, dict]]:
    """``show stat`` CSV -> {server: {backend: {status, weight, check}}}."""
    lines = text.strip().splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError(f"not a show stat answer: {text[:80]!r}")
    rows = csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]])))
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row["svname"] in ("FRONTEND", "BACKEND"):
            continue
        out.setdefault(row["svname"], {})[row["pxname"]] = {
            "status": row["status"],
            "weight": int(row["weight"] or 0),
            "check": row.get("check_status", ""),
        }
    return out


def lb_state(config: LabConfig, topology: Topology) -> dict[str, dict]:
    out = {}
    for lb in topology.lbs:
        try:
            text = processes.haproxy_command(lb.addr, config.lb_admin_port, "show stat")
            out[lb.name] = {"up": True, "servers": parse_show_stat(text)}
        except (OSError, ValueError) as e:
            out[lb.name] = {"up": False, "error": str(e), "servers": {}}
    return out


def active_alerts(config: LabConfig) -> list[dict] | None:
    url = f"http://{config.alertmanager_addr}/api/v2/alerts?active=true&silenced=false&inhibited=false"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            alerts = json.load(resp)
    except OSError:
        return None
    return [
        {
            "alertname": a["labels"].get("alertname"),
            "env": a["labels"].get("env"),
            "severity": a["labels"].get("severity"),
            "state": a.get("status", {}).get("state"),
            "starts_at": a.get("startsAt"),
            "labels": a["labels"],
            "summary": a.get("annotations", {}).get("summary", ""),
        }
        for a in alerts
    ]


def _hosts_of(status: dict) -> dict[str, dict]:
    hosts = status.get("hosts", {})
    if isinstance(hosts, list):
        hosts = {h["name"]: h for h in hosts}
    return hosts


def collect_status(config: LabConfig) -> dict:
    """Everything ``lab status`` shows, as one JSON-able dict."""
    topology = Topology(config)
    live = processes.liveness(config)
    world = processes.control(config, "GET", "/status") if live.get("labd") else None
    lbs = lb_state(config, topology)
    hosts = _hosts_of(world or {})
    databases = (world or {}).get("databases", {})
    roles = (world or {}).get("roles", {})
    envs = {}
    for env in ENVIRONMENTS:
        rows = []
        for h in topology.env_hosts(env):
            state = hosts.get(h.name, {})
            rows.append({
                "name": h.name,
                "role": h.role,
                "address": h.addr,
                "installed": state.get("installed"),
                "running": state.get("running"),
                "chef_running": state.get("chef", {}).get("running"),
                "chef_disabled_reason": state.get("chef", {}).get("disabled_reason", ""),
                "patches": state.get("patches", []),
                "reachable": state.get("reachable"),
                "lbs": {lb.name: lbs[lb.name]["servers"].get(h.name, {}) for lb in topology.lbs_for(env)},
            })
        db = databases.get(DATABASE[env], {})
        envs[env] = {
            "database": DATABASE[env],
            "migrations": db.get("applied", []),
            "chef_role": roles.get(env),
            "hosts": rows,
        }
    return {
        "lab_dir": str(config.lab_dir),
        "octet": config.octet,
        "up": all(live.values()),
        "processes": {name: {"pid": pid, "alive": bool(pid)} for name, pid in live.items()},
        "load_balancers": {name: {"up": s["up"], "error": s.get("error")} for name, s in lbs.items()},
        "alerts": active_alerts(config) if live.get("alertmanager") else None,
        "builds": (world or {}).get("builds"),
        "environments": envs,
    }


def _lb_cell(entry: dict) -> str:
    """``UP/100`` (main backend) plus ``cny:UP/100`` for a canary host's canary backend."""
    if not entry:
        return "-"
    parts = []
    for backend, s in sorted(entry.items(), key=lambda kv: kv[0].startswith("canary_")):
        tag = "cny:" if backend.startswith("canary_") else ""
        parts.append(f"{tag}{s['status']}/{s['weight']}")
    return " ".join(parts)


def format_status(status: dict) -> str:
    procs = status["processes"]
    out = [f"lab {status['lab_dir']} (octet {status['octet']}): {'up' if status['up'] else 'NOT UP'}"]
    out.append("  " + ", ".join(f"{n} {p['pid'] or 'DOWN'}" for n, p in procs.items()))
    alerts = status["alerts"]
    if alerts is None:
        out.append("alerts: (alertmanager not answering)")
    elif not alerts:
        out.append("alerts: none")
    else:
        out.append("alerts:")
        for a in alerts:
            out.append(f"  {a['alertname']} env={a['env']} severity={a['severity']} since {a['starts_at']}"
                       f"  {a['summary']}")
    builds = status.get("builds")
    if builds:
        items = builds.values() if isinstance(builds, dict) else builds
        names = []
        for b in sorted(items, key=lambda b: b.get("seq", 0)):
            flags = [k for k in ("nightly", "migration_fails", "qa_fails") if b.get(k)]
            flags += [f"{k}={b[k]}" for k in ("error_rate", "latency_ms") if b.get(k)]
            if b.get("install_fails_on"):
                flags.append("install_fails_on=" + ",".join(b["install_fails_on"]))
            if b.get("includes_patches"):
                flags.append("patches=" + ",".join(b["includes_patches"]))
            names.append(b["version"] + (f" ({' '.join(flags)})" if flags else ""))
        out.append("builds: " + ", ".join(names))
    for env, e in status["environments"].items():
        role = e.get("chef_role") or {}
        last = e["migrations"][-1] if e["migrations"] else "-"
        out.append("")
        out.append(f"{env}: db {e['database']} ({len(e['migrations'])} migrations, last {last}); "
                   f"chef role {role.get('version', '?')}"
                   + ("" if role.get("package_enabled", True) else " (package locked)"))
        lb_names = list(e["hosts"][0]["lbs"]) if e["hosts"] else []
        header = ["HOST", "ROLE", "INSTALLED", "RUNNING", "CHEF", *lb_names, "NOTE"]
        rows = [header]
        for h in e["hosts"]:
            notes = []
            if h["reachable"] is False:
                notes.append("UNREACHABLE")
            if h["patches"]:
                notes.append("patches " + ",".join(h["patches"]))
            if h["chef_disabled_reason"]:
                notes.append(f"chef disabled: {h['chef_disabled_reason']}")
            chef = {True: "on", False: "off", None: "?"}[h["chef_running"]]
            rows.append([h["name"], h["role"], h["installed"] or "-", h["running"] or "-", chef,
                         *(_lb_cell(h["lbs"][lb]) for lb in lb_names), "; ".join(notes)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            out.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(out)


# -- commands --------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    config = config_for_up(args)
    if processes.running_pid(config, "labd") or any(processes.liveness(config).values()):
        saved = LabConfig.load(config.lab_dir)
        if saved != config:
            raise UsageError(f"the lab at {config.lab_dir} is up with other settings; "
                             "run: python -m lab down")
    started = processes.up(config)
    env = liftoff_env.write(config)
    topology = Topology(config)
    what = "started " + ", ".join(started) if started else "already up"
    print(f"lab {config.lab_dir} (octet {config.octet}, {topology.size} hosts): {what}")
    print(f"point liftoff at it: source {liftoff_env.env_file(config)}  "
          f"(inventory {env['LIFTOFF_INVENTORY']})")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    config = load(args)
    processes.down(config)
    print(f"lab {config.lab_dir} is down")
    if args.purge:
        shutil.rmtree(config.lab_dir)
        print(f"removed {config.lab_dir}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = load(args)
    status = collect_status(config)
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        print(format_status(status))
    if not status["processes"]["labd"]["alive"]:
        raise UsageError(f"the lab at {config.lab_dir} is not up (run: python -m lab up)")
    return 0


FAULT_FIELDS = ("error_rate", "latency_ms", "install_fails_on", "migration_fails", "qa_fails")


def check_fault_values(args: argparse.Namespace, config: LabConfig) -> None:
    """Refuse an out-of-range ``--error-rate``/``--latency-ms`` or an unknown host, in one line."""
    if args.error_rate is not None and not 0 <= args.error_rate <= 1:
        raise UsageError(f"--error-rate must be within 0..1, got {args.error_rate:g}")
    if args.latency_ms is not None and args.latency_ms < 0:
        raise UsageError(f"--latency-ms must not be negative, got {args.latency_ms}")
    unknown = set(args.install_fails_on or []) - set(Topology(config).by_name)
    if unknown:
        raise UsageError(f"unknown hosts: {', '.join(sorted(unknown))} (see: python -m lab status)")


def build_body(args: argparse.Namespace) -> dict:
    body: dict = {"version": args.version, "nightly": args.nightly,
                  "migration_fails": args.migration_fails, "qa_fails": args.qa_fails}
    if args.error_rate is not None:
        body["error_rate"] = args.error_rate
    if args.latency_ms is not None:
        body["latency_ms"] = args.latency_ms
    body["install_fails_on"] = args.install_fails_on or []
    body["includes_patches"] = args.includes_patch or []
    return body


def faults_body(args: argparse.Namespace) -> dict:
    """The faults ``build faults`` changes: only the options given."""
    body = {name: getattr(args, name) for name in FAULT_FIELDS if getattr(args, name) is not None}
    if args.no_install_fails:
        if args.install_fails_on:
            raise UsageError("--install-fails-on and --no-install-fails contradict each other")
        body["install_fails_on"] = []
    if not body:
        raise UsageError("nothing to change: give --error-rate, --latency-ms, --install-fails-on, "
                         "--no-install-fails, --[no-]migration-fails or --[no-]qa-fails")
    return body


def fault_summary(build: dict) -> str:
    """``error_rate=0.5 qa_fails install_fails_on=web-01-sv-gstg`` (``none`` without faults)."""
    flags = [name for name in ("migration_fails", "qa_fails") if build.get(name)]
    flags += [f"{name}={build[name]:g}" for name in ("error_rate", "latency_ms") if build.get(name)]
    if build.get("install_fails_on"):
        flags.append("install_fails_on=" + ",".join(build["install_fails_on"]))
    return " ".join(flags) or "none"


def cmd_build_add(args: argparse.Namespace) -> int:
    config = load(args)
    require_up(config)
    check_fault_values(args, config)
    try:
        build = processes.control(config, "POST", "/builds", build_body(args))
    except LabError as e:
        raise UsageError(str(e)) from None
    print(json.dumps(build, indent=1) if args.json else f"build {args.version} added")
    return 0


def cmd_build_faults(args: argparse.Namespace) -> int:
    """``build faults VERSION ...``: change the faults of a build labd already has."""
    config = load(args)
    require_up(config)
    check_fault_values(args, config)
    body = faults_body(args)
    known = {b["version"] for b in processes.control(config, "GET", "/builds")}
    if args.version not in known:
        raise UsageError(f"no build {args.version} in the lab at {config.lab_dir} "
                         "(see: python -m lab build list)")
    path = "/builds/" + urllib.parse.quote(args.version, safe="")
    try:
        build = processes.control(config, "PATCH", path, body)
    except LabError as e:
        raise UsageError(str(e)) from None
    summary = f"build {args.version} faults: {fault_summary(build)}"
    print(json.dumps(build, indent=1) if args.json else summary)
    return 0


def cmd_build_list(args: argparse.Namespace) -> int:
    config = load(args)
    require_up(config)
    builds = processes.control(config, "GET", "/builds")
    if args.json:
        print(json.dumps(builds, indent=1))
        return 0
    items = builds.values() if isinstance(builds, dict) else builds
    for b in sorted(items, key=lambda b: b.get("seq", 0)):
        extra = {k: v for k, v in b.items() if k not in ("version", "seq", "created") and v}
        print(f"{b['seq']:>3}  {b['version']:<40} {json.dumps(extra) if extra else ''}".rstrip())
    return 0


def cmd_fault(args: argparse.Namespace) -> int:
    config = load(args)
    require_up(config)
    if args.host not in Topology(config).by_name:
        raise UsageError(f"unknown host {args.host!r}")
    try:
        processes.control(config, "POST", f"/faults/{args.fault}", {"host": args.host})
    except LabError as e:
        raise UsageError(str(e)) from None
    if not configs.sshd_in_sync(config):  # labd's hook normally reloads sshd already
        configs.reload_sshd(config)
    print(f"{args.fault}: {args.host}")
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    config = load(args)
    require_up(config)
    target = configs.add_rules(config, Path(args.file), args.name)
    configs.reload_prometheus(config)
    print(f"rules {args.name} loaded ({target}); Prometheus reloaded")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Print what the chat receiver got, or change it: ``--fail on|off``, ``--slow S``, ``--clear``."""
    config = load(args)
    change: dict = {}
    if args.fail is not None:
        change["fail"] = args.fail == "on"
    if args.slow is not None:
        if not 0 <= args.slow <= chat.MAX_SLOW_S:
            raise UsageError(f"--slow must be within 0..{chat.MAX_SLOW_S:g} seconds")
        change["slow_s"] = args.slow
    if change or args.clear:
        try:
            setting = chat.control(config, change) if change else chat.control(config)
            if args.clear:
                chat.clear(config)
        except OSError as e:
            raise LabError(chat.unavailable(config, e)) from None
        state = "failing (HTTP 500)" if setting["fail"] else "answering"
        slow = f", {setting['slow_s']:g} s before each answer" if setting["slow_s"] else ""
        print(f"chat receiver {state}{slow}" + ("; messages cleared" if args.clear else ""))
        return 0
    messages = chat.read_messages(config)
    if args.json:
        print(json.dumps(messages[-args.last:] if args.last else messages, indent=1))
    else:
        print(chat.format_messages(messages, args.last))
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    config = load(args)
    try:
        env = liftoff_env.write(config)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    sys.stdout.write(liftoff_env.shell(env))
    return 0


# -- argument parsing ------------------------------------------------------------------------
def add_fault_options(p: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The fault options of ``build add`` (off by default) and ``build faults`` (unchanged by
    default, ``--no-qa-fails`` turns one off)."""
    flag = argparse.BooleanOptionalAction if not defaults else "store_true"
    p.add_argument("--error-rate", type=float, metavar="X", help="share of requests answered HTTP 500 (0..1)")
    p.add_argument("--latency-ms", type=int, metavar="MS", help="extra latency of every request")
    p.add_argument("--install-fails-on", action="append", metavar="HOST",
                   help="apt-get install of this build fails on HOST (repeatable)")
    p.add_argument("--migration-fails", action=flag, default=None if not defaults else False,
                   help="db:migrate of this build fails")
    p.add_argument("--qa-fails", action=flag, default=None if not defaults else False,
                   help="the QA pipeline of this build fails")


def add_build_parser(sub) -> None:
    """``build add|list|faults``."""
    build = sub.add_parser("build", help="the build catalog: add builds, list them, change their faults")
    bsub = build.add_subparsers(dest="build_cmd", required=True, metavar="{add,list,faults}")
    add = bsub.add_parser("add", help="add a build")
    add.add_argument("version")
    add.add_argument("--nightly", action="store_true")
    add_fault_options(add, defaults=True)
    add.add_argument("--includes-patch", action="append", metavar="ID")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=cmd_build_add)
    lst = bsub.add_parser("list", help="list builds")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_build_list)
    faults = bsub.add_parser("faults", help="change the faults of a build (only the options given)")
    faults.add_argument("version", help="a build the lab has (see: python -m lab build list)")
    add_fault_options(faults, defaults=False)
    faults.add_argument("--no-install-fails", action="store_true",
                        help="installs of this build fail on no host")
    faults.add_argument("--json", action="store_true")
    faults.set_defaults(func=cmd_build_faults)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lab", description=(__doc__ or "").replace("``", ""))
    p.add_argument("--lab-dir", help="lab directory (default: $LIFTOFF_LAB_DIR or .lab/)")
    p.add_argument("--octet", type=int, help="lab network 127.N.0.0/16 (default: $LIFTOFF_LAB_OCTET or 42)")
    sub = p.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="start the lab (idempotent)")
    up.add_argument("--scale", type=int, help="about N hosts in all")
    up.add_argument("--hosts", action="append", metavar="ENV:ROLE=N", help="host count of one env and role")
    up.add_argument("--install-seconds", type=float)
    up.add_argument("--migration-seconds", type=float)
    up.add_argument("--chef-interval", type=float)
    up.add_argument("--traffic-rps", type=float)
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop every process of the lab")
    down.add_argument("--purge", action="store_true", help="also remove the lab directory")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="hosts, versions, LB states, alerts, migrations")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    add_build_parser(sub)

    fault = sub.add_parser("fault", help="make a host unreachable or reachable again")
    fault.add_argument("fault", choices=["host-down", "host-up"])
    fault.add_argument("host")
    fault.set_defaults(func=cmd_fault)

    rules = sub.add_parser("rules", help="load an extra Prometheus rule file (e.g. liftoff's traffic alerts)")
    rules.add_argument("file", help="rule file (YAML), '-' not accepted")
    rules.add_argument("--name", default="extra", help="installed as prometheus/rules.d/NAME.yml")
    rules.set_defaults(func=cmd_rules)

    talk = sub.add_parser("chat", help="the chat receiver: print its messages; make it fail or be slow")
    talk.add_argument("--fail", choices=["on", "off"], help="answer HTTP 500 to every message (on) or not")
    talk.add_argument("--slow", type=float, metavar="SECONDS",
                      help="wait this long before answering (0: no wait)")
    talk.add_argument("--clear", action="store_true", help="forget the messages received so far")
    talk.add_argument("--last", type=int, metavar="N", help="only the last N messages")
    talk.add_argument("--json", action="store_true")
    talk.set_defaults(func=cmd_chat)

    env = sub.add_parser("env", help="print the shell exports that point liftoff at the lab")
    env.set_defaults(func=cmd_env)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done (and ``-h``), 1 the lab failed, 2 bad usage (and no command at all)."""
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    if not argv:  # argparse convention: the usage, with every command, on stderr; exit 2
        p.print_help(sys.stderr)
        return 2
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"lab: {e}", file=sys.stderr)
        return 2
    except (LabError, configs.ConfigError, TimeoutError) as e:
        print(f"lab: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `lab status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
