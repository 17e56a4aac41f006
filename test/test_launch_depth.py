"""launch_testing: ``launch/depth.launch.py`` with a tiny checkpoint, a recorded bag played into it, outputs checked.

For a full ROS 2 (Jazzy) install, where ``launch``, ``launch_ros`` and ``launch_testing`` exist and the package is
built (``colcon build``, then ``colcon test`` or ``pytest test/test_launch_depth.py``; launch_testing needs
pytest<9). The player is ``ros2 bag play`` where rosbag2 is installed, otherwise ``geodiff_bag play``; the outputs
are recorded with ``geodiff_bag record`` and checked as in test_bag_replay.py: topics, encodings, stamps equal to
the input stamps, cloud size, metric alignment (two passes), exit codes at shutdown.

Where ``launch`` is not importable (the PyPI ROS wheels do not ship it) the module is skipped with that reason; the
same scenario then runs as plain pytest in test_bag_replay.py, which is what CI runs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import unittest
from pathlib import Path

import pytest

try:  # ROS 2 launch; the unrelated PyPI package also named `launch` has no LaunchDescription
    import launch_testing  # noqa: I001 - `launch` is ROS 2 launch, not the repo's launch/ folder
    import launch_testing.actions
    import launch_testing.asserts
    from launch import LaunchDescription
    from launch.actions import IncludeLaunchDescription
    from launch.launch_description_sources import PythonLaunchDescriptionSource
except ImportError as err:
    pytest.skip(f'ROS 2 launch / launch_testing not importable ({err}); not installable from PyPI. The same '
                'scenario runs as plain pytest in test/test_bag_replay.py', allow_module_level=True)

from ros_helpers import REPO, module_domain_id  # noqa: E402
from test_bag_replay import NODE_PARAMS, check_two_pass, inputs_in, replay_env  # noqa: E402

from geodiff_ros.ros.demo import DEPTH_TOPIC, IMAGE_TOPIC, INFO_TOPIC, write_synthetic_bag  # noqa: E402
from geodiff_ros.testing.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402

DOMAIN = module_domain_id(79)
NS = f'/geodiff_launch_{os.getpid()}'  # our own topics even if another run shares the domain


def _player_cmd(bag: Path, remaps: dict[str, str]) -> list[str] | None:
    """``ros2 bag play`` when rosbag2 is installed (None: check_two_pass uses geodiff_bag play)."""
    if shutil.which('ros2') is None or importlib.util.find_spec('rosbag2_py') is None:
        return None
    # rosbag2 cannot wait for subscribers: --delay gives discovery time so best-effort inputs are not lost
    return ['ros2', 'bag', 'play', str(bag), '--delay', '2.0', '--topics', *remaps,
            '--remap', *(f'{a}:={b}' for a, b in remaps.items())]


@pytest.mark.launch_test
def generate_test_description() -> tuple[LaunchDescription, dict]:
    """The node from depth.launch.py, tiny checkpoints, inputs remapped to the bag's topics."""
    os.environ.update({k: v for k, v in replay_env(DOMAIN).items()
                       if k.startswith(('ROS_', 'FASTDDS_', 'FASTRTPS_'))})  # the launched node inherits these
    tmp = Path(tempfile.mkdtemp(prefix='geodiff_launch_test_'))
    depth = write_tiny_checkpoint(tmp / 'tiny-depth', 'depth')
    normals = write_tiny_checkpoint(tmp / 'tiny-normals', 'normals')
    params = tmp / 'params.yaml'
    lines = ['/**:', '  ros__parameters:', f'    model_depth: "{depth}"', f'    model_normals: "{normals}"']
    lines += [f'    {name}: {value}' for name, value in NODE_PARAMS.items()]
    params.write_text('\n'.join(lines) + '\n')
    bag = write_synthetic_bag(tmp / 'synth', frames=3, width=160, height=120, period_s=1.0)  # see test_bag_replay
    description = LaunchDescription([
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(str(REPO / 'launch' / 'depth.launch.py')),
            launch_arguments={'params_file': str(params), 'namespace': NS, 'image': inputs_in(NS)[IMAGE_TOPIC],
                              'camera_info': inputs_in(NS)[INFO_TOPIC],
                              'sparse_depth': inputs_in(NS)[DEPTH_TOPIC]}.items()),
        launch_testing.actions.ReadyToTest(),
    ])
    return description, {'tmp': tmp, 'bag': bag}


class TestDepthLaunch(unittest.TestCase):
    """While the launched node runs: play the bag twice and check the recorded outputs."""

    def test_bag_through_launched_node(self, proc_output: object, tmp: Path, bag: Path) -> None:
        proc_output.assertWaitFor('processing frames', timeout=120)  # warm-up done
        check_two_pass(DOMAIN, tmp, bag, NS, player_cmd=_player_cmd)


@launch_testing.post_shutdown_test()
class TestDepthLaunchShutdown(unittest.TestCase):
    """launch stops the node with SIGINT: it must exit 0."""

    def test_exit_codes(self, proc_info: object) -> None:
        launch_testing.asserts.assertExitCodes(proc_info)
