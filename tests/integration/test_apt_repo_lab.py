"""The build source is a real apt repository, against a lab of its own (octet 63): labd serves
a public repository of the lab's public builds and an internal one of its internal builds
(HTTP Basic, the credentials in the lab's ``liftoff_builds_internal`` connection); liftoff reads
them through those connections: the newest nightly, a build's fields, an internal build marked
internal and never in the public index."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from lab import processes
from lab.model import BASE_VERSION
from liftoff import builds
from liftoff.errors import LiftoffError
from liftoff.inventory import load_inventory
from tests.labkit import Lab, running_lab

pytestmark = pytest.mark.lab

OCTET = 63
OLDER = "17.9.0+rnightly.5101.0a1b2c3d-0"
NEWEST = "17.9.0+rnightly.5102.4e5f6a7b-0"
OFFICIAL = "17.8.0-ee.0"
OFFICIAL_SHA = "89abcdef0123"
SECRET = "17.8.1-ee.0"  # internal: an undisclosed security build
SECRET_SHA = "fedcba987654"
SECRET_NIGHTLY = "17.10.0+rnightly.9999.deadbeef-0"  # internal, newer than every public nightly
INDEX = "dists/jammy/main/binary-amd64/Packages"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("apt-lab"), OCTET, "--install-seconds", "0.2") as lab:
        lab.build_add(OFFICIAL, sha=OFFICIAL_SHA, includes_patches=["p-7", "p-8"])
        lab.build_add(OLDER, nightly=True)
        lab.build_add(SECRET, internal=True, sha=SECRET_SHA, includes_patches=["sec-1"])
        lab.build_add(NEWEST, nightly=True)
        lab.build_add(SECRET_NIGHTLY, internal=True, nightly=True)
        yield lab


@pytest.fixture
def lab_env(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Lab:
    for name, value in lab.env.items():
        monkeypatch.setenv(name, value)
    builds.clear_cache()
    yield lab
    builds.clear_cache()


def conn(lab: Lab, name: str) -> dict:
    return json.loads(lab.env[f"AIRFLOW_CONN_{name}"])


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes, dict]:
    headers = {}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_the_public_index_lists_the_labs_public_builds(lab: Lab) -> None:
    base = conn(lab, "LIFTOFF_BUILDS")["host"]
    code, body, _ = get(f"{base}/{INDEX}")
    assert code == 200
    stanzas = builds.parse_packages(body.decode())
    catalog = processes.control(lab.config, "GET", "/builds")
    public = [b["version"] for b in catalog if not b["internal"]]
    assert [s["version"] for s in stanzas] == public == [BASE_VERSION, OFFICIAL, OLDER, NEWEST]
    assert SECRET.encode() not in body and SECRET_NIGHTLY.encode() not in body
    official = stanzas[1]
    assert (official["package"], official["architecture"]) == ("gitlab-ee", "amd64")
    assert (official["x-liftoff-nightly"], official["x-liftoff-sha"]) == ("no", OFFICIAL_SHA)
    assert official["x-liftoff-includes-patches"] == "p-7, p-8"
    assert official["x-liftoff-schema-version"] == "2"
    nightly = stanzas[3]
    assert nightly["x-liftoff-nightly"] == "yes" and nightly["x-liftoff-sha"] == "4e5f6a7b"  # the version's
    code, deb, _ = get(f"{base}/{official['filename']}")
    assert code == 200 and len(deb) == int(official["size"])
    assert hashlib.sha256(deb).hexdigest() == official["sha256"]
    code, release, _ = get(f"{base}/dists/jammy/Release")
    assert code == 200 and f" {hashlib.sha256(body).hexdigest()} {len(body)} main/binary-amd64/Packages" \
        in release.decode()
    assert get(f"{base}/pool/main/g/gitlab-ee/gitlab-ee_{SECRET}_amd64.deb")[0] == 404


def test_the_internal_repository_refuses_anonymous_reads(lab: Lab) -> None:
    internal = conn(lab, "LIFTOFF_BUILDS_INTERNAL")
    url = f"{internal['host']}/{INDEX}"
    code, _, headers = get(url)
    assert code == 401 and headers["WWW-Authenticate"].startswith("Basic realm=")
    assert get(url, (internal["login"], "not-the-password"))[0] == 401
    code, body, _ = get(url, (internal["login"], internal["password"]))
    assert code == 200
    assert [s["version"] for s in builds.parse_packages(body.decode())] == [SECRET, SECRET_NIGHTLY]
    assert internal["password"] in (lab.config.path("secrets", "apt.json")).read_text()


def test_liftoff_reads_both_repositories_through_the_connections(lab_env: Lab) -> None:
    inventory = load_inventory()
    assert inventory.connections["builds_internal"] == "liftoff_builds_internal"
    assert builds.newest_nightly(inventory) == NEWEST  # not the newer internal nightly
    assert builds.resolve_version(SimpleNamespace(inventory=inventory), None, scheduled=True) == NEWEST
    info = builds.build_info(inventory, OFFICIAL)
    assert (info["internal"], info["sha"], info["schema_version"]) == (False, OFFICIAL_SHA, 2)
    assert builds.included_patches(inventory, OFFICIAL) == ("p-7", "p-8")
    secret = builds.build_info(inventory, SECRET)
    assert secret["internal"] is True and builds.included_patches(inventory, SECRET) == ("sec-1",)
    assert builds.build_sha(SECRET, inventory=inventory) == SECRET_SHA
    listed = builds.list_builds(inventory)
    assert [b["version"] for b in listed if b["internal"]] == [SECRET, SECRET_NIGHTLY]
    assert builds.newest_build(listed) == NEWEST
    assert SECRET not in [b["version"] for b in builds.read_repository(inventory)]


def test_without_the_credentials_liftoff_says_which_connection(lab_env: Lab, monkeypatch) -> None:
    internal = conn(lab_env, "LIFTOFF_BUILDS_INTERNAL")
    anonymous = {k: v for k, v in internal.items() if k not in ("login", "password")}
    monkeypatch.setenv("AIRFLOW_CONN_LIFTOFF_BUILDS_INTERNAL", json.dumps(anonymous))
    with pytest.raises(LiftoffError) as err:
        builds.read_repository(None, internal=True)
    assert str(err.value) == (f"the build repository {internal['host']} needs credentials: set the login and "
                              "password of the Airflow connection liftoff_builds_internal (HTTP 401)")
    assert builds.build_info(None, SECRET) == {} and builds.newest_nightly(None) == NEWEST


def test_a_host_installs_only_what_its_sources_list(lab: Lab) -> None:
    host = lab.topology.env_hosts("gstg", "web")[0].name
    r = lab.ssh(host, "sudo apt-get install -y gitlab-ee=17.0.0-ee.0")
    assert r.returncode == 100 and "E: Version '17.0.0-ee.0' for 'gitlab-ee' was not found" in r.stderr
