"""Model engine: torch + diffusers only, no ROS imports (importable without rclpy)."""

from .checkpoint import DEPTH_HUB_ID, NORMALS_HUB_ID, ModelComponents, load_components
from .core import EngineConfig, GeoDiffEngine, encode_empty_prompt
from .errors import DeviceError, GeoDiffError, ImageFormatError, ModelLoadError
from .latent import LATENT_SCALE, Prediction, x0_from_prediction

__all__ = [
    "DEPTH_HUB_ID", "NORMALS_HUB_ID", "LATENT_SCALE", "DeviceError", "EngineConfig", "GeoDiffEngine",
    "GeoDiffError", "ImageFormatError", "ModelComponents", "ModelLoadError", "Prediction",
    "encode_empty_prompt", "load_components", "x0_from_prediction",
]
