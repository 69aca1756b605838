"""The set-up recipes people copy (README shell blocks, scripts/*.sh, docker-compose.yml) give
Airflow a PostgreSQL metadata DB only with a usable async URL next to it.

Unset, ``AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC`` is derived from the sync URL as
``postgresql+asyncpg://``, and ``airflow db migrate`` then fails with "No module named
'asyncpg'" where asyncpg is not installed (liftoff's pinned install does not bring it). The
async URL must be set: empty (Airflow's async engine off, as tests/airflow_stack.py does) or
with an async driver this environment has.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SYNC, ASYNC = "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"
ASSIGNMENT = re.compile(rf"^\s*(?:export\s+)?(?P<name>{SYNC}(?:_ASYNC)?)=(?P<value>\S*)", re.M)
ASYNC_DRIVERS = {"asyncpg": "asyncpg", "psycopg": "psycopg", "psycopg_async": "psycopg"}


def fenced_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```[^\n]*\n(.*?)^```", markdown, re.M | re.S)


def shell_settings(text: str) -> dict[str, str]:
    """The metadata DB URLs a shell text sets (quotes dropped; the last assignment wins)."""
    return {m["name"]: m["value"].strip("\"'") for m in ASSIGNMENT.finditer(text)}


def async_gap(settings: dict[str, str]) -> str | None:
    """Why these settings break ``airflow db migrate`` here, or None."""
    sync = settings.get(SYNC, "")
    if "postgresql" not in sync:
        return None
    if ASYNC not in settings:
        return f"{SYNC}={sync} without {ASYNC} (Airflow would derive postgresql+asyncpg://)"
    value = settings[ASYNC]
    if value == "":
        return None
    m = re.match(r"postgresql\+(\w+)://", value)
    module = ASYNC_DRIVERS.get(m.group(1)) if m else None
    if module is None or importlib.util.find_spec(module) is None:
        return f"{ASYNC}={value}: not an async PostgreSQL driver installed here ({sorted(ASYNC_DRIVERS)})"
    return None


def recipes() -> list[tuple[str, dict[str, str]]]:
    """(where, settings) of every README shell block, script and compose service that sets a URL."""
    out = []
    for doc in (ROOT / "README.md", ROOT / "lab" / "README.md"):
        for i, block in enumerate(fenced_blocks(doc.read_text()), 1):
            out.append((f"{doc.relative_to(ROOT)} code block {i}", shell_settings(block)))
    for script in sorted((ROOT / "scripts").glob("*.sh")):
        out.append((str(script.relative_to(ROOT)), shell_settings(script.read_text())))
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, svc in services.items():
        env = {k: "" if v is None else str(v) for k, v in (svc.get("environment") or {}).items()}
        out.append((f"docker-compose.yml service {name}", env))
    return [(where, s) for where, s in out if SYNC in s]


def test_every_postgresql_recipe_sets_a_usable_async_url():
    found = recipes()
    assert any("README.md code block" in where and "postgresql" in s[SYNC] for where, s in found), \
        "the distributed recipe was not found in README.md"
    assert any(where.startswith("docker-compose.yml") for where, _ in found)
    gaps = [f"{where}: {gap}" for where, s in found if (gap := async_gap(s))]
    assert gaps == []


@pytest.mark.parametrize(("block", "gap"), [
    ("export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql+psycopg2://u@h/airflow\nairflow db migrate\n",
     "without AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"),
    ("export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql+psycopg2://u@h/a\n"
     "export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC=postgresql+nosuchdriver://u@h/a\n",
     "not an async PostgreSQL driver"),
    ("export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql+psycopg2://u@h/a\n"
     "export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC=   # empty: async engine off\n", None),
    ('export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="sqlite:///$AIRFLOW_HOME/airflow.db"\n', None),
])
def test_the_check_finds_a_missing_or_unusable_async_url(block: str, gap: str | None):
    found = async_gap(shell_settings(block))
    assert (found is None) if gap is None else (gap in (found or "")), found


def test_airflow_configures_with_the_readme_s_distributed_settings():
    """What ``airflow db migrate`` does first (airflow.settings builds both engines) works with the
    README's URLs here; no database is reached."""
    [settings] = [s for where, s in recipes() if where.startswith("README.md") and "postgresql" in s[SYNC]]
    env = {**os.environ, SYNC: settings[SYNC], ASYNC: settings[ASYNC]}
    code = "from airflow import settings; print(repr(settings.SQL_ALCHEMY_CONN_ASYNC))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == repr(settings[ASYNC])
