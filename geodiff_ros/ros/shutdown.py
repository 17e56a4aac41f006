"""One orderly shutdown per process, whatever signals arrive and however often.

``ros2 launch`` + Ctrl-C delivers SIGINT twice within a few milliseconds (from the terminal to the whole process
group, then from launch to the node), and launch follows up with SIGTERM if the node is slow. rclpy's own handler
re-raises every SIGINT as ``KeyboardInterrupt`` in the main thread, so the second one landed inside the shutdown
(worker join, ``destroy_subscription``) and the node died with a traceback (exit -2, sometimes -6). Here the first
SIGINT, SIGTERM or SIGHUP (terminal closed, ssh dropped) only *requests* the shutdown; later ones are noted and
reported, never raised. The main loop polls :attr:`ShutdownRequest.requested` and runs the shutdown once.

Python runs signal handlers in the main thread between bytecodes, so the handler only records the signal and
calls short callbacks; nothing here takes a lock another thread may hold. A callback may raise on purpose: the
exception then surfaces in the main thread where the signal interrupted it (the node uses this to abandon a model
load in progress, and only that).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

__all__ = ["HANDLED_SIGNALS", "ShutdownRequest"]

HANDLED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ShutdownRequest:
    """Turns SIGINT / SIGTERM / SIGHUP into one shutdown request; install it before ``rclpy.init``.

    Use with ``rclpy.init(signal_handler_options=SignalHandlerOptions.NO)`` so rclpy installs no handler of its own.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self.received: list[str] = []  # signal names in arrival order (first one = the reason)

    @classmethod
    def install(cls) -> ShutdownRequest:
        """Handle SIGINT, SIGTERM and SIGHUP in this process from now on (main thread only)."""
        request = cls()
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, request._on_signal)
        return request

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    @property
    def reason(self) -> str:
        """The signal that asked for the shutdown ('' if none)."""
        return self.received[0] if self.received else ""

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a request; True once one arrived."""
        return self._event.wait(timeout)

    def on_request(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (quick, no locks) when the shutdown is requested; at once if it already was.

        The callback runs inside the signal handler: an exception it raises surfaces in the interrupted main-thread
        code (after the request is recorded; later callbacks are then skipped)."""
        self._callbacks.append(callback)
        if self.requested:
            callback()

    def request(self, reason: str) -> None:
        """Ask for the shutdown (what a signal does); the first call wins, later ones are only recorded."""
        self.received.append(reason)
        if self._event.is_set():
            return
        self._event.set()
        for callback in list(self._callbacks):
            callback()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.request(signal.Signals(signum).name)
