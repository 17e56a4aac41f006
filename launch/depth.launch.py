"""Start the geodiff node (depth, normals, metric cloud) and, optionally, RViz.

Example:
  ros2 launch geodiff_ros depth.launch.py image:=/camera/color/image_raw \
      camera_info:=/camera/color/camera_info sparse_depth:=/lidar/depth namespace:=front rviz:=true

Several cameras, one model (one GPU):
  ros2 launch geodiff_ros depth.launch.py cameras:="[front,left]" \
      image_pattern:=/{camera}/color/image_raw camera_info_pattern:=/{camera}/color/camera_info

The node's topics are relative (image, camera_info, sparse_depth -> depth/image, points, ...); this file remaps
the inputs and puts the outputs under ``namespace``. With ``cameras`` each camera's topics sit under its name
(front/image -> front/depth/image, front/points); the ``*_pattern`` arguments remap its inputs, ``{camera}``
standing for the name (image, camera_info, sparse_depth and sparse_points are then not used).
Parameters: the shipped config/geodiff.yaml, then your ``params_file`` on top (only what you change), then the
launch arguments given (``model``, ``device``, ``processing_res``, ``optimize``, ``autostart``,
``allow_cpu_fallback``, ... : ``--show-args`` lists them; the table is geodiff_ros/ros/params.py LAUNCH_ARGUMENTS).
``autostart`` (default true) makes the lifecycle node configure and activate itself, so no lifecycle manager is
needed. ``rviz:=true`` checks first that rviz2 is installed, then starts it with a layout written for this run
(every camera's displays). Works in a colcon workspace and in a pip/venv install where the console script sits
in ``<prefix>/lib/geodiff_ros``. Several GPUs: launch/multi_gpu.launch.py.
"""

import os  # noqa: I001 - `launch` is the ROS package, not this repo's launch/ folder

import yaml

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit, OnShutdown
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from geodiff_ros.ros.camera_sets import camera_remappings, parse_camera_list
from geodiff_ros.ros.launch_support import (
    INPUT_PATTERNS,
    end_launch_if_node_failed,
    params_files,
    parameter_overrides,
    rviz_requested,
    truthy,
    write_rviz_layout,
)
from geodiff_ros.ros.params import LAUNCH_ARGUMENTS, PARAMS


def _arg(context, name: str) -> str:
    return LaunchConfiguration(name).perform(context)


def _rviz(context, share: str, cameras: list[str], normals: bool, namespace: str, use_sim_time: bool) -> list:
    """RViz with this run's layout (every camera's displays), written to a temporary file removed at shutdown."""
    path = write_rviz_layout(share, cameras, normals, _arg(context, "fixed_frame"))
    # rviz/geodiff.rviz uses relative topic names, resolved in the same namespace as the node's outputs.
    return [
        Node(package="rviz2", executable="rviz2", name="rviz2", namespace=namespace, arguments=["-d", path],
             parameters=[{"use_sim_time": use_sim_time}]),
        RegisterEventHandler(OnShutdown(on_shutdown=[OpaqueFunction(function=lambda _ctx: os.remove(path))])),
    ]


def _nodes(context, *_args, **_kwargs):
    """Build the nodes once the arguments are known, so empty overrides leave the params files alone."""
    share = get_package_share_directory("geodiff_ros")
    want_rviz = rviz_requested(_arg(context, "rviz"))  # rviz2 missing: stops here, before any process starts
    use_sim_time = truthy(_arg(context, "use_sim_time"), "use_sim_time")
    overrides = {"use_sim_time": use_sim_time,
                 **parameter_overrides({arg: _arg(context, arg) for arg in LAUNCH_ARGUMENTS.values()})}
    namespace = _arg(context, "namespace")
    # "[front, left]" (YAML) or "front,left"; [] / "" = one camera on today's topics.
    cameras = parse_camera_list(yaml.safe_load(_arg(context, "cameras") or "[]"))
    if cameras:
        overrides["cameras"] = cameras
        patterns = {topic: _arg(context, arg) for arg, topic in INPUT_PATTERNS}
        remappings = camera_remappings(cameras, patterns)
    else:
        remappings = [(topic, _arg(context, topic)) for topic in ("image", "camera_info", "sparse_depth",
                                                                   "sparse_points")]
    node = Node(
        package="geodiff_ros",
        executable="geodiff_node",
        name="geodiff",
        namespace=namespace,
        output="screen",
        emulate_tty=True,
        # The shipped defaults, then the user's file on top (only what it sets), then the launch arguments given.
        parameters=[*params_files(share, _arg(context, "params_file")), overrides],
        arguments=["--ros-args", "--log-level", _arg(context, "log_level")],
        remappings=remappings,
    )
    # The node exiting with an error (bad parameters: 2, model not loadable: 1) ends the launch, exit code 1.
    actions = [node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=end_launch_if_node_failed))]
    if want_rviz:
        actions += _rviz(context, share, cameras, overrides.get("model_normals") != "", namespace, use_sim_time)
    return actions


def _parameter_arguments() -> list:
    """One launch argument per commonly overridden parameter (params.LAUNCH_ARGUMENTS; launch silently ignores
    undeclared ones, so each is declared); empty = the params files decide."""
    specs = {spec.name: spec for spec in PARAMS}
    notes = {"model_depth": " (hub id or folder)", "model_normals": " (hub id or folder; none disables normals)"}
    return [DeclareLaunchArgument(arg, default_value="",
                                  description=f'Override {param}{notes.get(param, "")}: {specs[param].description} '
                                              f'Empty: the params files decide (default {specs[param].default!r}).')
            for param, arg in LAUNCH_ARGUMENTS.items()]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node and its outputs."),
        DeclareLaunchArgument("image", default_value="/camera/color/image_raw",
                              description="Colour image topic (rectified preferred); with input_transport "
                                          "compressed the node subscribes to <image>/compressed."),
        DeclareLaunchArgument("camera_info", default_value="/camera/color/camera_info",
                              description="CameraInfo of the image (needed for the point cloud)."),
        DeclareLaunchArgument("sparse_depth", default_value="sparse_depth",
                              description="Sparse metric depth image (32FC1 m or 16UC1 mm) of the same camera."),
        DeclareLaunchArgument("sparse_points", default_value="sparse_points",
                              description="Sparse PointCloud2 (a LiDAR scan), placed with TF."),
        DeclareLaunchArgument("cameras", default_value="[]",
                              description='Several cameras in one node, e.g. "[front, left]": topics under each '
                                          'name (front/image, front/depth/image, ...); [] = one camera.'),
        DeclareLaunchArgument("image_pattern", default_value="",
                              description="With cameras: image topic of each camera, {camera} = its name, e.g. "
                                          "/{camera}/color/image_raw; empty = <namespace>/<camera>/image."),
        DeclareLaunchArgument("camera_info_pattern", default_value="",
                              description="With cameras: CameraInfo topic pattern, e.g. /{camera}/color/camera_info."),
        DeclareLaunchArgument("sparse_depth_pattern", default_value="",
                              description="With cameras: sparse depth topic pattern, e.g. /{camera}/lidar_depth."),
        DeclareLaunchArgument("sparse_points_pattern", default_value="",
                              description="With cameras: sparse PointCloud2 topic pattern (placed with TF)."),
        DeclareLaunchArgument("params_file", default_value="",
                              description="Your parameters YAML (/**: ros__parameters:), applied on top of the "
                                          "shipped config/geodiff.yaml: it only needs what you change."),
        *_parameter_arguments(),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="Use /clock (bag playback with --clock)."),
        DeclareLaunchArgument("rviz", default_value="false",
                              description="Also start RViz 2 with rviz/geodiff.rviz, with displays for every "
                                          "camera (checked first: launch stops with a message if rviz2 is missing)."),
        DeclareLaunchArgument("fixed_frame", default_value="camera_color_optical_frame",
                              description="RViz fixed frame (the camera optical frame works without TF)."),
        DeclareLaunchArgument("log_level", default_value="info",
                              description="Log level of the node (debug, info, warn, error, fatal)."),
        OpaqueFunction(function=_nodes),
    ])
