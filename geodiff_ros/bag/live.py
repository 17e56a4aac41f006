"""Bags over DDS with rclpy: a player that publishes stored CDR bytes and a recorder that stores what it receives.

This is what ``ros2 bag play`` / ``ros2 bag record`` do for users without rosbag2 (not installable from PyPI,
ros2-from-pypi.md) and for the tests. Both work on serialized bytes, so nothing is decoded on the way:
``Publisher.publish(bytes)`` sends the bag's CDR as is and ``create_subscription(..., raw=True)`` hands over the
received CDR (rosbags' CDR equals rclpy's, so the bytes round-trip unchanged).

Best-effort replay loses every message sent before the subscriber's endpoint has matched, so the player can wait
for subscribers before its first message (``wait_subscribers``) and gives DDS a short settle time after matching.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rclpy.duration import Duration
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability, QosTime

from geodiff_ros.bag.storage import Bag, BagError, BagWriter, RawMessage

__all__ = [
    "PlayOptions",
    "PlayStats",
    "Player",
    "Recorder",
    "message_class",
    "play_qos",
    "to_bag_qos",
]

LOG = logging.getLogger(__name__)

_SETTLE_S = 0.3  # after matching: lets the subscriber side finish matching the new writer too
_INFINITE = QosTime(9223372036, 854775807)  # rosbag2's spelling of an infinite QoS duration


def message_class(msgtype: str) -> Any:
    """The rclpy message class for ``pkg/msg/Type`` (or ``pkg/Type``), like rosidl_runtime_py's get_message.

    Raises:
        BagError: the package is not installed in this Python environment, or has no such type.
    """
    parts = msgtype.split("/")
    if len(parts) == 2:
        pkg, kind, name = parts[0], "msg", parts[1]
    elif len(parts) == 3:
        pkg, kind, name = parts
    else:
        msg = f"message type {msgtype!r} is not of the form package/msg/Type"
        raise BagError(msg)
    try:
        module = importlib.import_module(f"{pkg}.{kind}")
    except ImportError:
        msg = (f'message type {msgtype} is not installed in this Python environment (no module {pkg}.{kind}); '
               f'install its package (e.g. pip install ros-jazzy-{pkg.replace("_", "-")}) or leave its topics out '
               'with --topics')
        raise BagError(msg) from None
    cls = getattr(module, name, None)
    if cls is None:
        msg = f"message type {msgtype} does not exist in the installed {pkg} package (version mismatch?)"
        raise BagError(msg)
    return cls


def _bag_enum(enum: Any, value: int, unknown: Any) -> Any:
    try:
        return enum(int(value))
    except ValueError:
        return unknown


def _bag_time(duration: Any) -> QosTime:
    ns = int(duration.nanoseconds)
    if ns < 0 or ns >= 2**63 - 1:
        return _INFINITE
    sec, nsec = divmod(ns, 1_000_000_000)
    return QosTime(sec, nsec)


def to_bag_qos(profile: QoSProfile) -> Qos:
    """rclpy QoSProfile -> rosbags Qos (the enum values are the rmw ones on both sides)."""
    return Qos(
        _bag_enum(QosHistory, profile.history, QosHistory.UNKNOWN),
        int(profile.depth),
        _bag_enum(QosReliability, profile.reliability, QosReliability.UNKNOWN),
        _bag_enum(QosDurability, profile.durability, QosDurability.UNKNOWN),
        _bag_time(profile.deadline),
        _bag_time(profile.lifespan),
        _bag_enum(QosLiveliness, profile.liveliness, QosLiveliness.UNKNOWN),
        _bag_time(profile.liveliness_lease_duration),
        bool(profile.avoid_ros_namespace_conventions),
    )


def play_qos(recorded: list[Qos], override: str | None, depth: int = 10) -> QoSProfile:
    """Publisher QoS for a bag topic: the override, else what all recorded publishers offered, else reliable.

    rosbag2 does the same ("adapt offer to recorded offers"): a best-effort camera replays best effort. Reliable
    also reaches best-effort subscribers; the reverse does not connect (REP 2003).
    """
    if override is not None:
        reliable = override == "reliable"
    else:
        reliable = not recorded or any(q.reliability != QosReliability.BEST_EFFORT for q in recorded)
    transient = (override is None and bool(recorded)
                 and all(q.durability == QosDurability.TRANSIENT_LOCAL for q in recorded))
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=max(depth, max((q.depth for q in recorded), default=0)),
        reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if transient else DurabilityPolicy.VOLATILE,
    )


@dataclass
class PlayOptions:
    """How to play a bag (the CLI flags of ``geodiff_bag play``)."""

    rate: float = 1.0  # time scale: 2 = twice as fast
    loop: bool = False
    max_loops: int = 0  # with loop: stop after this many passes (0 = until stopped)
    topics: list[str] | None = None  # None = every topic whose type is installed
    remaps: dict[str, str] = field(default_factory=dict)
    qos: str | None = None  # 'reliable' | 'best_effort' for every publisher; None = as recorded
    wait_subscribers: int = 0  # before the first message, wait until each topic has this many subscribers
    wait_timeout: float = 10.0
    clock_hz: float = 0.0  # > 0: publish the bag's time on /clock at this rate (for nodes with use_sim_time)
    # Per-topic rewrite of a message before it is sent (bytes out, or None to drop it); the demo sparsifies depth.
    transforms: dict[str, Callable[[RawMessage], bytes | None]] = field(default_factory=dict)
    on_publish: Callable[[str, RawMessage], None] | None = None  # (output topic, message) after each publish


@dataclass
class PlayStats:
    """What a play run did."""

    published: dict[str, int] = field(default_factory=dict)  # per output topic
    loops: int = 0
    seconds: float = 0.0
    missing_subscribers: list[str] = field(default_factory=list)
    skipped_topics: dict[str, str] = field(default_factory=dict)  # bag topic -> why it was not played
    damage: str | None = None  # where reading stopped when the bag is damaged
    stopped: bool = False  # interrupted before the end


class Player:
    """Publishes a bag's messages with their original timing (scaled by ``rate``) on an existing rclpy node."""

    def __init__(self, node: Any, bag: Bag, options: PlayOptions) -> None:
        self.node = node
        self.bag = bag
        self.opts = options
        if not options.rate > 0:
            msg = f"rate must be > 0 (1 = recorded speed), got {options.rate}"
            raise BagError(msg)
        if not 0 <= options.clock_hz <= 1000:
            msg = f"clock rate must be within [0, 1000] Hz (0 = no /clock), got {options.clock_hz}"
            raise BagError(msg)
        explicit = options.topics is not None
        names = bag.select(options.topics)
        for src in options.remaps:
            if src not in bag.topics:
                msg = f'--remap {src}:=... names a topic the bag does not have; topics: {", ".join(bag.topics)}'
                raise BagError(msg)
        self.skipped: dict[str, str] = {}
        self.pubs: dict[str, Any] = {}
        for name in names:
            meta = bag.topics[name]
            try:
                cls = message_class(meta.msgtype)
            except BagError as err:
                if explicit:
                    raise
                self.skipped[name] = str(err)
                LOG.warning("not playing %s: %s", name, err)
                continue
            out = options.remaps.get(name, name)
            self.pubs[name] = node.create_publisher(cls, out, play_qos(meta.qos, options.qos))
        if not self.pubs:
            msg = f"nothing to play: no topic of {bag.path} has an installed message type"
            raise BagError(msg)
        self.clock = _BagClock(node, options.clock_hz, options.rate) if options.clock_hz > 0 else None

    def out_topic(self, name: str) -> str:
        return self.opts.remaps.get(name, name)

    def wait_for_subscribers(self, stop: threading.Event | None = None) -> list[str]:
        """Wait until every played topic has ``wait_subscribers`` subscribers; return the topics that do not."""
        need = self.opts.wait_subscribers
        if need <= 0:
            return []
        deadline = time.monotonic() + self.opts.wait_timeout
        while True:
            short = [self.out_topic(n) for n, p in self.pubs.items() if p.get_subscription_count() < need]
            if self.clock is not None and self.clock.pub.get_subscription_count() < need:
                short.append("/clock")
            if not short:
                time.sleep(_SETTLE_S)
                return []
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                LOG.warning("after %.1f s, fewer than %d subscriber(s) on: %s; playing anyway (best-effort "
                            "messages to them are lost)", self.opts.wait_timeout, need, ", ".join(short))
                return short
            time.sleep(0.05)

    def play(self, stop: threading.Event | None = None) -> PlayStats:
        """Publish the bag (looping if asked) until its end or ``stop``; returns counts and damage."""
        stop = stop or threading.Event()
        stats = PlayStats(published={self.out_topic(n): 0 for n in self.pubs}, skipped_topics=dict(self.skipped))
        stats.missing_subscribers = self.wait_for_subscribers(stop)
        clock = self.clock
        if clock is not None:
            clock.start()
        t_begin = time.monotonic()
        try:
            self._play_loops(stop, stats, clock)
        finally:
            if clock is not None:
                clock.stop()
        self.flush()
        stats.seconds = time.monotonic() - t_begin
        return stats

    def _play_loops(self, stop: threading.Event, stats: PlayStats, clock: _BagClock | None) -> None:
        while not stop.is_set():
            t0_wall = time.monotonic()
            t0_bag = None
            for msg in self.bag.messages(list(self.pubs)):
                if t0_bag is None:
                    t0_bag = msg.timestamp
                    if clock is not None:
                        clock.start_pass(t0_wall, t0_bag)  # each loop starts the bag's time over, as rosbag2
                due = t0_wall + (msg.timestamp - t0_bag) * 1e-9 / self.opts.rate
                wait = due - time.monotonic()
                if wait > 0 and stop.wait(wait):
                    break
                if stop.is_set():
                    break
                data: bytes | None = bytes(msg.data)
                transform = self.opts.transforms.get(msg.topic)
                if transform is not None:
                    data = transform(msg)
                    if data is None:
                        continue
                out = self.out_topic(msg.topic)
                self.pubs[msg.topic].publish(data)
                stats.published[out] += 1
                if self.opts.on_publish is not None:
                    self.opts.on_publish(out, msg)
            stats.damage = self.bag.damage
            if stop.is_set():
                stats.stopped = True
                break
            stats.loops += 1
            if not self.opts.loop or (self.opts.max_loops and stats.loops >= self.opts.max_loops):
                break
            if t0_bag is None:
                break  # empty selection: nothing to loop over

    def flush(self, timeout: float = 3.0) -> None:
        """Give the last messages time to leave: reliable ones until acknowledged, best-effort ones briefly."""
        for pub in self.pubs.values():
            if pub.qos_profile.reliability == ReliabilityPolicy.RELIABLE and pub.get_subscription_count() > 0:
                pub.wait_for_all_acked(Duration(seconds=timeout))
        time.sleep(0.2)

    def close(self) -> None:
        for pub in self.pubs.values():
            self.node.destroy_publisher(pub)
        self.pubs = {}
        if self.clock is not None:
            self.node.destroy_publisher(self.clock.pub)
            self.clock = None


class _BagClock:
    """Publishes the bag's current time on /clock from a thread, like ``ros2 bag play --clock``: bag time =
    first message's time of the pass + elapsed wall time x rate. Nodes started with ``use_sim_time:=true`` then
    see the recorded stamps as "now" (TF lookups, message filters, latency figures)."""

    def __init__(self, node: Any, hz: float, rate: float) -> None:
        from rosgraph_msgs.msg import Clock

        self._clock_cls = Clock
        # Depth 1 as rclcpp's ClockQoS; reliable reaches best-effort subscribers (rclpy's TimeSource) and
        # reliable ones alike (REP 2003).
        self.pub = node.create_publisher(Clock, "/clock", QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
        self.period = 1.0 / hz
        self.rate = rate
        self._origin: tuple[float, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="geodiff-bag-clock", daemon=True)
        self._thread.start()

    def start_pass(self, t0_wall: float, t0_bag_ns: int) -> None:
        with self._lock:
            self._origin = (t0_wall, t0_bag_ns)
        self._publish()

    def _publish(self) -> None:
        with self._lock:
            if self._origin is None:
                return
            t0_wall, t0_bag = self._origin
        now = t0_bag + int((time.monotonic() - t0_wall) * self.rate * 1e9)
        msg = self._clock_cls()
        msg.clock.sec, msg.clock.nanosec = divmod(now, 1_000_000_000)
        self.pub.publish(msg)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._publish()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None


class Recorder:
    """Subscribes raw to topics as they appear on the graph and writes every message to a :class:`BagWriter`.

    The node must be spun (the subscriptions and the discovery timer run in its executor). Message time in the
    bag is the receive time on the node's clock, as rosbag2 records it; the publishers' offered QoS is stored
    with each topic, and the subscription adapts to it (best effort if any publisher is best effort).
    """

    def __init__(self, node: Any, writer: BagWriter, topics: list[str], qos: str | None = None,
                 depth: int = 100, on_message: Callable[[str, bytes], None] | None = None) -> None:
        if not topics:
            raise BagError("record needs at least one topic (--topics /a /b ...)")
        self.node = node
        self.writer = writer
        self.qos_override = qos
        self.depth = depth
        self.on_message = on_message  # (topic, raw CDR) after each stored message, on the executor thread
        self.pending = [node.resolve_topic_name(t) for t in topics]
        self.errors: dict[str, str] = {}
        self.subscribed: dict[str, str] = {}  # topic -> type
        self._subs: list[Any] = []
        self._unmatched: dict[str, Any] = {}  # topic -> subscription not yet matched with a publisher
        self._lock = threading.Lock()
        self._closed = False
        self._timer = node.create_timer(0.2, self.discover)
        self.discover()

    def discover(self) -> None:
        """Subscribe to the pending topics that now have a publisher (called by a timer); log each subscription
        once it has matched a publisher (from then on nothing that publisher sends is missed, reliable or not)."""
        if self._closed:
            return
        for topic, sub in list(self._unmatched.items()):
            if sub.get_publisher_count() > 0:
                del self._unmatched[topic]
                LOG.info("matched %s (%d publisher(s))", topic, sub.get_publisher_count())
        if not self.pending:
            return
        graph = dict(self.node.get_topic_names_and_types())
        for topic in list(self.pending):
            types = graph.get(topic)
            if not types:
                continue
            msgtype = types[0]
            self.pending.remove(topic)
            try:
                cls = message_class(msgtype)
                offered = [to_bag_qos(i.qos_profile) for i in self.node.get_publishers_info_by_topic(topic)]
                with self._lock:
                    self.writer.add_topic(topic, msgtype, qos=offered)
            except BagError as err:
                self.errors[topic] = str(err)
                LOG.error("not recording %s: %s", topic, err)
                continue
            if self.qos_override is not None:
                reliable = self.qos_override == "reliable"
            else:
                reliable = bool(offered) and all(q.reliability == QosReliability.RELIABLE for q in offered)
            qos = QoSProfile(depth=self.depth, history=HistoryPolicy.KEEP_LAST,
                             reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT)

            def store(data: bytes, topic: str = topic) -> None:
                self._store(topic, data)

            sub = self.node.create_subscription(cls, topic, store, qos, raw=True)
            self._subs.append(sub)
            self._unmatched[topic] = sub
            self.subscribed[topic] = msgtype
            LOG.info("recording %s (%s, %s)", topic, msgtype, "reliable" if reliable else "best effort")

    def _store(self, topic: str, data: bytes) -> None:
        stamp = self.node.get_clock().now().nanoseconds
        with self._lock:
            if self._closed:
                return
            self.writer.write(topic, stamp, data)
        if self.on_message is not None:
            self.on_message(topic, data)

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.writer.counts)

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until every topic has a subscription (its publisher appeared); the node must be spinning."""
        deadline = time.monotonic() + timeout
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.pending

    def close(self) -> None:
        """Stop recording and finish the bag file (metadata.yaml)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.node.destroy_timer(self._timer)
        for sub in self._subs:
            self.node.destroy_subscription(sub)
        self._subs = []
        with self._lock:
            self.writer.close()
