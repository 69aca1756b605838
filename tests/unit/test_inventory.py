import copy

import pytest
import yaml

from liftoff.errors import InventoryError
from liftoff.inventory import DEFAULT_CONNECTIONS, LoadBalancerRef, Role, load_inventory, parse_inventory

INVENTORY = """
connections: {ssh: lab_ssh, gitlab: lab_gitlab}
qa: {project: gitlab-org/quality/gitlab-qa-runner, ref: main, timeout: 600, poll: 2}
environments:
  gstg:
    url: http://127.42.1.1:24210
    qa_cookie: null
    database: gstg
    canary_of: null
    alert_matchers: {env: gstg}
    load_balancers: [{name: fe-01-lb-gstg, admin: "127.42.1.1:24213"}]
    deploy_node: {name: deploy-01-sv-gstg, address: 127.42.10.1}
    roles:
      - {name: gitaly, stage: gitaly, batch: "10%", capacity_floor: "50%",
         restart: [gitaly], hup: [], hosts: [{name: gitaly-01-stor-gstg, address: 127.42.10.2}]}
      - name: web
        stage: fleet
        batch: "10%"
        capacity_floor: "60%"
        restart: [workhorse, nginx]
        hup: [puma]
        hosts:
          - {name: web-01-sv-gstg, address: 127.42.10.3}
          - {name: web-02-sv-gstg, address: 127.42.10.4}
      - {name: api, stage: fleet, batch: 2, hosts: [{name: api-01-sv-gstg, address: 127.42.10.5}]}
  gprd-cny:
    url: http://127.42.1.2:24211
    qa_cookie: gitlab_canary=true
    database: gprd
    canary_of: gprd
    alert_matchers: {env: gprd, stage: cny}
    load_balancers:
      - {name: fe-01-lb-gprd, admin: "127.42.1.2:24213"}
      - {name: fe-02-lb-gprd, host: 127.42.1.3, port: 24213}
    deploy_node: {name: deploy-cny-01-sv-gprd, address: 127.42.10.20}
    roles:
      - {name: web, stage: fleet, hosts: [{name: web-cny-01-sv-gprd, address: 127.42.10.21}]}
  gprd:
    url: https://gitlab.example.com
    alert_matchers: {env: gprd}
    deploy_node: {name: deploy-01-sv-gprd, address: deploy-01.example.com}
    roles:
      - {name: web, stage: fleet, hosts: [{name: web-01-sv-gprd, address: 127.42.10.30}]}
"""


@pytest.fixture()
def data():
    return yaml.safe_load(INVENTORY)


def test_loads_a_good_inventory(tmp_path, monkeypatch):
    path = tmp_path / "inventory.yml"
    path.write_text(INVENTORY)
    monkeypatch.setenv("LIFTOFF_INVENTORY", str(path))
    inv = load_inventory()
    assert inv.source == str(path)
    assert list(inv.environments) == ["gstg", "gprd-cny", "gprd"]
    assert inv.connections["ssh"] == "lab_ssh"
    assert inv.connections["alertmanager"] == DEFAULT_CONNECTIONS["alertmanager"]
    assert inv.conn_id("gitlab") == "lab_gitlab"
    assert inv.qa.project == "gitlab-org/quality/gitlab-qa-runner" and inv.qa.poll_s == 2.0
    gstg = inv.env("gstg")
    assert gstg.url == "http://127.42.1.1:24210"
    assert gstg.load_balancers == (LoadBalancerRef("fe-01-lb-gstg", "127.42.1.1", 24213),)
    assert gstg.load_balancers[0].admin == "127.42.1.1:24213"
    assert gstg.deploy_node.name == "deploy-01-sv-gstg"
    assert [r.name for r in gstg.roles] == ["gitaly", "web", "api"]
    assert gstg.stages() == ("gitaly", "fleet")
    assert [r.name for r in gstg.roles_in_stage("fleet")] == ["web", "api"]
    assert gstg.role("web").hup == ("puma",) and gstg.role("web").restart == ("workhorse", "nginx")
    assert [h.name for h in gstg.hosts()] == ["gitaly-01-stor-gstg", "web-01-sv-gstg", "web-02-sv-gstg",
                                              "api-01-sv-gstg"]
    assert gstg.host("deploy-01-sv-gstg").address == "127.42.10.1"
    assert gstg.role_of("web-02-sv-gstg").name == "web"
    assert not gstg.is_canary and gstg.qa_cookie is None
    cny = inv.env("gprd-cny")
    assert cny.is_canary and cny.canary_of == "gprd" and cny.database == "gprd"
    assert cny.qa_cookie == "gitlab_canary=true"
    assert cny.alert_matchers == {"env": "gprd", "stage": "cny"}
    assert cny.load_balancers[1].admin == "127.42.1.3:24213"
    gprd = inv.env("gprd")
    assert gprd.database == "gprd" and gprd.load_balancers == ()
    assert gprd.role("web").batch == "10%" and gprd.role("web").capacity_floor == "0%"


def test_unknown_environment_and_role_are_named(data):
    inv = parse_inventory(data)
    with pytest.raises(InventoryError, match="unknown environment 'gprd-xx'.*gstg, gprd-cny, gprd"):
        inv.env("gprd-xx")
    with pytest.raises(InventoryError, match="no role 'sidekiq'"):
        inv.env("gstg").role("sidekiq")
    with pytest.raises(InventoryError, match="no host 'nope'"):
        inv.env("gstg").host("nope")


def _role(n: int, batch="10%", floor="0%") -> Role:
    from liftoff.inventory import HostRef

    hosts = tuple(HostRef(f"h{i}", f"127.0.0.{i + 1}") for i in range(n))
    return Role("web", "fleet", batch, floor, (), (), hosts)


@pytest.mark.parametrize("n,batch,expected", [
    (1, "10%", 1), (9, "10%", 1), (10, "10%", 1), (20, "10%", 2), (25, "10%", 2), (100, "10%", 10),
    (5, "3", 3), (5, 10, 5), (4, "100%", 4), (3, "50%", 1),
])
def test_batch_size(n, batch, expected):
    assert _role(n, batch=str(batch)).batch_size() == expected


@pytest.mark.parametrize("n,floor,expected", [
    (1, "50%", 0), (2, "60%", 1), (3, "60%", 2), (10, "60%", 6), (10, "65%", 7), (10, "0%", 0),
    (10, "100%", 9), (5, "2", 2), (5, "9", 4), (100, "50%", 50),
])
def test_min_in_service(n, floor, expected):
    role = _role(n, floor=floor)
    assert role.min_in_service() == expected
    assert role.max_out_of_service() == n - expected


def _err(data, match):
    with pytest.raises(InventoryError, match=match):
        parse_inventory(data)


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d["environments"]["gstg"]["roles"][1].__setitem__("batch", "ten"),
     r"environments\.gstg\.roles\[1\]\.batch: expected a percentage"),
    (lambda d: d["environments"]["gstg"]["roles"][1].__setitem__("batch", "0%"),
     r"environments\.gstg\.roles\[1\]\.batch: must be more than 0"),
    (lambda d: d["environments"]["gstg"]["roles"][1].__setitem__("batch", "150%"),
     r"roles\[1\]\.batch: '150%' is more than 100%"),
    (lambda d: d["environments"]["gstg"]["roles"][0].__setitem__("capacity_floor", -1),
     r"roles\[0\]\.capacity_floor: must be at least 0"),
    (lambda d: d["environments"]["gstg"]["roles"][0].__setitem__("capacity_floor", True),
     r"roles\[0\]\.capacity_floor: expected a percentage"),
    (lambda d: d["environments"]["gstg"].pop("url"), r"environments\.gstg\.url: missing"),
    (lambda d: d["environments"]["gstg"].__setitem__("url", "ftp://x"),
     r"environments\.gstg\.url: expected an http"),
    (lambda d: d["environments"]["gstg"].__setitem__("url", "http://"), r"environments\.gstg\.url"),
    (lambda d: d["environments"]["gstg"].__setitem__("url", "http://a:99999"), r"gstg\.url: bad port"),
    (lambda d: d["environments"]["gstg"].pop("deploy_node"), r"environments\.gstg\.deploy_node: missing"),
    (lambda d: d["environments"]["gstg"]["deploy_node"].__setitem__("address", "a b"),
     r"environments\.gstg\.deploy_node\.address"),
    (lambda d: d["environments"]["gstg"]["roles"][1]["hosts"][1].__setitem__("name", "web;reboot"),
     r"environments\.gstg\.roles\[1\]\.hosts\[1\]\.name: host 'web;reboot' contains the shell metacharacter"),
    (lambda d: d["environments"]["gstg"]["roles"][1]["hosts"][1].__setitem__("name", "web-01-sv-gstg"),
     r"environments\.gstg\.roles: host 'web-01-sv-gstg' is listed twice"),
    (lambda d: d["environments"]["gstg"]["roles"][1].__setitem__("hosts", []),
     r"roles\[1\]\.hosts: must list at least one host"),
    (lambda d: d["environments"]["gstg"]["roles"][2].__setitem__("name", "web"),
     r"environments\.gstg\.roles: role 'web' is listed twice"),
    (lambda d: d["environments"]["gstg"]["roles"][1].pop("stage"), r"roles\[1\]\.stage: missing"),
    (lambda d: d["environments"]["gstg"]["roles"][1].__setitem__("batchsize", 3),
     r"environments\.gstg\.roles\[1\]\.batchsize: unknown field"),
    (lambda d: d["environments"]["gstg"]["roles"][1].__setitem__("hup", ["nginx"]),
     r"roles\[1\]\.hup: \['nginx'\] also listed under restart"),
    (lambda d: d["environments"]["gstg"]["roles"][1].__setitem__("restart", "nginx"),
     r"roles\[1\]\.restart: expected a list"),
    (lambda d: d["environments"]["gstg"]["roles"][1].__setitem__("restart", ["ng inx"]),
     r"roles\[1\]\.restart\[0\]: service 'ng inx' contains whitespace"),
    (lambda d: d["environments"]["gstg"].__setitem__("roles", []), r"environments\.gstg\.roles: must list"),
    (lambda d: d["environments"]["gstg"].__setitem__("alert_matchers", {}),
     r"environments\.gstg\.alert_matchers: must name at least one label"),
    (lambda d: d["environments"]["gstg"].__setitem__("alert_matchers", {"env": 'a"b'}),
     r"environments\.gstg\.alert_matchers\.env: expected a plain label value"),
    (lambda d: d["environments"]["gstg"].__setitem__("alert_matchers", {"1env": "x"}),
     r"environments\.gstg\.alert_matchers\.1env"),
    (lambda d: d["environments"]["gstg"]["load_balancers"][0].__setitem__("admin", "127.0.0.1"),
     r"environments\.gstg\.load_balancers\[0\]\.admin: expected 'host:port'"),
    (lambda d: d["environments"]["gstg"]["load_balancers"][0].__setitem__("admin", "127.0.0.1:0"),
     r"load_balancers\[0\]\.admin: port '0' is out of range"),
    (lambda d: d["environments"]["gstg"]["load_balancers"].append({"name": "fe-01-lb-gstg", "admin": "a:1"}),
     r"environments\.gstg\.load_balancers: load balancer 'fe-01-lb-gstg' is listed twice"),
    (lambda d: d["environments"]["gstg"].__setitem__("qa_cookie", "a=b; c=d"),
     r"environments\.gstg\.qa_cookie"),
    (lambda d: d["environments"]["gprd-cny"].__setitem__("canary_of", "gprd-xx"),
     r"environments\.gprd-cny\.canary_of: unknown environment 'gprd-xx'"),
    (lambda d: d["environments"]["gprd-cny"].__setitem__("canary_of", "gprd-cny"),
     r"canary_of: an environment cannot be the canary of itself"),
    (lambda d: d["environments"]["gprd"].__setitem__("canary_of", "gprd-cny"),
     r"environments\.gprd-cny\.canary_of: gprd is itself a canary|environments\.gprd\.canary_of"),
    (lambda d: d["environments"]["gprd"]["roles"][0]["hosts"][0].__setitem__("name", "web-01-sv-gstg"),
     r"host web-01-sv-gstg is also in gstg"),
    (lambda d: d["environments"].__setitem__("GSTG", d["environments"]["gprd"]), r"environments\.GSTG: env"),
    (lambda d: d.__setitem__("environments", {}), r"environments: must define at least one environment"),
    (lambda d: d.pop("environments"), r"environments: missing"),
    (lambda d: d.__setitem__("enviroments", {}), r"enviroments: unknown field"),
    (lambda d: d["connections"].__setitem__("ssh", "bad id"), r"connections\.ssh: conn id 'bad id'"),
    (lambda d: d["qa"].__setitem__("project", "../x"), r"qa\.project"),
    (lambda d: d["qa"].__setitem__("timeout", 0), r"qa\.timeout: expected a positive number"),
    (lambda d: d["environments"]["gstg"].__setitem__("roles", {"web": {}}),
     r"environments\.gstg\.roles: expected a list"),
])
def test_bad_fields_are_named(data, mutate, match):
    d = copy.deepcopy(data)
    mutate(d)
    _err(d, match)


def test_not_a_mapping():
    _err([1, 2], "inventory: expected a mapping")


def test_file_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("LIFTOFF_INVENTORY", raising=False)
    with pytest.raises(InventoryError, match="LIFTOFF_INVENTORY is not set"):
        load_inventory()
    with pytest.raises(InventoryError, match="cannot read inventory"):
        load_inventory(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("environments: {gstg: [\n")
    with pytest.raises(InventoryError, match="not valid YAML at line"):
        load_inventory(bad)


def test_extra_is_kept(data):
    data["environments"]["gstg"]["extra"] = {"canary_weight": 5}
    data["environments"]["gstg"]["roles"][1]["extra"] = {"backend": "web"}
    inv = parse_inventory(data)
    assert inv.env("gstg").extra == {"canary_weight": 5}
    assert inv.env("gstg").role("web").extra == {"backend": "web"}
