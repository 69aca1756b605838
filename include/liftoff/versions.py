"""Omnibus package versions and validated names and reasons (the command lines built from
them are in :mod:`liftoff.commands`).

Only the four version formats GitLab.com deploys are accepted (see ``parse_version``);
anything else raises :class:`InvalidVersion` before a command is built.

Order of versions (``<``): by ``major.minor``; within one series the development builds
come first (nightlies by pipeline id, then auto-deploy builds by timestamp), then release
candidates and official releases by patch level (``16.3.0-rc42.ee.0 < 16.3.0-ee.0 <
16.3.1-rc1.ee.0 < 16.3.1-ee.0``), then the package revision.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from functools import total_ordering

from liftoff.errors import InvalidInput, InvalidVersion

MAX_VERSION_LENGTH = 100
PACKAGE = "gitlab-ee"

KINDS = ("nightly", "auto_deploy", "rc", "official")
_RANK = {kind: i for i, kind in enumerate(KINDS)}

_N = r"(0|[1-9][0-9]{0,5})"  # a version number: no leading zeros, at most 6 digits
_PATTERNS = {
    "official": re.compile(rf"^{_N}\.{_N}\.{_N}-ee\.{_N}$"),
    "rc": re.compile(rf"^{_N}\.{_N}\.{_N}-rc([1-9][0-9]{{0,3}})\.ee\.{_N}$"),
    "nightly": re.compile(rf"^{_N}\.{_N}\.{_N}\+rnightly\.([1-9][0-9]{{0,11}})\.([0-9a-f]{{7,40}})-{_N}$"),
    "auto_deploy": re.compile(rf"^{_N}\.{_N}\.([0-9]{{12}})-([0-9a-f]{{7,40}})\.([0-9a-f]{{7,40}})$"),
}
EXAMPLES = (
    "16.3.0-ee.0",
    "16.3.0-rc42.ee.0",
    "16.3.0+rnightly.308853.0ab19c4f-0",
    "16.3.202311291200-13bd0cc7c2a.3f6b8fe0f4d",
)


@total_ordering
@dataclass(frozen=True, eq=False)
class PackageVersion:
    """One validated Omnibus package version; ``str()`` gives the exact text."""

    text: str
    kind: str
    major: int
    minor: int
    patch: int = 0
    rc: int = 0
    revision: int = 0
    pipeline_id: int = 0
    timestamp: datetime | None = None
    shas: tuple[str, ...] = ()
    _key: tuple = field(default=(), repr=False)

    def __str__(self) -> str:
        return self.text

    @property
    def series(self) -> str:
        """The milestone, ``16.3``."""
        return f"{self.major}.{self.minor}"

    @property
    def is_prerelease(self) -> bool:
        return self.kind != "official"

    @property
    def package(self) -> str:
        """The apt package spec: ``gitlab-ee=16.3.0-ee.0``."""
        return f"{PACKAGE}={self.text}"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackageVersion):
            return self.text == other.text
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.text)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, PackageVersion):
            return NotImplemented
        return self._key < other._key


def parse_version(value: object) -> PackageVersion:
    """Parse an official, RC, nightly or auto-deploy package version, or raise InvalidVersion."""
    if isinstance(value, PackageVersion):
        return value
    if not isinstance(value, str):
        raise InvalidVersion(f"package version must be text, got {type(value).__name__}")
    if not value:
        raise InvalidVersion("package version is empty")
    if len(value) > MAX_VERSION_LENGTH:
        raise InvalidVersion(f"package version is too long ({len(value)} > {MAX_VERSION_LENGTH} characters)")
    bad = _first_bad_char(value, allowed=".-+" + "abcdefghijklmnopqrstuvwxyz0123456789")
    if bad is not None:
        raise InvalidVersion(
            f"package version {value!r} contains {_describe(bad)}; expected e.g. {EXAMPLES[0]}")
    for kind, pattern in _PATTERNS.items():
        m = pattern.match(value)
        if m:
            return _build(kind, value, m.groups())
    raise InvalidVersion(
        f"{value!r} is not an Omnibus package version; expected one of: official {EXAMPLES[0]}, "
        f"rc {EXAMPLES[1]}, nightly {EXAMPLES[2]}, auto-deploy {EXAMPLES[3]}"
    )


def _build(kind: str, text: str, g: tuple[str, ...]) -> PackageVersion:
    major, minor = int(g[0]), int(g[1])
    if kind == "official":
        patch, revision = int(g[2]), int(g[3])
        return PackageVersion(text, kind, major, minor, patch, revision=revision,
                              _key=(major, minor, 1, patch, 1, 0, revision, text))
    if kind == "rc":
        patch, rc, revision = int(g[2]), int(g[3]), int(g[4])
        return PackageVersion(text, kind, major, minor, patch, rc=rc, revision=revision,
                              _key=(major, minor, 1, patch, 0, rc, revision, text))
    if kind == "nightly":
        patch, pipeline, sha, revision = int(g[2]), int(g[3]), g[4], int(g[5])
        key = (major, minor, 0, _RANK[kind], pipeline, patch, revision, text)
        return PackageVersion(text, kind, major, minor, patch, revision=revision, pipeline_id=pipeline,
                              shas=(sha,), _key=key)
    stamp = g[2]
    try:
        when = datetime.strptime(stamp, "%Y%m%d%H%M")
    except ValueError:
        raise InvalidVersion(f"auto-deploy version {text!r} has an impossible timestamp {stamp}") from None
    return PackageVersion(text, kind, major, minor, timestamp=when, shas=(g[3], g[4]),
                          _key=(major, minor, 0, _RANK[kind], int(stamp), 0, 0, text))


def commit_sha(version: object) -> str | None:
    """The application commit a nightly or auto-deploy version names (its first SHA), else None."""
    try:
        v = parse_version(version)
    except InvalidVersion:
        return None
    return v.shas[0] if v.shas else None


def is_version(value: object) -> bool:
    try:
        parse_version(value)
    except InvalidVersion:
        return False
    return True


# -- names and free text -----------------------------------------------------------------

SHELL_METACHARACTERS = set(";&|`$<>\\'\"*?!{}[]()~#^")
_CONTROL = {chr(c) for c in range(32)} | {chr(127)}

# kind -> (pattern, max length, extra characters allowed besides letters and digits)
_NAME_RULES: dict[str, tuple[str, int]] = {
    "env": (r"[a-z0-9][a-z0-9-]*", 32),
    "role": (r"[a-z0-9][a-z0-9_-]*", 64),
    "stage": (r"[a-z0-9][a-z0-9_-]*", 64),
    "service": (r"[a-z0-9][a-z0-9_-]*", 64),
    "host": (r"[A-Za-z0-9][A-Za-z0-9._-]*", 253),
    "lb": (r"[A-Za-z0-9][A-Za-z0-9._-]*", 253),
    "backend": (r"[A-Za-z0-9][A-Za-z0-9._-]*", 128),
    "server": (r"[A-Za-z0-9][A-Za-z0-9._-]*", 128),
    "database": (r"[A-Za-z0-9][A-Za-z0-9_-]*", 63),
    "patch": (r"[A-Za-z0-9][A-Za-z0-9._-]*", 128),
    "rollout": (r"[A-Za-z0-9][A-Za-z0-9._:+@~-]*", 250),
    "run_id": (r"[A-Za-z0-9][A-Za-z0-9._:+@~-]*", 250),  # Airflow's run-id alphabet
    "who": (r"[A-Za-z0-9][A-Za-z0-9._@+-]*", 128),
    "conn_id": (r"[A-Za-z0-9][A-Za-z0-9._-]*", 250),
    "label": (r"[a-zA-Z_][a-zA-Z0-9_]*", 128),
    "name": (r"[A-Za-z0-9][A-Za-z0-9._-]*", 128),
}
MAX_REASON_LENGTH = 500
_REASON_RE = re.compile(r"^[A-Za-z0-9 .,:_/@+=%-]+$")


def _first_bad_char(value: str, allowed: str) -> str | None:
    for ch in value:
        if not (ch.isascii() and (ch.isalnum() or ch in allowed)):
            return ch
    return None


def _describe(ch: str) -> str:
    if ch in _CONTROL:
        return f"a control character ({ch!r})"
    if ch.isspace():
        return "whitespace"
    if ch in SHELL_METACHARACTERS:
        return f"the shell metacharacter {ch!r}"
    if ch == "/":
        return "a path separator '/'"
    return f"the character {ch!r}"


def validate_name(kind: str, value: object) -> str:
    """Check a name (env, role, host, service, patch, run_id, who, ...) or a reason; return it.

    Names: letters, digits and a few separators, no whitespace, no shell metacharacters, no
    ``/`` or ``..``, bounded length. ``kind="reason"``: free text of letters, digits, single
    spaces and ``.,:_/@+=%-`` (room for an issue URL), 1..500 characters.
    """
    if kind == "reason":
        return validate_reason(value)
    if kind not in _NAME_RULES:
        raise ValueError(f"unknown name kind {kind!r}")
    pattern, max_len = _NAME_RULES[kind]
    label = kind.replace("_", " ")
    if not isinstance(value, str):
        raise InvalidInput(f"{label} must be text, got {type(value).__name__}")
    if not value:
        raise InvalidInput(f"{label} is empty")
    if len(value) > max_len:
        raise InvalidInput(f"{label} {value[:40]!r}... is too long ({len(value)} > {max_len} characters)")
    if ".." in value:
        raise InvalidInput(f"{label} {value!r} contains '..' (path traversal)")
    for ch in value:
        if ch in _CONTROL or ch.isspace() or ch in SHELL_METACHARACTERS or ch == "/":
            raise InvalidInput(f"{label} {value!r} contains {_describe(ch)}")
    if not re.fullmatch(pattern, value):
        raise InvalidInput(
            f"{label} {value!r} is not valid (expected {pattern}, at most {max_len} characters)")
    return value


def validate_reason(value: object, *, field_name: str = "reason") -> str:
    """Check a free-text reason (recorded, and passed to commands quoted); return it stripped."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field_name} must be text, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise InvalidInput(f"{field_name} is empty: say why")
    if len(text) > MAX_REASON_LENGTH:
        raise InvalidInput(f"{field_name} is too long ({len(text)} > {MAX_REASON_LENGTH} characters)")
    for ch in text:
        if ch in _CONTROL or (ch.isspace() and ch != " ") or ch in SHELL_METACHARACTERS:
            raise InvalidInput(f"{field_name} {text[:60]!r} contains {_describe(ch)}")
    if not _REASON_RE.match(text):
        bad = _first_bad_char(text, " .,:_/@+=%-")
        raise InvalidInput(f"{field_name} {text[:60]!r} contains {_describe(bad or '?')}")
    return text
