"""The ``geodiff_node`` process: ROS start-up, signals, autostart, exit codes (``python -m geodiff_ros.ros.process``).

Exit codes: 0 after Ctrl-C / SIGTERM / SIGHUP or a normal shutdown, 1 when autostart's configure or activate failed
(the log says why), 2 for invalid parameters at start-up.
"""

from __future__ import annotations

import os
import sys

import rclpy
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.signals import SignalHandlerOptions

from geodiff_ros.ros.node import NODE_NAME, GeoDiffNode
from geodiff_ros.ros.params import name_launch_arguments
from geodiff_ros.ros.shutdown import ShutdownRequest

__all__ = ["main"]

_POLL_S = 0.05  # executor spin slice of the main loop: how soon a shutdown request is acted on


def main(args: list[str] | None = None) -> int:
    """Console entry ``geodiff_node``: run the node, autostarting it unless ``autostart:=false``.

    Exit codes: 0 on Ctrl-C / SIGTERM / SIGHUP / normal shutdown (also when the signal arrives during configure),
    1 when autostart's configure failed (the log says why), 2 for invalid parameters at start-up. Ends the process
    itself (``os._exit``) once ROS is shut down, so call it as a program, not from code that should keep running.

    Signals: our own handlers, not rclpy's, so the first SIGINT/SIGTERM/SIGHUP requests one orderly
    shutdown and any further one (``ros2 launch`` + Ctrl-C sends SIGINT twice, then maybe SIGTERM) is only
    noted; see shutdown.py. The executor therefore spins in short slices and checks the request in between.
    """
    shutdown = ShutdownRequest.install()  # before rclpy.init: no signal finds the default handler
    rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
    code = 0
    node: GeoDiffNode | None = None
    executor: SingleThreadedExecutor | None = None
    try:
        node = _create_node()
        if node is None:
            code = 2
        else:
            shutdown.on_request(node.request_shutdown)
            # ONE executor thread for inputs (trivial callbacks), the diagnostics timer and parameter/lifecycle
            # services; inference runs on the worker thread, so services still answer during it. Not the
            # MultiThreadedExecutor: it re-yields and re-submits every callback its pool has not started
            # yet, so while the worker holds the GIL its spin loop busy-waits (measured: 64-84% of a core with 4
            # cameras at 30 Hz, the worker starved to 2 frames/s per camera) instead of 20% here. Its pool also
            # could not run services concurrently anyway: they share the node's default mutually exclusive
            # callback group.
            executor = SingleThreadedExecutor()
            executor.add_node(node)
            code = _autostart(node, shutdown)
            while code == 0 and not shutdown.requested and rclpy.ok():
                executor.spin_once(timeout_sec=_POLL_S)
    except ExternalShutdownException:
        pass
    except Exception:
        # The context can be shut down while spin_once() builds its wait set (RCLError "the given context is
        # not valid"). That is a normal shutdown; anything else is a real error.
        if rclpy.ok() and not shutdown.requested:
            raise
    finally:
        if node is not None:
            if shutdown.requested:
                node.get_logger().info(f"{shutdown.reason} received: shutting down")
            node.stop()
            if executor is not None:
                executor.shutdown(timeout_sec=0.5)
            if len(shutdown.received) > 1:
                node.get_logger().info(f'also received during the shutdown (noted, no action): '
                                       f'{", ".join(shutdown.received[1:])}')
            node.destroy_node()
        rclpy.try_shutdown()
    # Everything ROS is closed now. Interpreter teardown of torch/diffusers takes ~1.5 s on 2 cores, and a worker
    # stuck in a long GPU call (or an abandoned model load) would block it further; exit right away so
    # SIGINT/SIGTERM finish within 2 s.
    _exit_now(code)
    return code  # not reached; keeps the console_scripts contract (main returns the exit code)


def _create_node() -> GeoDiffNode | None:
    """The node, or None (logged) when its start-up parameters are invalid."""
    try:
        return GeoDiffNode()
    except Exception as err:  # noqa: BLE001 - parameter errors from rclpy come as several types
        rclpy.logging.get_logger(NODE_NAME).fatal(name_launch_arguments(f"cannot start: {err}"))
        return None


def _autostart(node: GeoDiffNode, shutdown: ShutdownRequest) -> int:
    """Configure and activate unless ``autostart:=false``; the exit code (1 = failed, 0 = fine or shut down)."""
    if not node.get_parameter("autostart").value:
        return 0
    for name, trigger in (("configure", node.trigger_configure), ("activate", node.trigger_activate)):
        if shutdown.requested:
            return 0
        if trigger() != TransitionCallbackReturn.SUCCESS:
            if shutdown.requested:
                return 0  # abandoned because of the signal: a normal shutdown
            reason = " (see the error above)" if name == "configure" else ""
            node.get_logger().fatal(f"autostart: {name} failed{reason}; exiting")
            return 1
    return 0


def _exit_now(code: int) -> None:
    """Flush the logs and leave the process immediately with ``code``."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
