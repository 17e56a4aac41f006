"""Model engine: torch + diffusers only, no ROS imports (importable without rclpy).

The torch parts load on first use of one of their names, so ``geodiff_ros.engine.config`` (defaults and input
rules) and ``geodiff_ros.engine.errors`` import without torch: the node validates its parameters before the model
stack is loaded.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .config import DEPTH_HUB_ID, NORMALS_HUB_ID
from .errors import DeviceError, GeoDiffError, ImageFormatError, ModelLoadError

_LAZY = {
    "ModelComponents": ".checkpoint", "load_components": ".checkpoint",
    "EngineConfig": ".core", "GeoDiffEngine": ".core", "encode_empty_prompt": ".core",
    "LATENT_SCALE": ".latent", "Prediction": ".latent", "x0_from_prediction": ".latent",
}

__all__ = [
    "DEPTH_HUB_ID", "LATENT_SCALE", "NORMALS_HUB_ID", "DeviceError", "EngineConfig", "GeoDiffEngine",
    "GeoDiffError", "ImageFormatError", "ModelComponents", "ModelLoadError", "Prediction",
    "encode_empty_prompt", "load_components", "x0_from_prediction",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
