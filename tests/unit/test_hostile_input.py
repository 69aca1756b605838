"""Hostile input: every field a person (trigger form, REST API, ChatOps) can fill in is refused
with a clear message before anything is touched.

The table below is the whole story: for each field, the layer that refuses it (the engine's
validators in ``liftoff.versions``, the inventory, the DAG's Params, the conf guard) and the
values thrown at it. A refusal is "clear" when the message names the field, fits on one line
(control characters are escaped, never echoed raw) and stays short (a 10k value is not
echoed back). The lab-level half (a refused value touched no host: labd's audit.log is
unchanged) is in tests/integration/test_faults.py.

Field: what refuses it (hostile values thrown at it):

* version: ``parse_version`` at every engine entry point, Param ``pattern``/``maxLength``
  (SHELL, TRAVERSAL, CONTROL, SIZE, LOOKALIKES, version-shaped injections).
* environment: ``validate_name("env")``, ``Inventory.env`` for an unknown one, Param ``enum``.
* role: ``validate_name("role")``, ``select_roles`` for an unknown one, Param item ``pattern``.
* patch id: ``validate_name("patch")``, Param ``pattern``.
* reason: ``validate_reason``, Param ``pattern``/``minLength``/``maxLength`` (SHELL, CONTROL,
  SIZE, LOOKALIKES, empty and blank).
* run id, who: ``validate_name("run_id"/"who")``, ``runs.Run``.
* canary weight: ``canary.parse_weight``, Param ``anyOf`` (SHELL, negative, > 100, bool).
* conf keys: ``liftoff_airflow.conf_guard.refuse_unknown_conf`` (Airflow itself accepts them):
  misspelt, injected, NUL, 10k, non-text.

Known and deliberate: a reason may contain ``/`` and ``.`` (it carries issue URLs), so
``../../etc/passwd`` is a valid *reason*: it is free text, stored as text and only ever passed
to a command as one shell-quoted argument (checked below). A trailing newline passes the
Params' ``^...$`` patterns (JSON Schema patterns run with Python's ``re.search``, where ``$``
also matches before a final newline); the engine's validators refuse it in the run's first
task, before any host is touched (checked below).
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path

import pytest

from lab.config import LabConfig
from lab.liftoff_env import inventory as lab_inventory
from liftoff.canary import parse_weight
from liftoff.commands import apt_install_command, chef_disable_command, patch_apply_command
from liftoff.errors import InvalidInput, InventoryError, LiftoffError
from liftoff.fleet import select_roles
from liftoff.inventory import parse_inventory
from liftoff.runs import Run
from liftoff.versions import parse_version, validate_name, validate_reason
from liftoff_airflow.conf_guard import refuse_unknown_conf, unknown_conf_keys

DAGS = Path(__file__).resolve().parents[2] / "dags"
GOOD_VERSION = "17.6.0-ee.0"

SHELL = {
    "semicolon": "; rm -rf /",
    "command substitution": "$(id)",
    "backticks": "`id`",
    "pipe": "x | nc 127.0.0.1 1",
    "and-list": "x && reboot",
    "redirect": "x > /etc/passwd",
    "quote break": "x' ; id ; '",
    "glob": "web-*",
    "variable": "${IFS}id",
}
TRAVERSAL = {
    "dot-dot": "../../etc/passwd",
    "absolute path": "/etc/passwd",
    "dot-dot only": "..",
}
CONTROL = {
    "newline injection": "gstg\nid",
    "trailing newline": "gstg\n",
    "carriage return": "gstg\rid",
    "tab": "gs\ttg",
    "NUL": "gstg\x00",
    "escape sequence": "gstg\x1b[2J",
}
SIZE = {
    "10k chars": "a" * 10_000,
    "empty": "",
    "blank": "   ",
}
LOOKALIKES = {
    "cyrillic s": "g\u0455tg",
    "fullwidth": "\uff47\uff53\uff54\uff47",
    "unicode hyphen": "web\u201001",
    "no-break space": "gs\u00a0tg",
    "right-to-left override": "gstg\u202e",
    "zero-width space": "gs\u200btg",
}
NAME_VALUES = {**SHELL, **TRAVERSAL, **CONTROL, **SIZE, **LOOKALIKES}
REASON_VALUES = {k: v for k, v in NAME_VALUES.items() if k not in TRAVERSAL and k != "glob"}
REASON_VALUES["trailing newline"] = "fix it\n\nid"  # a newline inside, not only at the end
VERSION_VALUES = {
    **{k: v for k, v in NAME_VALUES.items()},
    "version then semicolon": f"{GOOD_VERSION}; rm -rf /",
    "version then substitution": f"{GOOD_VERSION}$(id)",
    "version then newline": f"{GOOD_VERSION}\nid",
    "version then trailing newline": f"{GOOD_VERSION}\n",
    "version then NUL": f"{GOOD_VERSION}\x00",
    "version then space": f"{GOOD_VERSION} -o APT::x=y",
    "traversal around a version": f"../../{GOOD_VERSION}",
    "fullwidth digits": "\uff11\uff17.6.0-ee.0",
    "unicode hyphen in a version": "17.6.0\u2010ee.0",
    "version of 10k chars": "1" * 10_000 + ".6.0-ee.0",
    "not text": 17.6,
    "none": None,
}
NOT_TEXT = {"integer": 42, "none": None, "list": ["gstg"], "bytes": b"gstg"}

# field -> (callable that refuses, regex its message must match, values)
FIELDS: dict[str, tuple] = {
    "version": (parse_version, r"package version|Omnibus package version", VERSION_VALUES),
    "env": (lambda v: validate_name("env", v), r"^env\b", {**NAME_VALUES, **NOT_TEXT}),
    "role": (lambda v: validate_name("role", v), r"^role\b", {**NAME_VALUES, **NOT_TEXT}),
    "patch": (lambda v: validate_name("patch", v), r"^patch\b", {**NAME_VALUES, **NOT_TEXT}),
    "run_id": (lambda v: validate_name("run_id", v), r"^run id\b", {**NAME_VALUES, **NOT_TEXT}),
    "who": (lambda v: validate_name("who", v), r"^who\b", {**NAME_VALUES, **NOT_TEXT}),
    "reason": (validate_reason, r"^reason\b", {**REASON_VALUES, **NOT_TEXT}),
}
CASES = [pytest.param(field, value, id=f"{field}-{label}")
         for field, (_, _, values) in FIELDS.items() for label, value in values.items()]


def assert_clear(message: str, pattern: str) -> None:
    assert re.search(pattern, message), message
    assert "\n" not in message and "\r" not in message and "\x00" not in message, repr(message)
    assert "\x1b" not in message and "\u202e" not in message, repr(message)
    assert len(message) < 400, f"{len(message)} characters: {message[:120]!r}..."


@pytest.mark.parametrize(("field", "value"), CASES)
def test_engine_validators_refuse_with_a_clear_message(field: str, value: object):
    refuse, pattern, _ = FIELDS[field]
    with pytest.raises(InvalidInput) as caught:
        refuse(value)
    assert_clear(str(caught.value), pattern)


def test_the_table_is_big_enough():
    """The figures of the report: every field gets every family of hostile value."""
    assert len(CASES) >= 200
    for field, (_, _, values) in FIELDS.items():
        families = {"shell": SHELL, "control": CONTROL, "size": SIZE, "lookalike": LOOKALIKES}
        for family, members in families.items():
            assert set(members) & set(values), (field, family)


@pytest.mark.parametrize("value", ["17.6.0-ee.0", "16.3.0-rc42.ee.0", "16.3.0+rnightly.308853.0ab19c4f-0",
                                   "16.3.202311291200-13bd0cc7c2a.3f6b8fe0f4d"])
def test_good_versions_still_pass(value: str):
    assert str(parse_version(value)) == value
    assert shlex.split(apt_install_command(value)) == ["apt-get", "install", "-y", f"gitlab-ee={value}"]


def test_a_reason_is_text_and_reaches_a_command_as_one_quoted_argument():
    reason = "../../etc/passwd rollback, see https://gitlab.com/x/-/issues/1"
    assert validate_reason(reason) == reason
    argv = shlex.split(chef_disable_command(reason))
    assert argv == ["chef-client-disable", reason]


@pytest.mark.parametrize("value", ["sec-2026-1\n", "sec-2026-1; id", "../sec"])
def test_patch_ids_never_reach_a_command(value: str):
    with pytest.raises(InvalidInput, match="patch"):
        patch_apply_command(value)


# -- the inventory: well-formed but unknown names --------------------------------------------------

@pytest.fixture(scope="module")
def inventory(tmp_path_factory: pytest.TempPathFactory):
    config = LabConfig(lab_dir=tmp_path_factory.mktemp("hostile-lab"), octet=49)
    return parse_inventory(lab_inventory(config))


@pytest.mark.parametrize("name", ["prod", "gstg-old", "GSTG", "gprd-cny2"])
def test_unknown_environment_is_named(inventory, name: str):
    with pytest.raises(InventoryError, match=f"unknown environment '{re.escape(name)}'"):
        inventory.env(name)


def test_an_unknown_environment_is_named_briefly(inventory):
    with pytest.raises(InventoryError) as caught:
        inventory.env("x" * 10_000)
    assert_clear(str(caught.value), r"unknown environment")


@pytest.mark.parametrize("roles", [["webb"], ["web", "$(id)"], ["../web"], ["web\n"], [""], ["w" * 10_000]])
def test_unknown_or_hostile_role_is_refused(inventory, roles: list[str]):
    with pytest.raises(LiftoffError, match="role"):
        select_roles(inventory.env("gstg"), roles)


@pytest.mark.parametrize("run_id", ["$(id)", "run\nid", "../../run", "", "r" * 10_000, "run\u2010id"])
def test_a_run_with_a_hostile_id_cannot_be_made(inventory, run_id: str):
    with pytest.raises(InvalidInput, match="run id"):
        Run(run_id=run_id, inventory=inventory)


FULLWIDTH_50 = "\uff15\uff10"


@pytest.mark.parametrize("weight", [
    "$(id)", "; 0", "-1", "101", "1e3", True, "ready; id", "drain\n", None, 3.5, "5\u200b", FULLWIDTH_50,
])
def test_canary_weight_is_refused(weight: object):
    with pytest.raises(InvalidInput, match="canary weight"):
        parse_weight(weight)


def test_a_hostile_canary_weight_is_named_briefly():
    with pytest.raises(InvalidInput) as caught:
        parse_weight("x" * 10_000)
    assert_clear(str(caught.value), r"canary weight")


def test_canary_weight_form_refuses_non_ascii_digits(bag):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="weight"):
        _validate(bag.dags["canary_weight"], {"weight": FULLWIDTH_50})


def test_canary_weight_digits_become_an_integer():
    assert parse_weight(" 50\n") == 50  # surrounding whitespace of digits only; nothing else passes


# -- unknown conf keys -----------------------------------------------------------------------------

PARAMS = {"version": None, "dry_run": False, "on_failure": "rollback", "allow_precheck_failure": None,
          "quiet_period_seconds": None}


@pytest.mark.parametrize("conf", [
    {"verison": GOOD_VERSION},
    {"version": GOOD_VERSION, "on_falure": "halt"},
    {"version": GOOD_VERSION, "version; rm -rf /": "x"},
    {"version": GOOD_VERSION, "../../etc/passwd": 1},
    {"version": GOOD_VERSION, "dry_run\n": True},
    {"version": GOOD_VERSION, "dry_run\x00": True},
    {"version": GOOD_VERSION, "k" * 10_000: 1},
    {"version": GOOD_VERSION, "": 1},
    {"version": GOOD_VERSION, "v\u0435rsion": GOOD_VERSION},  # cyrillic e
    {"version": GOOD_VERSION, 1: 2},
])
def test_unknown_conf_keys_are_refused_naming_them(conf: dict):
    with pytest.raises(InvalidInput) as caught:
        refuse_unknown_conf(conf, PARAMS)
    message = str(caught.value)
    assert_clear(message, r"^unknown key\(s\) in the run conf: .*this DAG takes: allow_precheck_failure, ")
    assert "Nothing was changed" in message
    [bad] = unknown_conf_keys(conf, PARAMS)
    assert repr(bad if isinstance(bad, str) else repr(bad))[:20] in message


def test_known_conf_keys_pass_and_a_non_mapping_is_refused():
    refuse_unknown_conf(None, PARAMS)
    refuse_unknown_conf({}, PARAMS)
    refuse_unknown_conf({"version": GOOD_VERSION, "dry_run": True, "requested_by": "alice"}, PARAMS)
    with pytest.raises(InvalidInput, match="JSON object"):
        refuse_unknown_conf(["version"], PARAMS)  # type: ignore[arg-type]
    many = {f"k{i}": i for i in range(12)}
    with pytest.raises(InvalidInput, match="and 7 more"):
        refuse_unknown_conf(many, PARAMS)


# -- the DAGs' trigger forms (Params) ---------------------------------------------------------------

@pytest.fixture(scope="module")
def bag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def _validate(dag, conf: dict) -> None:
    from airflow.sdk.definitions.param import ParamsDict

    params = ParamsDict(copy.deepcopy(dag.params))
    for key, value in conf.items():
        params[key] = value
    params.validate()


# (dag, param) -> base conf making the other required params valid
FORM_FIELDS: dict[tuple[str, str], dict] = {
    ("deploy_canary", "version"): {},
    ("deploy_canary", "allow_precheck_failure"): {},
    ("deploy_production", "version"): {},
    ("deploy_production", "override_reason"): {},
    ("fast_deploy", "environment"): {"version": GOOD_VERSION, "reason": "hotfix for x"},
    ("fast_deploy", "version"): {"environment": "gstg", "reason": "hotfix for x"},
    ("fast_deploy", "reason"): {"environment": "gstg", "version": GOOD_VERSION},
    ("rollback", "environment"): {},
    ("rollback", "target_version"): {"environment": "gstg"},
    ("deploy_lock", "environment"): {"action": "lock", "reason": "incident 42"},
    ("deploy_lock", "reason"): {"environment": "gstg", "action": "lock"},
    ("post_deploy_patch", "environment"): {"reason": "security fix", "patch_id": "sec-1"},
    ("post_deploy_patch", "patch_id"): {"environment": "gstg", "reason": "security fix"},
    ("post_deploy_patch", "reason"): {"environment": "gstg", "patch_id": "sec-1"},
    ("canary_weight", "weight"): {},
}
# Values the engine refuses in the run's first task although the Param lets them through.
ENGINE_ONLY = {"trailing newline", "version then trailing newline"}


def _form_values(param: str) -> dict[str, object]:
    if "version" in param:
        values = VERSION_VALUES
    elif "reason" in param or param == "allow_precheck_failure":
        values = REASON_VALUES
    else:
        values = NAME_VALUES
    return {k: v for k, v in values.items() if v is not None and not isinstance(v, float)}


FORM_CASES = [pytest.param(dag_id, param, label, value, id=f"{dag_id}.{param}-{label}")
              for (dag_id, param) in FORM_FIELDS for label, value in _form_values(param).items()]


@pytest.mark.parametrize(("dag_id", "param", "label", "value"), FORM_CASES)
def test_trigger_forms_refuse_hostile_values(bag, dag_id: str, param: str, label: str, value: object):
    from airflow.sdk.exceptions import ParamValidationError

    try:
        _validate(bag.dags[dag_id], {**FORM_FIELDS[(dag_id, param)], param: value})
    except ParamValidationError as exc:
        assert param in str(exc)
        return
    # Through the form: only the known trailing-newline gap, and the engine refuses it.
    assert label in ENGINE_ONLY, f"{dag_id}.{param} accepted {value!r}"
    with pytest.raises(InvalidInput):
        parse_version(value) if "version" in param else validate_name("patch", value)


def test_the_forms_table_is_big_enough():
    assert len(FORM_CASES) >= 300


def test_airflow_itself_accepts_unknown_conf_keys(bag):
    """Why conf_guard exists: Airflow 3.3 validates declared Params only. If this ever fails,
    Airflow refuses unknown keys by itself and the guard may go."""
    _validate(bag.dags["deploy_canary"], {"version": GOOD_VERSION, "on_falure": "halt"})
    with pytest.raises(InvalidInput, match="on_falure"):
        refuse_unknown_conf({"version": GOOD_VERSION, "on_falure": "halt"}, bag.dags["deploy_canary"].params)


def test_conf_guard_knows_every_dag_s_params(bag):
    for dag in bag.dags.values():
        conf = dict.fromkeys(dag.params)
        refuse_unknown_conf(conf, dag.params)  # nothing declared is refused
        with pytest.raises(InvalidInput):
            refuse_unknown_conf({**conf, "unexpected": 1}, dag.params)
