"""The lab's two apt repositories of ``gitlab-ee``, made from labd's builds on every request and
served by labd's control API (``http://control_addr:control_port/apt/<repo>/``):

* ``/apt/public/``: every build that is not internal (released and nightly packages);
* ``/apt/internal/``: internal (undisclosed security) builds only, behind HTTP Basic
  credentials (``secrets/apt.json``, made on first use, mode 0600): 401 without them.

Each is a Debian repository with one suite and component, as a host's sources list names it
(``deb URI jammy main``)::

    dists/jammy/Release                          Suite, Components, Architectures, SHA256 of the index
    dists/jammy/main/binary-amd64/Packages       one stanza per build, oldest first
    pool/main/g/gitlab-ee/gitlab-ee_<V>_amd64.deb  a small stand-in package (its Size and SHA256)

A stanza has apt's fields (``Package``, ``Version``, ``Architecture``, ``Filename``, ``Size``,
``SHA256``, ...) and liftoff's own ``X-Liftoff-*`` fields, which apt ignores:
``X-Liftoff-Nightly`` (``yes``/``no``), ``X-Liftoff-Sha`` (the application commit, when the
build names one), ``X-Liftoff-Includes-Patches`` (comma-separated post-deployment patch ids,
when any) and ``X-Liftoff-Schema-Version`` (the build's ``seq``: its migrations' number).

Only the lab uses this (it does not import liftoff).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from aiohttp import web

from lab.config import LabConfig
from lab.model import Build, World
from lab.repository import build_sha

PACKAGE = "gitlab-ee"
SUITE = "jammy"
COMPONENT = "main"
ARCH = "amd64"
REPOS = ("public", "internal")
LOGIN = "liftoff"
REALM = "gitlab-ee internal packages"
INDEX = f"dists/{SUITE}/{COMPONENT}/binary-{ARCH}/Packages"
RELEASE = f"dists/{SUITE}/Release"
POOL = f"pool/{COMPONENT}/{PACKAGE[0]}/{PACKAGE}"


# -- credentials of the internal repository ---------------------------------------------------
def credentials_file(config: LabConfig) -> Path:
    return config.path("secrets", "apt.json")


def ensure_credentials(config: LabConfig) -> dict[str, str]:
    """``{"login", "password"}`` of the internal repository, made (0600) on first use; a
    concurrent first use never replaces a file another process wrote."""
    file = credentials_file(config)
    if not file.exists():
        file.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(file.parent, 0o700)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"login": LOGIN, "password": secrets.token_urlsafe(18)}, f, indent=1)
        try:
            os.link(tmp, file)  # fails when the file appeared meanwhile: keep that one
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return json.loads(file.read_text())


def repo_url(config: LabConfig, repo: str) -> str:
    return f"http://{config.control_addr}:{config.control_port}/apt/{repo}"


# -- the repository's files ------------------------------------------------------------------
def repo_builds(builds: Iterable[Build], repo: str) -> list[Build]:
    """The builds ``repo`` publishes (internal ones in ``internal`` only), oldest first."""
    internal = repo == "internal"
    return sorted((b for b in builds if bool(getattr(b, "internal", False)) == internal), key=lambda b: b.seq)


def package_file(version: str) -> str:
    return f"{POOL}/{PACKAGE}_{version}_{ARCH}.deb"


def package_bytes(version: str) -> bytes:
    """The stand-in ``.deb``: small, and the same bytes for the same version."""
    return f"!<arch>\nlab stand-in for {PACKAGE} {version}\n".encode()


def stanza(build: Build) -> str:
    data = package_bytes(build.version)
    fields = [
        ("Package", PACKAGE), ("Version", build.version), ("Architecture", ARCH),
        ("Maintainer", "GitLab, Inc. <support@gitlab.com>"), ("Priority", "optional"),
        ("Section", "misc"), ("Filename", package_file(build.version)), ("Size", str(len(data))),
        ("SHA256", hashlib.sha256(data).hexdigest()),
        ("Description", "GitLab Enterprise Edition (including NGINX, Postgres, Redis)\n"
                        " The lab's stand-in Omnibus package."),
        ("X-Liftoff-Nightly", "yes" if build.nightly else "no"),
    ]
    sha = build_sha(build)
    if sha:
        fields.append(("X-Liftoff-Sha", sha))
    if build.includes_patches:
        fields.append(("X-Liftoff-Includes-Patches", ", ".join(build.includes_patches)))
    fields.append(("X-Liftoff-Schema-Version", str(build.seq)))
    return "".join(f"{name}: {value}\n" for name, value in fields)


def packages_index(builds: Iterable[Build], repo: str) -> str:
    """The ``Packages`` index of ``repo``: stanzas separated by blank lines."""
    return "\n".join(stanza(b) for b in repo_builds(builds, repo))


def release_file(index: bytes, repo: str) -> str:
    digest = hashlib.sha256(index).hexdigest()
    return (f"Origin: lab\nLabel: {PACKAGE} {repo}\nSuite: {SUITE}\nCodename: {SUITE}\n"
            f"Architectures: {ARCH}\nComponents: {COMPONENT}\n"
            f"SHA256:\n {digest} {len(index)} {COMPONENT}/binary-{ARCH}/Packages\n")


def repo_file(builds: Iterable[Build], repo: str, path: str) -> bytes | None:
    """The bytes of ``path`` in ``repo``, None when it has no such file."""
    builds = list(builds)
    index = packages_index(builds, repo).encode()
    if path == INDEX:
        return index
    if path == RELEASE:
        return release_file(index, repo).encode()
    for build in repo_builds(builds, repo):
        if path == package_file(build.version):
            return package_bytes(build.version)
    return None


# -- HTTP ------------------------------------------------------------------------------------
def authorized(header: str | None, credentials: dict[str, str]) -> bool:
    """Whether an ``Authorization`` header carries the internal repository's credentials."""
    expected = f"{credentials['login']}:{credentials['password']}".encode()
    scheme, _, value = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        given = base64.b64decode(value.strip(), validate=True)
    except ValueError:
        return False
    return hmac.compare_digest(given, expected)


def add_routes(app: web.Application, world: World) -> None:
    """Serve both repositories at ``/apt/<repo>/<path>`` (GET and HEAD)."""
    credentials = ensure_credentials(world.config)

    async def serve(request: web.Request) -> web.Response:
        repo, path = request.match_info["repo"], request.match_info["path"]
        if repo not in REPOS:
            return web.Response(status=404, text=f"no repository {repo!r} (one of {', '.join(REPOS)})\n")
        if repo == "internal" and not authorized(request.headers.get("Authorization"), credentials):
            return web.Response(status=401, text="401 Unauthorized\n",
                                headers={"WWW-Authenticate": f'Basic realm="{REALM}"'})
        body = repo_file(world.builds.values(), repo, path)
        if body is None:
            return web.Response(status=404, text="404 Not Found\n")
        kind = "application/vnd.debian.binary-package" if path.endswith(".deb") else "text/plain"
        return web.Response(body=body, content_type=kind)

    app.router.add_get("/apt/{repo}/{path:.+}", serve)
