"""Airflow notifiers over :mod:`liftoff.notify` (chat through the HTTP provider's ``HttpHook``)."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseNotifier


class ApprovalWaitingNotifier(BaseNotifier):
    """For an ``ApprovalOperator``'s ``notifiers=``: tells chat that a person must answer, with
    the subject, the body, the timeout and the link to the answer page. Never raises: a chat
    outage does not fail the approval task (at most the chat connection's timeout)."""

    def notify(self, context: Any) -> None:
        from liftoff.notify import approval_waiting

        approval_waiting(context)
