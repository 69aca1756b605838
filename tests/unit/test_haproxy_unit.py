"""liftoff.haproxy against parsed real HAProxy 2.6 output and a fake runtime API over TCP."""

from __future__ import annotations

import asyncio

import pytest

from liftoff.errors import HAProxyError, InvalidInput
from liftoff.haproxy import (
    HAProxy,
    PartialApplication,
    admin_states,
    base_status,
    disagreements,
    out_of_service,
    server_states,
    split_answers,
)
from liftoff.inventory import LoadBalancerRef
from tests.unit.fleet_fakes import LBThread

# Captured from haproxy 2.6.12 (`show stat -1 4 -1;show servers state`, trimmed to the first columns
# that matter plus addr): web-01 drained and UP, web-02 weight 0, canary maint.
REAL_STAT = (
    "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,dreq,dresp,ereq,econ,eresp,wretr,wredis,status,"
    "weight,act,bck,chkfail,chkdown,lastchg,downtime,qlimit,pid,iid,sid,throttle,lbtot,tracked,type,rate,"
    "rate_lim,rate_max,check_status,addr\n"
    "web,web-01-sv-gprd,0,0,3,0,,0,0,0,,0,,0,0,0,0,DRAIN,100,1,0,1,1,1,1,,1,2,1,,0,,2,0,,0,L7OK,"
    "127.57.250.10:25701\n"
    "web,web-02-sv-gprd,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP,0,1,0,1,1,1,1,,1,2,2,,0,,2,0,,0,L7OK,127.57.250.11:25701\n"
    "canary,web-01-sv-gprd,0,0,0,0,,0,0,0,,0,,0,0,0,0,MAINT,5,1,0,1,1,1,1,,1,3,1,,0,,2,0,,0,L7OK,"
    "127.57.250.10:25701\n"
    "canary,web-03-sv-gprd,0,0,0,0,,0,0,0,,0,,0,0,0,0,UP 1/3,5,1,0,1,1,1,1,,1,3,1,,0,,2,0,,0,L7OK,"
    "127.57.250.12:25701\n"
)
REAL_STATE = (
    "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight "
    "srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state\n"
    "2 web 1 web-01-sv-gprd 127.57.250.10 2 8 100 100 1 6 3 4 6\n"
    "2 web 2 web-02-sv-gprd 127.57.250.11 2 0 0 100 2 6 3 4 6\n"
    "3 canary 1 web-01-sv-gprd 127.57.250.10 0 1 5 5 0 6 3 0 14\n"
    "3 canary 2 web-03-sv-gprd 127.57.250.12 2 0 5 5 0 6 3 0 14\n"
)


def test_statuses_from_real_output():
    states = {(s.backend, s.server): s for s in server_states("lb1", REAL_STAT, REAL_STATE)}
    web01 = states[("web", "web-01-sv-gprd")]
    assert (web01.status, web01.admin, web01.weight, web01.sessions) == ("DRAIN", "drain", 100, 3)
    web02 = states[("web", "web-02-sv-gprd")]
    assert (web02.status, web02.admin, web02.weight) == ("UP", "ready", 0)
    assert web02.in_service  # weight 0 is a traffic choice, not out of service
    canary = states[("canary", "web-01-sv-gprd")]
    assert (canary.status, canary.admin) == ("MAINT", "maint")
    assert states[("canary", "web-03-sv-gprd")].status == "UP"
    assert out_of_service({"lb1": list(states.values())}) == {
        "web-01-sv-gprd": "lb1 web DRAIN/drain"}


def test_admin_states_from_the_servers_state_alone_agree_with_the_full_read():
    full = {(s.backend, s.server): (s.status, s.admin, s.weight)
            for s in server_states("lb1", REAL_STAT, REAL_STATE)}
    light = {(s.backend, s.server): (s.status, s.admin, s.weight, s.sessions)
             for s in admin_states("lb1", REAL_STATE)}
    assert {k: v[:3] for k, v in light.items()} == full
    assert {v[3] for v in light.values()} == {0}  # no session counts in this read


def test_a_stat_line_with_a_quoted_field_is_read_like_the_others():
    quoted = REAL_STAT.replace("L7OK,127.57.250.11", '"L7OK, 200 OK",127.57.250.11')
    states = {(s.backend, s.server): s for s in server_states("lb1", quoted, REAL_STATE)}
    assert states[("web", "web-02-sv-gprd")].address == "127.57.250.11:25701"
    with pytest.raises(HAProxyError, match="unexpected 'show stat' answer"):
        server_states("lb1", "No such backend.\n", REAL_STATE)


def test_absent_columns_and_short_rows_read_as_empty():
    stat = "# pxname,svname,scur,status,weight\nweb,web-01-sv-gprd,2,UP,7\nweb,web-02-sv-gprd\n"
    states = {s.server: s for s in server_states("lb1", stat, "")}
    assert states["web-01-sv-gprd"][3:] == ("UP", "ready", 7, 2, "", "UP")
    assert (states["web-02-sv-gprd"].status, states["web-02-sv-gprd"].weight) == ("DOWN", 0)


def test_a_read_of_some_servers_equals_the_full_read_cut_to_them():
    """A batch reads its own servers' lines (``only``): the same states as the full read, quoted
    and short lines included, and nothing of the other servers."""
    quoted = REAL_STAT.replace("L7OK,127.57.250.11", '"L7OK, 200 OK",127.57.250.11')
    full = server_states("lb1", quoted, REAL_STATE)
    names = sorted({s.server for s in full})
    assert len(names) >= 2
    for only in ({names[0]}, {names[1]}, set(names[:2]), {"nowhere"}):
        want = [s for s in full if s.server in only]
        assert server_states("lb1", quoted, REAL_STATE, only) == want
    # web-01 is drained in 'show servers state' alone: a filtered read still merges it
    web01 = server_states("lb1", quoted, REAL_STATE, {"web-01-sv-gprd"})
    assert {s.admin for s in web01} == {"drain", "maint"}
    stat = "# pxname,svname,scur,status,weight\nweb,web-01-sv-gprd,2,UP,7\nweb\n"
    assert [s.server for s in server_states("lb1", stat, "", {"web-01-sv-gprd"})] == ["web-01-sv-gprd"]


@pytest.mark.parametrize("raw, want", [
    ("UP", "UP"), ("UP 1/3", "UP"), ("DOWN 1/2", "DOWN"), ("MAINT (via web/x)", "MAINT"),
    ("MAINT(resolution)", "MAINT"), ("no check", "UP"), ("NOLB", "NOLB"), ("DRAIN", "DRAIN"), ("?", "DOWN")])
def test_base_status(raw, want):
    assert base_status(raw) == want


def test_split_answers_in_order_and_incomplete_is_an_error():
    # set ok, set ok, unknown server, then a multi-line answer (as haproxy 2.6 printed it)
    text = "\n\nNo such server.\n\n1\n# be_id be_name\n2 web 1 a\n\n"
    assert split_answers(text, 4) == ["", "", "No such server.", "1\n# be_id be_name\n2 web 1 a"]
    with pytest.raises(HAProxyError, match="1 of 2"):
        split_answers("\n", 2)
    with pytest.raises(HAProxyError, match="0 of 1"):
        split_answers("", 1)


def refs(t: LBThread) -> list[LoadBalancerRef]:
    return [LoadBalancerRef(lb.name, lb.host, lb.port) for lb in t.lbs]


@pytest.fixture
def two_lbs():
    with LBThread("fe-01", "fe-02") as t:
        for lb in t.lbs:
            lb.add("web", "web-01", "127.0.0.2:80")
            lb.add("web", "web-02", "127.0.0.3:80")
            lb.add("canary_web", "web-01", "127.0.0.2:80", weight=5)
        yield t


def test_drain_every_backend_every_lb_one_connection_each(two_lbs):
    ha = HAProxy(refs(two_lbs))
    result = ha.drain(["web-01", "gitaly-01"])
    assert result.missing == ["gitaly-01"]
    for lb in two_lbs.lbs:
        assert [s.admin for s in lb.server_state("web-01")] == ["drain", "drain"]
        assert lb.server_state("web-02")[0].admin == "ready"
        # one read (snapshot) and one change connection per LB
        assert len(lb.lines) == 2
        assert lb.lines[1] == "set server web/web-01 state drain;set server canary_web/web-01 state drain"
        assert sorted(result.applied[lb.name]) == ["canary_web/web-01", "web/web-01"]
    servers = ha.servers("web-01")
    assert {s.status for states in servers.values() for s in states} == {"DRAIN"}
    ha.ready(["web-01"])
    assert ha.wait_up(["web-01", "web-02"], timeout=1) == {}


def test_many_servers_are_batched_into_few_connections():
    with LBThread("fe-01") as t:
        names = [f"web-{i:04d}-sv-gprd" for i in range(400)]
        for n in names:
            t.lbs[0].add("web", n, "127.0.0.2:80")
        HAProxy(refs(t)).drain(names)
        assert all(s.admin == "drain" for n in names for s in t.lbs[0].server_state(n))
        assert 2 <= len(t.lbs[0].lines) - 1 <= 3  # 400 commands in a few 8 kB lines, not 400 connections


def test_unreachable_lb_changes_nothing_anywhere(two_lbs):
    ha = HAProxy(refs(two_lbs), timeout=2)
    two_lbs.stop_lb(two_lbs.lbs[1])
    with pytest.raises(HAProxyError, match="fe-02") as info:
        ha.drain(["web-01"])
    assert "unreachable" in str(info.value)
    assert all(s.admin == "ready" for s in two_lbs.lbs[0].server_state("web-01"))
    assert not any(line.startswith("set ") for line in two_lbs.lbs[0].lines)


def test_lb_failing_mid_change_is_reported_as_partial(two_lbs):
    ha = HAProxy(refs(two_lbs), timeout=2)
    lb2 = two_lbs.lbs[1]
    read = ha.asnapshot

    async def read_then_break_lb2(only=None):
        result = await read(only)  # both LBs answer the read ...
        lb2.refuse = True  # ... then fe-02 drops the change connection unanswered
        return result

    ha.asnapshot = read_then_break_lb2
    with pytest.raises(PartialApplication) as info:
        asyncio.run(ha.adrain(["web-01"]))
    err = info.value
    assert list(err.applied) == ["fe-01"] and list(err.failed) == ["fe-02"]
    assert "NOT done on fe-02" in str(err) and "incomplete answer" in str(err)
    assert all(s.admin == "drain" for s in two_lbs.lbs[0].server_state("web-01"))
    assert all(s.admin == "ready" for s in lb2.server_state("web-01"))


def test_error_answer_is_not_success(two_lbs):
    ha = HAProxy(refs(two_lbs))
    lb = two_lbs.lbs[1]
    original = lb.execute
    # the LB refuses the change although it listed the server a moment ago
    lb.execute = lambda cmd: "No such server.\n" if cmd.startswith("set ") else original(cmd)
    with pytest.raises(PartialApplication, match="No such server"):
        ha.drain(["web-01"])


def test_set_weight_everywhere_or_only_some_backends(two_lbs):
    ha = HAProxy(refs(two_lbs))
    ha.set_weight(["web-01"], 0, backends=["web"])
    lb = two_lbs.lbs[0]
    assert lb.backends["web"]["web-01"].weight == 0 and lb.backends["canary_web"]["web-01"].weight == 5
    ha.set_weight(["web-01"], 7)
    assert [s.weight for s in lb.server_state("web-01")] == [7, 7]
    for bad in (-1, 257, "5; shutdown", True):
        with pytest.raises(InvalidInput):
            ha.set_weight(["web-01"], bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        ha.drain(["web-01;shutdown sessions"])


def test_disagreements_between_lbs(two_lbs):
    ha = HAProxy(refs(two_lbs))
    assert ha.disagreements() == []
    two_lbs.lbs[1].backends["web"]["web-02"].admin = "maint"
    found = ha.disagreements()
    assert [(d.backend, d.server) for d in found] == [("web", "web-02")]
    assert found[0].states == {"fe-01": "UP/ready/100", "fe-02": "MAINT/maint/100"}
    two_lbs.lbs[0].backends["web"].pop("web-01")
    assert ("web", "web-01") in [(d.backend, d.server) for d in disagreements(ha.snapshot())]


def test_wait_sessions_zero_is_bounded(two_lbs):
    ha = HAProxy(refs(two_lbs), poll=0.05)
    for lb in two_lbs.lbs:
        lb.backends["web"]["web-01"].sessions = 4
    left = ha.wait_sessions_zero(["web-01"], timeout=0.3)
    assert left == {"web-01": 8}
    for lb in two_lbs.lbs:
        lb.sessions_drop_after["web-01"] = 2
    assert ha.wait_sessions_zero(["web-01"], timeout=5) == {}


def test_wait_up_reports_lbs_that_disagree(two_lbs):
    ha = HAProxy(refs(two_lbs), poll=0.05)
    two_lbs.lbs[1].backends["web"]["web-02"].health = False
    bad = ha.wait_up(["web-01", "web-02"], timeout=0.2)
    assert list(bad) == ["web-02"] and list(bad["web-02"]) == ["fe-02"]
