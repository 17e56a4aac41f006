"""QoS profiles of the node, built from parameters.

REP 2003: consumers subscribe best effort (SensorDataQoS) so they connect to any camera; the
node publishes reliable so depth_image_proc, RViz and ``ros2 topic echo`` with their reliable defaults connect.
A best-effort publisher never reaches a reliable subscriber, which is why the output default is reliable.
"""

from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

__all__ = ["DIAGNOSTICS_QOS", "make_qos"]

_RELIABILITY = {
    "best_effort": ReliabilityPolicy.BEST_EFFORT,
    "reliable": ReliabilityPolicy.RELIABLE,
}

# diagnostic_updater publishes /diagnostics reliable, depth 1; the aggregator expects that.
DIAGNOSTICS_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE, history=HistoryPolicy.KEEP_LAST)


def make_qos(reliability: str, depth: int) -> QoSProfile:
    """KEEP_LAST ``depth`` / VOLATILE profile with the named reliability (``best_effort`` or ``reliable``)."""
    try:
        policy = _RELIABILITY[reliability]
    except KeyError:
        msg = f'QoS reliability {reliability!r} must be one of {", ".join(_RELIABILITY)}'
        raise ValueError(msg) from None
    return QoSProfile(depth=int(depth), reliability=policy, durability=DurabilityPolicy.VOLATILE,
                      history=HistoryPolicy.KEEP_LAST)
