"""Spread many cameras over the GPUs of one host: one geodiff node per GPU, each serving its share of cameras.

Example (4 cameras, 2 GPUs, round-robin: front and rear on cuda:0, left and right on cuda:1):
  ros2 launch geodiff_ros multi_gpu.launch.py cameras:="[front,left,rear,right]" num_gpus:=2 \
      image_pattern:=/{camera}/color/image_raw camera_info_pattern:=/{camera}/color/camera_info

Explicit placement instead (group i on the i-th GPU of ``gpus``, or of 0..num_gpus-1):
  ros2 launch geodiff_ros multi_gpu.launch.py cameras:="[front,left,rear,right]" \
      assignment:="front,left;rear,right" gpus:="[0,2]"

Each node loads one model copy on its GPU (cuda:i) and batches the frames of its cameras; nodes are named
geodiff_gpu<i>, their cameras' topics are <namespace>/<camera>/... exactly as with one node (depth.launch.py).
Camera-to-GPU rules live in geodiff_ros/ros/camera_sets.py (unit-tested without ROS launch).
"""

import yaml  # noqa: I001 - `launch` is the ROS package, not this repo's launch/ folder

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction
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

_PATTERNS = (('image_pattern', 'image'), ('camera_info_pattern', 'camera_info'),
             ('sparse_depth_pattern', 'sparse_depth'), ('sparse_points_pattern', 'sparse_points'))
_PARAM_OVERRIDES = (('model', 'model_depth'), ('dtype', 'dtype'))


def _arg(context, name: str) -> str:
    return LaunchConfiguration(name).perform(context)


def _gpus(context) -> list[int]:
    """GPU indices from ``gpus``, else 0..num_gpus-1 (``auto``: the visible GPUs, at least one)."""
    explicit = parse_gpu_list(_arg(context, 'gpus'))
    if explicit is not None:
        return explicit
    count = _arg(context, 'num_gpus')
    n = visible_gpu_count() if count == 'auto' else int(count)
    return list(range(max(1, n)))


def _nodes(context, *_args, **_kwargs):
    """One node per GPU that has cameras, once the arguments are known."""
    cameras = parse_camera_list(yaml.safe_load(_arg(context, 'cameras') or '[]'))
    if not cameras:
        raise CameraListError('multi_gpu.launch.py needs cameras:="[front, left, ...]"')
    plan = assign_cameras(cameras, _gpus(context), parse_assignment(_arg(context, 'assignment')))
    patterns = {topic: _arg(context, arg) for arg, topic in _PATTERNS}
    use_sim_time = _arg(context, 'use_sim_time').lower() in ('true', '1', 'yes')
    common = {'use_sim_time': use_sim_time}
    for arg, param in _PARAM_OVERRIDES:
        if _arg(context, arg):
            common[param] = _arg(context, arg)
    if _arg(context, 'batch_size'):
        common['batch_size'] = int(_arg(context, 'batch_size'))
    actions = []
    for gpu, group in sorted(plan.items()):
        actions.append(LogInfo(msg=f'geodiff_gpu{gpu}: cuda:{gpu} serves {", ".join(group)}'))
        actions.append(Node(
            package='geodiff_ros',
            executable='geodiff_node',
            name=f'geodiff_gpu{gpu}',
            namespace=_arg(context, 'namespace'),
            output='screen',
            emulate_tty=True,
            parameters=[_arg(context, 'params_file'), {**common, 'device': f'cuda:{gpu}', 'cameras': group}],
            arguments=['--ros-args', '--log-level', _arg(context, 'log_level')],
            remappings=camera_remappings(group, patterns),
        ))
    return actions


def generate_launch_description() -> LaunchDescription:
    share = get_package_share_directory('geodiff_ros')
    return LaunchDescription([
        DeclareLaunchArgument('cameras', description='Camera names, e.g. "[front, left, rear, right]".'),
        DeclareLaunchArgument('num_gpus', default_value='auto',
                              description='GPUs to use (cuda:0..N-1); auto = CUDA_VISIBLE_DEVICES / nvidia-smi.'),
        DeclareLaunchArgument('gpus', default_value='',
                              description='Explicit GPU indices, e.g. "[0, 2]" (overrides num_gpus).'),
        DeclareLaunchArgument('assignment', default_value='',
                              description='Cameras per GPU, e.g. "front,left;rear,right" (group i on the i-th '
                                          'GPU); empty = round-robin in list order.'),
        DeclareLaunchArgument('namespace', default_value='', description='Namespace of the nodes and topics.'),
        DeclareLaunchArgument('image_pattern', default_value='',
                              description='Image topic per camera, {camera} = its name, e.g. '
                                          '/{camera}/color/image_raw; empty = <namespace>/<camera>/image.'),
        DeclareLaunchArgument('camera_info_pattern', default_value='',
                              description='CameraInfo topic per camera, e.g. /{camera}/color/camera_info.'),
        DeclareLaunchArgument('sparse_depth_pattern', default_value='',
                              description='Sparse depth topic per camera, e.g. /{camera}/lidar_depth.'),
        DeclareLaunchArgument('sparse_points_pattern', default_value='',
                              description='Sparse PointCloud2 topic per camera (camera optical frame).'),
        DeclareLaunchArgument('params_file', default_value=f'{share}/config/geodiff.yaml',
                              description='Node parameters (/**: ros__parameters:), shared by all nodes.'),
        DeclareLaunchArgument('model', default_value='',
                              description='Override model_depth (hub id or folder); empty keeps the params file.'),
        DeclareLaunchArgument('dtype', default_value='', description='Override dtype (fp32, fp16, bf16).'),
        DeclareLaunchArgument('batch_size', default_value='',
                              description='Override batch_size (frames of different cameras per engine call).'),
        DeclareLaunchArgument('use_sim_time', default_value='false',
                              description='Use /clock (bag playback with --clock).'),
        DeclareLaunchArgument('log_level', default_value='info', description='Log level of the nodes.'),
        OpaqueFunction(function=_nodes),
    ])
