"""Where the package's installed files are, and the ROS environment every geodiff process starts with (DDS kept on
this machine). Used by the demo and the bag tool, so neither imports the other.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

__all__ = ["PACKAGE", "ensure_ros_env", "fastdds_profile", "share_file"]

PACKAGE = "geodiff_ros"
_PKG_ROOT = Path(__file__).resolve().parents[2]  # folder holding the geodiff_ros package (repo root in a checkout)


def share_file(*parts: str) -> Path | None:
    """A file installed in the package's share folder (ament index), else the one in the source checkout."""
    try:
        from ament_index_python.packages import get_package_share_directory

        path = Path(get_package_share_directory(PACKAGE), *parts)
        if path.is_file():
            return path
    except Exception:  # noqa: BLE001 - no AMENT_PREFIX_PATH or package not installed
        pass
    for base in (_PKG_ROOT, Path(sys.prefix) / "share" / PACKAGE):
        path = base.joinpath(*parts)
        if path.is_file():
            return path
    return None


def fastdds_profile() -> Path | None:
    """The project's loopback Fast DDS profile (installed share dir or checkout)."""
    return share_file("config", "fastdds_localhost.xml")


def ensure_ros_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Keep DDS traffic on this machine unless the user chose otherwise; returns the variables it set.

    Sets (only where unset) ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST, ROS_LOCALHOST_ONLY=1, the Fast DDS profile
    with a 16 MB shared-memory segment (big images under best effort, ros2-from-pypi.md), a ROS_DOMAIN_ID and a
    log folder. Must run before ``rclpy.init``; child processes inherit it.
    """
    env = os.environ if env is None else env
    wanted = {"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_LOCALHOST_ONLY": "1", "ROS_DOMAIN_ID": "42"}
    profile = env.get("FASTDDS_DEFAULT_PROFILES_FILE") or env.get("FASTRTPS_DEFAULT_PROFILES_FILE") or fastdds_profile()
    if profile:
        # Fast DDS 2.14 (Jazzy's rmw_fastrtps) reads only FASTRTPS_DEFAULT_PROFILES_FILE; Fast DDS 3 (kilted) reads
        # FASTDDS_DEFAULT_PROFILES_FILE. Without the first, Jazzy keeps the 512 KB shared-memory segment and loses
        # 640x480 images under best effort (checked here: the 16 MB segment appears only with FASTRTPS_...).
        wanted["FASTDDS_DEFAULT_PROFILES_FILE"] = str(profile)
        wanted["FASTRTPS_DEFAULT_PROFILES_FILE"] = str(profile)
    if not (env.get("HOME") or env.get("ROS_LOG_DIR") or env.get("ROS_HOME")):
        wanted["ROS_LOG_DIR"] = str(Path(tempfile.gettempdir()) / "geodiff_ros_logs")
    changed = {k: v for k, v in wanted.items() if not env.get(k)}
    env.update(changed)
    return changed
