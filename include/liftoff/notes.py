"""The run's note in the Airflow UI: the sentence a run ended with, where people look first.

A task has no metadata-DB access, so finalize sets the note through Airflow's own REST API
(``PATCH /api/v2/dags/{dag}/dagRuns/{run}``) as a user of the ``liftoff_airflow_api``
connection (``http``: host = the api-server's URL, login and password of a user allowed to
edit runs). Without that connection (``airflow dags test``, a set-up that did not define it)
the note is skipped with a log line; a note that cannot be set never fails or delays a run by
more than the connection's ``timeout`` (extra, default 10 s).
"""

from __future__ import annotations

import logging

from liftoff.errors import ConfigError
from liftoff.settings import base_url, resolve_connection

log = logging.getLogger(__name__)

CONN_ID = "liftoff_airflow_api"
NOTE_CHARS = 1000  # Airflow keeps 1,000 characters of a note


def note_text(summary: str) -> str:
    """A summary as a note: one paragraph, at most NOTE_CHARS characters."""
    text = " ".join(str(summary).split())
    return text if len(text) <= NOTE_CHARS else text[:NOTE_CHARS - 1] + "…"


def _client():
    from liftoff.chatops.api import AirflowClient, Credentials, normalize_url

    info = resolve_connection(CONN_ID)
    if not (info.login and info.password):
        raise ConfigError(f"connection {CONN_ID} has no login and password")
    timeout = float(info.extra_dejson.get("timeout", 10))
    creds = Credentials(url=normalize_url(base_url(info)), user=info.login, password=info.password)
    return AirflowClient(creds, timeout=timeout)


def set_run_note(dag_id: str, run_id: str, summary: str) -> bool:
    """Put ``summary`` on the run's page; False (logged, never raised) when it cannot."""
    try:
        client = _client()
    except Exception as exc:  # no connection: the note is optional
        log.info("run note not set (%s): %s", CONN_ID, " ".join(str(exc).split())[:200])
        return False
    try:
        client.set_run_note(dag_id, run_id, note_text(summary))
    except Exception as exc:  # the API is down or refused: the run's result stands
        log.warning("run note not set through %s: %s", client.base_url, client.redact(str(exc))[:300])
        return False
    log.info("run note set: %s", note_text(summary)[:200])
    return True
