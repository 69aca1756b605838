"""Exception types shared by every liftoff module.

Everything liftoff raises on purpose derives from :class:`LiftoffError`, so callers (DAG
tasks, the ChatOps CLI) can tell a refused or failed operation from a programming error.
Messages are meant for a release manager: they name the field, host or holder involved and
never carry a secret.
"""

from __future__ import annotations

from typing import Any


class LiftoffError(Exception):
    """Base class of every error liftoff raises on purpose."""


class InvalidInput(LiftoffError, ValueError):
    """A value given by a person or a caller was refused (bad name, reason, URL ...)."""


class InvalidVersion(InvalidInput):
    """Not an Omnibus package version of a known kind; refused before any command is built."""


class InventoryError(LiftoffError):
    """The inventory is missing, unreadable or has a bad field (the message names its path)."""


class ConfigError(LiftoffError):
    """A connection or setting liftoff needs is missing or unusable."""


class ConnectionNotFound(ConfigError):
    """No Airflow connection (nor plain-config fallback) has this id."""


class StoreError(LiftoffError):
    """The state store could not be reached or refused an operation."""


class LockHeld(LiftoffError):
    """The environment is locked by someone else; ``lock`` names the holder."""

    def __init__(self, lock: Any, message: str | None = None):
        self.lock = lock
        if message is None:
            message = (
                f"environment {lock.env} is locked by run {lock.run_id} ({lock.who}) since "
                f"{lock.since:%Y-%m-%d %H:%M:%S} UTC"
                + (f": {lock.reason}" if lock.reason else "")
            )
        super().__init__(message)


class GateFailed(LiftoffError):
    """A gate (alerts, quiet period, QA, production checks) did not pass."""

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


class PrecheckFailed(GateFailed):
    """A stage's precheck (or the production checks) found the environment unfit to change."""


class AlertsUnavailable(LiftoffError):
    """Alertmanager was unreachable or answered something unusable (counts as not quiet)."""


class QAError(LiftoffError):
    """The ops GitLab instance running QA could not be used (unreachable, refused, bad answer)."""


class HaltActive(LiftoffError):
    """Deploys are halted (e.g. by a post-deployment patch) until the halt is lifted."""


class RemoteError(LiftoffError):
    """A command on a host failed or the host could not be reached."""


class HAProxyError(LiftoffError):
    """A load balancer's runtime API could not be used or refused a change."""


class CapacityError(LiftoffError):
    """A change would take a role below its capacity floor."""


class MigrationError(LiftoffError):
    """Database migrations failed or must not run now."""


class RollbackRefused(LiftoffError):
    """A rollback is unsafe (e.g. post-deployment migrations newer than the target ran)."""
