"""The fleet estimator (``rightsizer estimator``) reading the records stream."""

from __future__ import annotations


def test_the_fleet_estimator_counts_a_resent_record_once() -> None:
    from proxy.programs.estimator_server import RecentIds

    recent = RecentIds(size=3)
    assert [recent.first_time(k) for k in ("a", "b", "a", "c", "d", "a")] == [
        True, True, False, True, True, True  # "a" fell out of the window of 3
    ]  # fmt: skip
