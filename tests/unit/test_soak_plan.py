"""The chaos soak's plans (bench/soak.py) without a lab or Airflow: the same seed plans the same
runs and faults, the fault kinds and pipelines issue 14 added show up in plans, the options
parse; and the lab's two knobs the new faults use (a slow install on one host, the GitLab API
stopped and back), on an in-memory world."""

from __future__ import annotations

import asyncio
import re
import socket
import time

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer

from bench import soak
from bench.soak import DAG_MIX, FAULTS, SHORT_DAGS, SLOW_INSTALL_S, Soak, dag_mix, fault_kinds, stack_process
from lab import control
from lab.config import LabConfig
from lab.gitlab_api import GitlabApi
from lab.hostsim import run_command
from lab.model import World
from lab.topology import Topology

OCTET = 92  # this module's lab addresses (only the GitLab API test listens: on a free port)
OLD, NEW = "17.6.0-ee.0", "17.7.0-ee.0"
PATCH_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")  # liftoff_airflow.params.PATCH_ID_PATTERN


class FakeLab:
    """What Soak.plan uses of a lab: its config, topology, and build_add (recorded)."""

    def __init__(self, tmp_path):
        self.config = LabConfig(lab_dir=tmp_path / "lab", octet=OCTET)
        self.topology = Topology(self.config)
        self.env: dict[str, str] = {}
        self.builds: list[tuple[str, dict]] = []

    def build_add(self, version: str, **attrs) -> dict:
        self.builds.append((version, attrs))
        return {"version": version, **attrs}


class FakeStore:
    def __init__(self, previous: str | None = None, canary: str | None = None):
        self.previous, self.canary = previous, canary

    def previous_version(self, env: str) -> str | None:
        return self.previous

    def current_version(self, env: str) -> str | None:
        return self.canary if env == "gprd-cny" else None


def make(tmp_path, seed=5, short=False, faults=None, dags=None, celery=False, store=None) -> Soak:
    return Soak(FakeLab(tmp_path), None, seed, short, faults, dags=dags, celery=celery,
                store=store or FakeStore(previous="17.9.0+rnightly.1.abc1234-0"), inventory=object())


def plans(tmp_path, n=40, **kw) -> list[str]:
    s = make(tmp_path, **kw)
    return [s.plan(i).describe() for i in range(n)]


def test_the_same_seed_plans_the_same_runs_and_faults(tmp_path):
    assert plans(tmp_path / "a") == plans(tmp_path / "b")
    assert plans(tmp_path / "a", short=True, faults=["host_down", "slow_install"]) == \
        plans(tmp_path / "b", short=True, faults=["host_down", "slow_install"])
    assert plans(tmp_path / "c", seed=6) != plans(tmp_path / "d", seed=5)


def test_a_plan_depends_on_its_seed_and_index_only(tmp_path):
    """Run N's plan is the same whether or not runs before it were planned (its own Random)."""
    full = make(tmp_path / "a", short=True)
    [full.plan(i) for i in range(7)]
    assert full.plan(7).describe().split(" build=")[1] == \
        make(tmp_path / "b", short=True).plan(7).describe().split(" build=")[1]


def test_new_fault_kinds_appear_in_plans_with_their_parameters(tmp_path):
    s = make(tmp_path, faults=["slow_install", "gitlab_api_stop"])
    faults = [f for i in range(60) for f in s.plan(i).faults]
    assert {f.kind for f in faults} == {"slow_install", "gitlab_api_stop"}
    hosts = {h.name for h in s.lab.topology.hosts}
    for f in faults:
        if f.kind == "slow_install":
            assert f.at_commands == 0 and f.heal_after == float("inf"), "from the start to the run's end"
            assert f.target in hosts and SLOW_INSTALL_S[0] <= f.seconds <= SLOW_INSTALL_S[1]
            assert f"slow_install({f.target}, {f.seconds:.0f} s) from the start" == f.describe()
        else:
            assert f.target == "" and f.seconds is None
            assert f.at_commands is None or 1 <= f.at_commands <= 40


def test_slow_install_targets_a_host_the_run_installs_on(tmp_path):
    s = make(tmp_path, faults=["slow_install"], dags=["fast_deploy", "deploy_canary"])
    envs = {h.name: h.env for h in s.lab.topology.hosts}
    for i in range(30):
        plan = s.plan(i)
        expected = {"gstg", "gprd-cny"} if plan.dag == "deploy_canary" else {plan.env}
        assert {envs[f.target] for f in plan.faults} <= expected


def test_the_celery_worker_kill_needs_celery(tmp_path):
    assert "celery_worker_kill" not in [k for k, _ in fault_kinds(None, celery=False)]
    assert "celery_worker_kill" in [k for k, _ in fault_kinds(None, celery=True)]
    assert fault_kinds(["celery_worker_kill", "host_down"], celery=False) == [("host_down", 5)]
    s = make(tmp_path, celery=True, faults=["celery_worker_kill"])
    kinds = {f.kind for i in range(80) for f in s.plan(i).faults}
    assert kinds == {"celery_worker_kill"}
    assert stack_process("celery_worker_kill") == "worker"
    assert stack_process("api_server_kill") == "api-server" and stack_process("scheduler_kill") == "scheduler"


def test_the_short_mix_is_the_three_short_pipelines(tmp_path):
    assert [d for d, _ in dag_mix(short=True)] == list(SHORT_DAGS)
    assert [d for d, _ in dag_mix(short=False)] == [d for d, _ in DAG_MIX]
    assert {s.split(":")[1].split()[0] for s in plans(tmp_path, short=True)} <= set(SHORT_DAGS)


def test_deploy_production_promotes_only_what_the_canary_verified(tmp_path):
    # nothing verified: a deploy_canary instead
    s = make(tmp_path / "a", dags=["deploy_production"])
    assert {s.plan(i).dag for i in range(5)} == {"deploy_canary"}
    # verified and still on the canary: promoted, on gprd
    verified = "17.9.0+rnightly.7501.abcdef1-0"
    s = make(tmp_path / "b", dags=["deploy_production"], store=FakeStore(canary=verified))
    s.verified = verified
    plan = s.plan(0)
    assert (plan.dag, plan.env, plan.version, plan.conf["version"]) == ("deploy_production", "gprd", verified,
                                                                        verified)
    assert plan.conf["on_failure"] in ("halt", "rollback") and "approval" not in plan.conf
    # the canary moved on since: verified again first
    moved = FakeStore(canary="17.9.0+rnightly.9.abc0000-0")
    s = make(tmp_path / "c", dags=["deploy_production"], store=moved)
    s.verified = verified
    assert s.plan(0).dag == "deploy_canary"


def test_a_successful_deploy_canary_makes_its_build_promotable(tmp_path):
    """Whether it succeeded at once or after a `liftoff retry` (both call succeeded())."""
    store = FakeStore()
    s = make(tmp_path, dags=["deploy_canary", "deploy_production"], store=store)
    canary = next(p for p in map(s.plan, range(40)) if p.dag == "deploy_canary" and p.build == "good")
    s.succeeded(canary)
    store.canary = canary.version  # liftoff's record: the canary runs it
    assert s.promotable() == canary.version and s.good["gprd-cny"] == canary.version
    plans = [s.plan(i) for i in range(40, 80)]
    assert {p.version for p in plans if p.dag == "deploy_production"} == {canary.version}


def test_post_deploy_patch_plans_and_later_builds_include_the_patch(tmp_path):
    s = make(tmp_path, dags=["post_deploy_patch", "fast_deploy"])
    patched = []
    for i in range(30):
        plan = s.plan(i)
        if plan.dag == "post_deploy_patch":
            c = plan.conf
            assert PATCH_ID.match(c["patch_id"]) and c["action"] == "apply" and c["patch"] and c["reason"]
            roles = {h.role for h in s.lab.topology.env_hosts(plan.env)}
            assert 1 <= len(c["roles"]) <= 2 and set(c["roles"]) <= roles
            patched.append(c["patch_id"])
        elif patched:
            assert s.lab.builds[-1][1]["includes_patches"] == patched
    assert patched, "no post_deploy_patch in 30 runs"


def test_options_parse_and_refuse(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake_run(args, tmp):
        seen["args"] = args
        return {"violations_total": 0}

    monkeypatch.setattr(soak, "run_soak", fake_run)
    every = ",".join(k for k, _ in FAULTS)  # as tests/e2e/test_soak_slice.py passes them
    assert soak.main(["--seed", "3", "--runs", "2", "--short", "--faults", every,
                      "--tmp", str(tmp_path)]) == 0
    args = seen["args"]
    assert (args.seed, args.runs, args.short, args.celery, args.dags) == (3, 2, True, False, None)
    assert soak.main(["--celery", "--dags", "deploy_canary,fast_deploy", "--concurrency", "2",
                      "--tmp", str(tmp_path)]) == 0
    assert seen["args"].celery and seen["args"].dags == ["deploy_canary", "fast_deploy"]
    for bad, says in ((["--faults", "nope"], "unknown kinds"),
                      (["--faults", "celery_worker_kill"], "need --celery"),
                      (["--dags", "traffic"], "unknown pipelines"), (["--runs", "0"], "at least 1")):
        with pytest.raises(SystemExit):
            soak.main([*bad, "--tmp", str(tmp_path)])
        assert says in capsys.readouterr().err


# -- the lab's knobs --------------------------------------------------------------------------
@pytest.fixture
def world(tmp_path):
    config = LabConfig(lab_dir=tmp_path / "lab", octet=OCTET, install_seconds=0.01)
    config.save()
    w = World.open(config)
    w.add_build(OLD)
    w.add_build(NEW)
    yield w
    w.close()


def test_a_slow_install_on_one_host_only(world):
    async def go():
        async with TestClient(TestServer(control.make_app(world))) as client:
            resp = await client.post("/faults/slow-install", json={"host": "web-01-sv-gstg", "seconds": 0.6})
            assert resp.status == 200 and (await resp.json()) == {"slow_install": {"web-01-sv-gstg": 0.6}}
            resp = await client.post("/faults/slow-install", json={"host": "nope", "seconds": 1})
            assert resp.status == 404
            assert (await client.post("/faults/slow-install", json={"host": "web-01-sv-gstg",
                                                                      "seconds": -1})).status == 400
            timed = {}
            for host in ("web-01-sv-gstg", "web-02-sv-gstg"):
                t = time.monotonic()
                install = f"apt-get install -y gitlab-ee={OLD}"
                code, _, err = await run_command(world, world.hosts[host], install)
                assert code == 0, err
                timed[host] = time.monotonic() - t
            assert timed["web-01-sv-gstg"] >= 0.6 > timed["web-02-sv-gstg"]
            status = await (await client.get("/status")).json()
            assert status["faults"]["slow_install"] == {"web-01-sv-gstg": 0.6}
            resp = await client.post("/faults/slow-install", json={"host": "web-01-sv-gstg"})
            assert (await resp.json()) == {"slow_install": {}} and "slow_install" not in world.faults
            t = time.monotonic()
            await run_command(world, world.hosts["web-01-sv-gstg"], f"apt-get install -y gitlab-ee={NEW}")
            assert time.monotonic() - t < 0.5

    asyncio.run(go())


def test_the_gitlab_api_stops_and_comes_back_with_its_state(world, monkeypatch):
    # a free port of its own: a soak's lab may run on this octet meanwhile
    with socket.socket() as sock:
        sock.bind((world.config.control_addr, 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(LabConfig, "gitlab_port", property(lambda self: port))

    async def go():
        api = GitlabApi(world)
        await api._start()
        control.COMPONENTS["gitlab_api"] = api
        url = f"{world.config.gitlab_url}/api/v4/version"
        headers = {"PRIVATE-TOKEN": api.tokens["private_token"]}
        try:
            async with TestClient(TestServer(control.make_app(world))) as client, ClientSession() as http:
                async with http.get(url, headers=headers) as resp:  # a kept-alive connection
                    assert resp.status == 200
                api.issues[1] = {"iid": 1, "title": "kept"}
                assert (await client.post("/faults/gitlab-api-down")).status == 200
                assert not api.serving and world.faults["gitlab_api_down"] is True
                with pytest.raises(OSError):
                    async with http.get(url, headers=headers) as resp:
                        pass
                assert (await client.post("/faults/gitlab-api-up")).status == 200
                assert api.serving and "gitlab_api_down" not in world.faults
                async with http.get(url, headers=headers) as resp:
                    assert resp.status == 200
                assert api.issues[1]["title"] == "kept"
        finally:
            control.COMPONENTS.pop("gitlab_api", None)
            await api.close()

    asyncio.run(go())


def test_the_gitlab_api_fault_needs_the_api_in_labd(world):
    async def go():
        async with TestClient(TestServer(control.make_app(world))) as client:
            resp = await client.post("/faults/gitlab-api-down")
            assert resp.status == 409 and "does not run" in (await resp.json())["error"]

    asyncio.run(go())
