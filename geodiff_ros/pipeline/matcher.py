"""The one stamp matcher: an image takes the CameraInfo and the sparse depth whose header stamps are nearest to its own.

Used by the node (subscription callbacks add, the worker thread matches) and by ``geodiff_bag process`` (the bag is
read in order; an image is matched once the messages that belong to it can have been read), so a recorded bag
processed offline pairs every image with the same messages as when it is played into the node.

Rule: the nearest stamp within ``max_dt`` (none: no limit); on equal distance the later stamp wins, then the later
arrival (a re-sent message replaces the one it repeats). Sparse input is optional and never holds an image back:
the matcher only answers with what it holds.

Why not ``message_filters.Cache``: it bounds its ring by message count only (one 4000x3000 float depth image is
48 MB, and memory must stay bounded by bytes), it has no lock although the node adds on the executor thread while
the worker reads, it asks either for the element before or after a time but not the nearest one with a tie rule,
it converts stamps with ``rclpy.time.Time.from_msg``, which the bag tool's rosbags messages are not, and it is fed by
a ``message_filters.Subscriber`` of a node, which the offline tool does not have.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any, Generic, TypeVar

__all__ = ["StampMatcher"]

T = TypeVar("T")


class StampMatcher(Generic[T]):
    """Recent items keyed by stamp (ns), bounded by count and by bytes; thread-safe.

    Args:
        max_items: most items kept (the oldest arrival is dropped first).
        max_bytes: most bytes kept in all (0 = no byte bound); an item larger than this alone is refused by
            :meth:`add`, so the caller can count and report it.
    """

    def __init__(self, max_items: int = 16, max_bytes: int = 0) -> None:
        if max_items < 1:
            msg = "a StampMatcher keeps at least one item"
            raise ValueError(msg)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: deque[tuple[int, int, int, T]] = deque()  # (stamp_ns, arrival, nbytes, item)
        self._arrivals = 0  # tells an old timeline's items from a new one's after time went backwards
        self._bytes = 0

    def add(self, stamp_ns: int, item: T, nbytes: int = 0) -> bool:
        """Keep ``item``; False (nothing kept) when it alone exceeds ``max_bytes``."""
        if self.max_bytes and nbytes > self.max_bytes:
            return False
        with self._lock:
            self._arrivals += 1
            self._items.append((int(stamp_ns), self._arrivals, nbytes, item))
            self._bytes += nbytes
            while len(self._items) > self.max_items or (self.max_bytes and self._bytes > self.max_bytes):
                self._bytes -= self._items.popleft()[2]
        return True

    def nearest(self, stamp_ns: int, max_dt_s: float | None = None) -> tuple[T | None, float | None]:
        """The item nearest to ``stamp_ns`` within ``max_dt_s`` (None = any) and the nearest offset in seconds
        (None when empty), so a caller can say why nothing matched."""
        with self._lock:
            if not self._items:
                return None, None
            best = min(self._items, key=lambda it: (abs(it[0] - stamp_ns), -it[0], -it[1]))
        offset_s = abs(best[0] - stamp_ns) * 1e-9
        if max_dt_s is not None and offset_s > max_dt_s:
            return None, offset_s
        return best[3], offset_s

    def newest_stamp(self) -> int | None:
        """The largest stamp held (None when empty)."""
        with self._lock:
            return max((it[0] for it in self._items), default=None)

    def mark(self) -> int:
        """The arrival count now; :meth:`forget_up_to` drops what had arrived by then."""
        with self._lock:
            return self._arrivals

    def forget_up_to(self, mark: int) -> None:
        """Forget the items that arrived by ``mark`` (after time went backwards they belong to the old timeline)."""
        self._keep(lambda it: it[1] > mark)

    def forget_before(self, stamp_ns: int) -> None:
        """Forget items stamped before ``stamp_ns`` except the newest one (no image to come can still need them)."""
        newest = self.newest_stamp()
        self._keep(lambda it: it[0] >= stamp_ns or it[0] == newest)

    def clear(self) -> None:
        self._keep(lambda it: False)

    def _keep(self, predicate: Any) -> None:
        with self._lock:
            kept = [it for it in self._items if predicate(it)]
            self._items = deque(kept)
            self._bytes = sum(it[2] for it in kept)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes
