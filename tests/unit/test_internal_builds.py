"""An internal build's version in a task: masked in its log lines by Airflow's secrets masker,
scrubbed from its return value (the XCom the UI shows) as ``internal-<short hash>``."""

from __future__ import annotations

import json

from liftoff.status import internal_label, internal_traces
from liftoff_airflow import dagkit

SECRET = "17.6.2+rnightly.5703.c57c57c-0"


def test_every_form_of_the_version_is_a_trace():
    assert internal_traces(SECRET) == [
        "17.6.2+rnightly.5703.c57c57c-0", "17.6.2_rnightly.5703.c57c57c-0", "rnightly.5703.c57c57c-0",
        "c57c57c", "17.6.2"]
    assert internal_traces("17.6.2-ee.0") == ["17.6.2-ee.0"]


def test_a_return_value_is_scrubbed_only_for_an_internal_build():
    value = {"version": SECRET, "rollout": f"gstg:{SECRET}", "hosts": [{"web-01": f"-> {SECRET}"}],
             "previous_version": "17.6.1+rnightly.5702.b57b57b-0", "count": 3}
    scrubbed = dagkit.scrub_internal(value, SECRET, True)
    text = json.dumps(scrubbed)
    assert not [t for t in internal_traces(SECRET) if t in text], text
    assert scrubbed["version"] == internal_label(SECRET) and scrubbed["count"] == 3
    assert scrubbed["previous_version"] == "17.6.1+rnightly.5702.b57b57b-0"
    assert dagkit.scrub_internal(value, SECRET, False) is value


def test_the_masker_hides_the_version_in_log_lines(monkeypatch):
    from airflow.sdk import log as sdk_log

    masked: list = []
    monkeypatch.setattr(sdk_log, "mask_secret", lambda secret, name=None: masked.append(secret))
    dagkit.hide_internal(SECRET, False)
    assert masked == []
    dagkit.hide_internal(SECRET, True)
    assert masked == internal_traces(SECRET)


def test_airflow_s_masker_redacts_every_form_of_a_masked_version():
    from airflow.sdk._shared.secrets_masker.secrets_masker import SecretsMasker

    masker = SecretsMasker()
    for trace in internal_traces(SECRET):
        masker.add_mask(trace)
    line = masker.redact(f"web-01: 17.6.1 -> {SECRET} in 0.3 s; commit c57c57c; base 17.6.2")
    assert not [t for t in internal_traces(SECRET) if t in line], line
    assert line.startswith("web-01: 17.6.1 -> ***")
