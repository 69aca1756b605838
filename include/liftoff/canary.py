"""The production canary: which environment is the canary of which, its weight in the
production backends (0-100 against the main fleet's 100) or its state on every production LB,
and what canary verified.

Every weight change passes the door on the canary environment (:mod:`liftoff.guard`): a
canary deploy holding its lock refuses another run's change unless forced; a one-shot change
(the canary_weight DAG, a person) takes the lock only for the change.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable

from liftoff import guard, locks
from liftoff.errors import HAProxyError, InvalidInput, LiftoffError, PrecheckFailed
from liftoff.haproxy import HAProxy, PartialApplication, ServerState
from liftoff.inventory import Environment, Inventory
from liftoff.runs import Run
from liftoff.versions import parse_version, validate_reason

log = logging.getLogger(__name__)

CANARY_STATES = ("drain", "ready", "maint")
CONVERGE_TIMEOUT = 15.0


def canary_env_of(inventory: Inventory, main: str) -> str | None:
    """The canary environment of ``main`` (the one whose ``canary_of`` names it), if any."""
    return next((e.name for e in inventory.environments.values() if e.canary_of == main), None)


def canary_env_name(inventory: Inventory) -> str:
    """The production canary environment (the first environment that is a canary)."""
    name = next((e.name for e in inventory.environments.values() if e.canary_of), None)
    if name is None:
        raise LiftoffError(f"inventory {inventory.source or '?'} has no canary environment (canary_of)")
    return name


def main_env(run: Run, canary_env: str) -> Environment:
    """The environment whose LBs carry the canary's servers (itself when it is no canary)."""
    env = run.env(canary_env)
    return run.env(env.canary_of) if env.canary_of else env


def canary_hosts(run: Run, canary_env: str = "gprd-cny") -> list[str]:
    return [h.name for h in run.env(canary_env).hosts()]


def parse_weight(weight: int | str) -> int | str:
    """0..100 or drain/ready/maint (ASCII digits in text, blanks around them, are a weight)."""
    expected = f"canary weight must be 0..100 or one of {', '.join(CANARY_STATES)}"
    if isinstance(weight, bool):
        raise InvalidInput(f"{expected}, got {weight}")
    if isinstance(weight, str) and re.fullmatch(r"[0-9]{1,3}", weight.strip()):
        weight = int(weight.strip())
    if isinstance(weight, int):
        if not 0 <= weight <= 100:
            raise InvalidInput(f"canary weight must be within 0..100, got {str(weight)[:20]}")
        return weight
    if isinstance(weight, str) and weight in CANARY_STATES:
        return weight
    raise InvalidInput(f"{expected}, got {str(weight)[:40]!r}" + ("..." if len(str(weight)) > 40 else ""))


def current_canary_weight(run: Run, canary_env: str = "gprd-cny") -> int:
    """The highest weight a canary server has in a production (non-canary) backend."""
    hosts = set(canary_hosts(run, canary_env))
    snap = HAProxy.for_env(main_env(run, canary_env)).snapshot()
    weights = [s.weight for states in snap.values() for s in states
               if s.server in hosts and not s.backend.startswith("canary")]
    return max(weights, default=0)


def apply_weight(run: Run, weight: int | str, *, canary_env: str = "gprd-cny", force: bool = False) -> dict:
    """Set the canary servers' weight in the production backends, or their state, on every
    production LB, through the door on the canary environment: another run's canary deploy
    refuses less canary traffic unless ``force``."""
    weight = parse_weight(weight)
    main = main_env(run, canary_env)
    hosts = canary_hosts(run, canary_env)
    # More canary traffic never gets in a canary deploy's way: it passes the deploy's lock (recorded);
    # less traffic (a lower weight, drain, maint) needs ``force``.
    raising = (not force and isinstance(weight, int) and locks.held_by_other(run, canary_env) is not None
               and weight >= current_canary_weight(run, canary_env))
    with guard.entered(run, canary_env, "canary_weight", force=force or raising):
        haproxy = HAProxy.for_env(main)
        backends = sorted(r.name for r in main.roles) if isinstance(weight, int) else []
        try:
            if isinstance(weight, int):
                result = haproxy.set_weight(hosts, weight, backends=backends)
            else:
                result = getattr(haproxy, weight)(hosts)
        except PartialApplication as exc:
            if exc.applied:  # some LBs hold it: the others get it when they are back (liftoff.lbstate)
                remember_setting(run, canary_env, weight, hosts, backends)
            raise
        remember_setting(run, canary_env, weight, hosts, backends)
    return {"weight": weight, "hosts": hosts, "result": result.to_dict(),
            "lbs": [lb.name for lb in main.load_balancers]}


def remember_setting(run: Run, canary_env: str, weight: int | str, hosts: list[str],
                     backends: list[str]) -> None:
    """Record the canary weight (or state) just set, so an LB that loses it (restarted) gets it
    back (:mod:`liftoff.lbstate`). Recorded once it reached an LB (not when every LB refused)."""
    kind = "weight" if isinstance(weight, int) else "state"
    run.store.record_lb_setting(canary_env, kind, weight, hosts, backends, run.run_id, run.who)


def canary_divergence(snap: dict[str, list[ServerState]], hosts: Iterable[str], main_backends: Iterable[str],
                      weight: int | str) -> dict[str, list[str]]:
    """Where the LBs do not show the requested canary setting: ``{lb: [what differs]}``.

    A weight must be on every canary server of every main backend; a state (drain/ready/maint)
    in every backend holding it. A canary server one LB lists and another does not also
    differs (servers no LB lists, like gitaly, are not behind the LBs)."""
    hosts = set(hosts) & {s.server for states in snap.values() for s in states}
    main = set(main_backends)
    out: dict[str, list[str]] = {}
    for lb, states in snap.items():
        bad: list[str] = []
        seen = set()
        for s in states:
            if s.server not in hosts:
                continue
            seen.add(s.server)
            if isinstance(weight, int):
                if s.backend in main and s.weight != weight:
                    bad.append(f"{s.backend}/{s.server} weight {s.weight}")
            elif s.admin != weight:
                bad.append(f"{s.backend}/{s.server} {s.admin}")
        bad += [f"{h} missing" for h in sorted(hosts - seen)]
        if bad:
            out[lb] = bad
    return out


def wait_converged(run: Run, canary_env: str, weight: int | str, timeout: float) -> None:
    """Read every production LB back until each shows the canary setting; HAProxyError if not."""
    main = main_env(run, canary_env)
    hosts = canary_hosts(run, canary_env)
    haproxy = HAProxy.for_env(main)
    deadline = time.monotonic() + timeout
    while True:
        try:
            diverging = canary_divergence(haproxy.snapshot(), hosts, [r.name for r in main.roles], weight)
        except HAProxyError as exc:
            diverging = {"*": [str(exc)]}
        if not diverging or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if diverging:
        raise HAProxyError(f"canary weight {weight} did not converge on every LB within {timeout:.0f}s: "
                           + "; ".join(f"{lb}: {', '.join(b[:5])}" for lb, b in sorted(diverging.items())))


def set_canary_weight(run: Run, weight: int | str, *, force: bool = False,
                      timeout: float = CONVERGE_TIMEOUT) -> dict:
    """``canary weight``: set the weight (or state) on every production LB, then verify every LB
    converged. A canary deploy holding the canary's lock refuses it unless ``force``; a lock
    taken by hand is not a deploy and does not refuse it."""
    weight = parse_weight(weight)
    canary = canary_env_name(run.inventory)
    by_hand = locks.by_hand(locks.held_by_other(run, canary))
    before = current_canary_weight(run, canary)
    result = apply_weight(run, weight, canary_env=canary, force=force or by_hand)
    wait_converged(run, canary, weight, timeout)
    result.update(converged=[lb.name for lb in main_env(run, canary).load_balancers], previous_weight=before,
                  forced=force, canary_env=canary)
    return result


def shield_for_rollback(run: Run, env_name: str) -> dict:
    """Before a rollback: production drains its canary (forced: the rollback wins over a canary
    deploy); the canary itself gets no production traffic (weight 0); others: nothing."""
    env = run.env(env_name)
    canary = canary_env_of(run.inventory, env.name)
    if canary is not None:
        result = apply_weight(run, "drain", canary_env=canary, force=True)
        return {"action": f"drained canary {canary}", "result": result,
                "note": f"{canary} stays drained: canary_weight ready once it is wanted again"}
    if env.is_canary:
        result = apply_weight(run, 0, canary_env=env.name, force=True)
        return {"action": f"canary {env.name} weight 0", "result": result,
                "note": "the canary stays at weight 0: set canary_weight once it is wanted again"}
    return {"action": "none"}


def verified_on_canary(run: Run, version: str, override_reason: str | None = None,
                       env_name: str = "gprd") -> str:
    """Promote only the version canary verified, unless overridden with a recorded reason."""
    version = str(parse_version(version))
    canary = canary_env_of(run.inventory, env_name)
    verified = run.store.current_version(canary) if canary else None
    if verified != version:
        if not override_reason:
            raise PrecheckFailed(f"{version} is not the version verified on {canary} "
                              f"({verified or 'none recorded'}); give an override reason to promote it")
        reason = validate_reason(override_reason, field_name="override_reason")
        log.warning("promoting %s, not the canary-verified %s: overridden by %s: %s",
                    version, verified, run.who, reason)
    return version


# -- promotion on evidence: the canary judge in the pipelines ---------------------------------------

NEXT, ABORT, ASK, ACCEPTED = "next", "abort", "ask", "accepted"


def analysis_config(run: Run, canary_env: str = "gprd-cny"):
    """The canary environment's judge settings (``extra.analysis``; on by default)."""
    from liftoff.analysis import AnalysisConfig

    return AnalysisConfig.from_environment(run.env(canary_env))


def decision_for(verdict: str, accepted: bool = False) -> str:
    """What the pipeline does with a verdict: pass -> next (the next step, or promotion); fail ->
    abort (canary weight 0, the run's on_failure); marginal or inconclusive -> ask a person, or
    go on when a person already accepted this run's canary (``accepted``)."""
    if verdict == "pass":
        return NEXT
    if verdict == "fail":
        return ABORT
    return ACCEPTED if accepted else ASK


def judge_step(run: Run, canary_env: str, stage: str, weight: int | None, held_from: float, *,
               accepted: bool = False, now: float | None = None, prometheus=None) -> dict:
    """Judge the canary over the interval it was just held (``held_from`` .. now) against its
    main fleet; record the judgement (state store), push it (metrics), announce it (chat).
    Returns the judgement with the pipeline's decision and the table people read."""
    from liftoff import notify
    from liftoff.analysis import analyze, render_table

    end = time.time() if now is None else now
    window = max(end - held_from, 1.0)
    verdict = analyze(run.inventory, canary_env, end=end, prometheus=prometheus, window_s=window)
    decision = decision_for(verdict.verdict, accepted)
    data = verdict.to_json()
    run.store.record_analysis(run.run_id, canary_env, stage, weight, verdict.verdict, verdict.score,
                              decision, json.dumps(data))
    run.metrics().canary_analysis(canary_env, stage, verdict.verdict, verdict.score)
    where = f"{stage}" + (f" at weight {weight}" if weight is not None else "")
    notify.canary_judged(run, canary_env, where, verdict.verdict, verdict.score, verdict.reason, decision)
    log.info("canary %s judged over %.0fs (%s): %s, score %s; %s", canary_env, window, where,
             verdict.verdict, verdict.score, decision)
    return {"env": canary_env, "stage": stage, "weight": weight, "verdict": verdict.verdict,
            "score": verdict.score, "reason": verdict.reason, "decision": decision,
            "window_s": round(window, 1), "table": render_table(verdict)}


def judgement_sentence(result: dict) -> str:
    """One sentence for a judgement that stops the run or asks a person."""
    where = result.get("stage", "?") + (f" at canary weight {result['weight']}"
                                        if result.get("weight") is not None else "")
    score = "-" if result.get("score") is None else f"{result['score']:g}"
    return (f"canary analysis of {result.get('env')} ({where}): {result.get('verdict')} (score {score}): "
            f"{result.get('reason')}")
