"""Shared pytest set-up: loopback-only DDS, offline hub, tiny checkpoints, the optional shared data.

Every process started from the tests inherits this environment, so nothing ever leaves the machine
(ros2-from-pypi.md: ROS_AUTOMATIC_DISCOVERY_RANGE, ROS_LOCALHOST_ONLY and the Fast DDS localhost profile).
"""

from __future__ import annotations

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
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


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
