"""fractal serve's restart back-off in process (fractal/supervisor.py): a crash loop waits longer
each time, up to a bound, and a child that ran a while is restarted at once."""
from __future__ import annotations

import pytest

from fractal.supervisor import MAX_BACKOFF_S, STABLE_S, next_backoff_s


def test_a_crash_loop_doubles_the_wait_from_a_fifth_of_a_second_up_to_the_bound() -> None:
    waits, wait = [], 0.0
    for _ in range(9):
        wait = next_backoff_s(wait, lived_s=0.1)
        waits.append(wait)
    assert waits == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, MAX_BACKOFF_S, MAX_BACKOFF_S, MAX_BACKOFF_S]


@pytest.mark.parametrize("previous_s", [0.0, 0.8, MAX_BACKOFF_S])
def test_a_child_that_lived_past_the_stable_time_restarts_at_once(previous_s: float) -> None:
    assert next_backoff_s(previous_s, lived_s=STABLE_S) == 0.0
    assert next_backoff_s(previous_s, lived_s=STABLE_S * 100) == 0.0


def test_a_quick_death_after_a_stable_run_starts_the_loop_over() -> None:
    assert next_backoff_s(next_backoff_s(6.4, lived_s=STABLE_S + 1), lived_s=0.0) == 0.2
