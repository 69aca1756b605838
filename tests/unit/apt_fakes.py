"""A fake apt repository for the unit tests: a ``Packages`` index made from build entries,
served on loopback, optionally behind HTTP Basic credentials."""

from __future__ import annotations

import base64
import threading

from tests.unit.http_fakes import LocalServer, QuietHandler

SUITE = "stable"
INDEX = f"/dists/{SUITE}/main/binary-amd64/Packages"


def stanza(entry: dict) -> str:
    """One ``gitlab-ee`` stanza with liftoff's ``X-Liftoff-*`` fields from a build entry."""
    lines = [f"Package: {entry.get('package', 'gitlab-ee')}", f"Version: {entry['version']}",
             "Architecture: amd64", f"Filename: pool/main/g/gitlab-ee/gitlab-ee_{entry['version']}_amd64.deb",
             "Size: 1234", "SHA256: " + "ab" * 32, "Description: GitLab EE", " a second line",
             f"X-Liftoff-Nightly: {'yes' if entry.get('nightly') else 'no'}"]
    if entry.get("sha"):
        lines.append(f"X-Liftoff-Sha: {entry['sha']}")
    if entry.get("includes_patches"):
        lines.append("X-Liftoff-Includes-Patches: " + ", ".join(entry["includes_patches"]))
    if "seq" in entry:
        lines.append(f"X-Liftoff-Schema-Version: {entry['seq']}")
    return "".join(f"{line}\n" for line in lines)


def packages_index(entries: list[dict]) -> str:
    return "\n".join(stanza(e) for e in entries)


class FakeRepository:
    """Serves ``index`` (text; ``entries`` as an index by default) at ``/dists/stable/main/
    binary-amd64/Packages``; 401 without ``credentials`` when given. Records every request's
    (path, headers); ``hold`` (an Event, set at close) makes it wait before answering."""

    def __init__(self, entries: list[dict] | None = None, credentials: tuple[str, str] | None = None):
        self.index = packages_index(entries or [])
        self.credentials = credentials
        self.requests: list[tuple[str, dict]] = []
        self.hold: threading.Event | None = None
        fake = self

        class Handler(QuietHandler):
            def do_GET(self):  # noqa: N802
                fake.requests.append((self.path, dict(self.headers)))
                if fake.hold is not None:
                    fake.hold.wait(10)
                if not fake.allowed(self.headers.get("Authorization")):
                    self.reply(401, b"401 Unauthorized\n", "text/plain")
                elif self.path != INDEX:
                    self.reply(404, b"404 Not Found\n", "text/plain")
                else:
                    self.reply(200, fake.index.encode(), "text/plain")

        self._http = LocalServer(Handler)
        self.url = self._http.url

    def allowed(self, header: str | None) -> bool:
        if self.credentials is None:
            return True
        token = base64.b64encode(":".join(self.credentials).encode()).decode()
        return header == f"Basic {token}"

    def conn(self, login: str | None = None, password: str | None = None, **extra) -> dict:
        """An Airflow connection (JSON form) to this repository."""
        return {"conn_type": "http", "host": self.url, "login": login, "password": password,
                "extra": {"suite": SUITE, **extra}}

    def close(self):
        if self.hold is not None:
            self.hold.set()
        self._http.close()
