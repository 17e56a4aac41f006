"""Offline processing of a bag: the engine over its image topic, written to a new bag next to the original topics.

What the ``geodiff`` node would publish live, computed from a recording without DDS or rclpy: ``depth/relative``,
``depth/image`` (when a metric fit to the sparse depth exists), ``depth/camera_info``, ``normals/image``, ``points``
(and the colour visualisations on request). The per-frame work after the engine is the node's own
(``geodiff_ros.pipeline``: the same stamp matcher, metric fit and temporal state, metric depth, views and cloud) with
the same per-frame settings (``ProcessOptions.settings``, named as the node's parameters), so a bag processed here
gives what playing it into the node gives. Headers are copied from the input image (same stamp and frame_id), and
each output is stored at the input image's bag time, so a replay of the new bag is in sync.

The bag is read once, in order. An image waits in a short queue until the camera_info and sparse depth that belong
to it (nearest stamp) can have arrived: a later message on those topics passed its stamp, or the bag time moved on
by ``lookahead_s``. The sparse input is a depth Image of the same camera or, as the node's ``sparse_points``, a
PointCloud2 projected onto the image grid through the camera_info (nearest point per pixel), in the image's optical
frame or moved there by the static extrinsic ``sparse_points.frame_id`` / ``sparse_points.transform``. Messages are
decoded with the node's duck-typed conversions (rosbags messages carry numpy ``data``) and outputs are serialized
with the rosbags type store.

Shapes: ``H,W`` image; ``H',W'`` after ``cloud_stride``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from geodiff_ros.bag.storage import (
    Bag,
    BagError,
    BagWriter,
    RawMessage,
    camera_info_topic_for,
    image_topic_is_compressed,
)
from geodiff_ros.geometry import InvalidCameraInfo, PinholeIntrinsics, intrinsics_from_camera_info, sparse_to_image_grid
from geodiff_ros.pipeline import (
    FRAME_PARAMS,
    AlignmentConfig,
    FrameProcessor,
    FrameResult,
    OutputConfig,
    SparseConfig,
    StampMatcher,
    Wanted,
    depth_range_problem,
    frame_defaults,
    value_problem,
)
from geodiff_ros.ros.conversions import (
    ImageConversionError,
    compressed_to_rgb8,
    depth_to_metres,
    image_to_rgb8,
    numpy_to_image_fields,
    stamp_ns,
)
from geodiff_ros.ros.extrinsics import cloud_extrinsic
from geodiff_ros.ros.sparse import SparseUnusable, sparse_metres

__all__ = ["ProcessOptions", "ProcessSummary", "process_bag", "sparse_depth_image", "sparsify"]

LOG = logging.getLogger(__name__)

_IMAGE = "sensor_msgs/msg/Image"
_INFO = "sensor_msgs/msg/CameraInfo"
_CLOUD = "sensor_msgs/msg/PointCloud2"
_TF, _TF_STATIC = "/tf", "/tf_static"
TRANSFORM_FORMAT = ("X Y Z QX QY QZ QW (metres and a quaternion: the pose of the cloud frame in the image's optical "
                    "frame, as `ros2 run tf2_ros tf2_echo <image frame> <cloud frame>` prints it)")
_FLOAT32 = 7  # sensor_msgs/PointField FLOAT32
_SPEC = {p.name: p for p in FRAME_PARAMS}
# The bag is read in order and pruned by stamp (_prune): the matchers' count bound only guards against a bag whose
# camera_info or sparse topic has far more messages than its images.
_MATCHER_ITEMS = 10_000


def sparsify(depth_m: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep a random ``fraction`` of the valid pixels of a metric depth map ``[H,W]`` (NaN = none).

    Returns ``(kept, held_out)``, both ``[H,W]`` float32 with NaN elsewhere: a dense depth camera then stands in
    for a sparse sensor (LiDAR-like ~2 %), and the held-out pixels measure how well the fit generalises.
    """
    valid = np.isfinite(depth_m) & (depth_m > 0)
    rng = np.random.default_rng(seed)
    keep = valid & (rng.random(depth_m.shape) < fraction)
    kept = np.where(keep, depth_m, np.nan).astype(np.float32)
    held = np.where(valid & ~keep, depth_m, np.nan).astype(np.float32)
    return kept, held


def sparse_depth_image(msg: Any, fraction: float, seed: int) -> np.ndarray:
    """``16UC1`` millimetre array (0 = none) holding a random ``fraction`` of a depth Image-like message."""
    kept, _ = sparsify(depth_to_metres(msg), fraction, seed)
    mm = np.nan_to_num(kept * 1000.0, nan=0.0)
    return np.clip(np.rint(mm), 0, 65535).astype(np.uint16)  # [H,W]


@dataclass
class ProcessOptions:
    """Settings of ``geodiff_bag process``.

    ``settings`` holds the per-frame settings under the node's parameter names (``alignment.method``,
    ``min_depth``, ``depth_encoding``, ``publish_cloud``, ``sparse_points.frame_id``, ...: the pipeline's
    ``FRAME_PARAMS``); missing ones take the node's defaults.
    """

    image_topic: str
    camera_info_topic: str | None = None  # None: <image namespace>/camera_info if the bag has it; '' = none
    sparse_topic: str | None = None  # sparse metric depth Image (32FC1 m / 16UC1 mm) of the camera, or PointCloud2
    sparse_fraction: float = 1.0  # < 1: use only this random fraction of the sparse pixels, evaluate on the rest
    output_namespace: str = ""  # outputs at <ns>/depth/image ... ('' = root, like the node without namespace)
    visualize: bool = False  # also depth/image_vis and normals/image_vis (rgb8)
    batch_size: int = 4
    lookahead_s: float = 0.5
    settings: Mapping[str, Any] = field(default_factory=dict)

    def frame_settings(self) -> dict[str, Any]:
        """Every per-frame setting: the node's defaults overridden by ``settings``.

        Raises:
            BagError: an unknown name, a value out of range or not allowed, min_depth >= max_depth, or a
                transform without its frame (checked before the model loads, so a typo costs no time).
        """
        unknown = sorted(set(self.settings) - set(_SPEC))
        if unknown:
            msg = f'unknown per-frame setting(s) {", ".join(unknown)}; the settings are {", ".join(_SPEC)}'
            raise BagError(msg)
        values = {**frame_defaults(), **self.settings}
        for name in self.settings:
            problem = value_problem(_SPEC[name], values[name])
            if problem:
                if name == "sparse_points.transform":
                    problem = (f'--sparse-transform {" ".join(map(str, values[name]))}: {problem}; give '
                               f"{TRANSFORM_FORMAT}")
                raise BagError(problem)
        problem = depth_range_problem(values["min_depth"], values["max_depth"])
        if problem:
            raise BagError(problem)
        if "sparse_points.transform" in self.settings and not values["sparse_points.frame_id"]:
            msg = ("--sparse-transform needs --sparse-frame FRAME: the frame_id of the clouds it maps into the "
                   "image's optical frame")
            raise BagError(msg)
        return values


@dataclass
class ProcessSummary:
    """What ``process_bag`` did; ``damage`` says where a damaged input stopped being readable."""

    frames_in: int = 0
    frames_out: int = 0
    frames_metric: int = 0
    frames_failed: int = 0
    sparse_unused: int = 0  # frames whose matched sparse message could not be used (frame, camera_info, malformed)
    outputs: dict[str, int] = field(default_factory=dict)  # output topic -> messages written
    passthrough: dict[str, int] = field(default_factory=dict)  # input topic -> messages copied
    skipped_topics: dict[str, str] = field(default_factory=dict)
    scales: list[float] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)
    absrel_heldout: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    infer_seconds: float = 0.0
    damage: str | None = None
    camera_info_topic: str | None = None
    devices: list[str] = field(default_factory=list)  # where the engine ran (bag.parallel: one worker each)
    worker_frames: list[int] = field(default_factory=list)  # frames each device computed (bag.parallel)


@dataclass
class _Frame:
    raw: RawMessage
    msg: Any
    stamp: int


class _Processor:
    """One pass over the bag; see the module docstring for the queueing rule."""

    def __init__(self, bag: Bag, writer: BagWriter, engine: Any, opts: ProcessOptions,
                 progress: Callable[[int], None] | None) -> None:
        import torch

        from geodiff_ros.geometry.device import HostStaging

        self.bag, self.writer, self.engine, self.opts = bag, writer, engine, opts
        self.progress = progress
        self.summary = ProcessSummary()
        self.ts = writer.typestore
        self.pending: collections.deque[_Frame] = collections.deque()
        self.batch: list[_Frame] = []  # frames with complete inputs, waiting for a full engine batch
        self.infos: StampMatcher[Any] = StampMatcher(_MATCHER_ITEMS)
        self.sparse: StampMatcher[Any] = StampMatcher(_MATCHER_ITEMS)
        self.last_seen = {"info": -math.inf, "sparse": -math.inf, "tf": -math.inf}
        self.values = opts.frame_settings()
        self.alignment = AlignmentConfig.from_values(self.values)
        self.output = OutputConfig.from_values(self.values)
        self.sparse_config = SparseConfig.from_values(self.values)
        self.frames = FrameProcessor(self.alignment)
        self.staging = HostStaging(torch.device(getattr(engine, "device", None) or "cpu"))
        self.warned: set[str] = set()  # one warning per kind of unusable sparse input, not one per frame
        self._check_topics()

    # -- set-up

    def _check_topics(self) -> None:
        bag, opts = self.bag, self.opts
        self.compressed = image_topic_is_compressed(bag, opts.image_topic)
        info = camera_info_topic_for(bag, opts.image_topic, opts.camera_info_topic)
        if opts.camera_info_topic is None:
            if info:
                LOG.info("camera_info: using %s (sibling of the image topic)", info)
            else:
                LOG.warning("no camera_info topic given or found next to %s: no point cloud and no "
                            "depth/camera_info", opts.image_topic)
        self.info_topic = info
        self.summary.camera_info_topic = info or None
        if opts.sparse_topic:
            bag.select([opts.sparse_topic])
            if bag.topics[opts.sparse_topic].msgtype not in (_IMAGE, _CLOUD):
                msg = (f"--sparse-topic {opts.sparse_topic} has type {bag.topics[opts.sparse_topic].msgtype}; "
                       f"it must be a depth {_IMAGE} (32FC1 metres or 16UC1 millimetres) or a {_CLOUD}")
                raise BagError(msg)
        self.sparse_is_cloud = bool(opts.sparse_topic) and bag.topics[opts.sparse_topic].msgtype == _CLOUD
        self._setup_tf()
        frame_set = {"sparse_points.frame_id", "sparse_points.transform"} & set(opts.settings)
        if frame_set and not self.sparse_is_cloud:
            msg = ("--sparse-frame / --sparse-transform place a PointCloud2 --sparse-topic in the image's optical "
                   f'frame; {opts.sparse_topic or "no --sparse-topic"} is not one (a sparse depth Image is already '
                   "on the camera grid): drop them or give the cloud topic")
            raise BagError(msg)
        if not 0.0 < opts.sparse_fraction <= 1.0:
            msg = f"--sparse-fraction must be in (0, 1], got {opts.sparse_fraction}"
            raise BagError(msg)
        ns = "/" + opts.output_namespace.strip("/") if opts.output_namespace.strip("/") else ""
        self.out = {key: f"{ns}/{rel}" for key, rel in (
            ("relative", "depth/relative"), ("depth", "depth/image"), ("depth_info", "depth/camera_info"),
            ("normals", "normals/image"), ("points", "points"), ("depth_vis", "depth/image_vis"),
            ("normals_vis", "normals/image_vis"))}
        clash = sorted(set(self.out.values()) & set(bag.topics))
        if clash:
            msg = (f'the bag already has output topic(s) {", ".join(clash)} (processed before?); write the new '
                   "outputs elsewhere with --output-namespace, e.g. --output-namespace geodiff")
            raise BagError(msg)
        for meta in bag.topics.values():
            problem = bag.type_problem(meta.msgtype)
            if problem is None or meta.digest:
                try:
                    self.writer.add_topic(meta.name, meta.msgtype, meta.qos, meta.msgdef, meta.digest)
                    continue
                except BagError as err:
                    problem = str(err)
            self.summary.skipped_topics[meta.name] = problem
            LOG.warning("not copying %s (%s): %s", meta.name, meta.msgtype, problem)

    def _setup_tf(self) -> None:
        """A tf2 buffer of the bag's /tf and /tf_static for clouds in other frames than the image's (the node's TF:
        the static extrinsic settings win where given, as in the node)."""
        self.tf: Any = None
        self.tf_topics = [t for t in (_TF, _TF_STATIC) if t in self.bag.topics and self.sparse_is_cloud]
        self.no_tf = "the bag has no /tf or /tf_static"
        if not self.tf_topics:
            return
        from geodiff_ros.ros.tf import TF2_MISSING, BagTf, tf2_available

        if not tf2_available():
            self.no_tf = TF2_MISSING
            LOG.warning("the bag has %s but %s", " and ".join(self.tf_topics), TF2_MISSING)
            self.tf_topics = []
            return
        self.tf = BagTf()
        LOG.info("transforms of sparse clouds from the bag's %s", " and ".join(self.tf_topics))

    # -- main loop

    def run(self) -> ProcessSummary:
        t_start = time.monotonic()
        opts = self.opts
        for raw in self.bag.messages():
            if self.writer.has_topic(raw.topic):
                self._copy(raw)
            try:
                if raw.topic == opts.image_topic:
                    msg = self.bag.deserialize(raw)
                    self.pending.append(_Frame(raw, msg, stamp_ns(msg.header)))
                    self.summary.frames_in += 1
                elif raw.topic == self.info_topic:
                    msg = self.bag.deserialize(raw)
                    self.infos.add(stamp_ns(msg.header), msg)
                    self.last_seen["info"] = max(self.last_seen["info"], stamp_ns(msg.header))
                elif raw.topic == opts.sparse_topic:
                    msg = self.bag.deserialize(raw)
                    self.sparse.add(stamp_ns(msg.header), msg)
                    self.last_seen["sparse"] = max(self.last_seen["sparse"], stamp_ns(msg.header))
                elif raw.topic in self.tf_topics:
                    msg = self.bag.deserialize(raw)
                    self.tf.add(msg, static=raw.topic == _TF_STATIC)
                    if raw.topic == _TF and msg.transforms:
                        newest = max(stamp_ns(t.header) for t in msg.transforms)
                        self.last_seen["tf"] = max(self.last_seen["tf"], newest)
            except Exception as err:  # noqa: BLE001 - a corrupt message must not end the run
                self._fail(f"{raw.topic} at bag time {raw.timestamp * 1e-9:.3f} s does not deserialize: {err}")
                continue
            self._drain(raw.timestamp, final=False)
        self._drain(None, final=True)
        self._finish()
        self.summary.damage = self.bag.damage
        self.summary.seconds = time.monotonic() - t_start
        return self.summary

    def _copy(self, raw: RawMessage) -> None:
        """Copy an input message unchanged (bag.parallel defers this to keep the one-process write order)."""
        self.writer.write(raw.topic, raw.timestamp, raw.data)
        self.summary.passthrough[raw.topic] = self.summary.passthrough.get(raw.topic, 0) + 1

    def _finish(self) -> None:
        """End of the bag: nothing is outstanding in one process (bag.parallel waits for its workers here)."""

    def _fail(self, text: str) -> None:
        self.summary.frames_failed += 1
        self.summary.errors.append(text)
        LOG.warning("%s", text)

    def _ready(self, frame: _Frame, now: int | None) -> bool:
        if now is None:
            return True
        if now - frame.raw.timestamp > self.opts.lookahead_s * 1e9:
            return True
        info_ok = not self.info_topic or self.last_seen["info"] >= frame.stamp
        sparse_due = frame.stamp + self.alignment.sparse_max_dt * 1e9
        sparse_ok = not self.opts.sparse_topic or self.last_seen["sparse"] >= sparse_due
        tf_ok = _TF not in self.tf_topics or self.last_seen["tf"] >= sparse_due  # to interpolate at the cloud
        return info_ok and sparse_ok and tf_ok

    def _drain(self, now: int | None, final: bool) -> None:
        """Move frames whose inputs are complete to the batch; run the engine on full batches (all when final)."""
        while self.pending and self._ready(self.pending[0], now):
            self.batch.append(self.pending.popleft())
            if len(self.batch) >= max(1, self.opts.batch_size):
                self._process(self.batch)
                self.batch = []
        if final and self.batch:
            self._process(self.batch)
            self.batch = []
        self._prune()

    def _prune(self) -> None:
        """Drop camera_info / sparse messages too old for any image still to come (keep the latest)."""
        waiting = [*self.batch, *self.pending]
        oldest = min(f.stamp for f in waiting) if waiting else max(self.last_seen["info"], self.last_seen["sparse"])
        if math.isfinite(oldest):
            horizon = int(oldest - (self.alignment.sparse_max_dt + 2.0) * 1e9)
            self.infos.forget_before(horizon)
            self.sparse.forget_before(horizon)

    # -- per batch

    def _decode(self, frames: list[_Frame]) -> tuple[list[_Frame], list[np.ndarray]]:
        """The frames of a batch that decode, and their ``[H,W,3]`` uint8 images (the others are logged)."""
        rgbs: list[np.ndarray] = []
        good: list[_Frame] = []
        for frame in frames:
            try:
                rgbs.append(compressed_to_rgb8(frame.msg) if self.compressed else image_to_rgb8(frame.msg))
                good.append(frame)
            except ImageConversionError as err:
                self._fail(f"image at stamp {frame.stamp * 1e-9:.6f} s dropped: {err}")
        return good, rgbs

    def _process(self, frames: list[_Frame]) -> None:
        good, rgbs = self._decode(frames)
        if not good:
            return
        t0 = time.monotonic()
        pred = self.engine.predict(rgbs, on_device=True)  # VAE encode, one UNet step per task, VAE decode
        self.summary.infer_seconds += time.monotonic() - t0
        self._emit(good, rgbs, pred.depth, pred.normals)

    def _emit(self, good: list[_Frame], rgbs: list[np.ndarray], depth: Any, normals: Any) -> None:
        """Align and write the outputs of one batch, frame by frame in stamp order (the aligner is a filter)."""
        import torch

        for i, (frame, rgb) in enumerate(zip(good, rgbs, strict=True)):
            relative = None if depth is None else torch.as_tensor(depth[i])  # [H,W] in [0,1], 0 near
            normal_map = None if normals is None else torch.as_tensor(normals[i])  # [H,W,3] optical frame
            self._outputs(frame, rgb, relative, normal_map)
            if self.progress is not None:
                self.progress(1)

    def _camera_model(self, frame: _Frame, width: int, height: int) -> tuple[Any, PinholeIntrinsics | None]:
        """The camera_info nearest by stamp and its intrinsics, if it describes this image size."""
        info, _ = self.infos.nearest(frame.stamp)
        if info is None:
            return None, None
        try:
            intr = intrinsics_from_camera_info(
                info.k, info.p, int(info.width), int(info.height), int(info.binning_x), int(info.binning_y),
                int(info.roi.x_offset), int(info.roi.y_offset), int(info.roi.width), int(info.roi.height))
        except InvalidCameraInfo as err:
            LOG.warning("camera_info unusable, no cloud: %s", err)
            return None, None
        if (intr.width, intr.height) != (width, height):
            LOG.warning("camera_info describes %dx%d but the image is %dx%d: no cloud, no depth/camera_info",
                        intr.width, intr.height, width, height)
            return None, None
        return info, intr

    def _sparse_grid(self, frame: _Frame, width: int, height: int,
                     intr: PinholeIntrinsics | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The sparse depth matched to the frame on the image grid ``[H,W]`` (the node's rule) and, with
        ``sparse_fraction`` < 1, the held-out part of it; (None, None) without a usable one."""
        if not self.opts.sparse_topic:
            return None, None
        msg, _ = self.sparse.nearest(frame.stamp, self.alignment.sparse_max_dt)
        if msg is None:
            return None, None
        header = frame.msg.header
        kind = "points" if self.sparse_is_cloud else "depth"
        extrinsic = None
        if kind == "points":
            cloud_frame = msg.header.frame_id
            try:
                extrinsic = cloud_extrinsic(cloud_frame, header.frame_id, stamp_ns(msg.header), self.sparse_config,
                                            self.tf, self.no_tf)
            except SparseUnusable as err:
                self.summary.sparse_unused += 1
                self._warn_once(f"frame:{cloud_frame}", "sparse input on %s not used for the metric fit: %s "
                                "(geodiff_bag process: record /tf_static with the bag, or give --sparse-frame %s "
                                "--sparse-transform X Y Z QX QY QZ QW)", self.opts.sparse_topic, err, cloud_frame)
                return None, None
        try:
            native = sparse_metres(kind, msg, width, height, intr, extrinsic)  # [h,w] m, NaN none
        except Exception as err:  # noqa: BLE001 - a malformed sparse message must never cost the frame
            self.summary.sparse_unused += 1
            LOG.warning("sparse input at stamp %.6f s unusable, frame processed without it: %s (%s)",
                        frame.stamp * 1e-9, err, type(err).__name__)
            return None, None
        held = None
        if self.opts.sparse_fraction < 1.0:
            native, held = sparsify(native, self.opts.sparse_fraction, seed=frame.stamp % (2**32))
            held = sparse_to_image_grid(held, width, height)
        return sparse_to_image_grid(native, width, height), held  # [H,W]

    def _outputs(self, frame: _Frame, rgb: np.ndarray, relative: Any, normals: Any) -> None:
        height, width = rgb.shape[:2]
        info, intr = self._camera_model(frame, width, height)
        back_s = self.frames.time_went_backwards(frame.stamp, self.alignment)
        if back_s is not None:
            LOG.warning("time went backwards by %.3f s at stamp %.6f s: alignment state reset", back_s,
                        frame.stamp * 1e-9)
        sparse, held = self._sparse_grid(frame, width, height, intr) if relative is not None else (None, None)
        result = self.frames.process(
            stamp_ns=frame.stamp, relative=relative, normals=normals, rgb=rgb, intr=intr, sparse=sparse,
            alignment=self.alignment, output=self.output,
            wanted=Wanted(depth_vis=self.opts.visualize, normals_vis=self.opts.visualize, cloud=True),
            staging=self.staging)
        for kind, text in result.warnings:
            if kind == "no_fit":  # says why this frame has no fit: every time
                LOG.warning("%s (stamp %.6f s)", text, frame.stamp * 1e-9)
            else:
                self._warn_once(kind, "%s", text)
        self._summarise(result, held)
        self._write_outputs(frame, result, info)

    def _summarise(self, result: FrameResult, held: np.ndarray | None) -> None:
        if result.state is None:
            return
        self.summary.frames_metric += 1
        self.summary.scales.append(float(result.state.scale))
        if math.isfinite(result.state.residual_rel):
            self.summary.residuals.append(float(result.state.residual_rel))
        if held is not None:
            depth = result.host["depth"].numpy()
            metric = depth if depth.dtype != np.uint16 else np.where(depth > 0, depth / 1000.0, np.nan)
            ok = np.isfinite(held) & np.isfinite(metric)
            if ok.any():
                self.summary.absrel_heldout.append(float(np.mean(np.abs(metric[ok] - held[ok]) / held[ok])))

    def _write_outputs(self, frame: _Frame, result: FrameResult, info: Any) -> None:
        """One message per output, header copied from the input, stored at the input's bag time."""
        header = frame.msg.header
        bag_time = frame.raw.timestamp
        host = result.host
        if "relative" in host:
            self._write("relative", bag_time, self._image(host["relative"].numpy(), "32FC1", header))
        if "depth_vis" in host:
            self._write("depth_vis", bag_time, self._image(host["depth_vis"].numpy(), "rgb8", header))
        if "depth" in host:
            depth = host["depth"].numpy()
            self._write("depth", bag_time, self._image(depth, "16UC1" if depth.dtype == np.uint16 else "32FC1",
                                                       header))
        if info is not None:
            self._write("depth_info", bag_time, dataclasses.replace(info, header=header))
        if "normals" in host:
            self._write("normals", bag_time, self._image(host["normals"].numpy(), "32FC3", header))
        if "normals_vis" in host:
            self._write("normals_vis", bag_time, self._image(host["normals_vis"].numpy(), "rgb8", header))
        if "points" in host:
            packed = host["points"].numpy()  # [H',W',k] float32, the structured layout's bytes
            dtype = np.dtype([(name, "<f4") for name in result.cloud_fields])
            self._write("points", bag_time, self._cloud(packed.view(dtype)[..., 0], header))
        self.summary.frames_out += 1

    def _warn_once(self, key: str, text: str, *args: Any) -> None:
        if key not in self.warned:
            self.warned.add(key)
            LOG.warning(text + " (warned once; the summary counts the frames)", *args)

    def _write(self, key: str, bag_time: int, msg: Any) -> None:
        topic = self.out[key]
        self.writer.write_msg(topic, bag_time, msg)
        self.summary.outputs[topic] = self.summary.outputs.get(topic, 0) + 1

    def _image(self, array: np.ndarray, encoding: str, header: Any) -> Any:
        fields = numpy_to_image_fields(array, encoding)
        fields["data"] = np.frombuffer(fields["data"], np.uint8)  # rosbags wants numpy uint8
        return self.ts.types[_IMAGE](header=header, **fields)

    def _cloud(self, points: np.ndarray, header: Any) -> Any:
        """PointCloud2 (rosbags) from a structured ``[H',W']`` array of float32 fields (pointcloud.cloud_array's
        layout)."""
        point_field = self.ts.types["sensor_msgs/msg/PointField"]
        fields = [point_field(name=name, offset=int(points.dtype.fields[name][1]), datatype=_FLOAT32, count=1)
                  for name in points.dtype.names]
        height, width = points.shape
        data = np.frombuffer(np.ascontiguousarray(points).tobytes(), np.uint8)
        return self.ts.types["sensor_msgs/msg/PointCloud2"](
            header=header, height=height, width=width, fields=fields, is_bigendian=False,
            point_step=points.dtype.itemsize, row_step=points.dtype.itemsize * width, data=data, is_dense=False)


def process_bag(bag: Bag, writer: BagWriter, engine: Any, options: ProcessOptions,
                progress: Callable[[int], None] | None = None) -> ProcessSummary:
    """Run ``engine`` over ``options.image_topic`` of ``bag`` and write originals + outputs to ``writer``.

    ``writer`` must use ``bag.typestore`` so types the bag defines itself can be copied. A damaged bag is
    processed up to where it stops being readable (``summary.damage`` says where).

    Raises:
        BagError: a named topic is missing or has the wrong type, an output topic already exists in the bag, or a
            setting is invalid.
    """
    return _Processor(bag, writer, engine, options, progress).run()
