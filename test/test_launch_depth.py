"""launch_testing: ``launch/depth.launch.py`` with a tiny checkpoint, a recorded bag played into it, outputs checked.

For a full ROS 2 (Jazzy) install, where ``launch``, ``launch_ros`` and ``launch_testing`` exist and the package is
built (``colcon build``, then ``colcon test`` or ``pytest test/test_launch_depth.py``; launch_testing needs
pytest<9). The player is ``ros2 bag play`` where rosbag2 is installed, otherwise ``geodiff_bag play``; the outputs
are recorded with ``geodiff_bag record`` and checked as in test_bag_replay.py: topics, encodings, stamps equal to
the input stamps, cloud size, metric alignment (two passes), exit codes at shutdown.

Runs under pytest (``pytest test/test_launch_depth.py``, ``colcon test``) and under ``launch_test
test/test_launch_depth.py``. ``scripts/setup_venv.sh --dev`` installs ROS 2 launch from ``../shared/ros/wheels``
when that folder exists, so CI runs this for real; where ``launch`` is not importable (it is not on PyPI) the module
is skipped with that reason, and test_bag_replay.py runs the same scenario as plain pytest.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
import time
import unittest
from pathlib import Path

import pytest

# launch_test loads this file outside pytest: no conftest, so the helpers beside it and (in a checkout) the source
# folder are not on sys.path yet.
_TEST_DIR = Path(__file__).resolve().parent
if str(_TEST_DIR) not in sys.path:
    sys.path.insert(0, str(_TEST_DIR))
if os.environ.get("GEODIFF_TEST_INSTALLED") != "1" and str(_TEST_DIR.parent) not in sys.path:
    sys.path.insert(0, str(_TEST_DIR.parent))

try:  # ROS 2 launch; the unrelated PyPI package also named `launch` has no LaunchDescription
    import launch_testing  # noqa: I001 - `launch` is ROS 2 launch, not the repo's launch/ folder
    import launch_testing.actions
    import launch_testing.asserts
    from launch import LaunchDescription
    from launch.actions import IncludeLaunchDescription, OpaqueFunction, RegisterEventHandler
    from launch.event_handlers import OnShutdown
    from launch.launch_description_sources import PythonLaunchDescriptionSource
except ImportError as err:
    pytest.skip(f"ROS 2 launch / launch_testing not importable ({err}): not on PyPI; scripts/setup_venv.sh --dev "
                "installs them from ../shared/ros/wheels when present. The same scenario runs as plain pytest in "
                "test/test_bag_replay.py", allow_module_level=True)

from ros_helpers import launch_file, module_domain_id  # noqa: E402
from test_bag_replay import NODE_PARAMS, check_two_pass, inputs_in, replay_env  # noqa: E402

from geodiff_ros.bag.synthetic import DEPTH_TOPIC, IMAGE_TOPIC, INFO_TOPIC, write_synthetic_bag  # noqa: E402
from geodiff_ros.testing.tiny_checkpoint import write_tiny_checkpoint  # noqa: E402

DOMAIN = module_domain_id(79)
NS = f"/geodiff_launch_{os.getpid()}"  # our own topics even if another run shares the domain


def _player_cmd(bag: Path, remaps: dict[str, str]) -> list[str] | None:
    """``ros2 bag play`` when rosbag2 is installed (None: check_two_pass uses geodiff_bag play)."""
    if shutil.which("ros2") is None or importlib.util.find_spec("rosbag2_py") is None:
        return None
    # rosbag2 cannot wait for subscribers: --delay gives discovery time so best-effort inputs are not lost
    return ["ros2", "bag", "play", str(bag), "--delay", "2.0", "--topics", *remaps,
            "--remap", *(f"{a}:={b}" for a, b in remaps.items())]


def _write_inputs(tmp: Path) -> None:
    """Tiny checkpoints, the params file and the bag (before launch starts: launch_testing times out if the node
    process starts late)."""
    tmp.mkdir(parents=True)
    depth = write_tiny_checkpoint(tmp / "tiny-depth", "depth")
    normals = write_tiny_checkpoint(tmp / "tiny-normals", "normals")
    lines = ["/**:", "  ros__parameters:", f'    model_depth: "{depth}"', f'    model_normals: "{normals}"']
    lines += [f"    {name}: {value}" for name, value in NODE_PARAMS.items()]
    (tmp / "params.yaml").write_text("\n".join(lines) + "\n")
    write_synthetic_bag(tmp / "synth", frames=3, width=160, height=120, period_s=1.0)  # see test_bag_replay


@pytest.mark.launch_test
def generate_test_description() -> tuple[LaunchDescription, dict]:
    """The node from depth.launch.py, tiny checkpoints, inputs remapped to the bag's topics."""
    os.environ.update({k: v for k, v in replay_env(DOMAIN).items()
                       if k.startswith(("ROS_", "FASTDDS_", "FASTRTPS_"))})  # the launched node inherits these
    tmp = Path(tempfile.gettempdir()) / f"geodiff_launch_test_{os.getpid()}_{time.monotonic_ns()}"
    _write_inputs(tmp)
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # also when launch never runs (launch_test -s)
    description = LaunchDescription([
        # The checkpoints, params and recordings (~6 MB) go when launch shuts down, after the tests that use them.
        RegisterEventHandler(OnShutdown(on_shutdown=[OpaqueFunction(
            function=lambda _context: shutil.rmtree(tmp, ignore_errors=True))])),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(str(launch_file("depth.launch.py"))),
            launch_arguments={"params_file": str(tmp / "params.yaml"), "namespace": NS,
                              "image": inputs_in(NS)[IMAGE_TOPIC], "camera_info": inputs_in(NS)[INFO_TOPIC],
                              "sparse_depth": inputs_in(NS)[DEPTH_TOPIC]}.items()),
        launch_testing.actions.ReadyToTest(),
    ])
    return description, {"tmp": tmp, "bag": tmp / "synth"}


class TestDepthLaunch(unittest.TestCase):
    """While the launched node runs: play the bag twice and check the recorded outputs."""

    def test_bag_through_launched_node(self, proc_output: object, tmp: Path, bag: Path) -> None:
        proc_output.assertWaitFor("processing frames", timeout=120)  # warm-up done
        check_two_pass(DOMAIN, tmp, bag, NS, player_cmd=_player_cmd)


@launch_testing.post_shutdown_test()
class TestDepthLaunchShutdown(unittest.TestCase):
    """launch stops the node with SIGINT: it must exit 0; the test's temporary folder is gone."""

    def test_exit_codes(self, proc_info: object) -> None:
        launch_testing.asserts.assertExitCodes(proc_info)

    def test_temporary_files_removed(self, tmp: Path) -> None:
        self.assertFalse(tmp.exists(), f"{tmp} left behind")
