"""The one stamp matcher of the node and the bag tool: nearest stamp, the tie rule, the bounds, forgetting."""

from __future__ import annotations

import pytest

from geodiff_ros.pipeline import StampMatcher

S = 1_000_000_000  # one second in ns


def test_nearest_within_max_dt_and_the_offset_when_nothing_matches() -> None:
    m: StampMatcher[str] = StampMatcher()
    assert m.nearest(10 * S, 0.1) == (None, None)  # empty: no offset to report
    m.add(10 * S, "a")
    m.add(11 * S, "b")
    assert m.nearest(int(10.3 * S), 0.5) == ("a", pytest.approx(0.3))
    assert m.nearest(int(10.8 * S), None)[0] == "b"  # no limit: the nearest whatever its distance
    item, offset = m.nearest(int(12.5 * S), 0.1)
    assert item is None and offset == pytest.approx(1.5)  # the caller can say how far the nearest one was


def test_equal_distance_takes_the_later_stamp_then_the_later_arrival() -> None:
    m: StampMatcher[str] = StampMatcher()
    m.add(11 * S, "after")
    m.add(9 * S, "before")
    assert m.nearest(10 * S, 2.0)[0] == "after"
    m.add(11 * S, "after, sent again")
    assert m.nearest(10 * S, 2.0)[0] == "after, sent again"


def test_bounded_by_count_and_by_bytes_oldest_arrival_first() -> None:
    m: StampMatcher[int] = StampMatcher(max_items=3, max_bytes=100)
    for k in range(5):
        assert m.add(k * S, k, nbytes=10)
    assert len(m) == 3 and m.nearest(0, None)[0] == 2  # 0 and 1 dropped by count
    assert m.add(10 * S, 10, nbytes=90)  # 3 x 10 + 90 > 100: the oldest two go
    assert len(m) == 2 and m.nbytes == 100
    assert not m.add(11 * S, 11, nbytes=101)  # alone above the bound: refused, nothing evicted for it
    assert len(m) == 2 and m.nbytes == 100


def test_forgetting_an_old_timeline_and_what_no_image_can_need() -> None:
    m: StampMatcher[str] = StampMatcher()
    m.add(100 * S, "old run")
    mark = m.mark()
    m.add(5 * S, "new run")
    m.forget_up_to(mark)  # time went backwards: what had arrived before belongs to the old timeline
    assert m.nearest(100 * S, None)[0] == "new run"
    m.add(6 * S, "newer")
    m.add(1 * S, "late, old stamp")
    m.forget_before(5 * S)
    assert sorted(m.nearest(s * S, 0.0)[0] for s in (5, 6)) == ["new run", "newer"]
    assert m.nearest(1 * S, 0.0)[0] is None
    m.forget_before(100 * S)  # the newest is kept even when older than the horizon
    assert len(m) == 1 and m.newest_stamp() == 6 * S
