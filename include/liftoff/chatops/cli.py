"""``liftoff``: the ChatOps commands, each one call (or a few) to Airflow's REST API v2.

    liftoff deploy 17.6.0+rnightly.308853.0ab19c4f-0 --dry-run
    liftoff promote 17.6.0-ee.0 [--override-reason R] [--approval]
    liftoff rollback gprd [--to VERSION] [--fast] [--reason R]
    liftoff rollback check gprd
    liftoff fast-deploy gprd 17.6.1-ee.0 --reason "CVE-... fix" [--internal]
    liftoff traffic [--env gstg --env gprd-cny] [--rps 5] [--for 10m] [--endpoint /explore]
    liftoff canary weight 5 | --drain | --ready | --maint  [--force]
    liftoff patch gprd fix-123.patch --roles web,api --reason "..."
    liftoff lock gprd --reason "..."      liftoff unlock gprd --reason "..."
    liftoff status [--no-lbs]
    liftoff retry RUN_ID stage_3 [--dag deploy_canary] [--dry-run]
    liftoff watch RUN_ID [--dag deploy_canary]
    liftoff approve RUN_ID --reason R [--dag deploy_production] [--task approval]
    liftoff reject RUN_ID [--reason R] [--dag deploy_production] [--task approval]

Credentials: LIFTOFF_API_URL (default http://127.0.0.1:8080) with LIFTOFF_API_USER and
LIFTOFF_API_PASSWORD, or LIFTOFF_API_TOKEN. Inputs are validated before any call. Exit codes:
0 done, 1 the run (or check) failed, 2 bad input (also an API 400), 3 Airflow unreachable,
4 credentials refused, 5 other API errors.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from liftoff.canary import CANARY_STATES, parse_weight
from liftoff.chatops.api import (
    TERMINAL_STATES,
    AirflowClient,
    ApiError,
    ApiUnreachable,
    AuthFailed,
    ChatOpsError,
    Credentials,
    NotFound,
    q,
)
from liftoff.errors import InvalidInput
from liftoff.inventory import ROLLOUT_MODES
from liftoff.status import internal_label, scrub_internal
from liftoff.versions import parse_version, validate_name, validate_reason

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2

DAG_CANARY = "deploy_canary"
DAG_PRODUCTION = "deploy_production"
DAG_ROLLBACK = "rollback"
DAG_CANARY_WEIGHT = "canary_weight"
DAG_PATCH = "post_deploy_patch"
DAG_LOCK = "deploy_lock"
DAG_FAST = "fast_deploy"
DAG_TRAFFIC = "traffic"
STATUS_DAGS = (DAG_CANARY, DAG_PRODUCTION)
SAFETY_TASK = "safety_check"
MAX_PATCH_BYTES = 256 * 1024
ACTIVE_STATES = {"running", "queued", "scheduled", "up_for_retry", "up_for_reschedule", "restarting",
                 "deferred"}
ROLLBACK_TASKS = ("rollback",)  # a run that rolled back cannot resume where it failed
FINAL_TASKS = ("finalize",)
# Stuck tasks: liftoff's documented [scheduler] task_instance_heartbeat_timeout, and how long a
# running task (or, since Airflow 3.3's REST API has no heartbeat per task instance, the
# scheduler) may stay silent before watch says so.
HEARTBEAT_TIMEOUT_S = 60
HEARTBEAT_WARN_S = 30
HEALTH_EVERY_S = 10.0  # seconds between two reads of /monitor/health while a watch polls
TI_HEARTBEAT_FIELDS = ("last_heartbeat_at", "last_heartbeat")  # used when the API gives one
_STAGE_RE = re.compile(r"^stage_(\d+)(?:_|$)")


# -- conf builders (pure: validated input in, the DAG's conf out) ------------------------------

def _version(value: str) -> str:
    return str(parse_version(value))


def _reason(value: str | None, field: str = "reason") -> str | None:
    return None if value is None else validate_reason(value, field_name=field)


ROLLOUT_HELP = "every role in lockstep batches or a sliding window (default: each role's own)"


def _rollout(conf: dict[str, Any], rollout: str | None) -> dict[str, Any]:
    if rollout is not None:
        conf["rollout_mode"] = _choice(rollout, ROLLOUT_MODES, "rollout")
    return conf


def deploy_conf(version: str, *, dry_run: bool = False, allow_precheck_failure: str | None = None,
                on_failure: str | None = None, quiet_period_seconds: int | None = None,
                rollout: str | None = None) -> dict:
    conf: dict[str, Any] = _rollout({"version": _version(version), "dry_run": bool(dry_run)}, rollout)
    if allow_precheck_failure is not None:
        conf["allow_precheck_failure"] = _reason(allow_precheck_failure, "allow-precheck-failure")
    if on_failure is not None:
        conf["on_failure"] = _choice(on_failure, ("rollback", "halt"), "on-failure")
    if quiet_period_seconds is not None:
        conf["quiet_period_seconds"] = _int_range(quiet_period_seconds, 0, 86400, "quiet-period")
    return conf


def promote_conf(version: str, *, override_reason: str | None = None, approval: bool = False,
                 canary_weight: int | None = None, on_failure: str | None = None,
                 dry_run: bool = False, quiet_period_seconds: int | None = None,
                 allow_precheck_failure: str | None = None, rollout: str | None = None) -> dict:
    conf: dict[str, Any] = _rollout({"version": _version(version), "approval": bool(approval)}, rollout)
    if dry_run:
        conf["dry_run"] = True
    if quiet_period_seconds is not None:
        conf["quiet_period_seconds"] = _int_range(quiet_period_seconds, 0, 86400, "quiet-period")
    if allow_precheck_failure is not None:
        conf["allow_precheck_failure"] = _reason(allow_precheck_failure, "allow-precheck-failure")
    if override_reason is not None:
        conf["override_reason"] = _reason(override_reason, "override-reason")
    if canary_weight is not None:
        conf["canary_weight"] = _int_range(canary_weight, 0, 100, "canary-weight")
    if on_failure is not None:
        conf["on_failure"] = _choice(on_failure, ("rollback", "halt"), "on-failure")
    return conf


def rollback_conf(env: str, *, to: str | None = None, fast: bool = False, reason: str | None = None,
                  check_only: bool = False, override_reason: str | None = None,
                  rollout: str | None = None) -> dict:
    conf: dict[str, Any] = _rollout({
        "environment": validate_name("env", env),
        "target_version": None if to is None else _version(to),
        "mode": "fast" if fast else "normal",
        "reason": _reason(reason),
    }, rollout)
    if override_reason is not None:
        conf["override_reason"] = _reason(override_reason, "override-reason")
    if check_only:
        conf["check_only"] = True
    return conf


def fast_deploy_conf(env: str, version: str, *, reason: str, internal: bool = False,
                     rollout: str | None = None) -> dict:
    return _rollout({"environment": validate_name("env", env), "version": _version(version),
                     "reason": validate_reason(reason), "internal": bool(internal)}, rollout)


def traffic_conf(envs: Sequence[str] | None = None, *, rps: float | None = None, duration: str | None = None,
                 endpoints: Sequence[str] | None = None, concurrency: int | None = None) -> dict:
    """The traffic DAG's conf: only what is given (the DAG's defaults for the rest), each bound
    checked here as the DAG checks it."""
    from liftoff.checks import parse_duration
    from liftoff.traffic import (
        DEFAULT_CONCURRENCY,
        DEFAULT_DURATION_S,
        DEFAULT_ENDPOINTS,
        DEFAULT_RPS,
        MAX_DURATION_S,
        validate,
    )

    conf: dict[str, Any] = {}
    if envs:
        conf["environments"] = [validate_name("env", e) for e in dict.fromkeys(envs)]
    seconds = None if duration is None else int(parse_duration(duration).total_seconds())
    if seconds is not None and seconds > MAX_DURATION_S:
        raise InvalidInput(f"traffic runs at most {MAX_DURATION_S:g} s at a time, got --for {duration}")
    paths = validate(DEFAULT_RPS if rps is None else rps,
                     DEFAULT_DURATION_S if seconds is None else seconds, list(endpoints or DEFAULT_ENDPOINTS),
                     DEFAULT_CONCURRENCY if concurrency is None else concurrency)
    for key, value in (("rps", rps), ("duration_s", seconds), ("concurrency", concurrency)):
        if value is not None:
            conf[key] = value
    if endpoints:
        conf["endpoints"] = paths
    return conf


def canary_weight_conf(weight: int | str, *, force: bool = False) -> dict:
    return {"weight": parse_weight(weight), "force": bool(force)}


def patch_conf(env: str, file: str | Path, *, roles: str | Sequence[str], reason: str) -> dict:
    path = Path(file)
    patch_id = validate_name("patch", path.stem)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read patch file {str(path)!r}: {exc.strerror or exc}") from None
    if not raw.strip():
        raise InvalidInput(f"patch file {str(path)!r} is empty")
    if len(raw) > MAX_PATCH_BYTES:
        raise InvalidInput(f"patch file {str(path)!r} is too big ({len(raw)} > {MAX_PATCH_BYTES} bytes)")
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"patch file {str(path)!r} is not UTF-8 text") from None
    return {"environment": validate_name("env", env), "patch_id": patch_id, "patch": content,
            "roles": parse_roles(roles), "reason": validate_reason(reason)}


def lock_conf(env: str, action: str, reason: str) -> dict:
    return {"environment": validate_name("env", env), "action": _choice(action, ("lock", "unlock"), "action"),
            "reason": validate_reason(reason)}


def freeze_conf(env: str, reason: str, *, until: str | None = None, duration: str | None = None,
                now: datetime | None = None) -> dict:
    """``liftoff freeze ENV --until ISO|--for DURATION --reason R``: checked here, so bad input
    is one line and nothing is triggered."""
    from liftoff.checks import MAX_FREEZE, parse_duration, parse_time

    conf: dict[str, Any] = {"environment": validate_name("env", env), "action": "freeze",
                            "reason": validate_reason(reason)}
    if (until is None) == (duration is None):
        raise InvalidInput("give either --until TIME (ISO 8601 with a zone) or --for DURATION (like 2h)")
    now = now or datetime.now(UTC)
    if until is not None:
        end = parse_time(until, "--until")
        if end <= now:
            raise InvalidInput(f"--until {until} is not in the future")
        if end - now > MAX_FREEZE:
            raise InvalidInput(f"a freeze lasts at most {MAX_FREEZE.days} days")
        conf["until"] = end.isoformat()
    else:
        if parse_duration(duration) > MAX_FREEZE:
            raise InvalidInput(f"a freeze lasts at most {MAX_FREEZE.days} days")
        conf["duration"] = str(duration).strip().lower().replace(" ", "")
    return conf


def unfreeze_conf(env: str, reason: str) -> dict:
    return {"environment": validate_name("env", env), "action": "unfreeze", "reason": validate_reason(reason)}


def parse_roles(roles: str | Sequence[str]) -> list[str]:
    items = roles.split(",") if isinstance(roles, str) else list(roles)
    out: list[str] = []
    for item in items:
        name = validate_name("role", item.strip())
        if name not in out:
            out.append(name)
    if not out:
        raise InvalidInput("--roles names no role")
    return out


def _choice(value: str, choices: tuple[str, ...], field: str) -> str:
    if value not in choices:
        raise InvalidInput(f"{field} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _int_range(value: object, low: int, high: int, field: str) -> int:
    try:
        number = int(str(value), 10)
    except ValueError:
        raise InvalidInput(f"{field} must be a whole number within {low}..{high}, got {value!r}") from None
    if not low <= number <= high:
        raise InvalidInput(f"{field} must be within {low}..{high}, got {number}")
    return number


# -- runs, stages and their states ----------------------------------------------------------

def unit_of(task_id: str) -> str:
    """A task's stage (its top-level task group) or, outside groups, the task itself."""
    return task_id.split(".", 1)[0]


def unit_key(name: str) -> tuple:
    m = _STAGE_RE.match(name)
    return (0, int(m.group(1)), name) if m else (1, 0, name)


def unit_state(states: Sequence[str | None]) -> str:
    """One state for a group of task states."""
    s = {state or "none" for state in states}
    if "failed" in s:
        return "failed"
    if "upstream_failed" in s:
        return "upstream_failed"
    if s & ACTIVE_STATES:
        return "deferred" if s & ACTIVE_STATES == {"deferred"} else "running"
    if s <= {"success", "skipped"}:
        return "success" if "success" in s else "skipped"
    if s <= {"none", "removed"}:
        return "pending"
    return "running"  # some done, some still to start


def unit_states(task_instances: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    groups: dict[str, list[str | None]] = {}
    for ti in task_instances:
        groups.setdefault(unit_of(ti["task_id"]), []).append(ti.get("state"))
    return {name: unit_state(groups[name]) for name in sorted(groups, key=unit_key)}


def stage_states(task_instances: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    return {k: v for k, v in unit_states(task_instances).items() if _STAGE_RE.match(k)}


def resolve_stage(stage: str, groups: Sequence[str]) -> str:
    """``stage_3_staging_fleet``, ``stage_3`` or ``3`` -> the run's task group."""
    validate_name("stage", stage)
    if stage in groups:
        return stage
    number = stage if stage.isdigit() else (m.group(1) if (m := _STAGE_RE.match(stage)) else None)
    if number is not None:
        matches = [g for g in groups if (m := _STAGE_RE.match(g)) and m.group(1) == str(int(number))]
        if len(matches) == 1:
            return matches[0]
    known = ", ".join(g for g in groups if _STAGE_RE.match(g)) or "none"
    raise InvalidInput(f"no stage {stage!r} in this run; its stages: {known}")


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _fmt_time(value: str | None) -> str:
    t = _parse_time(value)
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if t else "-"


def _duration(start: str | None, end: str | None) -> str:
    a, b = _parse_time(start), _parse_time(end) or datetime.now(UTC)
    if a is None:
        return ""
    secs = max(0, int((b - a).total_seconds()))
    return f"{secs // 60}m{secs % 60:02d}s" if secs >= 60 else f"{secs}s"


# -- output -----------------------------------------------------------------------------------

class Output:
    def __init__(self, as_json: bool, out: TextIO, err: TextIO):
        self.as_json = as_json
        self.out = out
        self.err = err

    def line(self, text: str = "") -> None:
        if not self.as_json:
            print(text, file=self.out, flush=True)

    def data(self, obj: Any) -> None:
        if self.as_json:
            print(json.dumps(obj, sort_keys=True, default=str), file=self.out, flush=True)

    def error(self, message: str, code: int) -> None:
        print(f"liftoff: error: {message}", file=self.err, flush=True)
        if self.as_json:
            print(json.dumps({"error": message, "exit_code": code}), file=self.out, flush=True)


# -- commands ---------------------------------------------------------------------------------

def _conf_summary(conf: Mapping[str, Any]) -> dict:
    """The conf to show: a patch's content as its size; an internal build's version (and every
    form of it, in any field) as its label."""
    shown = dict(conf)
    if isinstance(shown.get("patch"), str):
        shown["patch"] = f"<{len(shown['patch'].encode())} bytes>"
    if shown.get("internal") is True:
        shown = scrub_internal(shown, str(conf["version"]))
    return shown


def readable_run_id(what: str, now: datetime | None = None) -> str:
    """A run id that says what the run does and can be pasted anywhere (shell, URL, ``watch``):
    ``deploy_17.9.0+rnightly.42.abcdef1-0__20261203T080012Z_1a2b`` (Airflow's run-id alphabet)."""
    label = re.sub(r"[^A-Za-z0-9_.+-]+", "_", what.split(" (", 1)[0]).strip("_.-")[:150] or "run"
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{label}__{stamp}_{secrets.token_hex(2)}"


def trigger(client: AirflowClient, out: Output, dag_id: str, conf: dict, what: str) -> dict:
    run = client.trigger(dag_id, conf, note=f"{what} (liftoff CLI)", run_id=readable_run_id(what))
    run_id = run["dag_run_id"]
    url = client.ui_url(dag_id, run_id)
    out.line(f"{what}: {dag_id} run {run_id} ({run.get('state', 'queued')})")
    out.line(f"  {url}")
    result = {"dag_id": dag_id, "dag_run_id": run_id, "state": run.get("state"), "url": url,
              "conf": _conf_summary(conf)}
    return result


def cmd_deploy(client: AirflowClient, out: Output, args: argparse.Namespace) -> int:
    conf = deploy_conf(args.version, dry_run=args.dry_run, allow_precheck_failure=args.allow_precheck_failure,
                       on_failure=args.on_failure, quiet_period_seconds=args.quiet_period,
                       rollout=args.rollout)
    what = f"deploy {conf['version']}" + (" (dry run: plan only)" if args.dry_run else "")
    return _triggered(client, out, args, trigger(client, out, DAG_CANARY, conf, what))


def cmd_promote(client: AirflowClient, out: Output, args: argparse.Namespace) -> int:
    conf = promote_conf(args.version, override_reason=args.override_reason, approval=args.approval,
                        canary_weight=args.canary_weight, on_failure=args.on_failure, dry_run=args.dry_run,
                        quiet_period_seconds=args.quiet_period,
                        allow_precheck_failure=args.allow_precheck_failure, rollout=args.rollout)
    return _triggered(client, out, args,
                      trigger(client, out, DAG_PRODUCTION, conf, f"promote {conf['version']} to production"))


def cmd_rollback(client: AirflowClient, out: Output, args: argparse.Namespace) -> int:
    target = list(args.target)
    if target[0] == "check" and len(target) == 2:
        return cmd_rollback_check(client, out, args, target[1])
    if len(target) != 1 or target[0] == "check":
        raise InvalidInput("usage: liftoff rollback ENV [--to VERSION] [--fast] [--reason R] "
                           "| liftoff rollback check ENV")
    conf = rollback_conf(target[0], to=args.to, fast=args.fast, reason=args.reason,
                         override_reason=args.override_reason, rollout=args.rollout)
    what = f"rollback {conf['environment']} to {conf['target_version'] or 'the previous version'}"
    return _triggered(client, out, args, trigger(client, out, DAG_ROLLBACK, conf, what))


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def rollback_check_lines(env: str, result: Any) -> list[str]:
    """What ``rollback check`` prints of the safety check's answer: the verdict, then the command
    to run only when SAFE; when NOT SAFE the reasons and what to do instead."""
    if not isinstance(result, dict):
        return [str(result)]
    safe = result.get("safe")
    target = result.get("target")
    lines = [f"rollback of {env}" + (f" to {target}" if target else "") + " is "
             + ("SAFE" if safe is True else "NOT SAFE" if safe is False else "(no verdict)")]
    for key, value in result.items():
        if key not in ("safe", "command", "reasons", "overridable", "env"):
            lines.append(f"{key}: {_shown(value)}")
    if safe is True:
        if result.get("command"):
            lines.append(f"command: {result['command']}")
        return lines
    reasons = result.get("reasons") or []
    if reasons:
        lines.append("why not:" if safe is False else "reasons:")
        lines.extend(f"  - {_shown(r)}" for r in reasons)
    if safe is not False:
        return lines
    again = f"liftoff rollback check {env}" + (f" --to {target}" if target else "")
    if result.get("overridable") is False:
        lines.append("next: this cannot be overridden: clear what the reasons say (name a target with "
                     f"--to, or wait until the lock's holder is done), then check again: {again}")
    else:
        lines.append("next: fix forward with a new build; or roll back anyway, with a recorded reason: "
                     f"liftoff rollback {env} --to {target or 'VERSION'} --override-reason \"WHY\"")
    return lines


def cmd_rollback_check(client: AirflowClient, out: Output, args: argparse.Namespace, env: str) -> int:
    conf = rollback_conf(env, to=args.to, fast=args.fast, reason=args.reason, check_only=True)
    run = client.trigger(DAG_ROLLBACK, conf)
    run_id = run["dag_run_id"]
    out.line(f"rollback check of {conf['environment']}: run {run_id}, waiting for {SAFETY_TASK} ...")
    beats = HeartbeatWatch(client, out, DAG_ROLLBACK, run_id, events=False)
    state = wait_for_run(client, DAG_ROLLBACK, run_id, timeout=args.max_wait, interval=args.interval,
                         on_poll=lambda _run, tis: beats(tis))
    try:
        result = client.xcom(DAG_ROLLBACK, run_id, SAFETY_TASK)
    except NotFound:
        result = None
    url = client.ui_url(DAG_ROLLBACK, run_id)
    out.data({"dag_id": DAG_ROLLBACK, "dag_run_id": run_id, "state": state, "url": url, "result": result})
    if result is None:
        out.error(f"the rollback check run {run_id} ended {state} without a {SAFETY_TASK} result: {url}",
                  EXIT_FAILED)
        return EXIT_FAILED
    safe = result.get("safe") if isinstance(result, dict) else None
    for text in rollback_check_lines(conf["environment"], result):
        out.line(f"  {text}")
    out.line(f"  {url}")
    return EXIT_OK if safe is True and state == "success" else EXIT_FAILED


def cmd_fast_deploy(client: AirflowClient, out: Output, args: argparse.Namespace) -> int:
    """An internal build is named by its label (``liftoff status`` shows the same) in the run's
    id, note and everything printed: its version goes only into the run's conf."""
    conf = fast_deploy_conf(args.env, args.version, reason=args.reason, internal=args.internal,
                            rollout=args.rollout)
    shown = internal_label(conf["version"]) if conf["internal"] else conf["version"]
    what = f"fast deploy {shown} to {conf['environment']}"
    return _triggered(client, out, args, trigger(client, out, DAG_FAST, conf, what))


def cmd_traffic(client: AirflowClient, out: Output, args: argparse.Namespace) -> int:
    conf = traffic_conf(args.env, rps=args.rps, duration=args.duration, endpoints=args.endpoint,
                        concurrency=args.concurrency)
    where = ", ".join(conf.get("environments", [])) or "the default environments"
    what = f"traffic to {where}"
    return _triggered(client, out, args, trigger(client, out, DAG_TRAFFIC, conf, what))


def cmd_canary(client: AirflowClient, out: Output, args: argparse.Namespace) -> int:
    if (args.weight is None) == (args.state is None):
        raise InvalidInput("give a weight 0..100 or one of --drain, --ready, --maint")
    conf = canary_weight_conf(args.state if args.state else args.weight, force=args.force)
    what = f"canary weight {conf['weight']}" + (" (forced)" if conf["force"] else "")
    return _triggered(client, out, args, trigger(client, out, DAG_CANARY_WEIGHT, conf, what))


def cmd_patch(client: AirflowClient, out: Output, args: argparse.Namespace) -> int:
    conf = patch_conf(args.env, args.file, roles=args.roles, reason=args.reason)
    what = f"patch {conf['patch_id']} on {conf['environment']} ({', '.join(conf['roles'])})"
    return _triggered(client, out, args, trigger(client, out, DAG_PATCH, conf, what))


def cmd_lock(client: AirflowClient, out: Output, args: argparse.Namespace) -> int:
    conf = lock_conf(args.env, args.command, args.reason)
    return _triggered(client, out, args,
                      trigger(client, out, DAG_LOCK, conf, f"{conf['action']} {conf['environment']}"))


def cmd_freeze(client: AirflowClient, out: Output, args: argparse.Namespace) -> int:
    if args.command == "freeze":
        conf = freeze_conf(args.env, args.reason, until=args.until, duration=args.duration)
        what = f"freeze {conf['environment']} until {conf.get('until') or 'now + ' + conf['duration']}"
    else:
        conf = unfreeze_conf(args.env, args.reason)
        what = f"unfreeze {conf['environment']}"
    return _triggered(client, out, args, trigger(client, out, DAG_LOCK, conf, what))


def _triggered(client: AirflowClient, out: Output, args: argparse.Namespace, result: dict) -> int:
    if getattr(args, "watch", False):
        out.data(result)
        return watch_run(client, out, result["dag_id"], result["dag_run_id"], interval=args.interval)
    out.data(result)
    return EXIT_OK


def _read_xcom(client: AirflowClient, dag_id: str, run_id: str, task_id: str,
               key: str = "return_value") -> Any:
    try:
        return client.xcom(dag_id, run_id, task_id, key=key)
    except ChatOpsError:
        return None


def run_result(client: AirflowClient, dag_id: str, run_id: str) -> dict | None:
    """The run's finalize result (``summary``: the sentence it ended with), or None (no
    finalize task, or it has not run)."""
    for key in ("summary", "return_value"):  # a failed finalize pushes "summary"
        value = _read_xcom(client, dag_id, run_id, "finalize", key)
        if isinstance(value, dict) and value.get("summary"):
            return value
    return None


def run_summary(client: AirflowClient, dag_id: str, run: Mapping[str, Any]) -> dict:
    """A run as ``status`` shows it: state, versions, per-stage states, other tasks that ran."""
    run_id = run["dag_run_id"]
    tis = client.task_instances(dag_id, run_id)
    units = unit_states(tis)
    conf = run.get("conf") or {}
    task_ids = {ti["task_id"] for ti in tis}
    version = _read_xcom(client, dag_id, run_id, "resolve_version") if "resolve_version" in task_ids else None
    previous = None
    first_precheck = next((t for t in sorted(task_ids, key=unit_key) if t.endswith(".precheck")), None)
    if first_precheck:
        check = _read_xcom(client, dag_id, run_id, first_precheck)
        if isinstance(check, dict):
            previous = check.get("previous_version")
    ended = "finalize" in task_ids and run.get("state") in TERMINAL_STATES
    result = run_result(client, dag_id, run_id) if ended and run.get("state") != "success" else None
    return {
        "dag_run_id": run_id, "state": run.get("state"), "run_type": run.get("run_type"),
        "summary": result.get("summary") if result else None,
        "start_date": run.get("start_date"), "end_date": run.get("end_date"),
        "version": version if isinstance(version, str) else conf.get("version"),
        "previous_version": previous, "dry_run": bool(conf.get("dry_run")),
        "triggered_by": run.get("triggering_user_name"),
        "stages": {k: v for k, v in units.items() if _STAGE_RE.match(k)},
        "tasks": {k: v for k, v in units.items()
                  if not _STAGE_RE.match(k) and v not in ("pending", "skipped")},
        "url": client.ui_url(dag_id, run_id),
    }


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _txt(value: Any) -> str:
    """A value from the API as one line of plain text (no terminal control characters)."""
    return _CONTROL.sub("?", str(value))


def _ago(age_s: Any) -> str:
    if not isinstance(age_s, int) or isinstance(age_s, bool):
        return ""
    if age_s < 120:
        return f"{age_s}s ago"
    if age_s < 7200:
        return f"{age_s // 60}m ago"
    if age_s < 172800:
        return f"{age_s // 3600}h{age_s % 3600 // 60:02d}m ago"
    return f"{age_s // 86400}d ago"


def _since(at: Any, age_s: Any) -> str:
    """``since 2026-12-02 16:40:00Z (12m ago)``."""
    ago = _ago(age_s)
    return f"since {_fmt_time(at) if isinstance(at, str) else '-'}" + (f" ({ago})" if ago else "")


def _versions(counts: Mapping[str, Any]) -> str:
    return ", ".join(f"{n}x {_txt(v)}" for v, n in counts.items()) or "no hosts"


def _lock_line(lock: Mapping[str, Any]) -> str:
    hand = " (by hand)" if lock.get("by_hand") else ""
    reason = f"  reason: {_txt(lock['reason'])}" if lock.get("reason") else ""
    return (f"locked by {_txt(lock.get('who'))}{hand}  {_since(lock.get('since'), lock.get('age_s'))}"
            f"  run {_txt(lock.get('run_id'))}{reason}")


def _canary_lines(canary: Mapping[str, Any]) -> list[str]:
    per_lb = []
    for lb in canary.get("lbs") or []:
        if lb.get("error"):  # the production environment's lines say why
            per_lb.append(f"{_txt(lb['name'])} UNREADABLE")
        else:
            state = f" {_txt(lb['state'])}" if lb.get("state") not in (None, "ready") else ""
            mixed = f" (mixed: {','.join(_txt(w) for w in lb['weights'])})" if lb.get("weights") else ""
            per_lb.append(f"{_txt(lb['name'])} {_txt(lb.get('weight'))}{mixed}{state}")
    if canary.get("agree") is None:
        verdict = _txt(canary.get("error") or "no production LB answered")
    elif canary["agree"]:
        verdict = "LBs agree" + ("" if canary.get("complete") else " (not every LB answered)")
    else:
        verdict = "LBs DISAGREE"
    lines = [f"  canary weight on {_txt(canary.get('of'))}'s LBs: " + ", ".join(per_lb) + f"  ({verdict})"]
    return lines + _disagreement_lines(canary.get("disagreements") or [], 5, "    ", "    ... and {n} more")


def _disagreement_lines(diffs: list, limit: int, head: str, more: str) -> list[str]:
    """One line per backend/server the LBs disagree on (at most ``limit``), then how many more."""
    lines = []
    for d in diffs[:limit]:
        states = ", ".join(f"{_txt(lb)} {_txt(v)}" for lb, v in (d.get("states") or {}).items())
        lines.append(f"{head}{_txt(d.get('backend'))}/{_txt(d.get('server'))}: {states}")
    if len(diffs) > limit:
        lines.append(more.format(n=len(diffs) - limit))
    return lines


def _out_of_service_lines(oos: list) -> list[str]:
    lines = [f"  out of service: {len(oos)}" if oos else "  out of service: none"]
    for h in oos:
        rec = h.get("record")
        why = ""
        if rec:
            why = (f"drain record  run {_txt(rec.get('run_id'))}  "
                   f"{_since(rec.get('since'), rec.get('age_s'))}"
                   + (f"  reason: {_txt(rec['reason'])}" if rec.get("reason") else ""))
        note = h.get("note") or ""
        if note and note != "drain record":
            why = f"{why}  ({_txt(note)})" if why else _txt(note).upper()
        on_lbs = "; ".join(f"{_txt(lb)}: {_txt(v)}" for lb, v in (h.get("lbs") or {}).items())
        lines.append(f"    {_txt(h['host'])}  {why}" + (f"  [{on_lbs}]" if on_lbs else ""))
    return lines


def _chef_and_lb_lines(env: Mapping[str, Any]) -> list[str]:
    lines = [f"  failed: {_txt(h['host'])}  {_txt(h.get('reason'))}  run {_txt(h.get('run_id'))}"
             for h in env.get("failed_hosts") or []]
    chef = env.get("chef_stopped") or {}
    if chef.get("env_wide"):
        w = chef["env_wide"]
        state = _txt(w.get("status") or "running")
        lines.append(f"  chef stopped on every host: {_txt(w.get('kind'))} {_txt(w.get('version'))} "
                     f"{state} (since {_fmt_time(w.get('since'))})  run {_txt(w.get('run_id'))}")
    stopped = [f"{_txt(h['host'])} ({_txt(h.get('why'))})" for h in chef.get("hosts") or []]
    if stopped:
        lines.append("  chef stopped: " + ", ".join(stopped))
    lines += [f"  LB {_txt(lb['name'])} UNREADABLE: {_txt(lb.get('error'))}"
              for lb in env.get("load_balancers") or [] if lb.get("ok") is False]
    return lines + _disagreement_lines(env.get("lb_disagreements") or [], 10, "  LBs disagree on ",
                                       "  ... and {n} more LB disagreement(s)")


def _record_lines(env: Mapping[str, Any]) -> list[str]:
    lines = []
    for p in env.get("patches") or []:
        roles = ",".join(_txt(r) for r in p.get("roles") or [])
        lines.append(f"  patch {_txt(p['patch_id'])}: {_txt(p.get('status'))} on {roles or '?'} "
                     f"({p.get('hosts', 0)} hosts) by {_txt(p.get('who'))}  run {_txt(p.get('run_id'))}"
                     + (f"  reason: {_txt(p['reason'])}" if p.get("reason") else ""))
    deps = env.get("deployments") or []
    if deps:
        lines.append("  last deployments:")
    lines += [f"    {_fmt_time(d.get('updated'))}  {_txt(d.get('kind')):<8} {_txt(d.get('status')):<11} "
              f"{_txt(d.get('version'))}  run {_txt(d.get('run_id'))}" for d in deps]
    return lines


def _pressure_lines(pressure: Mapping[str, Any] | None) -> list[str]:
    """Commits not deployed yet (``liftoff.changes``), or why that is not known."""
    if not pressure:
        return []
    if pressure.get("commits") is None:
        return [f"  not deployed yet: not known ({_txt(pressure.get('note') or 'no reason given')})"]
    upto = f" (up to {_txt(pressure['newest_build'])})" if pressure.get("newest_build") else ""
    url = f": {_txt(pressure['web_url'])}" if pressure.get("web_url") and pressure["commits"] else ""
    return [f"  not deployed yet: {pressure['commits']} commit(s){upto}{url}"]


def _env_lines(name: str, env: Mapping[str, Any]) -> list[str]:
    current = env.get("current_version") or "no successful deploy recorded"
    canary = f", canary of {_txt(env['canary_of'])}" if env.get("canary_of") else ""
    lines = [f"{_txt(name)}: {_txt(current)}  ({env.get('hosts', 0)} hosts{canary})"]
    for role in env.get("roles") or []:
        extra = [f"{role[k]} {k.replace('_', ' ')}" for k in ("out_of_service", "failed", "in_progress")
                 if role.get(k)]
        lines.append(f"  {_txt(role['name']):<10} {_versions(role.get('versions') or {})}"
                     + (f"  ({', '.join(extra)})" if extra else ""))
    lines.append(f"  lock: {_lock_line(env['lock'])}" if env.get("lock") else "  lock: none")
    lines += _pressure_lines(env.get("pressure"))
    lines += _out_of_service_lines(env.get("out_of_service") or []) + _chef_and_lb_lines(env)
    if env.get("canary"):
        lines += _canary_lines(env["canary"])
    return lines + _record_lines(env)


def fleet_lines(snap: Mapping[str, Any]) -> list[str]:
    """``liftoff status``'s view of liftoff.status.snapshot: per environment, compact."""
    lbs = "LBs read" if snap.get("lbs_read") else "LBs not read"
    lines = [f"liftoff state at {_fmt_time(snap.get('generated_at'))} ({lbs})"]
    for name, env in (snap.get("environments") or {}).items():
        lines += _env_lines(name, env)
    for h in snap.get("halts") or []:
        patch = f" (patch {_txt(h['patch_id'])})" if h.get("patch_id") else ""
        lines.append(f"HALT{patch} by {_txt(h.get('who'))}  {_since(h.get('since'), h.get('age_s'))}: "
                     f"{_txt(h.get('reason'))}")
    if not snap.get("halts"):
        lines.append("halts: none")
    for f in snap.get("freezes") or []:
        if f.get("error"):
            lines.append(f"FREEZE {_txt(f.get('env'))}: unreadable in the inventory: {_txt(f['error'])}")
            continue
        when = (f"until {_fmt_time(f.get('until'))}" if f.get("active")
                else f"from {_fmt_time(f.get('since'))} until {_fmt_time(f.get('until'))}")
        lines.append(f"FREEZE {_txt(f.get('env'))} {when} by {_txt(f.get('who'))}: {_txt(f.get('reason'))}")
    for env_name, judged in (snap.get("canary_analyses") or {}).items():
        for a in judged[-1:]:
            weight = "" if a.get("weight") is None else f" at weight {a['weight']}"
            score = "-" if a.get("score") is None else f"{a['score']:g}"
            ago = _ago(a.get("age_s"))
            when = _fmt_time(a.get("at")) + (f" ({ago})" if ago else "")
            lines.append(f"canary judge {_txt(env_name)}: {_txt(a.get('verdict'))} (score {score}) in "
                         f"{_txt(a.get('stage'))}{weight} -> {_txt(a.get('decision'))}, run "
                         f"{_txt(a.get('run_id'))} at {when}: {_txt(a.get('reason'))}")
    for lock in snap.get("other_locks") or []:
        lines.append(f"{_txt(lock.get('env'))} (not in the inventory): {_lock_line(lock)}")
    return lines


def fleet_report(client: AirflowClient, out: Output, lbs: bool = True) -> dict:
    """The fleet part of ``status``: the snapshot printed, or one line saying why there is none."""
    try:
        snap = client.fleet_status(lbs=lbs)
    except NotFound as exc:
        out.line(f"liftoff state: not available: {exc}")
        return {"error": str(exc), "status": 404}
    except ApiError as exc:
        out.line(f"liftoff state: not available: {exc}")
        return {"error": str(exc), "status": exc.status}
    for line in fleet_lines(snap):
        out.line(line)
    out.line()
    return snap


def approval_entry(detail: Mapping[str, Any], client: AirflowClient) -> dict:
    ti = detail.get("task_instance") or {}
    dag_id, run_id, task_id = ti.get("dag_id", "?"), ti.get("dag_run_id", "?"), ti.get("task_id", "?")
    users = [u.get("name") or u.get("id") for u in detail.get("assigned_users") or [] if isinstance(u, dict)]
    return {"dag_id": dag_id, "dag_run_id": run_id, "task_id": task_id, "map_index": ti.get("map_index", -1),
            "subject": detail.get("subject"), "options": detail.get("options"),
            "since": detail.get("created_at"), "assigned_users": users,
            "url": f"{client.ui_url(dag_id, run_id)}/tasks/{q(task_id)}/required_actions"
                   f"?map_index={ti.get('map_index', -1)}"}


def approvals_report(client: AirflowClient, out: Output) -> list[dict] | dict:
    """Pending approvals (HITL requests unanswered), each with the page to answer it."""
    try:
        waiting = [approval_entry(d, client) for d in client.pending_approvals()]
    except ChatOpsError as exc:
        out.line(f"approvals: not available: {exc}")
        return {"error": str(exc)}
    if not waiting:
        out.line("approvals: none waiting")
    for a in waiting:
        who = f"  for {', '.join(map(_txt, a['assigned_users']))}" if a["assigned_users"] else ""
        out.line(f"approval waiting: {_txt(a['subject'])}  run {a['dag_run_id']}  since "
                 f"{_fmt_time(a['since'])}{who}")
        out.line(f"  answer it: {a['url']}")
        out.line(f"  or: liftoff approve {a['dag_run_id']} --dag {a['dag_id']} --reason \"WHY\"  "
                 f"(or liftoff reject ...)")
    out.line()
    return waiting


def cmd_status(client: AirflowClient, out: Output, args: argparse.Namespace) -> int:
    report: dict[str, Any] = {}
    dags = [validate_name("name", d) for d in (args.dag or STATUS_DAGS)]
    _int_range(args.limit, 1, 100, "--limit")
    fleet = fleet_report(client, out, lbs=not args.no_lbs)
    approvals = approvals_report(client, out)
    for dag_id in dags:
        dag = client.dag(dag_id)
        if dag is None:
            report[dag_id] = {"exists": False, "runs": []}
            out.line(f"{dag_id}: not deployed (Airflow has no such DAG)")
            continue
        runs = [run_summary(client, dag_id, r) for r in client.dag_runs(dag_id, limit=args.limit)]
        report[dag_id] = {"exists": True, "paused": dag.get("is_paused"), "runs": runs}
        paused = " (paused)" if dag.get("is_paused") else ""
        out.line(f"{dag_id}{paused}: " + (f"last {len(runs)} run(s)" if runs else "no runs yet"))
        for r in runs:
            versions = r["version"] or ""
            if versions and r["previous_version"] and r["previous_version"] != versions:
                versions = f"{r['previous_version']} -> {versions}"
            flags = " dry-run" if r["dry_run"] else ""
            out.line(f"  {r['dag_run_id']}  {r['state']}{flags}  {versions + '  ' if versions else ''}"
                     f"started {_fmt_time(r['start_date'])} ({_duration(r['start_date'], r['end_date'])})")
            if r.get("summary"):
                out.line(f"    {_txt(r['summary'])}")
            for stage, state in r["stages"].items():
                out.line(f"    {stage:<34} {state}")
            if r["tasks"]:
                out.line("    " + ", ".join(f"{t}: {s}" for t, s in r["tasks"].items()))
    out.data({"fleet": fleet, "approvals": approvals, "dags": report})
    return EXIT_OK


def retry_stage(client: AirflowClient, dag_id: str, run_id: str, stage: str, *, dry_run: bool = False,
                show: Callable[[str], None] = lambda _: None) -> dict:
    """Clear the failed tasks of one stage (and what failed downstream of them) so the scheduler
    runs them again in the same run: a dry run first to show what will be cleared."""
    validate_name("name", dag_id)
    validate_name("run_id", run_id)
    validate_name("stage", stage)
    run = client.dag_run(dag_id, run_id)
    if run.get("state") not in TERMINAL_STATES:
        raise InvalidInput(f"run {run_id} is still {run.get('state')}: let it end first "
                           f"(liftoff watch {run_id} --dag {dag_id})")
    tis = client.task_instances(dag_id, run_id)
    groups = list(dict.fromkeys(sorted((unit_of(t["task_id"]) for t in tis), key=unit_key)))
    group = resolve_stage(stage, groups)
    handled = {t["task_id"]: t.get("state") for t in tis if t["task_id"] in ROLLBACK_TASKS
               and t.get("state") not in (None, "skipped", "removed")}
    if handled:
        done = ", ".join(f"{k}: {v}" for k, v in handled.items())
        raise InvalidInput(f"run {run_id} went to rollback ({done}): its environment was returned, so a "
                           f"stage cannot resume; start a new deploy")
    members = [t for t in tis if unit_of(t["task_id"]) == group]
    if not any(t.get("state") == "failed" for t in members):
        states = ", ".join(f"{t['task_id']}={t.get('state')}" for t in members)
        failed_elsewhere = sorted({unit_of(t["task_id"]) for t in tis if t.get("state") == "failed"}
                                  - {group, *FINAL_TASKS}, key=unit_key)
        hint = f"; what failed: {', '.join(failed_elsewhere)}" if failed_elsewhere else ""
        raise InvalidInput(f"nothing failed in {group} of run {run_id} ({states}){hint}")
    task_ids = sorted(t["task_id"] for t in members)
    preview = client.clear_task_instances(dag_id, run_id, task_ids, dry_run=True)
    will = [{"task_id": t["task_id"], "state": t.get("state")} for t in preview]
    will.sort(key=lambda t: (unit_key(unit_of(t["task_id"])), t["task_id"]))
    show(f"retry {group} of {dag_id} run {run_id}: {len(will)} task(s) to clear")
    downstream: dict[str, int] = {}
    for t in will:
        if unit_of(t["task_id"]) == group:
            show(f"  {t['task_id']:<52} {t['state']}")
        else:
            downstream[unit_of(t["task_id"])] = downstream.get(unit_of(t["task_id"]), 0) + 1
    for unit, count in downstream.items():
        show(f"  + {unit} ({count} downstream task{'s' if count > 1 else ''})")
    result = {"dag_id": dag_id, "dag_run_id": run_id, "stage": group, "dry_run": dry_run,
              "will_clear": will, "cleared": []}
    if dry_run or not will:
        return result
    cleared = client.clear_task_instances(dag_id, run_id, task_ids, dry_run=False)
    result["cleared"] = sorted(t["task_id"] for t in cleared)
    show(f"cleared {len(cleared)} task(s); the run is queued again")
    return result


def cmd_retry(client: AirflowClient, out: Output, args: argparse.Namespace) -> int:
    result = retry_stage(client, args.dag, args.run_id, args.stage, dry_run=args.dry_run, show=out.line)
    if not args.dry_run:
        out.line(f"  follow it: liftoff watch {args.run_id} --dag {args.dag}")
    out.line(f"  {client.ui_url(args.dag, args.run_id)}")
    out.data(result)
    return EXIT_OK


def _age_s(value: Any, now: datetime) -> int | None:
    t = _parse_time(value) if isinstance(value, str) else value if isinstance(value, datetime) else None
    if t is None:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return max(0, int((now - t).total_seconds()))


def _next_step(dag_id: str, run_id: str, task_id: str) -> str:
    stage = unit_of(task_id)
    if _STAGE_RE.match(stage):
        return f"`liftoff retry {run_id} {stage} --dag {dag_id}`"
    return f"clear {task_id} in the Airflow UI to run it again"


def stale_heartbeats(tis: Sequence[Mapping[str, Any]], *, dag_id: str, run_id: str, now: datetime,
                     health: Mapping[str, Any] | None = None,
                     warn_after: int = HEARTBEAT_WARN_S) -> list[dict]:
    """Running tasks that may have lost their worker, each with one sentence saying so.

    A task instance's own heartbeat is used when the API gives one (``last_heartbeat_at``);
    Airflow 3.3's REST API does not, so for those the scheduler's heartbeat from
    ``/monitor/health`` (``health``, None when unknown) stands in: a LocalExecutor's workers
    die with their scheduler, and no task is failed for a lost heartbeat while no scheduler runs."""
    found: list[dict] = []
    timeout = f"the heartbeat timeout ({HEARTBEAT_TIMEOUT_S} s)"
    scheduler = (health or {}).get("scheduler")
    scheduler = scheduler if isinstance(scheduler, dict) else None  # None: nothing known
    scheduler_age = _age_s((scheduler or {}).get("latest_scheduler_heartbeat"), now)
    scheduler_silent = scheduler is not None and (
        (scheduler_age is not None and scheduler_age > warn_after)
        or (scheduler_age is None and scheduler.get("status") != "healthy"))
    for ti in tis:
        if ti.get("state") != "running":
            continue
        task_id = ti["task_id"]
        key = {"task_id": task_id, "map_index": ti.get("map_index", -1), "try_number": ti.get("try_number")}
        field = next((f for f in TI_HEARTBEAT_FIELDS if f in ti), None)
        if field is not None:
            age = _age_s(ti.get(field), now)
            if age is not None and age > warn_after:
                found.append({**key, "source": "task", "silent_s": age, "message": (
                    f"task {task_id} has not heartbeated for {age} s: its worker may have died; "
                    f"Airflow fails it after {timeout}, then {_next_step(dag_id, run_id, task_id)}")})
        elif scheduler_silent:
            silent = f"for {scheduler_age} s" if scheduler_age is not None else "at all"
            found.append({**key, "source": "scheduler", "silent_s": scheduler_age, "message": (
                f"task {task_id} is running but the scheduler has not heartbeated {silent}: the task's "
                f"worker may have died with it; Airflow fails a task that stopped heartbeating after "
                f"{timeout} once a scheduler runs, then {_next_step(dag_id, run_id, task_id)}")})
    return found


class HeartbeatWatch:
    """Called on every poll of a watch: says once when a running task may have lost its worker
    (:func:`stale_heartbeats`), and when it is heard from again."""

    def __init__(self, client: AirflowClient, out: Output, dag_id: str, run_id: str, *, events: bool = True,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        """``events``: JSON events too (watch); without (a command printing one JSON document),
        the sentences go to stderr under --json."""
        self.client, self.out, self.dag_id, self.run_id, self.clock = client, out, dag_id, run_id, clock
        self.events = events
        self.reported: dict[tuple, dict] = {}
        self._health: dict | None = None
        self._health_at: float | None = None

    def health(self) -> dict | None:
        """The API's /monitor/health, read at most every HEALTH_EVERY_S; None when unknown."""
        if self._health_at is None or time.monotonic() - self._health_at >= HEALTH_EVERY_S:
            self._health_at = time.monotonic()
            try:
                answer = self.client.health()
                self._health = answer if isinstance(answer, dict) else None
            except ChatOpsError:
                self._health = None
        return self._health

    def __call__(self, tis: Sequence[Mapping[str, Any]]) -> list[dict]:
        running = [t for t in tis if t.get("state") == "running"]
        needs_health = any(not any(f in t for f in TI_HEARTBEAT_FIELDS) for t in running)
        now = self.clock()
        found = stale_heartbeats(running, dag_id=self.dag_id, run_id=self.run_id, now=now,
                                 health=self.health() if needs_health else None)
        current = {(f["task_id"], f["map_index"], f["try_number"], f["source"]): f for f in found}
        stamp = now.strftime("%H:%M:%S")
        running_ids = {(t["task_id"], t.get("map_index", -1), t.get("try_number")) for t in running}
        for key, item in current.items():
            if key not in self.reported:
                self._say(stamp, item["message"], {"event": "heartbeat", **item})
        for key, item in self.reported.items():
            if key not in current and key[:3] in running_ids:
                back = (f"task {item['task_id']} heartbeats again" if item["source"] == "task" else
                        f"the scheduler heartbeats again; task {item['task_id']} is still running")
                self._say(stamp, back, {"event": "heartbeat_back", "task_id": item["task_id"],
                                        "source": item["source"]})
        self.reported = current
        return found

    def _say(self, stamp: str, text: str, event: dict) -> None:
        self.out.line(f"{stamp}  {text}")
        if self.events:
            self.out.data({**event, "time": stamp})
        elif self.out.as_json:
            print(f"liftoff: warning: {text}", file=self.out.err, flush=True)


def wait_for_run(client: AirflowClient, dag_id: str, run_id: str, *, timeout: float | None,
                 interval: float, on_poll: Callable[[dict, list[dict]], None] | None = None) -> str:
    """Poll until the run ends; returns its state. Gives up (exit 1) after ``timeout``."""
    deadline = None if not timeout else time.monotonic() + timeout
    unreachable = 0
    while True:
        try:
            run = client.dag_run(dag_id, run_id)
            tis = client.task_instances(dag_id, run_id) if on_poll else []
            unreachable = 0
        except ApiUnreachable:
            unreachable += 1  # an api-server restart should not end a watch
            if unreachable >= 5:
                raise
            time.sleep(interval)
            continue
        if on_poll:
            on_poll(run, tis)
        state = run.get("state")
        if state in TERMINAL_STATES:
            return state
        if deadline is not None and time.monotonic() >= deadline:
            raise ChatOpsError(f"run {run_id} of {dag_id} is still {state} after {timeout:.0f}s")
        time.sleep(interval)


def watch_run(client: AirflowClient, out: Output, dag_id: str, run_id: str, *, interval: float = 2.0,
              timeout: float | None = None) -> int:
    """Print every stage transition until the run ends: 0 on success, 1 on failure."""
    seen: dict[str, str] = {}
    run_state: list[str | None] = [None]
    url = client.ui_url(dag_id, run_id)
    out.line(f"watching {dag_id} run {run_id}")
    out.line(f"  {url}")
    beats = HeartbeatWatch(client, out, dag_id, run_id)

    def on_poll(run: dict, tis: list[dict]) -> None:
        now = datetime.now(UTC).strftime("%H:%M:%S")
        if run.get("state") != run_state[0]:
            if run_state[0] is not None or run.get("state") not in TERMINAL_STATES:
                out.line(f"{now}  run {run_state[0] or '-'} -> {run.get('state')}")
            out.data({"event": "run", "time": now, "from": run_state[0], "to": run.get("state")})
            run_state[0] = run.get("state")
        for name, state in unit_states(tis).items():
            before = seen.get(name, "pending")
            if state != before:
                out.line(f"{now}  {name:<34} {before} -> {state}")
                out.data({"event": "stage", "time": now, "unit": name, "from": before, "to": state})
                seen[name] = state
        beats(tis)

    final = wait_for_run(client, dag_id, run_id, timeout=timeout, interval=interval, on_poll=on_poll)
    run = client.dag_run(dag_id, run_id)
    tis_end = client.task_instances(dag_id, run_id)
    failed = [t["task_id"] for t in sorted(  # the first to fail first
        (t for t in tis_end if t.get("state") == "failed"),
        key=lambda t: (_parse_time(t.get("start_date")) is None, _parse_time(t.get("start_date"))
                       or datetime.min.replace(tzinfo=UTC), t["task_id"]))]
    out.line(f"run {run_id}: {final} ({_duration(run.get('start_date'), run.get('end_date'))})")
    result = run_result(client, dag_id, run_id) if "finalize" in {t.get("task_id") for t in tis_end} else None
    note = run.get("note") or ""
    if result is None and final != "success" and f"{dag_id} failed at " in note:  # no finalize: the note
        result = {"summary": note}
    if result:
        out.line(f"  {_txt(result['summary'])}")
    if final != "success" and failed:
        out.line(f"  failed: {', '.join(failed)}")
        stage = next((unit_of(t) for t in failed if _STAGE_RE.match(unit_of(t))), None)
        if stage:
            out.line(f"  retry it: liftoff retry {run_id} {stage} --dag {dag_id}")
    out.data({"event": "end", "dag_id": dag_id, "dag_run_id": run_id, "state": final, "failed": failed,
              "summary": result.get("summary") if result else None, "url": url})
    return EXIT_OK if final == "success" else EXIT_FAILED


def cmd_watch(client: AirflowClient, out: Output, args: argparse.Namespace) -> int:
    validate_name("name", args.dag)
    validate_name("run_id", args.run_id)
    return watch_run(client, out, args.dag, args.run_id, interval=args.interval, timeout=args.max_wait)


# -- approvals (human in the loop) -------------------------------------------------------------

APPROVE, REJECT = "Approve", "Reject"
# Airflow 3.3.2: an answer within about a second of the task parking (awaiting_input) can fail
# the task: the scheduler gets the parked workload's late "success" event once the task already
# runs again, and marks it failed. A request younger than this is answered when it is this old.
HITL_SETTLE_S = 5.0
_sleep = time.sleep  # the tests replace it


def settle(detail: Mapping[str, Any], now: datetime | None = None) -> float:
    """Wait until the request is :data:`HITL_SETTLE_S` old; returns the seconds waited."""
    created = _parse_time(detail.get("created_at"))
    if created is None:
        return 0.0
    wait = min(HITL_SETTLE_S, HITL_SETTLE_S - ((now or datetime.now(UTC)) - created).total_seconds())
    if wait <= 0:
        return 0.0
    _sleep(wait)
    return wait


def _hitl_task(detail: Mapping[str, Any]) -> tuple[str, int]:
    ti = detail.get("task_instance") or {}
    return str(ti.get("task_id", "?")), int(ti.get("map_index", -1))


def _user_names(users: Any) -> list[str]:
    return [_txt(u.get("name") or u.get("id")) for u in users or [] if isinstance(u, dict)]


def answered_text(detail: Mapping[str, Any]) -> str:
    """``already answered by alice: Approve at 2026-12-03 08:10:00Z``."""
    who = _user_names([detail.get("responded_by_user") or detail.get("responded_by")]) or ["someone"]
    chosen = ", ".join(map(_txt, detail.get("chosen_options") or [])) or "?"
    return f"already answered by {who[0]}: {chosen} at {_fmt_time(detail.get('responded_at'))}"


def approval_params_input(detail: Mapping[str, Any], reason: str | None) -> dict:
    """The request's params as answered: Airflow wants all of them or none; the reason goes in
    its ``reason`` param when it has one."""
    params = detail.get("params") or {}
    values = {k: v.get("value") if isinstance(v, dict) else v for k, v in params.items()}
    if reason is not None and "reason" in values:
        values["reason"] = reason
    return values


def _no_pending_request(client: AirflowClient, dag_id: str, run_id: str, task_id: str | None) -> ApiError:
    client.dag_run(dag_id, run_id)  # NotFound (exit 5) when there is no such run
    answered = [d for d in client.run_approvals(dag_id, run_id, pending=False)
                if d.get("response_received") and task_id in (None, _hitl_task(d)[0])]
    if answered:
        return ApiError(f"run {run_id} of {dag_id}: {answered_text(answered[-1])}", 409)
    task = f" of task {task_id}" if task_id else ""
    return ApiError(f"run {run_id} of {dag_id} has no pending approval request{task}", 404)


def pending_request(client: AirflowClient, dag_id: str, run_id: str, task_id: str | None) -> dict:
    """The run's one unanswered human-in-the-loop request (of ``task_id`` when given)."""
    try:
        listed = client.run_approvals(dag_id, run_id)
    except NotFound:
        client.dag_run(dag_id, run_id)  # "no run X of DAG Y" when that is why
        raise
    pending = [d for d in listed if task_id in (None, _hitl_task(d)[0])]
    if len(pending) == 1:
        return pending[0]
    if pending:
        asking = ", ".join(f"{t}[{i}]" if i >= 0 else t for t, i in map(_hitl_task, pending))
        raise InvalidInput(f"run {run_id} waits for {len(pending)} answers ({asking}): name one with --task")
    raise _no_pending_request(client, dag_id, run_id, task_id)


def _send_answer(client: AirflowClient, dag_id: str, run_id: str, detail: Mapping[str, Any], option: str,
                 reason: str | None) -> dict:
    task_id, map_index = _hitl_task(detail)
    try:
        return client.answer_hitl(dag_id, run_id, task_id, map_index, chosen_options=[option],
                                  params_input=approval_params_input(detail, reason))
    except AuthFailed as exc:
        users = _user_names(detail.get("assigned_users"))
        if exc.status == 403 and users:
            raise AuthFailed(f"you are not among the assigned users: {', '.join(users)}", 403) from None
        raise
    except ApiError as exc:
        if exc.status != 409:
            raise
        try:
            now = client.hitl_detail(dag_id, run_id, task_id, map_index)
        except ChatOpsError:
            now = {}
        raise ApiError(answered_text(now), 409, exc.detail) from None


def answer_approval(client: AirflowClient, dag_id: str, run_id: str, option: str, *,
                    reason: str | None = None, task_id: str | None = None) -> dict:
    """Answer the run's pending approval request with ``option`` (Approve or Reject)."""
    detail = pending_request(client, dag_id, run_id, task_id)
    options = [str(o) for o in detail.get("options") or []]
    if option not in options:
        offers = ", ".join(options) or "nothing"
        raise InvalidInput(f"the request {_txt(detail.get('subject'))!r} offers {offers}, not {option}")
    settle(detail)
    answer = _send_answer(client, dag_id, run_id, detail, option, reason)
    task, map_index = _hitl_task(detail)
    by = _user_names([answer.get("responded_by")])
    return {"dag_id": dag_id, "dag_run_id": run_id, "task_id": task, "map_index": map_index,
            "subject": detail.get("subject"), "chosen_options": answer.get("chosen_options") or [option],
            "responded_by": by[0] if by else None, "reason": reason, "url": client.ui_url(dag_id, run_id)}


def cmd_answer(client: AirflowClient, out: Output, args: argparse.Namespace) -> int:
    option = APPROVE if args.command == "approve" else REJECT
    validate_name("name", args.dag)
    validate_name("run_id", args.run_id)
    if args.task is not None:
        validate_name("name", args.task)
    reason = _reason(args.reason)
    result = answer_approval(client, args.dag, args.run_id, option, reason=reason, task_id=args.task)
    by = f" as {result['responded_by']}" if result["responded_by"] else ""
    out.line(f"{'approved' if option == APPROVE else 'rejected'}: {_txt(result['subject'])}  "
             f"({args.dag} run {args.run_id}, task {result['task_id']}){by}")
    out.line(f"  reason: {_txt(reason) if reason else 'none given'}")
    out.line(f"  {result['url']}")
    out.data(result)
    return EXIT_OK


def cmd_analysis(client: AirflowClient, out: Output, args: argparse.Namespace) -> int:
    """``liftoff analysis RUN_ID``: every canary judgement of the run, with its table."""
    from liftoff.analysis import table_of

    validate_name("run_id", args.run_id)
    records = client.run_analyses(args.run_id)
    out.data({"run_id": args.run_id, "analyses": records})
    if not records:
        out.line(f"run {args.run_id}: no canary judgement (the judge did not run in it, or is off)")
        return EXIT_OK
    for r in records:
        weight = "" if r.get("weight") is None else f" at canary weight {r['weight']}"
        out.line(f"{r.get('at')}  {r.get('env')} {r.get('stage')}{weight}: {r.get('verdict')} -> "
                 f"{r.get('decision')}")
        out.line("  " + table_of(r).replace("\n", "\n  "))
    return EXIT_OK


# -- argument parsing -------------------------------------------------------------------------

def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON (one document, or one per event for watch)")
    watchable = argparse.ArgumentParser(add_help=False)
    watchable.add_argument("--watch", action="store_true", help="follow the run until it ends")
    poll = argparse.ArgumentParser(add_help=False)
    poll.add_argument("--interval", type=_positive, default=2.0, help="seconds between polls (default 2)")

    p = argparse.ArgumentParser(
        prog="liftoff", parents=[common],
        description="ChatOps for liftoff deployments, through Airflow's REST API.",
        epilog="Credentials: LIFTOFF_API_URL, LIFTOFF_API_USER + LIFTOFF_API_PASSWORD or LIFTOFF_API_TOKEN. "
               "Exit codes: 0 ok, 1 run failed, 2 bad input, 3 Airflow unreachable, 4 credentials refused, "
               "5 API error.")
    p.add_argument("--api-url", help="Airflow's URL (default: $LIFTOFF_API_URL or http://127.0.0.1:8080)")
    p.add_argument("--timeout", type=_positive, default=30.0, help="seconds per HTTP request (default 30)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = [common, watchable, poll]

    d = sub.add_parser("deploy", parents=parents, help="deploy a build to staging and canary (deploy_canary)")
    d.add_argument("version")
    d.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    d.add_argument("--allow-precheck-failure", metavar="REASON", help="let failed prechecks pass (recorded)")
    d.add_argument("--on-failure", choices=["rollback", "halt"])
    d.add_argument("--quiet-period", type=int, metavar="SECONDS", help="alert-free window after each stage")
    d.add_argument("--rollout", choices=ROLLOUT_MODES, help=ROLLOUT_HELP)
    d.set_defaults(func=cmd_deploy)

    pr = sub.add_parser("promote", parents=parents, help="promote a build to production (deploy_production)")
    pr.add_argument("version")
    pr.add_argument("--override-reason", metavar="R", help="override failed production checks (recorded)")
    pr.add_argument("--approval", action="store_true", help="the release manager approves the promotion")
    pr.add_argument("--canary-weight", type=int, metavar="N")
    pr.add_argument("--rollout", choices=ROLLOUT_MODES, help=ROLLOUT_HELP)
    pr.add_argument("--on-failure", choices=["rollback", "halt"])
    pr.add_argument("--dry-run", action="store_true", help="show the plan, change nothing")
    pr.add_argument("--quiet-period", type=int, metavar="SECONDS",
                    help="alert-free window after each stage (below the inventory's minimum: give "
                         "--allow-precheck-failure REASON)")
    pr.add_argument("--allow-precheck-failure", metavar="REASON", help="let failed prechecks pass (recorded)")
    pr.set_defaults(func=cmd_promote)

    r = sub.add_parser("rollback", parents=parents, help="roll an environment back, or `rollback check ENV`",
                       usage="liftoff rollback ENV [--to VERSION] [--fast] [--reason R]\n"
                             "       liftoff rollback check ENV")
    r.add_argument("target", nargs="+", metavar="ENV")
    r.add_argument("--to", metavar="VERSION", help="target version (default: the previous one)")
    r.add_argument("--fast", action="store_true", help="big batches, short waits")
    r.add_argument("--rollout", choices=ROLLOUT_MODES, help=ROLLOUT_HELP)
    r.add_argument("--reason", metavar="R")
    r.add_argument("--override-reason", metavar="R", help="roll back even if the safety check refuses")
    r.add_argument("--max-wait", type=_positive, default=900.0, metavar="SECONDS",
                   help="check: seconds to wait for the result (default 900)")
    r.set_defaults(func=cmd_rollback)

    fd = sub.add_parser("fast-deploy", parents=parents,
                        help="deploy a critical fix to one environment now: no QA, no quiet "
                             "period (fast_deploy)")
    fd.add_argument("env")
    fd.add_argument("version")
    fd.add_argument("--reason", required=True, metavar="R", help="why it cannot wait (recorded, pushed)")
    fd.add_argument("--internal", action="store_true",
                    help="an undisclosed security build: its version is shown nowhere (a label instead)")
    fd.add_argument("--rollout", choices=ROLLOUT_MODES, help=ROLLOUT_HELP)
    fd.set_defaults(func=cmd_fast_deploy)

    tr = sub.add_parser("traffic", parents=parents,
                        help="synthetic traffic against environments for a while, metrics to the "
                             "Pushgateway (traffic)")
    tr.add_argument("--env", action="append", metavar="ENV",
                    help="an environment (repeatable; default: staging, canary and the main fleet)")
    tr.add_argument("--rps", type=float, help="requests a second per environment (default 5)")
    tr.add_argument("--for", dest="duration", metavar="DURATION", help="how long: 300s, 10m, 1h (default 5m)")
    tr.add_argument("--endpoint", action="append", metavar="PATH", help="a path to request (repeatable)")
    tr.add_argument("--concurrency", type=int, metavar="N", help="requests in flight at most (default 16)")
    tr.set_defaults(func=cmd_traffic)

    c = sub.add_parser("canary", parents=[common], help="canary traffic")
    csub = c.add_subparsers(dest="canary_command", required=True, metavar="weight")
    w = csub.add_parser("weight", parents=parents, help="set canary weight or state (canary_weight)",
                        usage="liftoff canary weight (N | --drain | --ready | --maint) [--force]")
    w.add_argument("weight", nargs="?", help="0..100")
    state = w.add_mutually_exclusive_group()
    for name in CANARY_STATES:
        state.add_argument(f"--{name}", dest="state", action="store_const", const=name)
    w.add_argument("--force", action="store_true", help="even while a canary deploy runs")
    w.set_defaults(func=cmd_canary, state=None)

    pa = sub.add_parser("patch", parents=parents, help="apply a post-deployment patch (post_deploy_patch)")
    pa.add_argument("env")
    pa.add_argument("file")
    pa.add_argument("--roles", required=True, metavar="r1,r2")
    pa.add_argument("--reason", required=True, metavar="R")
    pa.set_defaults(func=cmd_patch)

    for action in ("lock", "unlock"):
        lk = sub.add_parser(action, parents=parents, help=f"{action} an environment's deploys (deploy_lock)")
        lk.add_argument("env")
        lk.add_argument("--reason", required=True, metavar="R")
        lk.set_defaults(func=cmd_lock)

    fz = sub.add_parser("freeze", parents=parents, help="freeze an environment's changes until a time or "
                                                      "for a while, with a reason (deploy_lock)")
    fz.add_argument("env")
    when = fz.add_mutually_exclusive_group()
    when.add_argument("--until", metavar="ISO", help="end of the freeze, ISO 8601 with a zone")
    when.add_argument("--for", dest="duration", metavar="DURATION", help="how long: 90m, 2h, 1d12h, 1w")
    fz.add_argument("--reason", required=True, metavar="R")
    fz.set_defaults(func=cmd_freeze)
    uf = sub.add_parser("unfreeze", parents=parents, help="lift an environment's freezes, with a reason "
                                                          "(deploy_lock)")
    uf.add_argument("env")
    uf.add_argument("--reason", required=True, metavar="R")
    uf.set_defaults(func=cmd_freeze)

    st = sub.add_parser("status", parents=[common],
                        help="every environment's state (versions, locks, drained hosts, chef, canary "
                             "weight, halts, patches, deployments) and the last runs of deploy_canary and "
                             "deploy_production")
    st.add_argument("--limit", type=int, default=3, help="runs per DAG (default 3)")
    st.add_argument("--no-lbs", action="store_true", help="liftoff's records only: do not read the LBs")
    st.add_argument("--dag", action="append", help="only this DAG (repeatable)")
    st.set_defaults(func=cmd_status)

    rt = sub.add_parser("retry", parents=[common], help="clear a failed stage so the run goes on")
    rt.add_argument("run_id")
    rt.add_argument("stage", help="stage_3_staging_fleet, stage_3 or 3")
    rt.add_argument("--dag", default=DAG_CANARY)
    rt.add_argument("--dry-run", action="store_true", help="only show what would be cleared")
    rt.set_defaults(func=cmd_retry)

    wa = sub.add_parser("watch", parents=[common, poll], help="follow a run until it ends")
    wa.add_argument("run_id")
    wa.add_argument("--dag", default=DAG_CANARY)
    wa.add_argument("--max-wait", type=_positive, default=None, metavar="SECONDS",
                    help="give up after SECONDS (exit 1)")
    wa.set_defaults(func=cmd_watch)
    ay = sub.add_parser("analysis", parents=[common], help="the canary judgements of a run (stage 6, "
                                                          "stage 7's weight steps), with their tables")
    ay.add_argument("run_id")
    ay.set_defaults(func=cmd_analysis)
    for action in ("approve", "reject"):
        an = sub.add_parser(action, parents=[common],
                            help=f"{action} the run's pending approval request (human in the loop)")
        an.add_argument("run_id")
        an.add_argument("--reason", required=action == "approve", metavar="R",
                        help="why (printed; in the request's reason param when it has one)")
        an.add_argument("--dag", default=DAG_PRODUCTION)
        an.add_argument("--task", help="the task that asks, when the run waits for more than one answer")
        an.set_defaults(func=cmd_answer)
    return p


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None,
         stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out_stream = stdout or sys.stdout
    err_stream = stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2, --help 0
        return int(exc.code or 0)
    out = Output(bool(getattr(args, "json", False)), out_stream, err_stream)
    client = _Lazy(lambda: AirflowClient(Credentials.from_env(env, args.api_url), timeout=args.timeout))
    try:
        code = args.func(client, out, args)
        out_stream.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:  # `liftoff status | head`: the reader has what it wanted
        _quiet_stdout(out_stream)
        return EXIT_OK
    except InvalidInput as exc:
        out.error(str(exc), EXIT_INPUT)
        return EXIT_INPUT
    except ChatOpsError as exc:
        out.error(str(exc), exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        out.error("interrupted", 130)
        return 130


def _quiet_stdout(stream: TextIO) -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush does
    not print a BrokenPipeError traceback."""
    import contextlib
    import os

    with contextlib.suppress(OSError, ValueError, AttributeError):  # not a real file (tests)
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


class _Lazy:
    """The client, built on first use: input is validated before credentials are even read."""

    def __init__(self, factory: Callable[[], AirflowClient]):
        self._factory = factory
        self._client: AirflowClient | None = None

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            self._client = self._factory()
        return getattr(self._client, name)


if __name__ == "__main__":
    raise SystemExit(main())
