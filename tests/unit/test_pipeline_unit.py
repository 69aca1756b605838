"""Pure parts of the pipeline steps."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from liftoff.checks import in_weekly_change_lock


@pytest.mark.parametrize(("when", "locked"), [
    (datetime(2026, 11, 27, 22, 59, tzinfo=UTC), False),  # Friday before 23:00
    (datetime(2026, 11, 27, 23, 0, tzinfo=UTC), True),  # Friday 23:00
    (datetime(2026, 11, 28, 12, 0, tzinfo=UTC), True),  # Saturday
    (datetime(2026, 11, 29, 12, 0, tzinfo=UTC), True),  # Sunday
    (datetime(2026, 11, 30, 5, 59, tzinfo=UTC), True),  # Monday before 06:00
    (datetime(2026, 11, 30, 6, 0, tzinfo=UTC), False),  # Monday 06:00
    (datetime(2026, 12, 2, 12, 0, tzinfo=UTC), False),  # Wednesday
])
def test_weekly_change_lock_window(when: datetime, locked: bool):
    assert in_weekly_change_lock(when) is locked
