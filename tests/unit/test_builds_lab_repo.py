"""The lab's apt repositories (lab.apt_repo) without a running lab: what each publishes, read
back with liftoff's own parser; the internal one's credentials."""

from __future__ import annotations

import base64
import hashlib
import os
import stat

from lab import apt_repo
from lab.config import LabConfig
from lab.model import Build
from liftoff import builds

BUILDS = [
    Build("17.8.0-ee.0", 1, includes_patches=["p-1", "p-2"], sha="0123abcd"),
    Build("17.8.1-ee.0", 2, internal=True, sha="fedc4321"),
    Build("17.9.0+rnightly.7.1a2b3c4d-0", 3, nightly=True),
]


def basic(login: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()


def test_each_repository_publishes_its_builds_as_liftoff_reads_them():
    public = builds.entries_of(apt_repo.packages_index(reversed(BUILDS), "public"), internal=False)
    assert [(e["version"], e["nightly"], e.get("sha"), e["schema_version"]) for e in public] == [
        ("17.8.0-ee.0", False, "0123abcd", 1), ("17.9.0+rnightly.7.1a2b3c4d-0", True, "1a2b3c4d", 3)]
    assert public[0]["includes_patches"] == ["p-1", "p-2"] and public[1]["includes_patches"] == []
    internal = apt_repo.packages_index(BUILDS, "internal")
    assert [e["version"] for e in builds.entries_of(internal, internal=True)] == ["17.8.1-ee.0"]
    assert "17.8.1-ee.0" not in apt_repo.packages_index(BUILDS, "public")


def test_the_release_file_and_the_pool_match_the_index():
    index = apt_repo.repo_file(BUILDS, "public", apt_repo.INDEX)
    release = apt_repo.repo_file(BUILDS, "public", apt_repo.RELEASE).decode()
    assert f" {hashlib.sha256(index).hexdigest()} {len(index)} main/binary-amd64/Packages\n" in release
    [first, _] = builds.entries_of(index.decode(), internal=False)
    deb = apt_repo.repo_file(BUILDS, "public", first["filename"])
    assert (len(deb), hashlib.sha256(deb).hexdigest()) == (first["size"], first["sha256"])
    assert apt_repo.repo_file(BUILDS, "public", apt_repo.package_file("17.8.1-ee.0")) is None
    assert apt_repo.repo_file(BUILDS, "internal", apt_repo.package_file("17.8.1-ee.0")) is not None
    assert apt_repo.repo_file(BUILDS, "public", "dists/noble/Release") is None


def test_credentials_are_made_once_private_and_checked(tmp_path):
    config = LabConfig(lab_dir=tmp_path / "lab", octet=63)
    made = apt_repo.ensure_credentials(config)
    assert apt_repo.ensure_credentials(config) == made and made["login"] == apt_repo.LOGIN
    assert stat.S_IMODE(os.stat(apt_repo.credentials_file(config)).st_mode) == 0o600
    assert [p.name for p in apt_repo.credentials_file(config).parent.iterdir()] == ["apt.json"]
    assert apt_repo.authorized(basic(made["login"], made["password"]), made)
    for header in (None, "", basic(made["login"], "wrong"), "Bearer x", "Basic !!notbase64", "Basic"):
        assert not apt_repo.authorized(header, made), header
