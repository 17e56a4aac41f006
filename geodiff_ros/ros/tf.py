"""Transforms from tf2 for sparse LiDAR clouds: the node's live TF and a bag's recorded /tf and /tf_static.

``TfTransforms`` answers the question of ``ros.extrinsics.cloud_extrinsic`` (the pose of a cloud's frame in the
image's optical frame at the cloud's stamp) from a ``tf2_ros.Buffer``:

- a chain of static transforms (robot_state_publisher's URDF joints, a calibration on /tf_static) is looked up once
  and cached until the next /tf_static message, whose arrival may change it;
- a moving chain is looked up at the cloud's stamp (interpolated between the transforms around it), waiting at most
  ``wait_s`` for the transform to arrive (20 ms in the node: the worker and the executor never wait longer; after a
  miss the same pair is not waited for again for ``retry_s``, so a missing transform costs no frame any time);
- no transform: None with tf2's reason, and the caller skips the cloud for this frame.

The node's ``NodeTf`` fills the buffer with a ``tf2_ros.TransformListener`` on the node; ``BagTf`` with the /tf and
/tf_static messages of a bag as ``geodiff_bag process`` reads them (no node, no DDS), so offline processing lands on
the points the live node uses. tf2_ros is optional: without it (a venv without the tf2 wheels) the node runs and a
cloud that needs TF gets a message saying how to install it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from geodiff_ros.geometry.transform import InvalidTransform, RigidTransform

__all__ = ["TF2_MISSING", "BagTf", "NodeTf", "TfTransforms", "tf2_available"]

TF2_MISSING = ("tf2_ros is not installed: install it (`sudo apt install ros-jazzy-tf2-ros`, or scripts/setup_venv.sh "
               "with ../shared/ros/tf2 beside the checkout), or set sparse_points.frame_id and sparse_points.transform")
WAIT_S = 0.02  # the longest a lookup waits for a transform to arrive (the node's worker thread)
RETRY_S = 1.0  # after a miss, the same frame pair is looked up without waiting for this long
TF_STATIC_QOS_DEPTH = 100  # as tf2_ros's StaticTransformBroadcaster / TransformListener (transient local)


def tf2_available() -> bool:
    try:
        import tf2_ros  # noqa: F401
    except ImportError:
        return False
    return True


def _pose_of(transform: Any) -> RigidTransform:
    """geometry_msgs/Transform -> the pose ``[x, y, z, qx, qy, qz, qw]`` as a RigidTransform."""
    t, q = transform.translation, transform.rotation
    return RigidTransform([t.x, t.y, t.z, q.x, q.y, q.z, q.w])


class TfTransforms:
    """Look-ups in a ``tf2_ros.Buffer`` as ``ros.extrinsics.TransformLookup`` asks them (thread-safe)."""

    def __init__(self, buffer: Any, wait_s: float = WAIT_S, retry_s: float = RETRY_S) -> None:
        self.buffer = buffer
        self.wait_s = wait_s
        self.retry_s = retry_s
        self.static_generation = 0  # +1 on every /tf_static message: cached static chains are looked up again
        self._lock = threading.Lock()
        self._static: dict[tuple[str, str], tuple[int, RigidTransform]] = {}
        self._missed: dict[tuple[str, str], float] = {}  # pair -> monotonic time of the last miss

    def on_static(self) -> None:
        with self._lock:
            self.static_generation += 1

    def __call__(self, target: str, source: str, stamp_ns: int) -> tuple[RigidTransform | None, str]:
        """The pose of ``source`` in ``target`` at ``stamp_ns`` (None and the reason when tf2 has none)."""
        from rclpy.time import Time

        key = (target, source)
        with self._lock:
            generation = self.static_generation
            cached = self._static.get(key)
        if cached is not None and cached[0] == generation:
            return cached[1], ""
        latest = Time()
        if self.buffer.can_transform_core(target, source, latest)[0]:
            found = self.buffer.lookup_transform_core(target, source, latest)
            if found.header.stamp.sec == 0 and found.header.stamp.nanosec == 0:  # every link static
                return self._cache(key, generation, found)
        at = Time(nanoseconds=int(stamp_ns))
        ok, why = self.buffer.can_transform_core(target, source, at)
        if not ok and self.wait_s > 0 and time.monotonic() - self._missed.get(key, -1e9) > self.retry_s:
            deadline = time.monotonic() + self.wait_s
            while not ok and time.monotonic() < deadline:
                time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))
                ok, why = self.buffer.can_transform_core(target, source, at)
        if not ok:
            self._missed[key] = time.monotonic()
            return None, str(why).strip() or "unknown frames"
        self._missed.pop(key, None)
        return self._pose(self.buffer.lookup_transform_core(target, source, at))

    def _cache(self, key: tuple[str, str], generation: int, found: Any) -> tuple[RigidTransform | None, str]:
        pose, why = self._pose(found)
        if pose is not None:
            with self._lock:
                self._static[key] = (generation, pose)
        return pose, why

    @staticmethod
    def _pose(found: Any) -> tuple[RigidTransform | None, str]:
        try:
            return _pose_of(found.transform), ""
        except InvalidTransform as err:
            return None, f"TF holds an invalid transform ({err})"


class NodeTf(TfTransforms):
    """The node's TF: a ``tf2_ros.Buffer`` filled by a ``TransformListener`` on the node (static and dynamic)."""

    def __init__(self, node: Any) -> None:
        import tf2_ros
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile
        from tf2_msgs.msg import TFMessage

        super().__init__(tf2_ros.Buffer(node=node))
        self._node = node
        self.listener = tf2_ros.TransformListener(self.buffer, node, spin_thread=False)
        # tf2 does not tell when a static transform changes (a calibration update): this subscription stores each
        # /tf_static message itself before it invalidates the cached static chains, so no look-up in between can
        # cache the old transform under the new generation (the listener's own copy of it is then a no-op).
        static_qos = QoSProfile(depth=TF_STATIC_QOS_DEPTH, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                                history=HistoryPolicy.KEEP_LAST)
        self._static_sub = node.create_subscription(TFMessage, "/tf_static", self._on_static_msg, static_qos)

    def _on_static_msg(self, msg: Any) -> None:
        for stamped in msg.transforms:
            self.buffer.set_transform_static(stamped, "tf_static")
        self.on_static()

    def close(self) -> None:
        self.listener.unregister()
        self._node.destroy_subscription(self._static_sub)


class BagTf(TfTransforms):
    """A bag's /tf and /tf_static in a ``tf2_ros.Buffer`` (no node): fed in bag order, looked up without waiting."""

    def __init__(self, cache_s: float = 30.0) -> None:
        import tf2_ros
        from rclpy.duration import Duration

        super().__init__(tf2_ros.Buffer(cache_time=Duration(seconds=cache_s)), wait_s=0.0)

    def add(self, msg: Any, static: bool) -> None:
        """One TFMessage (rclpy or rosbags) of the bag's /tf (``static`` False) or /tf_static."""
        for item in msg.transforms:
            stamped = _transform_stamped(item)
            if static:
                self.buffer.set_transform_static(stamped, "bag")
            else:
                self.buffer.set_transform(stamped, "bag")
        if static:
            self.on_static()


def _transform_stamped(item: Any) -> Any:
    """A rosbags (or rclpy) TransformStamped as the rclpy message tf2 takes."""
    from geometry_msgs.msg import TransformStamped

    out = TransformStamped()
    out.header.stamp.sec = int(item.header.stamp.sec)
    out.header.stamp.nanosec = int(item.header.stamp.nanosec)
    out.header.frame_id = str(item.header.frame_id)
    out.child_frame_id = str(item.child_frame_id)
    t, q = item.transform.translation, item.transform.rotation
    out.transform.translation.x, out.transform.translation.y, out.transform.translation.z = (
        float(t.x), float(t.y), float(t.z))
    out.transform.rotation.x, out.transform.rotation.y = float(q.x), float(q.y)
    out.transform.rotation.z, out.transform.rotation.w = float(q.z), float(q.w)
    return out
