"""Latest-frame slots for N cameras and the fair batch picker of the node's engine thread (pure Python, no ROS).

Each camera has a one-slot mailbox (a new frame overwrites one the worker never took: a counted drop, so no
backlog of old frames builds up, as one would in a deep subscription queue). The worker takes up to ``max_batch``
frames at once so the engine runs them in one call. Fairness: cameras are served in the order they started
waiting, where waiting starts when an empty slot receives a frame and is *not* reset by newer frames overwriting
it. A fast camera therefore cannot push a slow one back, and with N cameras and batches of B no camera waits more
than ceil(N/B) engine calls. Ties go round-robin from a rotating start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["BatchStats", "FrameScheduler", "Handoff"]


class FrameScheduler:
    """Per-camera one-slot mailboxes plus ``take`` for the worker (thread-safe; callbacks only ``put``)."""

    def __init__(self, n_cameras: int, clock: Callable[[], float] = time.monotonic) -> None:
        if n_cameras < 1:
            msg = "a FrameScheduler needs at least one camera"
            raise ValueError(msg)
        self._n = n_cameras
        self._clock = clock
        self._cond = threading.Condition()
        self._items: list[Any] = [None] * n_cameras
        self._since: list[float] = [0.0] * n_cameras  # when each full slot started waiting
        self._rr = 0  # round-robin start for ties
        self._closed = False

    @property
    def n_cameras(self) -> int:
        return self._n

    def put(self, index: int, item: Any) -> bool:
        """Store camera ``index``'s newest frame; True if it replaced one the worker never took (a drop)."""
        with self._cond:
            dropped = self._items[index] is not None
            if not dropped:
                self._since[index] = self._clock()
            self._items[index] = item
            self._cond.notify()
            return dropped

    def pending(self) -> list[int]:
        """Indices of cameras with a frame waiting (for tests and diagnostics)."""
        with self._cond:
            return [i for i, item in enumerate(self._items) if item is not None]

    def take(self, max_batch: int, window_s: float = 0.0, timeout: float = 0.2) -> list[tuple[int, Any]]:
        """Up to ``max_batch`` waiting frames as ``(camera index, item)``, longest-waiting camera first.

        Blocks until a frame arrives, the scheduler is closed or ``timeout`` passes ([] then). With ``window_s``
        > 0 it then waits until ``min(max_batch, cameras)`` frames are ready or the first of them has waited
        ``window_s``, so frames of synchronised cameras (a stereo pair) share one engine call. The window counts
        from the first frame's arrival, so a worker that was busy never adds latency.
        """
        max_batch = max(1, int(max_batch))
        with self._cond:
            deadline = self._clock() + timeout
            while not self._closed and not any(item is not None for item in self._items):
                left = deadline - self._clock()
                if left <= 0:
                    return []
                self._cond.wait(left)
            if self._closed:
                return []
            want = min(max_batch, self._n)
            if window_s > 0.0:
                ready = [i for i in range(self._n) if self._items[i] is not None]
                close_at = min(self._since[i] for i in ready) + window_s
                while not self._closed and len(ready) < want:
                    left = close_at - self._clock()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                    ready = [i for i in range(self._n) if self._items[i] is not None]
                if self._closed:
                    return []
            order = sorted((i for i in range(self._n) if self._items[i] is not None),
                           key=lambda i: (self._since[i], (i - self._rr) % self._n))
            picked = order[:max_batch]
            out = [(i, self._items[i]) for i in picked]
            for i in picked:
                self._items[i] = None
            self._rr = (self._rr + 1) % self._n
            return out

    def close(self) -> None:
        """Drop waiting frames and wake the worker (stop / deactivate)."""
        with self._cond:
            self._closed = True
            self._items = [None] * self._n
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False
            self._items = [None] * self._n


class Handoff:
    """The one slot between the node's engine thread and its post-processing thread (the pipelined worker).

    The engine thread waits for the slot to be free *before* it takes the next camera frame, so while frame N is
    aligned and published, frame N+1 runs through the network, and frame N+2 is taken from the cameras only when
    it can follow right away: at most one frame waits here, and the newest camera frame is the one taken (older
    ones are overwritten, and counted, in the FrameScheduler mailboxes). Nothing is computed only to be dropped.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None

    def wait_free(self, timeout: float) -> bool:
        """Block until the slot is empty (True) or ``timeout`` passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._item is None, timeout)

    def put(self, item: Any) -> None:
        """Fill the slot (the engine thread checked :meth:`wait_free` first; a leftover item is replaced)."""
        with self._cond:
            self._item = item
            self._cond.notify_all()

    def take(self, timeout: float) -> Any:
        """The waiting item (slot emptied), or None after ``timeout``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._item is not None, timeout):
                return None
            item, self._item = self._item, None
            self._cond.notify_all()
            return item

    def clear(self) -> None:
        """Drop a waiting item (deactivate: its publishers are off)."""
        with self._cond:
            self._item = None
            self._cond.notify_all()


class BatchStats:
    """How well frames were batched: engine calls, network passes (one per same-size group) and frames."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.engine_calls = 0
        self.network_passes = 0
        self.frames = 0
        self.max_batch = 0
        self.batched_frames = 0  # frames that shared a network pass with another camera's frame

    def record(self, shapes: Sequence[tuple[int, ...]], batch_size: int) -> None:
        """One ``engine.predict`` call on frames of these shapes; the engine groups same-size frames into passes
        of at most ``batch_size`` (engine/core.py ``_batches``), which is mirrored here."""
        groups: dict[tuple[int, ...], int] = {}
        for shape in shapes:
            groups[tuple(shape)] = groups.get(tuple(shape), 0) + 1
        size = max(1, int(batch_size))
        passes = [min(size, count - k) for count in groups.values() for k in range(0, count, size)]
        with self._lock:
            self.engine_calls += 1
            self.network_passes += len(passes)
            self.frames += len(shapes)
            self.max_batch = max([self.max_batch, *passes])
            self.batched_frames += sum(p for p in passes if p > 1)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "engine_calls": self.engine_calls,
                "network_passes": self.network_passes,
                "frames": self.frames,
                "batched_frames": self.batched_frames,
                "max_batch": self.max_batch,
                "frames_per_pass": self.frames / self.network_passes if self.network_passes else float("nan"),
            }
