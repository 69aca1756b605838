"""Param patterns that hold at trigger time, and one-line words for a refused Param.

Airflow checks a Param's ``pattern`` with Python's ``re.search``, where ``$`` also matches
before a final newline: ``^...$`` takes ``"17.5.0-ee.0\\n"``. The trigger form checks the
same pattern with a JavaScript ``RegExp`` (no ``\\A``/``\\Z`` there), so every liftoff pattern
ends in ``$(?!\\n)`` instead, which both engines read as "the very end" (:func:`anchored`).

Airflow's 400 for a refused Param is ``Invalid input for param NAME: <jsonschema's error>``:
the regular expression, the whole schema and the value over many lines. The words here
(:func:`explain_param_error`) say the rule in one line instead; liftoff_plugin.py puts them in
the REST answer. A pattern registered with :func:`pattern_rule` has its own words.
"""

from __future__ import annotations

import ast
import json
import re
from textwrap import dedent
from typing import Any

from liftoff.traffic import ENDPOINT_PATTERN as _ENDPOINT_PATTERN
from liftoff.versions import _PATTERNS

# Python's re and a JavaScript RegExp both read this as the end of the text, never before a
# final newline (``\Z`` is Python only).
END = r"$(?!\n)"

# liftoff's DAGs (dags/*.py), whose refused Params get one-line words in a 400.
LIFTOFF_DAG_IDS: frozenset[str] = frozenset({
    "canary_weight", "deploy_canary", "deploy_lock", "deploy_production", "fast_deploy",
    "post_deploy_patch", "rollback", "traffic",
})

MAX_VALUE_CHARS = 60
MAX_LINE_CHARS = 400

_RULES: dict[str, str] = {}  # pattern (fixed and as it was) -> the rule in words


def _escaped(text: str, index: int) -> bool:
    """Whether the character at ``index`` is escaped by an odd run of backslashes."""
    slashes = 0
    while index - slashes - 1 >= 0 and text[index - slashes - 1] == "\\":
        slashes += 1
    return slashes % 2 == 1


def anchored(pattern: str) -> str:
    """``pattern`` anchored at both ends so that no trailing newline passes, in Python and
    JavaScript alike: ``^(?:body)$(?!\\n)`` (the group only when the body has a ``|``).
    Idempotent; a ``^``/``$`` the pattern already has is not doubled."""
    if pattern.startswith("^") and pattern.endswith(END):
        return pattern
    body = pattern[1:] if pattern.startswith("^") else pattern
    if body.endswith("$") and not _escaped(body, len(body) - 1):
        body = body[:-1]
    if "|" in body:
        body = f"(?:{body})"
    return f"^{body}{END}"


def pattern_rule(pattern: str, words: str) -> str:
    """Register ``words`` as the rule of ``pattern`` (in its fixed form and as given, so a
    DAG not switched yet gets the words too); returns the fixed pattern."""
    fixed = anchored(pattern)
    _RULES[fixed] = _RULES[pattern] = words
    return fixed


VERSION_RULE = ("must be an Omnibus package version such as 17.6.0-ee.0, 17.6.0-rc3.ee.0, "
                "17.6.0+rnightly.308853.0ab19c4f-0 or 17.6.202611291200-13bd0cc7c2a.3f6b8fe0f4d "
                "(one line, no spaces)")
REASON_RULE = ("may hold only letters, digits, spaces and . , : _ / @ + = % - "
               "(one line, 5 to 500 characters)")

_VERSION_BODY = "|".join(p.pattern.strip("^$") for p in _PATTERNS.values())
# The pattern dagkit used so far, kept only so its refusals get the same words.
_LEGACY_VERSION_PATTERN = "^(?:" + _VERSION_BODY + ")$"
pattern_rule(_LEGACY_VERSION_PATTERN, VERSION_RULE)

VERSION_PATTERN = pattern_rule(_VERSION_BODY, VERSION_RULE)
REASON_PATTERN = pattern_rule(r"^[A-Za-z0-9 .,:_/@+=%-]+$", REASON_RULE)
PATCH_ID_PATTERN = pattern_rule(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$",
    "must be a patch id such as security-2026-0042: a letter or digit, then up to 79 letters, "
    "digits, . _ or - (one line)")
ROLE_PATTERN = pattern_rule(
    r"^[a-z0-9][a-z0-9_-]{0,63}$",
    "must be a role name such as web: a lowercase letter or digit, then up to 63 of a-z 0-9 _ - "
    "(one line)")
ENDPOINT_PATTERN = pattern_rule(
    _ENDPOINT_PATTERN,
    "must be a path such as /explore: a / then up to 200 of A-Z a-z 0-9 / _ . ~ % = & ? - "
    "(one line)")

# A pattern without registered words: the rule by the Param's title.
_TITLE_RULES: tuple[tuple[str, str], ...] = (("version", VERSION_RULE), ("reason", REASON_RULE))

_PREFIX = re.compile(r"Invalid input for param (?P<name>[^:\s]{1,250}): ")
_FAILED = re.compile(r"\n\nFailed validating '(?P<keyword>\w+)' in schema(?P<where>(?:\[[^\]\n]*\])*):\n")
_ON = re.compile(r"\n\nOn instance(?P<path>(?:\[[^\]\n]*\])*):\n")
_TYPES = {"string": "text", "integer": "an integer", "number": "a number", "boolean": "true or false",
          "null": "empty (null)", "array": "a list", "object": "an object"}


def short(value: Any, limit: int = MAX_VALUE_CHARS) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_UNREADABLE = object()


def _literal(block: str) -> Any:
    """A pformat'ed block of jsonschema's message back to its value (or _UNREADABLE)."""
    try:
        return ast.literal_eval(dedent(block).strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return _UNREADABLE


def _count(n: Any, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _listed(values: Any) -> str:
    text = ", ".join(json.dumps(v) if not isinstance(v, str) else v for v in list(values or []))
    return text if len(text) <= 120 else text[:117] + "..."


def describe(schema: Any) -> str:
    """A (sub)schema in a few words: ``one of drain, ready`` or ``an integer from 0 to 100``."""
    if not isinstance(schema, dict):
        return "a valid value"
    if "enum" in schema:
        return f"one of {_listed(schema['enum'])}"
    types = schema.get("type")
    types = types if isinstance(types, list) else [types] if types else []
    words = " or ".join(_TYPES.get(t, str(t)) for t in types) or "a value"
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        return f"{words} from {low} to {high}"
    if low is not None:
        return f"{words} of at least {low}"
    if high is not None:
        return f"{words} of at most {high}"
    return words


def rule_in_words(keyword: str, schema: Any) -> str:
    """The rule a value broke, from the failing JSON-schema keyword and its schema; a pattern
    is never shown, only its registered words (or the title's, or a plain "format")."""
    s = schema if isinstance(schema, dict) else {}
    v = s.get(keyword)
    title = str(s.get("title") or "")
    if keyword == "pattern":
        if isinstance(v, str) and v in _RULES:
            return _RULES[v]
        for word, words in _TITLE_RULES:
            if word in title.lower():
                return words
        return "is not in the expected format" + (f" (see the description of {title})" if title else "")
    simple = {
        "maxLength": lambda: f"must be at most {_count(v, 'character')}",
        "minLength": lambda: "must not be empty" if v == 1 else f"must be at least {_count(v, 'character')}",
        "type": lambda: f"must be {describe({'type': v})}",
        "enum": lambda: f"must be one of {_listed(v)}",
        "const": lambda: f"must be {short(v)}",
        "minimum": lambda: f"must be at least {v}",
        "maximum": lambda: f"must be at most {v}",
        "exclusiveMinimum": lambda: f"must be more than {v}",
        "exclusiveMaximum": lambda: f"must be less than {v}",
        "multipleOf": lambda: f"must be a multiple of {v}",
        "minItems": lambda: f"must list at least {_count(v, 'item')}",
        "maxItems": lambda: f"must list at most {_count(v, 'item')}",
        "uniqueItems": lambda: "must not list the same item twice",
        "format": lambda: f"must be a valid {v}",
        "anyOf": lambda: "must be " + " or ".join(describe(x) for x in (v or [])),
        "oneOf": lambda: "must be exactly one of: " + "; ".join(describe(x) for x in (v or [])),
        "required": lambda: f"must have {_listed(v)}",
        "additionalProperties": lambda: "has a key it does not take",
    }
    if keyword in simple:
        return simple[keyword]()
    return f"breaks the rule {keyword!r} of {title or 'this field'}"


def explain_param_error(detail: str) -> str | None:
    """One line for Airflow's ``Invalid input for param NAME: <jsonschema error>``:
    ``Invalid input for param NAME: <the rule in words> (got <value repr, cut>)``, with
    ``item N`` for a list's item. None when ``detail`` is not such a message."""
    m = _PREFIX.match(detail)
    if not m:
        return None
    name, rest = m["name"], detail[m.end():]
    failed = _FAILED.search(rest)
    on = _ON.search(rest, failed.end()) if failed else None
    if not failed or not on:
        # Not a jsonschema error ("No value passed" and the like): its first line, cut.
        first = rest.split("\n", 1)[0].strip()
        if first == "No value passed":
            first = "is required: no value was given"
        elif " does not match " in first:  # a pattern, whatever the format around it: not shown
            first = "is not in the expected format"
        line = f"Invalid input for param {name}: {first}"
        return line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS - 3] + "..."
    words = rule_in_words(failed["keyword"], _literal(rest[failed.end():on.start()]))
    if re.match(r"\[\d+\]", failed["where"]):  # schema[1]: one form of an anyOf/oneOf, the closest
        words += " (or take another of its allowed forms)"
    item = ""
    path = re.findall(r"\[([^\]]*)\]", on["path"])
    if path:
        item = "item " + ".".join(str(int(p) + 1) if p.isdigit() else p.strip("'\"") for p in path) + " "
    value = _literal(rest[on.end():])
    got = "" if value is _UNREADABLE else f" (got {short(value)})"
    line = f"Invalid input for param {name}: {item}{words}{got}"
    return line if len(line) <= MAX_LINE_CHARS else line[:MAX_LINE_CHARS - 3] + "..."
