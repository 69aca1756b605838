"""liftoff.builds reads builds from apt repositories: the Packages parser, the public and the
internal repository over HttpHook (fake repositories on loopback), the cache, the errors."""

from __future__ import annotations

import json
import logging
import threading
from types import SimpleNamespace

import pytest
import yaml

from liftoff import builds
from liftoff.errors import LiftoffError
from tests.unit.apt_fakes import INDEX, FakeRepository, packages_index

N1 = "17.9.0+rnightly.100.1a2b3c4d-0"
N2 = "17.9.0+rnightly.101.5e6f7a8b-0"
OLD_FLAGGED = "17.8.1-rc1.ee.0"  # a nightly by its flag, in an older series
OFFICIAL = "17.8.0-ee.0"
AUTO = "17.10.202601011200-0123abcd.4567ef01"  # newest of all, not a nightly
SECRET = "17.8.2-ee.0"  # internal
SECRET_NIGHTLY = "17.11.0+rnightly.900.deadbee-0"  # internal, newer than every public nightly
LOGIN = ("liftoff", "s3cret-pass")
PUBLIC_ENTRIES = [
    {"version": N2, "nightly": True, "seq": 5},
    {"version": OFFICIAL, "sha": "0123456789abcdef", "includes_patches": ["p-1", "p-2"], "seq": 3},
    {"version": N1, "nightly": True, "seq": 4},
    {"version": OLD_FLAGGED, "nightly": True},
    {"version": AUTO},
    {"version": "not-a-version", "nightly": True},
    {"package": "gitlab-ce", "version": "99.0.0-ce.0", "nightly": True},
]
INTERNAL_ENTRIES = [{"version": SECRET, "sha": "fedcba9876543210", "includes_patches": ["sec-1"], "seq": 6},
                    {"version": SECRET_NIGHTLY, "nightly": True}]
RUN = SimpleNamespace(inventory=None)


def use(monkeypatch, conn_id: str, conn: dict | None) -> None:
    var = f"AIRFLOW_CONN_{conn_id.upper()}"
    if conn is None:
        monkeypatch.delenv(var, raising=False)
    else:
        monkeypatch.setenv(var, json.dumps(conn))


@pytest.fixture()
def repos(monkeypatch):
    """A public and an internal repository, the connections pointing at them (with credentials)."""
    public, internal = FakeRepository(PUBLIC_ENTRIES), FakeRepository(INTERNAL_ENTRIES, LOGIN)
    for name in ("LIFTOFF_INVENTORY", "LIFTOFF_CONNECTIONS"):
        monkeypatch.delenv(name, raising=False)
    use(monkeypatch, "liftoff_builds", public.conn())
    use(monkeypatch, "liftoff_builds_internal", internal.conn(*LOGIN))
    builds.clear_cache()
    yield SimpleNamespace(public=public, internal=internal)
    builds.clear_cache()
    public.close()
    internal.close()


# -- the parser ------------------------------------------------------------------------------

def test_the_parser_reads_stanzas_continuations_and_field_names_in_any_case():
    text = "Package: gitlab-ee\nversion:  1.0\nDescription: one\n two\n\tthree\n\n\n\nPACKAGE: b\nX-A: "
    assert builds.parse_packages(text) == [
        {"package": "gitlab-ee", "version": "1.0", "description": "one\ntwo\nthree"},
        {"package": "b", "x-a": ""}]
    assert builds.parse_packages("") == [] and builds.parse_packages("\n\n") == []


@pytest.mark.parametrize(("text", "why"), [
    (f"Package: gitlab-ee\nVersion {SECRET}\n", "line 2 is not a 'Field: value' line"),
    (f" {SECRET}\nPackage: gitlab-ee\n", "line 1 continues no field"),
    (f"Package: gitlab-ee\nVersion: 1\n\nPackage: gitlab-ee\nVersion: {SECRET}\nVersion: 2\n",
     "line 6 repeats a field of its stanza"),
    (": no name\n", "line 1 is not a 'Field: value' line"),
])
def test_a_malformed_index_is_one_line_naming_the_line_never_its_text(text, why):
    with pytest.raises(LiftoffError) as err:
        builds.parse_packages(text, "the Packages index of http://repo")
    assert str(err.value) == f"the Packages index of http://repo is malformed: {why}"
    assert SECRET not in str(err.value) and "\n" not in str(err.value)


def test_entries_are_the_gitlab_ee_stanzas_once_each_and_need_a_version():
    text = packages_index([{"version": N1, "nightly": True}, {"version": N1}, {"version": OFFICIAL,
                           "package": "gitaly"}])
    assert [e["version"] for e in builds.entries_of(text, False)] == [N1]
    with pytest.raises(LiftoffError, match=r"^the Packages index is malformed: gitlab-ee stanza 2 has no "
                                           r"Version$"):
        builds.entries_of("Package: gitaly\n\nPackage: gitlab-ee\nArchitecture: amd64\n", False)


# -- reading the repositories ----------------------------------------------------------------

def test_the_public_repository_lists_its_builds_with_liftoffs_fields(repos):
    entries = builds.read_repository(None)
    assert [e["version"] for e in entries] == [N2, OFFICIAL, N1, OLD_FLAGGED, AUTO, "not-a-version"]
    official = entries[1]
    assert official == {"version": OFFICIAL, "nightly": False, "internal": False,
                        "includes_patches": ["p-1", "p-2"], "sha": "0123456789abcdef", "schema_version": 3,
                        "size": 1234, "sha256": "ab" * 32,
                        "filename": f"pool/main/g/gitlab-ee/gitlab-ee_{OFFICIAL}_amd64.deb"}
    assert entries[0]["nightly"] is True and "sha" not in entries[0]
    [(path, headers)] = repos.public.requests
    assert path == INDEX and "suite" not in {h.lower() for h in headers}  # extra keys are not headers
    assert "Authorization" not in headers


def test_newest_nightly_and_resolve_version_keep_the_version_rules(repos):
    assert builds.newest_nightly(None) == N2  # not the last listed, not the internal newer one
    assert builds.resolve_version(RUN, None, scheduled=True) == N2
    assert builds.resolve_version(RUN, OFFICIAL, scheduled=False) == OFFICIAL
    with pytest.raises(LiftoffError, match="a manual run needs a version"):
        builds.resolve_version(RUN, None, scheduled=False)
    repos.public.index = packages_index([{"version": OFFICIAL}])
    builds.clear_cache()
    with pytest.raises(LiftoffError, match="^the build repository liftoff_builds lists no nightly build$"):
        builds.newest_nightly(None)


def test_the_internal_repository_needs_the_connections_credentials(repos, monkeypatch):
    use(monkeypatch, "liftoff_builds_internal", repos.internal.conn())
    with pytest.raises(LiftoffError) as err:
        builds.read_repository(None, internal=True)
    assert str(err.value) == (f"the build repository {repos.internal.url} needs credentials: set the login "
                              "and password of the Airflow connection liftoff_builds_internal (HTTP 401)")
    use(monkeypatch, "liftoff_builds_internal", repos.internal.conn("liftoff", "wrong"))
    with pytest.raises(LiftoffError, match="refused the credentials of the Airflow connection "
                                           "liftoff_builds_internal"):
        builds.read_repository(None, internal=True)
    public = [e["version"] for e in builds.read_repository(None)]
    assert [e["version"] for e in builds.list_builds(None)] == public  # the public builds still known


def test_internal_builds_are_marked_and_never_the_newest(repos):
    listed = builds.list_builds(None)
    assert [(e["version"], e["internal"]) for e in listed[-2:]] == [(SECRET, True), (SECRET_NIGHTLY, True)]
    info = builds.build_info(None, SECRET)
    assert info["internal"] is True and info["sha"] == "fedcba9876543210" and info["schema_version"] == 6
    assert builds.included_patches(None, SECRET) == ("sec-1",)
    assert builds.build_sha(SECRET, inventory=SimpleNamespace(connections={})) == "fedcba9876543210"
    assert builds.build_info(None, OFFICIAL)["internal"] is False
    assert builds.newest_build(listed) == AUTO and builds.newest_nightly(None) == N2
    assert builds.build_info(None, "17.0.0-ee.0") == {}


def test_without_an_internal_connection_internal_builds_are_not_known(repos, monkeypatch):
    use(monkeypatch, "liftoff_builds_internal", None)
    assert all(not e["internal"] for e in builds.list_builds(None))
    assert builds.build_info(None, SECRET) == {}
    assert repos.internal.requests == []


def test_the_inventory_names_the_connections(repos, monkeypatch):
    use(monkeypatch, "liftoff_builds", None)
    use(monkeypatch, "other_builds", repos.public.conn())
    inventory = SimpleNamespace(connections={"builds": "other_builds"})
    assert builds.newest_nightly(inventory) == N2
    with pytest.raises(LiftoffError, match="liftoff_builds"):
        builds.newest_nightly(None)


def test_one_fetch_per_repository_within_a_few_seconds(repos, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(builds, "_clock", lambda: now[0])
    builds.newest_nightly(None)
    builds.included_patches(None, OFFICIAL)
    builds.build_info(None, SECRET)
    builds.list_builds(None)
    assert (len(repos.public.requests), len(repos.internal.requests)) == (1, 1)
    now[0] += builds.CACHE_S - 0.5
    builds.list_builds(None)
    assert (len(repos.public.requests), len(repos.internal.requests)) == (1, 1)
    now[0] += 1
    builds.list_builds(None)
    assert (len(repos.public.requests), len(repos.internal.requests)) == (2, 2)
    use(monkeypatch, "liftoff_builds", repos.public.conn(timeout=5))  # another connection: read again
    builds.newest_nightly(None)
    assert len(repos.public.requests) == 3


def test_a_build_published_after_the_cached_read_is_found_at_once(repos, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(builds, "_clock", lambda: now[0])
    fresh = "17.9.1-ee.0"
    assert builds.build_info(None, OFFICIAL)["sha"] == "0123456789abcdef"
    repos.public.index = packages_index([*PUBLIC_ENTRIES, {"version": fresh, "includes_patches": ["p-9"]}])
    assert builds.included_patches(None, fresh) == ("p-9",)  # within CACHE_S: read again on a miss
    assert builds.build_info(None, "17.9.2-ee.0") == {}
    assert builds.included_patches(None, OFFICIAL) == ("p-1", "p-2")  # a hit: no request
    assert len(repos.public.requests) == 3  # the first read, then one per miss


def test_a_malformed_or_missing_index_fails_in_one_sentence(repos, monkeypatch, caplog):
    repos.public.index = f"Package: gitlab-ee\nVersion {N1}\n"
    with pytest.raises(LiftoffError) as err:
        builds.newest_nightly(None)
    assert str(err.value) == (f"the Packages index of {repos.public.url}{INDEX} is malformed: line 2 is "
                              "not a 'Field: value' line")
    with caplog.at_level(logging.WARNING, logger="liftoff.builds"):
        assert builds.build_info(None, N1) == {}
    assert "build source unavailable: the Packages index of" in caplog.text
    use(monkeypatch, "liftoff_builds", repos.public.conn() | {"extra": {"suite": "noble"}})
    with pytest.raises(LiftoffError, match=rf"answered HTTP 404 for {repos.public.url}/dists/noble/"):
        builds.list_builds(None)


def test_an_unreachable_or_slow_repository_fails_within_the_connections_timeout(repos, monkeypatch):
    repos.public.hold = threading.Event()
    use(monkeypatch, "liftoff_builds", repos.public.conn(timeout=0.3))
    with pytest.raises(LiftoffError, match=r"^the build repository liftoff_builds is unreachable "
                                           r"\(ReadTimeout\)$"):
        builds.list_builds(None)
    use(monkeypatch, "liftoff_builds", {"conn_type": "http", "host": "http://127.0.0.1:9"})
    with pytest.raises(LiftoffError, match=r"unreachable \(ConnectionError\)$"):
        builds.newest_nightly(None)
    assert builds.build_info(None, N1) == {}
    assert builds.build_sha(N1, inventory=SimpleNamespace()) == "1a2b3c4d"  # from the version


def test_an_internal_version_is_never_logged(repos, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    builds.build_info(None, SECRET)
    repos.internal.index = f"Package: gitlab-ee\nVersion {SECRET}\n"
    builds.clear_cache()
    assert builds.build_info(None, SECRET) == {}
    use(monkeypatch, "liftoff_builds_internal", repos.internal.conn())
    builds.list_builds(None)
    assert "internal builds are not known" in caplog.text
    assert SECRET not in caplog.text and SECRET_NIGHTLY not in caplog.text


def test_connections_from_the_liftoff_connections_file(repos, monkeypatch, tmp_path):
    """The distributed set-up gives liftoff its connections in a LIFTOFF_CONNECTIONS file."""
    file = tmp_path / "connections.yaml"
    file.write_text(yaml.safe_dump({"liftoff_builds": repos.public.conn(),
                                    "liftoff_builds_internal": repos.internal.conn(*LOGIN)}))
    use(monkeypatch, "liftoff_builds", None)
    use(monkeypatch, "liftoff_builds_internal", None)
    monkeypatch.setenv("LIFTOFF_CONNECTIONS", str(file))
    assert builds.newest_nightly(None) == N2
    assert builds.build_info(None, SECRET)["internal"] is True
