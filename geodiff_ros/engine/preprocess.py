"""Image conversion and the E2E-FT resize policy (docs/method.md#resize).

Inputs become HxWx3 uint8 RGB: grayscale is replicated, RGBA drops alpha, 16-bit is scaled to 8-bit.
Resizing happens on the GPU/CPU tensor in float with rounding back to uint8 values, which is what torchvision's
``resize(..., antialias=True)`` does for uint8 tensors in the official pipeline.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ImageFormatError

# official (torchvision) modes: bilinear -> BILINEAR, bicubic -> BICUBIC, nearest -> NEAREST_EXACT
RESAMPLE_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Convert one image to HxWx3 uint8 RGB.

    Accepts HxW or HxWx1 (grayscale), HxWx3 (RGB), HxWx4 (RGBA, alpha dropped) in uint8, uint16 (scaled by
    1/257) or float in [0, 1]. Anything else raises ImageFormatError naming what was received.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageFormatError(
            f"unsupported image shape {arr.shape}: expected HxW (grayscale), HxWx3 (RGB) or HxWx4 (RGBA); "
            "convert the image to RGB first"
        )
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageFormatError(f"empty image of shape {arr.shape}: width and height must be at least 1")
    arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.uint16:
        return np.ascontiguousarray((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ImageFormatError("float image contains NaN or inf; replace them before inference")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise ImageFormatError(
                f"float image values span [{arr.min():.3g}, {arr.max():.3g}]; float input must be in [0, 1]"
            )
        return np.round(arr * 255.0).astype(np.uint8)
    raise ImageFormatError(f"unsupported image dtype {arr.dtype}: use uint8, uint16 or float in [0, 1]")


def processing_size(height: int, width: int, processing_res: int) -> tuple[int, int]:
    """Size the network runs at: the longest edge becomes ``processing_res`` (also up-sampling), docs/method.md#resize.

    f = min(R/W, R/H); new = (int(H*f), int(W*f)) with float multiply then floor; 0 keeps the native size.
    """
    if processing_res <= 0:
        return height, width
    factor = min(processing_res / width, processing_res / height)
    return max(1, int(height * factor)), max(1, int(width * factor))


# The VAE encoder halves the image three times with unpadded 3x3 convolutions: below 8 px on a side torch fails
# with "Kernel size can't be greater than actual input size" (measured with the tiny and the full-size VAE layout).
MIN_PROCESSING_SIDE = 8


def processing_size_problem(height: int, width: int, processing_res: int) -> str | None:
    """Why a ``width x height`` image cannot run at ``processing_res`` (too thin after resizing), or None.

    A 100000x1 image shrinks to 768x1 at processing_res 768; callers check this before the engine so the error
    names the size and the minimum instead of torch's convolution message.
    """
    h, w = processing_size(height, width, processing_res)
    if min(h, w) >= MIN_PROCESSING_SIDE:
        return None
    longest = max(height, width)
    need = MIN_PROCESSING_SIDE
    if processing_res > 0:
        need = max(need, int(MIN_PROCESSING_SIDE * longest / processing_res))
        while min(processing_size(need, longest, processing_res)) < MIN_PROCESSING_SIDE:
            need += 1
    return (f"image {width}x{height} is too thin for the network: at processing_res {processing_res} it becomes "
            f"{w}x{h}, below the minimum of {MIN_PROCESSING_SIDE} px per side; its shorter side must be at least "
            f"{need} px (for a {longest} px longer side)")


def resize_uint8_batch(images: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    """Resize a [B,3,H,W] uint8-valued tensor with antialiasing, returning float values rounded like uint8."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images.float()
    mode = RESAMPLE_MODES[resample]
    x = images.float()
    if mode == "nearest-exact":
        out = F.interpolate(x, size=size, mode=mode)
    else:
        out = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    return out.round_().clamp_(0.0, 255.0)


def resize_output(x: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    """Resize predictions [B,C,h,w] back to the input size, antialiased as the official pipeline."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    mode = RESAMPLE_MODES[resample]
    if mode == "nearest-exact":
        return F.interpolate(x, size=size, mode=mode)
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
