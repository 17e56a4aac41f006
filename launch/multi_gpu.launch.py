"""Spread many cameras over the GPUs of one host: one geodiff node per GPU, each serving its share of cameras.

Example (4 cameras, 2 GPUs, round-robin: front and rear on cuda:0, left and right on cuda:1):
  ros2 launch geodiff_ros multi_gpu.launch.py cameras:="[front,left,rear,right]" num_gpus:=2 \
      image_pattern:=/{camera}/color/image_raw camera_info_pattern:=/{camera}/color/camera_info

Explicit placement instead (group i on the i-th GPU of ``gpus``, or of 0..num_gpus-1):
  ros2 launch geodiff_ros multi_gpu.launch.py cameras:="[front,left,rear,right]" \
      assignment:="front,left;rear,right" gpus:="[0,2]"

Each node loads one model copy on its GPU (cuda:i) and batches the frames of its cameras; nodes are named
geodiff_gpu<i>, their cameras' topics are <namespace>/<camera>/... exactly as with one node (depth.launch.py).
``device:=cpu`` runs every node on the CPU instead (tests, machines without a GPU); ``allow_cpu_fallback:=true``
lets a node whose GPU is missing run on the CPU (``ros2 param get /geodiff_gpu<i> device`` then says cpu).
``rviz:=true`` starts one RViz with every camera's displays (checked first: launch stops if rviz2 is missing).
Camera-to-GPU rules live in geodiff_ros/ros/camera_sets.py (unit-tested without ROS launch).
"""

import os  # noqa: I001 - `launch` is the ROS package, not this repo's launch/ folder

import yaml

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit, OnShutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from geodiff_ros.ros.camera_sets import (
    CameraListError,
    assign_cameras,
    camera_remappings,
    parse_assignment,
    parse_camera_list,
    parse_gpu_list,
    visible_gpu_count,
)
from geodiff_ros.ros.launch_support import (
    INPUT_PATTERNS,
    LaunchArgumentError,
    end_launch_if_node_failed,
    params_files,
    parameter_overrides,
    rviz_requested,
    truthy,
    write_rviz_layout,
)
from geodiff_ros.ros.params import LAUNCH_ARGUMENTS, PARAMS

# Launch arguments of depth.launch.py that apply to every node here too (device is placed per node, below).
_SHARED = ("model_depth", "model_normals", "dtype", "allow_cpu_fallback", "local_files_only", "processing_res",
           "optimize", "cpu_threads", "batch_size", "autostart", "publish_cloud", "cloud_stride")


def _arg(context, name: str) -> str:
    return LaunchConfiguration(name).perform(context)


def _gpus(context) -> list[int]:
    """GPU indices from ``gpus``, else 0..num_gpus-1 (``auto``: the visible GPUs, at least one)."""
    explicit = parse_gpu_list(_arg(context, "gpus"))
    if explicit is not None:
        return explicit
    count = _arg(context, "num_gpus")
    n = visible_gpu_count() if count == "auto" else int(count)
    return list(range(max(1, n)))


def _device(context, gpu: int) -> str:
    """The node's device: cuda:<gpu>, or cpu for every node with device:=cpu."""
    device = _arg(context, "device")
    if device in ("", "cuda"):
        return f"cuda:{gpu}"
    if device == "cpu":
        return "cpu"
    msg = f"device:={device!r}: use cpu (every node on the CPU) or leave it empty (gpus:= / num_gpus:= place them)"
    raise LaunchArgumentError(msg)


def _rviz(context, cameras: list[str], normals: bool, use_sim_time: bool) -> list:
    """One RViz showing every camera (relative topics in ``namespace``), its layout removed at shutdown."""
    path = write_rviz_layout(get_package_share_directory("geodiff_ros"), cameras, normals,
                             _arg(context, "fixed_frame"))
    return [
        Node(package="rviz2", executable="rviz2", name="rviz2", namespace=_arg(context, "namespace"),
             arguments=["-d", path], parameters=[{"use_sim_time": use_sim_time}]),
        RegisterEventHandler(OnShutdown(on_shutdown=[OpaqueFunction(function=lambda _ctx: os.remove(path))])),
    ]


def _nodes(context, *_args, **_kwargs):
    """One node per GPU that has cameras, once the arguments are known."""
    want_rviz = rviz_requested(_arg(context, "rviz"))  # rviz2 missing: stops here, before any process starts
    cameras = parse_camera_list(yaml.safe_load(_arg(context, "cameras") or "[]"))
    if not cameras:
        raise CameraListError('multi_gpu.launch.py needs cameras:="[front, left, ...]"')
    plan = assign_cameras(cameras, _gpus(context), parse_assignment(_arg(context, "assignment")))
    patterns = {topic: _arg(context, arg) for arg, topic in INPUT_PATTERNS}
    use_sim_time = truthy(_arg(context, "use_sim_time"), "use_sim_time")
    given = {LAUNCH_ARGUMENTS[p]: _arg(context, LAUNCH_ARGUMENTS[p]) for p in _SHARED}
    common = {"use_sim_time": use_sim_time, **parameter_overrides(given)}
    files = params_files(get_package_share_directory("geodiff_ros"), _arg(context, "params_file"))
    actions = []
    for gpu, group in sorted(plan.items()):
        device = _device(context, gpu)
        actions.append(LogInfo(msg=f'geodiff_gpu{gpu}: {device} serves {", ".join(group)}'))
        node = Node(
            package="geodiff_ros",
            executable="geodiff_node",
            name=f"geodiff_gpu{gpu}",
            namespace=_arg(context, "namespace"),
            output="screen",
            emulate_tty=True,
            parameters=[*files, {**common, "device": device, "cameras": group}],
            arguments=["--ros-args", "--log-level", _arg(context, "log_level")],
            remappings=camera_remappings(group, patterns),
        )
        # A node exiting with an error ends the launch (the other nodes too), exit code 1.
        actions += [node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=end_launch_if_node_failed))]
    if want_rviz:
        actions += _rviz(context, cameras, common.get("model_normals") != "", use_sim_time)
    return actions


def generate_launch_description() -> LaunchDescription:
    specs = {spec.name: spec for spec in PARAMS}
    return LaunchDescription([
        DeclareLaunchArgument("cameras", description='Camera names, e.g. "[front, left, rear, right]".'),
        DeclareLaunchArgument("num_gpus", default_value="auto",
                              description="GPUs to use (cuda:0..N-1); auto = CUDA_VISIBLE_DEVICES / nvidia-smi."),
        DeclareLaunchArgument("gpus", default_value="",
                              description='Explicit GPU indices, e.g. "[0, 2]" (overrides num_gpus).'),
        DeclareLaunchArgument("assignment", default_value="",
                              description='Cameras per GPU, e.g. "front,left;rear,right" (group i on the i-th '
                                          'GPU); empty = round-robin in list order.'),
        DeclareLaunchArgument("device", default_value="",
                              description="Empty: node i on cuda:<its GPU>; cpu: every node on the CPU."),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the nodes and topics."),
        DeclareLaunchArgument("image_pattern", default_value="",
                              description="Image topic per camera, {camera} = its name, e.g. "
                                          "/{camera}/color/image_raw; empty = <namespace>/<camera>/image."),
        DeclareLaunchArgument("camera_info_pattern", default_value="",
                              description="CameraInfo topic per camera, e.g. /{camera}/color/camera_info."),
        DeclareLaunchArgument("sparse_depth_pattern", default_value="",
                              description="Sparse depth topic per camera, e.g. /{camera}/lidar_depth."),
        DeclareLaunchArgument("sparse_points_pattern", default_value="",
                              description="Sparse PointCloud2 topic per camera (camera optical frame)."),
        DeclareLaunchArgument("params_file", default_value="",
                              description="Your parameters YAML for all nodes, on top of the shipped "
                                          "config/geodiff.yaml (it only needs what you change)."),
        *[DeclareLaunchArgument(LAUNCH_ARGUMENTS[p], default_value="",
                                description=f"Override {p} on every node: {specs[p].description} Empty: the "
                                            "params files decide.") for p in _SHARED],
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="Use /clock (bag playback with --clock)."),
        DeclareLaunchArgument("rviz", default_value="false",
                              description="Also start one RViz 2 showing every camera."),
        DeclareLaunchArgument("fixed_frame", default_value="camera_color_optical_frame",
                              description="RViz fixed frame."),
        DeclareLaunchArgument("log_level", default_value="info", description="Log level of the nodes."),
        OpaqueFunction(function=_nodes),
    ])
