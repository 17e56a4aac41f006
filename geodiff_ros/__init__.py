"""geodiff_ros: single-step diffusion depth and normals (E2E-FT, arXiv 2409.11355) for ROS 2.

The sub-packages ``engine``, ``geometry``, ``training`` and ``evaluation`` import no ROS module;
only ``geodiff_ros.ros`` does.
"""

__version__ = "0.1.0"
