"""When a periodic duty is next due: a pure function of now, its period and its delay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from mailflow.outbound.periodic import next_due

pytestmark = pytest.mark.pure

H, M = timedelta(hours=1), timedelta(minutes=1)


@pytest.mark.parametrize(
    ("now", "every", "delay", "due"),
    [
        (datetime(2026, 12, 3, 6, 1, tzinfo=UTC), H, 2 * M, datetime(2026, 12, 3, 6, 2, tzinfo=UTC)),
        (datetime(2026, 12, 3, 6, 2, tzinfo=UTC), H, 2 * M, datetime(2026, 12, 3, 7, 2, tzinfo=UTC)),
        (datetime(2026, 12, 3, 6, 59, 59, tzinfo=UTC), H, 2 * M, datetime(2026, 12, 3, 7, 2, tzinfo=UTC)),
        (datetime(2026, 12, 3, 6, 7, tzinfo=UTC), 10 * M, timedelta(0), datetime(2026, 12, 3, 6, 10, tzinfo=UTC)),
        (datetime(2026, 12, 3, 23, 30, tzinfo=UTC), timedelta(days=1), timedelta(0), datetime(2026, 12, 4, tzinfo=UTC)),
    ],
    ids=["before-the-delay", "exactly-due-means-next-period", "end-of-hour", "every-10-minutes", "daily"],
)
def test_the_next_due_time_is_the_first_period_start_plus_delay_after_now(now, every, delay, due):
    assert next_due(now, every, delay) == due


def test_a_period_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        next_due(datetime(2026, 1, 1, tzinfo=UTC), timedelta(0))
