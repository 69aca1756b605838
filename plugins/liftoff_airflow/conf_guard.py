"""Refuse a DAG run conf that carries keys the DAG does not declare.

Airflow 3.3 validates the values of declared Params but takes any other conf key silently
(``[core] dag_run_conf_overrides_params`` merges the whole conf into ``params``, unvalidated),
and has no DAG-level option to refuse them. A misspelt key (``verison``, ``on_falure``) would
then be ignored and the run would go on with the default: for a deploy, fail closed instead.

Call :func:`refuse_unknown_conf` first thing in each DAG's first task (before any host is
touched), with the run's conf and the DAG's params.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from liftoff.errors import InvalidInput

# Conf keys every liftoff DAG accepts besides its Params (set by the ChatOps CLI).
EXTRA_KEYS: frozenset[str] = frozenset({"requested_by"})
MAX_KEYS_SHOWN = 5
MAX_KEY_CHARS = 40


def _show(key: object) -> str:
    """A conf key fit for a message: quoted, control characters escaped, bounded length."""
    text = key if isinstance(key, str) else repr(key)
    if len(text) > MAX_KEY_CHARS:
        return repr(text[:MAX_KEY_CHARS]) + f"... ({len(text)} characters)"
    return repr(text)


def unknown_conf_keys(conf: Mapping[Any, Any] | None, params: Iterable[str],
                      extra: Iterable[str] = EXTRA_KEYS) -> list[Any]:
    """The keys of ``conf`` that are neither Params nor allowed extras, in conf order."""
    known = set(params) | set(extra)
    return [k for k in (conf or {}) if not isinstance(k, str) or k not in known]


def refuse_unknown_conf(conf: Mapping[Any, Any] | None, params: Iterable[str],
                        extra: Iterable[str] = EXTRA_KEYS) -> None:
    """Raise :class:`InvalidInput` naming the unknown keys (and the known ones) of a run conf.

    ``params`` is the DAG's params (a ``ParamsDict``/``dict``: only its keys are used). A conf
    that is not a mapping is refused too."""
    if conf is None:
        return
    if not isinstance(conf, Mapping):
        raise InvalidInput(f"the run conf must be a JSON object, got {type(conf).__name__}")
    names = sorted(set(params))
    bad = unknown_conf_keys(conf, names, extra)
    if not bad:
        return
    shown = ", ".join(_show(k) for k in bad[:MAX_KEYS_SHOWN])
    more = f" and {len(bad) - MAX_KEYS_SHOWN} more" if len(bad) > MAX_KEYS_SHOWN else ""
    raise InvalidInput(f"unknown key(s) in the run conf: {shown}{more}; this DAG takes: "
                       f"{', '.join(names + sorted(set(extra)))}. Nothing was changed.")
