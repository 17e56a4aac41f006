"""Offline processing of a bag: the engine over its image topic, written to a new bag next to the original topics.

What the ``geodiff`` node would publish live, computed from a recording without DDS or rclpy: ``depth/relative``,
``depth/image`` (metres, when a metric fit to the sparse depth exists), ``depth/camera_info``, ``normals/image``,
``points`` (and the colour visualisations on request). Headers are copied from the input image (same stamp and
frame_id), and each output is stored at the input image's bag time, so a replay of the new bag is in sync.

The bag is read once, in order. An image waits in a short queue until the camera_info and sparse depth that belong
to it (nearest stamp) can have arrived: a later message on those topics passed its stamp, or the bag time moved on
by ``lookahead_s``. The sparse input is a depth Image of the same camera or, as the node's ``sparse_points``, a
PointCloud2 projected onto the image grid through the camera_info (nearest point per pixel), in the image's optical
frame or in ``sparse_frame`` moved there by the static extrinsic ``sparse_transform``. Messages are decoded
with the node's duck-typed conversions (rosbags messages carry numpy ``data``) and outputs are serialized with the
rosbags type store.

Shapes: ``H,W`` image; ``H',W'`` after ``cloud_stride``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
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
from geodiff_ros.geometry import (
    InvalidCameraInfo,
    PinholeIntrinsics,
    TemporalAligner,
    apply_alignment,
    backproject,
    fit_scale_shift,
    intrinsics_from_camera_info,
    sparse_to_image_grid,
)
from geodiff_ros.geometry.transform import InvalidTransform, RigidTransform
from geodiff_ros.ros.conversions import (
    ImageConversionError,
    compressed_to_rgb8,
    depth_to_metres,
    image_to_rgb8,
    numpy_to_image_fields,
    stamp_ns,
)
from geodiff_ros.ros.params import PARAMS
from geodiff_ros.ros.pointcloud import cloud_array, cloud_to_sparse_depth

__all__ = ["ProcessOptions", "ProcessSummary", "process_bag", "sparsify", "sparse_depth_image"]

LOG = logging.getLogger(__name__)

_DEFAULTS = {p.name: p.default for p in PARAMS}  # the node's parameter defaults: offline = live behaviour
_IMAGE = "sensor_msgs/msg/Image"
_INFO = "sensor_msgs/msg/CameraInfo"
_CLOUD = "sensor_msgs/msg/PointCloud2"
_IDENTITY = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)
TRANSFORM_FORMAT = ("X Y Z QX QY QZ QW (metres and a quaternion: the pose of the cloud frame in the image's optical "
                    "frame, as `ros2 run tf2_ros tf2_echo <image frame> <cloud frame>` prints it)")
_FLOAT32 = 7  # sensor_msgs/PointField FLOAT32


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
    """Settings of ``geodiff_bag process`` (alignment defaults are the node's parameter defaults)."""

    image_topic: str
    camera_info_topic: str | None = None  # None: <image namespace>/camera_info if the bag has it; '' = none
    sparse_topic: str | None = None  # sparse metric depth Image (32FC1 m / 16UC1 mm) of the camera, or PointCloud2
    sparse_fraction: float = 1.0  # < 1: use only this random fraction of the sparse pixels, evaluate on the rest
    sparse_frame: str = ""  # frame of PointCloud2 sparse input that sparse_transform maps into the optical frame
    sparse_transform: Sequence[float] | None = None  # [x, y, z, qx, qy, qz, qw]; None = identity (node default)
    output_namespace: str = ""  # outputs at <ns>/depth/image ... ('' = root, like the node without namespace)
    visualize: bool = False  # also depth/image_vis and normals/image_vis (rgb8)
    cloud: bool = True
    cloud_stride: int = 1
    cloud_color: bool = True
    cloud_normals: bool = True
    batch_size: int = 4
    lookahead_s: float = 0.5
    method: str = _DEFAULTS["alignment.method"]
    min_points: int = _DEFAULTS["alignment.min_points"]
    min_inlier_ratio: float = _DEFAULTS["alignment.min_inlier_ratio"]
    inlier_threshold_rel: float = _DEFAULTS["alignment.inlier_threshold_rel"]
    ema_alpha: float = _DEFAULTS["alignment.ema_alpha"]
    max_fallback_age_s: float = _DEFAULTS["alignment.max_fallback_age_s"]
    reset_ratio: float = _DEFAULTS["alignment.reset_ratio"]
    sparse_max_dt: float = _DEFAULTS["alignment.sparse_max_dt"]
    fixed_scale: float = _DEFAULTS["alignment.fixed_scale"]
    min_depth: float = _DEFAULTS["min_depth"]
    max_depth: float = _DEFAULTS["max_depth"]

    def sparse_extrinsic(self) -> RigidTransform:
        """The static extrinsic of the cloud frame (checked before the model loads, so a typo costs no time).

        Raises:
            BagError: not 7 finite numbers with a non-zero quaternion, or given without ``sparse_frame``.
        """
        values = _IDENTITY if self.sparse_transform is None else self.sparse_transform
        try:
            extrinsic = RigidTransform(values)
        except (InvalidTransform, TypeError, ValueError) as err:
            msg = f'--sparse-transform {" ".join(map(str, values))}: {err}; give {TRANSFORM_FORMAT}'
            raise BagError(msg) from err
        if self.sparse_transform is not None and not self.sparse_frame:
            msg = ("--sparse-transform needs --sparse-frame FRAME: the frame_id of the clouds it maps into the "
                   "image's optical frame")
            raise BagError(msg)
        return extrinsic


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
        self.bag, self.writer, self.engine, self.opts = bag, writer, engine, opts
        self.progress = progress
        self.summary = ProcessSummary()
        self.ts = writer.typestore
        self.pending: collections.deque[_Frame] = collections.deque()
        self.batch: list[_Frame] = []  # frames with complete inputs, waiting for a full engine batch
        self.infos: collections.deque[tuple[int, Any]] = collections.deque()
        self.sparse: collections.deque[tuple[int, Any]] = collections.deque()
        self.last_seen = {"info": -math.inf, "sparse": -math.inf}
        self.extrinsic = opts.sparse_extrinsic()
        self.warned: set[str] = set()  # one warning per kind of unusable sparse input, not one per frame
        fixed = float(opts.fixed_scale)
        self.aligner = TemporalAligner(ema_alpha=opts.ema_alpha, max_fallback_age_s=opts.max_fallback_age_s,
                                       reset_ratio=opts.reset_ratio, fixed_scale=fixed if fixed > 0 else None)
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
        if (opts.sparse_frame or opts.sparse_transform is not None) and not self.sparse_is_cloud:
            msg = ('--sparse-frame / --sparse-transform place a PointCloud2 --sparse-topic in the image\'s optical '
                   f'frame; {opts.sparse_topic or "no --sparse-topic"} is not one (a sparse depth Image is already '
                   'on the camera grid): drop them or give the cloud topic')
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
                   'outputs elsewhere with --output-namespace, e.g. --output-namespace geodiff')
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
                    self.infos.append((stamp_ns(msg.header), msg))
                    self.last_seen["info"] = max(self.last_seen["info"], stamp_ns(msg.header))
                elif raw.topic == opts.sparse_topic:
                    msg = self.bag.deserialize(raw)
                    self.sparse.append((stamp_ns(msg.header), msg))
                    self.last_seen["sparse"] = max(self.last_seen["sparse"], stamp_ns(msg.header))
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
        sparse_due = frame.stamp + self.opts.sparse_max_dt * 1e9
        sparse_ok = not self.opts.sparse_topic or self.last_seen["sparse"] >= sparse_due
        return info_ok and sparse_ok

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
        """Drop camera_info / sparse messages too old for any image still to come (keep the latest info)."""
        waiting = [*self.batch, *self.pending]
        oldest = min(f.stamp for f in waiting) if waiting else max(self.last_seen.values())
        horizon = oldest - int((self.opts.sparse_max_dt + 2.0) * 1e9)
        for ring in (self.infos, self.sparse):
            while len(ring) > 1 and ring[0][0] < horizon:
                ring.popleft()

    @staticmethod
    def _nearest(ring: collections.deque[tuple[int, Any]], stamp: int, max_dt_ns: float | None) -> Any:
        if not ring:
            return None
        best = min(ring, key=lambda item: abs(item[0] - stamp))
        if max_dt_ns is not None and abs(best[0] - stamp) > max_dt_ns:
            return None
        return best[1]

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
        pred = self.engine.predict(rgbs)  # Model invocation: VAE encode, one UNet step per task, VAE decode
        self.summary.infer_seconds += time.monotonic() - t0
        self._emit(good, rgbs, pred.depth, pred.normals)

    def _emit(self, good: list[_Frame], rgbs: list[np.ndarray], depth: Any, normals: Any) -> None:
        """Align and write the outputs of one batch, frame by frame in stamp order (the aligner is a filter)."""
        for i, (frame, rgb) in enumerate(zip(good, rgbs, strict=True)):
            relative = None if depth is None else np.asarray(depth[i])  # [H,W] in [0,1], 0 near
            normal_map = None if normals is None else np.asarray(normals[i])  # [H,W,3] optical frame
            self._outputs(frame, rgb, relative, normal_map)
            if self.progress is not None:
                self.progress(1)

    def _outputs(self, frame: _Frame, rgb: np.ndarray, relative: np.ndarray | None,
                 normals: np.ndarray | None) -> None:
        from geodiff_ros.visualize import colorize_depth, normals_to_rgb

        opts = self.opts
        header = frame.msg.header
        bag_time = frame.raw.timestamp
        height, width = rgb.shape[:2]

        # 1. Camera model (nearest camera_info by stamp, else the latest one): must describe this image size.
        info = self._nearest(self.infos, frame.stamp, None)
        intr = None
        if info is not None:
            try:
                intr = intrinsics_from_camera_info(
                    info.k, info.p, int(info.width), int(info.height), int(info.binning_x), int(info.binning_y),
                    int(info.roi.x_offset), int(info.roi.y_offset), int(info.roi.width), int(info.roi.height))
            except InvalidCameraInfo as err:
                LOG.warning("camera_info unusable, no cloud: %s", err)
            if intr is not None and (intr.width, intr.height) != (width, height):
                LOG.warning("camera_info describes %dx%d but the image is %dx%d: no cloud, no depth/camera_info",
                            intr.width, intr.height, width, height)
                intr, info = None, None

        # 2. Metric alignment to the sparse depth nearest in stamp (the node's rule: robust fit, smoothed).
        metric = None
        if relative is not None:
            result = None
            held = None
            sparse_msg = self._nearest(self.sparse, frame.stamp, opts.sparse_max_dt * 1e9) if opts.sparse_topic \
                else None
            sparse_m = None
            if sparse_msg is not None:
                try:
                    sparse_m = self._sparse_metres(sparse_msg, header, width, height, intr)  # [h,w] m, NaN none
                except Exception as err:  # noqa: BLE001 - a malformed sparse message must never cost the frame
                    LOG.warning("sparse input at stamp %.6f s unusable, frame processed without it: %s (%s)",
                                frame.stamp * 1e-9, err, type(err).__name__)
                if sparse_m is None:
                    self.summary.sparse_unused += 1
            if sparse_m is not None:
                try:
                    if opts.sparse_fraction < 1.0:
                        sparse_m, held = sparsify(sparse_m, opts.sparse_fraction, seed=frame.stamp % (2**32))
                        held = sparse_to_image_grid(held, width, height)
                    sparse = sparse_to_image_grid(sparse_m, width, height)  # [H,W]
                    result = fit_scale_shift(relative, sparse, method=opts.method, min_points=opts.min_points,
                                             min_inlier_ratio=opts.min_inlier_ratio,
                                             inlier_threshold_rel=opts.inlier_threshold_rel)
                    if not result.ok:
                        LOG.warning("no metric fit at stamp %.6f s: %s", frame.stamp * 1e-9, result.reason)
                except (ImageConversionError, ValueError) as err:
                    LOG.warning("sparse depth at stamp %.6f s unusable: %s", frame.stamp * 1e-9, err)
            state = self.aligner.update(result, frame.stamp * 1e-9)
            if state is not None:
                metric = apply_alignment(relative, state.scale, state.shift, opts.min_depth, opts.max_depth)
                self.summary.frames_metric += 1
                self.summary.scales.append(float(state.scale))
                if math.isfinite(state.residual_rel):
                    self.summary.residuals.append(float(state.residual_rel))
                if held is not None:
                    ok = np.isfinite(held) & np.isfinite(metric)
                    if ok.any():
                        self.summary.absrel_heldout.append(
                            float(np.mean(np.abs(metric[ok] - held[ok]) / held[ok])))

        # 3. Outputs: header copied from the input, stored at the input's bag time.
        if relative is not None:
            self._write("relative", bag_time, self._image(relative, "32FC1", header))
            if opts.visualize:
                vis = metric if metric is not None else relative
                self._write("depth_vis", bag_time, self._image(colorize_depth(vis), "rgb8", header))
        if metric is not None:
            self._write("depth", bag_time, self._image(metric, "32FC1", header))
        if info is not None:
            self._write("depth_info", bag_time, dataclasses.replace(info, header=header))
        if normals is not None:
            self._write("normals", bag_time, self._image(normals, "32FC3", header))
            if opts.visualize:
                self._write("normals_vis", bag_time, self._image(normals_to_rgb(normals), "rgb8", header))
        if opts.cloud and metric is not None and intr is not None:
            stride = max(1, int(opts.cloud_stride))
            xyz = backproject(metric, intr, stride)  # [H',W',3] metres, NaN invalid (depth_image_proc formula)
            colours = rgb[::stride, ::stride] if opts.cloud_color else None
            nrm = normals[::stride, ::stride] if (normals is not None and opts.cloud_normals) else None
            self._write("points", bag_time, self._cloud(cloud_array(xyz, colours, nrm), header))
        self.summary.frames_out += 1

    def _sparse_metres(self, msg: Any, header: Any, width: int, height: int,
                       intr: PinholeIntrinsics | None) -> np.ndarray | None:
        """Sparse metres, NaN = none: a depth Image on its own grid; a cloud projected onto the image grid (the
        node's code path), or None when it cannot be placed (warned once per cause, naming the option to fix)."""
        if not self.sparse_is_cloud:
            return depth_to_metres(msg)  # [h,w]
        if intr is None:
            self._warn_once("intr", "sparse clouds on %s need a usable camera_info of the image to be projected: "
                            "not used for the metric fit (give --camera-info-topic)", self.opts.sparse_topic)
            return None
        depth = cloud_to_sparse_depth(msg, header.frame_id, self.opts.sparse_frame, self.extrinsic, intr, width,
                                      height)  # [H,W]
        if depth is None:
            cloud_frame = msg.header.frame_id
            self._warn_once(
                f"frame:{cloud_frame}", "sparse clouds on %s are in frame %r, the image in %r: not used for the "
                "metric fit; give --sparse-frame %s --sparse-transform X Y Z QX QY QZ QW (its pose in the image "
                "frame, as `ros2 run tf2_ros tf2_echo %s %s` prints it)", self.opts.sparse_topic, cloud_frame,
                header.frame_id, cloud_frame, header.frame_id, cloud_frame)
        return depth

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
        """PointCloud2 (rosbags) from the structured ``[H',W']`` array of pointcloud.cloud_array (all float32)."""
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
        BagError: a named topic is missing or has the wrong type, or an output topic already exists in the bag.
    """
    return _Processor(bag, writer, engine, options, progress).run()
