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
``autostart`` (in the params file, default true) makes the lifecycle node configure and activate itself, so no
lifecycle manager is needed. Works in a colcon workspace and in a pip/venv install where the console script sits
in ``<prefix>/lib/geodiff_ros``. Several GPUs: launch/multi_gpu.launch.py.
"""

import os  # noqa: I001 - `launch` is the ROS package, not this repo's launch/ folder

import yaml

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from geodiff_ros.ros.camera_sets import camera_remappings, parse_camera_list

# Launch arguments that override one node parameter, only when given (the params file holds the defaults).
_PARAM_OVERRIDES = (('model', 'model_depth'), ('model_normals', 'model_normals'), ('device', 'device'),
                    ('dtype', 'dtype'))
# Per-camera input patterns (several cameras): launch argument -> node input topic.
_PATTERNS = (('image_pattern', 'image'), ('camera_info_pattern', 'camera_info'),
             ('sparse_depth_pattern', 'sparse_depth'), ('sparse_points_pattern', 'sparse_points'))


def _nodes(context, *_args, **_kwargs):
    """Build the nodes once the arguments are known, so empty overrides leave the params file alone."""
    share = get_package_share_directory('geodiff_ros')
    use_sim_time = LaunchConfiguration('use_sim_time').perform(context).lower() in ('true', '1', 'yes')
    overrides = {'use_sim_time': use_sim_time}
    for arg, param in _PARAM_OVERRIDES:
        value = LaunchConfiguration(arg).perform(context)
        if value:
            overrides[param] = '' if value == 'none' else value  # 'none' disables a model ('' keeps the file's)
    batch_size = LaunchConfiguration('batch_size').perform(context)
    if batch_size:
        overrides['batch_size'] = int(batch_size)
    namespace = LaunchConfiguration('namespace').perform(context)
    # "[front, left]" (YAML) or "front,left"; [] / "" = one camera on today's topics.
    cameras = parse_camera_list(yaml.safe_load(LaunchConfiguration('cameras').perform(context) or '[]'))
    if cameras:
        overrides['cameras'] = cameras
        patterns = {topic: LaunchConfiguration(arg).perform(context) for arg, topic in _PATTERNS}
        remappings = camera_remappings(cameras, patterns)
    else:
        remappings = [
            ('image', LaunchConfiguration('image').perform(context)),
            ('camera_info', LaunchConfiguration('camera_info').perform(context)),
            ('sparse_depth', LaunchConfiguration('sparse_depth').perform(context)),
            ('sparse_points', LaunchConfiguration('sparse_points').perform(context)),
        ]

    geodiff = Node(
        package='geodiff_ros',
        executable='geodiff_node',
        name='geodiff',
        namespace=namespace,
        output='screen',
        emulate_tty=True,
        parameters=[LaunchConfiguration('params_file').perform(context), overrides],
        arguments=['--ros-args', '--log-level', LaunchConfiguration('log_level').perform(context)],
        remappings=remappings,
    )
    # rviz/geodiff.rviz uses relative topic names, resolved in the same namespace as the node's outputs.
    rviz = Node(
        package='rviz2',
        executable='rviz2',
        name='rviz2',
        namespace=namespace,
        arguments=['-d', os.path.join(share, 'rviz', 'geodiff.rviz'),
                   '-f', LaunchConfiguration('fixed_frame').perform(context)],
        parameters=[{'use_sim_time': use_sim_time}],
        condition=IfCondition(LaunchConfiguration('rviz')),
    )
    return [geodiff, rviz]


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory('geodiff_ros')
    return LaunchDescription([
        DeclareLaunchArgument('namespace', default_value='', description='Namespace of the node and its outputs.'),
        DeclareLaunchArgument('image', default_value='/camera/color/image_raw',
                              description='Colour image topic (rectified preferred); with input_transport '
                                          'compressed the node subscribes to <image>/compressed.'),
        DeclareLaunchArgument('camera_info', default_value='/camera/color/camera_info',
                              description='CameraInfo of the image (needed for the point cloud).'),
        DeclareLaunchArgument('sparse_depth', default_value='sparse_depth',
                              description='Sparse metric depth image (32FC1 m or 16UC1 mm) of the same camera.'),
        DeclareLaunchArgument('sparse_points', default_value='sparse_points',
                              description='Sparse PointCloud2 already in the camera optical frame.'),
        DeclareLaunchArgument('cameras', default_value='[]',
                              description='Several cameras in one node, e.g. "[front, left]": topics under each '
                                          'name (front/image, front/depth/image, ...); [] = one camera.'),
        DeclareLaunchArgument('image_pattern', default_value='',
                              description='With cameras: image topic of each camera, {camera} = its name, e.g. '
                                          '/{camera}/color/image_raw; empty = <namespace>/<camera>/image.'),
        DeclareLaunchArgument('camera_info_pattern', default_value='',
                              description='With cameras: CameraInfo topic pattern, e.g. /{camera}/color/camera_info.'),
        DeclareLaunchArgument('sparse_depth_pattern', default_value='',
                              description='With cameras: sparse depth topic pattern, e.g. /{camera}/lidar_depth.'),
        DeclareLaunchArgument('sparse_points_pattern', default_value='',
                              description='With cameras: sparse PointCloud2 topic pattern (camera optical frame).'),
        DeclareLaunchArgument('batch_size', default_value='',
                              description='Override batch_size (most frames of different cameras per engine call).'),
        DeclareLaunchArgument('params_file', default_value=os.path.join(share, 'config', 'geodiff.yaml'),
                              description='Node parameters (/**: ros__parameters:).'),
        DeclareLaunchArgument('model', default_value='',
                              description='Override model_depth (hub id or folder); empty keeps the params file.'),
        DeclareLaunchArgument('model_normals', default_value='',
                              description='Override model_normals (hub id or folder; none disables normals).'),
        DeclareLaunchArgument('device', default_value='', description='Override device (cpu, cuda, cuda:N).'),
        DeclareLaunchArgument('dtype', default_value='', description='Override dtype (fp32, fp16, bf16).'),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='Use /clock (bag playback with --clock).'),
        DeclareLaunchArgument('rviz', default_value='false', description='Also start RViz with rviz/geodiff.rviz.'),
        DeclareLaunchArgument('fixed_frame', default_value='camera_color_optical_frame',
                              description='RViz fixed frame (the camera optical frame works without TF).'),
        DeclareLaunchArgument('log_level', default_value='info', description='Log level of the node.'),
        OpaqueFunction(function=_nodes),
    ])
