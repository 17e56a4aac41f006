"""Shared pytest set-up: loopback-only DDS, offline hub, tiny checkpoints, the optional shared data.

Every process started from the tests inherits this environment, so nothing ever leaves the machine
(ros2-from-pypi.md: ROS_AUTOMATIC_DISCOVERY_RANGE, ROS_LOCALHOST_ONLY and the Fast DDS localhost profile).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GEODIFF_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_LOCALHOST_ONLY"] = "1"
# Jazzy's Fast DDS 2.14 reads FASTRTPS_DEFAULT_PROFILES_FILE; FASTDDS_* is the Fast DDS 3 name (set both).
os.environ["FASTRTPS_DEFAULT_PROFILES_FILE"] = str(REPO / "config" / "fastdds_localhost.xml")
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = os.environ["FASTRTPS_DEFAULT_PROFILES_FILE"]
os.environ.setdefault("ROS_DOMAIN_ID", str(10 + os.getpid() % 80))
os.environ.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="geodiff_roslog_"))
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the network
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _test_installed_package() -> bool:
    """Which geodiff_ros the suite tests: the installed one under ``colcon test`` (colcon sets COLCON=1) or with
    GEODIFF_TEST_INSTALLED=1, as a ROS user runs it; otherwise (a checkout) the source folder, so edits are tested
    without reinstalling."""
    flag = os.environ.get("GEODIFF_TEST_INSTALLED")
    if flag is not None:
        return flag not in ("", "0", "false")
    return bool(os.environ.get("COLCON"))


def _same_path(entry: str, path: Path) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == path
    except OSError:
        return False


if _test_installed_package():
    # colcon runs `python -m pytest` in the source folder, which puts that folder first on sys.path: drop it (and
    # from PYTHONPATH, which subprocesses inherit) so imports resolve to the install (install/.../site-packages).
    os.environ["GEODIFF_TEST_INSTALLED"] = "1"  # ros_helpers: subprocesses must not start in the source folder
    sys.path[:] = [p for p in sys.path if not _same_path(p, REPO)]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and not _same_path(p, REPO))
    try:  # (a --symlink-install build resolves to the source folder again, by design)
        import geodiff_ros  # noqa: F401
    except ImportError as err:
        raise pytest.UsageError(f"testing the installed geodiff_ros, but it is not importable ({err}): run "
                                "`colcon build` and `source install/setup.bash` first") from err
else:
    os.environ["GEODIFF_TEST_INSTALLED"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))

# With ROS 2 launch installed, the launch_testing pytest plugin imports launch.logging, which makes every logger
# created afterwards a LaunchLogger with propagate=False: our libraries' log lines (geodiff_bag's errors, ...)
# would then never reach pytest's caplog. Loggers of this project are plain loggers again; launch's own loggers,
# created when launch was imported, keep their class.
if logging.getLoggerClass() is not logging.Logger:
    logging.setLoggerClass(logging.Logger)
    for _name, _logger in list(logging.root.manager.loggerDict.items()):
        if _name.split(".")[0] in ("geodiff_ros", "geodiff_bag") and isinstance(_logger, logging.Logger):
            _logger.propagate = True


@pytest.fixture(scope="session")
def tiny_depth_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny depth checkpoint in the GonzaloMG hub layout (random weights)."""
    from geodiff_ros.testing.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-e2e-ft-depth", "depth")


@pytest.fixture(scope="session")
def tiny_normals_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny normals checkpoint sharing the depth checkpoint's VAE and text encoder."""
    from geodiff_ros.testing.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-e2e-ft-normals", "normals")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (real RGB-D frames); tests using it skip cleanly without it."""
    if not (SHARED_DATA / "manifest.json").is_file():
        pytest.skip(f"real data folder {SHARED_DATA} not present (set GEODIFF_SHARED_DATA to use it)")
    return SHARED_DATA


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", 'soak: long soak test (runs by default; deselect with -m "not soak")')
