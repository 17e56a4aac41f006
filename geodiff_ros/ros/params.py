"""Every parameter of the ``geodiff`` node, declared in one place.

``PARAMS`` is the single source of truth: name, default, description, numeric range or allowed strings, and
whether the value is fixed once the node is configured (model, device, dtype, QoS...). ``config/geodiff.yaml``
mirrors these defaults (a test compares them). ``validate_changes`` is pure Python so it can be tested without
rclpy; the node calls it from its on-set-parameters callback and returns its reason to the caller of
``ros2 param set``.

Multi-camera: ``cameras`` names the cameras one node serves; each one may override a few runtime
parameters as ``camera.<name>.<parameter>`` (``PER_CAMERA``), declared per camera without a default so an unset
override means "use the node-wide value".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from geodiff_ros.engine.config import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    DEFAULT_PROCESSING_RES,
    DEFAULT_STARTUP_MODE,
    DEPTH_HUB_ID,
    DTYPE_CHOICES,
    NORMALS_HUB_ID,
    OPTIMIZE_MODES,
    STARTUP_MODES,
    processing_res_problem,
)
from geodiff_ros.pipeline.settings import FRAME_PARAMS, ParamSpec, depth_range_problem, value_problem

if TYPE_CHECKING:
    from rclpy.node import Node

__all__ = [
    "LAUNCH_ARGUMENTS",
    "PARAMS",
    "PER_CAMERA",
    "ParamSpec",
    "Settings",
    "camera_override_key",
    "camera_overrides",
    "declare_all",
    "declare_camera_overrides",
    "engine_config_kwargs",
    "name_launch_arguments",
    "read_settings",
    "validate_changes",
]

_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?)$")


PARAMS: tuple[ParamSpec, ...] = (
    # --- engine (read when configuring) ---
    ParamSpec("model_depth", DEPTH_HUB_ID,
              'Depth model: Hugging Face hub id or local folder in hub layout; "" disables depth.',
              configure_time=True),
    ParamSpec("model_normals", NORMALS_HUB_ID,
              'Normals model: Hugging Face hub id or local folder; "" disables normals.', configure_time=True),
    ParamSpec("check_model_task", True,
              "Refuse a model whose model_index.json (geodiff_task) or own folder / repo name says it is the other "
              "task (swapped model_depth / model_normals). false trusts the parameter it was given in.",
              configure_time=True),
    ParamSpec("tasks", ["depth", "normals"],
              "Which of the configured models to run (subset of depth, normals).",
              choices=("depth", "normals"), configure_time=True),
    ParamSpec("device", DEFAULT_DEVICE, "Torch device: cpu, cuda or cuda:N.", configure_time=True),
    ParamSpec("dtype", DEFAULT_DTYPE,
              "Inference precision. fp16 (default): fast on a GPU and within the engine benchmark's accuracy "
              "tolerance; bf16 only on request (as fast, but outside that tolerance: benchmarks/README.md); fp32 "
              "the official computation. The CPU runs fp16 as fp32.",
              choices=DTYPE_CHOICES, configure_time=True),
    ParamSpec("allow_cpu_fallback", False,
              "If the device is unavailable, run on CPU (slow) instead of failing to configure.",
              configure_time=True),
    ParamSpec("local_files_only", False, "Never download: load hub ids from the local cache only.",
              configure_time=True),
    ParamSpec("processing_res", DEFAULT_PROCESSING_RES,
              "Longest image edge fed to the network, multiple of 8 (0 = native size). Outputs match the input size.",
              lo=0, hi=4096, configure_time=True),
    ParamSpec("optimize", "auto",
              "Engine speed-up (geodiff_ros/engine/accel.py). auto (default) = compile+graph on a CUDA GPU (fastest; "
              "the first start compiles for a minute or two, restarts re-use the kernels cached per user, see the "
              "README), none on the CPU. none = the official eager path; channels_last; graph (CUDA graphs: start-up "
              "in seconds, about 3x slower than compile+graph); compile (torch.compile); compile+graph. The compiling "
              "runs in the worker on activation (warmup_size), shown in /diagnostics; services stay responsive.",
              choices=OPTIMIZE_MODES, configure_time=True),
    ParamSpec("cpu_threads", 0,
              "device cpu only: torch intra-op threads (0 = one per core). 1 is faster for small models on 2-4 "
              "cores shared with ROS (benchmarks/README.md); the full-size model wants every core.",
              lo=0, hi=256, configure_time=True),
    ParamSpec("startup_mode", DEFAULT_STARTUP_MODE,
              "With a compiled optimize mode: serve_eager (default) publishes from the first camera frame with the "
              "eager path while the compiled path (and a CUDA graph per batch size the cameras form) builds in the "
              "background, switching per batch size when ready (/diagnostics 'serving'); wait_compiled builds it "
              "first, frames waiting, for repeatable latency from the first frame.",
              choices=STARTUP_MODES, configure_time=True),
    ParamSpec("warmup_size", [640, 480],
              "Width and height of a dummy frame the worker runs when the node activates, before real frames, so "
              "lazy initialisation, compilation and CUDA-graph capture do not land on the first camera frame "
              "(the node stays responsive meanwhile; camera frames wait newest-first). [0, 0] skips it."),
    # --- topics ---
    ParamSpec("input_transport", "raw", "raw: sensor_msgs/Image on image; compressed: CompressedImage (JPEG/PNG)"
              " on image/compressed.", choices=("raw", "compressed"), configure_time=True),
    ParamSpec("qos.input.reliability", "best_effort",
              "Reliability of the input subscriptions (best_effort = SensorDataQoS, REP 2003).",
              choices=("best_effort", "reliable"), configure_time=True),
    ParamSpec("qos.input.depth", 5, "History depth of the input subscriptions.", lo=1, hi=1000,
              configure_time=True),
    ParamSpec("qos.output.reliability", "reliable",
              "Reliability of the outputs (reliable reaches depth_image_proc and RViz defaults).",
              choices=("best_effort", "reliable"), configure_time=True),
    ParamSpec("qos.output.depth", 2, "History depth of the output publishers.", lo=1, hi=1000,
              configure_time=True),
    # --- input checks and preparation (runtime) ---
    ParamSpec("max_input_pixels", 40_000_000,
              "Largest input image in pixels (width x height; 40 MP holds 8K UHD); a larger frame is dropped with a "
              "warning before it is decoded (compressed: size read from the JPEG/PNG header). 0 = no limit.",
              lo=0, hi=2_000_000_000),
    ParamSpec("reduce_large_input", True,
              "Compressed input at least 4x processing_res on its longest edge is decoded at 1/2, 1/4 or 1/8 size "
              "(libjpeg scaling, still >= 2x processing_res); outputs and depth/camera_info then have that size. "
              "false: outputs always at the input size."),
    ParamSpec("rectify", False,
              "Undistort and rectify each image with its CameraInfo (D, K, R, P; OpenCV maps cached per "
              "CameraInfo) before inference, as image_proc does: for a lens with distortion and no image_proc "
              "upstream, so clouds are right. Outputs then carry the rectified CameraInfo (D = 0, R = I, K = P)."),
    # --- cameras and batching ---
    ParamSpec("cameras", [],
              "Camera names served by this node, e.g. [front, left]: each uses topics under its own prefix "
              "(front/image, front/camera_info, front/depth/image, ...). [] = one camera on image, camera_info, ...",
              configure_time=True),
    ParamSpec("batch_size", 4, "Most frames (of different cameras) run through the model in one engine call.",
              lo=1, hi=64, configure_time=True),
    ParamSpec("batch_window_s", 0.005,
              "Several cameras only: after a frame arrives, wait at most this long for other cameras' frames so "
              "they share one engine call (0 = never wait). Not added when the worker was busy anyway.",
              lo=0.0, hi=1.0),
    # --- per frame (runtime): point cloud, metric alignment, depth range and encoding (the pipeline's table) ---
    *FRAME_PARAMS,
    # --- node ---
    ParamSpec("autostart", True, "Configure and activate at start-up (off: drive it with ros2 lifecycle).",
              configure_time=True),
    ParamSpec("diagnostics_period", 1.0, "Seconds between /diagnostics messages.", lo=0.05, hi=3600.0,
              configure_time=True),
)

_BY_NAME = {p.name: p for p in PARAMS}

# Launch arguments (launch/depth.launch.py, multi_gpu.launch.py) that set one parameter each: the launch files
# declare them from this table, and messages that name such a parameter also name its argument (name_launch_arguments).
LAUNCH_ARGUMENTS: dict[str, str] = {
    "model_depth": "model", "model_normals": "model_normals", "device": "device", "dtype": "dtype",
    "allow_cpu_fallback": "allow_cpu_fallback", "local_files_only": "local_files_only",
    "processing_res": "processing_res", "optimize": "optimize", "cpu_threads": "cpu_threads",
    "batch_size": "batch_size", "input_transport": "input_transport", "autostart": "autostart",
    "publish_cloud": "publish_cloud", "cloud_stride": "cloud_stride", "alignment.fixed_scale": "fixed_scale",
    "max_depth": "max_depth",
}


def name_launch_arguments(text: str) -> str:
    """``text`` plus the launch arguments of the parameters it names, e.g. "... (ros2 launch: model:=...)"."""
    named = [arg for param, arg in LAUNCH_ARGUMENTS.items()
             if re.search(rf"(?<![\w.]){re.escape(param)}(?!\w)", text)]
    if not named:
        return text
    return f'{text} (ros2 launch: {", ".join(f"{arg}:=..." for arg in dict.fromkeys(named))})'

# Runtime parameters a camera may override as camera.<name>.<parameter> (scale, range and cloud differ per camera).
PER_CAMERA: tuple[str, ...] = ("alignment.fixed_scale", "alignment.sparse_max_dt", "min_depth", "max_depth",
                               "cloud_stride", "sparse_points.frame_id", "sparse_points.transform")


def camera_override_key(name: str) -> tuple[str, str] | None:
    """``camera.front.max_depth`` -> ("front", "max_depth"); None for any other parameter name."""
    if not name.startswith("camera."):
        return None
    camera, _, key = name[len("camera."):].partition(".")
    if camera and key in PER_CAMERA:
        return camera, key
    return None


def declare_all(node: Node) -> None:
    """Declare every parameter on ``node`` with a descriptor (description, range, allowed values)."""
    from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

    for spec in PARAMS:
        if spec.name == "cameras":
            # rclpy types a declared [] as a byte array and rcl turns a YAML [] into "not set": dynamic typing
            # accepts both and a string list; read_settings normalises the value (camera_sets.parse_camera_list).
            node.declare_parameter(spec.name, [], ParameterDescriptor(
                description=spec.description, dynamic_typing=True,
                additional_constraints="string array of ROS name tokens; fixed while configured"))
            continue
        constraints = []
        if spec.choices:
            constraints.append("one of: " + ", ".join(spec.choices))
        if spec.configure_time:
            constraints.append("fixed while configured (cleanup the node to change it)")
        desc = ParameterDescriptor(description=spec.description, additional_constraints="; ".join(constraints))
        if spec.lo is not None and spec.hi is not None:
            if isinstance(spec.default, bool):
                pass
            elif isinstance(spec.default, int):
                desc.integer_range = [IntegerRange(from_value=int(spec.lo), to_value=int(spec.hi), step=0)]
            else:
                desc.floating_point_range = [
                    FloatingPointRange(from_value=float(spec.lo), to_value=float(spec.hi), step=0.0)]
        node.declare_parameter(spec.name, spec.default, desc)


def declare_camera_overrides(node: Node, cameras: list[str]) -> None:
    """Declare ``camera.<name>.<parameter>`` for each camera and ``PER_CAMERA`` entry, typed but without a value:
    a value from the params file or ``-p`` overrides the node-wide one for that camera only."""
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.parameter import Parameter

    kinds = {bool: Parameter.Type.BOOL, int: Parameter.Type.INTEGER, float: Parameter.Type.DOUBLE,
             str: Parameter.Type.STRING, list: Parameter.Type.DOUBLE_ARRAY}
    for camera in cameras:
        for key in PER_CAMERA:
            name = f"camera.{camera}.{key}"
            if node.has_parameter(name):
                continue
            spec = _BY_NAME[key]
            node.declare_parameter(name, kinds[type(spec.default)], ParameterDescriptor(
                description=f"Camera {camera} only: {spec.description} (unset = the node-wide {key})."))


def camera_overrides(node: Node, cameras: list[str]) -> dict[str, dict[str, Any]]:
    """Camera -> {parameter: value} for the per-camera overrides that are set."""
    from rclpy.exceptions import ParameterUninitializedException

    out: dict[str, dict[str, Any]] = {}
    for camera in cameras:
        out[camera] = {}
        for key in PER_CAMERA:
            try:
                value = node.get_parameter(f"camera.{camera}.{key}").value
            except ParameterUninitializedException:
                continue
            if value is not None:
                out[camera][key] = value
    return out


def _check_one(spec: ParamSpec, value: Any) -> str | None:
    """Reason ``value`` is invalid for ``spec``, or None. Ranges are also enforced by rclpy; kept for tests."""
    reason = value_problem(spec, value)  # range, choices and the per-frame settings' own rules
    if reason:
        return reason
    if spec.name == "cameras":
        from geodiff_ros.ros.camera_sets import CameraListError, parse_camera_list

        try:
            parse_camera_list(value)
        except CameraListError as err:
            return str(err)
        return None
    if spec.name == "warmup_size":
        size = list(value)
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
            return f"warmup_size={size!r} must be two integers [width, height] ([0, 0] skips the warm-up)"
        if size != [0, 0] and not all(8 <= v <= 8192 for v in size):
            return f"warmup_size={size!r}: width and height must be within [8, 8192], or [0, 0] to skip the warm-up"
        return None
    if spec.name == "device" and not _DEVICE_RE.match(str(value)):
        return f"device={value!r} must be cpu, cuda or cuda:N"
    if spec.name == "processing_res":
        return processing_res_problem(value)
    return None


def validate_changes(changes: dict[str, Any], current: dict[str, Any], configured: bool) -> str | None:
    """Reason to reject a set of parameter changes, or None to accept them.

    Args:
        changes: names -> new values (one atomic ``set_parameters`` request).
        current: names -> current values (to check cross-parameter constraints).
        configured: whether the engine/endpoints exist (configure-time parameters are then fixed).
    """
    merged = {**current, **changes}
    for name, value in changes.items():
        spec = _BY_NAME.get(name)
        per_camera = camera_override_key(name)
        if per_camera is not None:
            if value is None:
                continue  # unset again: the node-wide value applies
            reason = _check_one(_BY_NAME[per_camera[1]], value)
            if reason:
                return f"{name}: {reason}"
            continue
        if spec is None:
            continue  # use_sim_time, qos_overrides..., handled by rclpy
        if configured and spec.configure_time and value != current.get(name):
            return (f"{name} is fixed while the node is configured; run `ros2 lifecycle set <node> deactivate` "
                    f"and `cleanup`, set it, then `configure` and `activate` again")
        reason = _check_one(spec, value)
        if reason:
            return reason
    reason = depth_range_problem(merged.get("min_depth", 0.0), merged.get("max_depth", float("inf")))
    if reason:
        return reason
    for camera in sorted({key[0] for key in map(camera_override_key, merged) if key is not None}):
        lo = merged.get(f"camera.{camera}.min_depth", merged.get("min_depth", 0.0))
        hi = merged.get(f"camera.{camera}.max_depth", merged.get("max_depth", float("inf")))
        if lo is not None and hi is not None:
            reason = depth_range_problem(lo, hi, where=f"camera {camera}: ")
            if reason:
                return reason
    tasks = list(merged.get("tasks", []))
    if changes.keys() & {"tasks", "model_depth", "model_normals"}:
        runnable = [t for t in tasks if merged.get(f"model_{t}", "")]
        if not runnable:
            return ("no task left to run: tasks must include depth or normals with a non-empty model_depth / "
                    "model_normals")
    return None


@dataclass
class Settings:
    """A snapshot of the parameters with python names, read once per configure / after each accepted set."""

    values: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def active_tasks(self) -> tuple[str, ...]:
        """Tasks that are requested and have a model."""
        return tuple(t for t in ("depth", "normals") if t in self["tasks"] and self[f"model_{t}"])

    def cameras(self) -> list[str]:
        """Camera names ([] = the single unnamed camera on today's topics)."""
        from geodiff_ros.ros.camera_sets import parse_camera_list

        return parse_camera_list(self.values.get("cameras"))

    def for_camera(self, overrides: dict[str, Any]) -> Settings:
        """These settings with one camera's ``camera.<name>.*`` overrides applied."""
        return Settings({**self.values, **overrides}) if overrides else self


def read_settings(node: Node) -> Settings:
    """Read every declared parameter from ``node`` into a Settings snapshot."""
    return Settings({spec.name: node.get_parameter(spec.name).value for spec in PARAMS})


def engine_config_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``geodiff_ros.engine.EngineConfig`` from the node settings."""
    tasks = settings.active_tasks()
    return {
        "depth_model": settings["model_depth"] if "depth" in tasks else None,
        "normals_model": settings["model_normals"] if "normals" in tasks else None,
        "device": settings["device"],
        "dtype": settings["dtype"],
        "processing_res": int(settings["processing_res"]),
        "match_input_res": True,  # outputs share the input's pixel grid, so CameraInfo is reused as is
        "allow_cpu_fallback": bool(settings["allow_cpu_fallback"]),
        "local_files_only": bool(settings["local_files_only"]),
        "batch_size": int(settings["batch_size"]),
        "optimize": str(settings["optimize"]),
        "cpu_threads": int(settings["cpu_threads"]),
        "check_model_task": bool(settings["check_model_task"]),
    }
