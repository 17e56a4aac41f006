"""Model engine: torch + diffusers only, no ROS imports (importable without rclpy)."""

from .checkpoint import DEPTH_HUB_ID, NORMALS_HUB_ID, ModelComponents, load_components
from .core import LATENT_SCALE, EngineConfig, GeoDiffEngine, Prediction, encode_empty_prompt, x0_from_prediction
from .errors import DeviceError, GeoDiffError, ImageFormatError, ModelLoadError

__all__ = [
    "DEPTH_HUB_ID", "NORMALS_HUB_ID", "LATENT_SCALE", "DeviceError", "EngineConfig", "GeoDiffEngine",
    "GeoDiffError", "ImageFormatError", "ModelComponents", "ModelLoadError", "Prediction",
    "encode_empty_prompt", "load_components", "x0_from_prediction",
]
