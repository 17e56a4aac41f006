"""Errors raised by the engine. Every message names the problem and the fix."""

from __future__ import annotations


class GeoDiffError(Exception):
    """Base class of all geodiff engine errors."""


class ModelLoadError(GeoDiffError):
    """A checkpoint could not be found, downloaded or used."""


class ImageFormatError(GeoDiffError, ValueError):
    """An input image has a shape or dtype the engine cannot convert to RGB."""


class DeviceError(GeoDiffError):
    """The requested device or dtype is not available on this machine."""
