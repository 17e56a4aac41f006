"""The engine's defaults and input rules, without torch: one home for what the node parameters, the CLIs, the launch
files and the benchmarks offer and check, so they never restate (and drift from) the engine's own values.

Importing this module does not import torch or diffusers (``geodiff_ros.engine`` loads its torch parts lazily), so
the node can validate its parameters and fail fast before the model stack is loaded.
"""

from __future__ import annotations

import argparse

__all__ = [
    "DEFAULT_DEVICE",
    "DEFAULT_DTYPE",
    "DEFAULT_PROCESSING_RES",
    "DEPTH_HUB_ID",
    "DTYPE_CHOICES",
    "NORMALS_HUB_ID",
    "OPTIMIZE_MODES",
    "PROCESSING_RES_MULTIPLE",
    "TASKS",
    "optimize_problem",
    "processing_res_argument",
    "processing_res_problem",
]

# The released E2E-FT checkpoints (Hugging Face hub ids); a local folder in the same layout works the same way.
DEPTH_HUB_ID = "GonzaloMG/marigold-e2e-ft-depth"
NORMALS_HUB_ID = "GonzaloMG/marigold-e2e-ft-normals"
TASKS = ("depth", "normals")

DEFAULT_DEVICE = "cuda"
# fp16: fast on a GPU and within the engine benchmark's accuracy tolerance; bf16 on request; fp32 is the official
# computation (the CPU runs fp16 as fp32).
DTYPE_CHOICES = ("fp32", "fp16", "bf16")
DEFAULT_DTYPE = "fp16"

# Engine speed-ups (accel.py): none = the official eager path; auto = compile+graph on CUDA, none on the CPU.
OPTIMIZE_MODES = ("auto", "none", "channels_last", "graph", "compile", "compile+graph")

# Longest image edge fed to the network (0 = native size), the released models' training and inference size.
DEFAULT_PROCESSING_RES = 768
# The VAE downsamples by 8: at a multiple of 8 the network's output grid covers the resized image exactly. At
# another size the decoder's output stops up to 7 px short and the resize back stretches it over the image (the
# official code accepts that, and its ETH3D protocol runs at 756: the evaluation may; serving front-ends may not).
PROCESSING_RES_MULTIPLE = 8

# How a server starts a compiled engine (engine/serving.py): serve eager frames at once while the optimised path
# builds in the background, or build it first (repeatable latency from the first frame).
STARTUP_MODES = ("serve_eager", "wait_compiled")
DEFAULT_STARTUP_MODE = "serve_eager"


def processing_res_problem(value: int, option: str = "processing_res") -> str | None:
    """Why ``value`` is not a valid processing resolution for serving (``option`` names the setting), or None."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{option}={value!r} must be an integer (the longest image edge in pixels, 0 for native size)"
    if value < 0:
        return f"{option}={value} must be >= 0 (0 runs the network at the native image size)"
    if value % PROCESSING_RES_MULTIPLE:
        lower = value - value % PROCESSING_RES_MULTIPLE
        return (f"{option}={value} must be a multiple of {PROCESSING_RES_MULTIPLE} (the VAE downsamples by "
                f"{PROCESSING_RES_MULTIPLE}), e.g. {lower or PROCESSING_RES_MULTIPLE} or "
                f"{lower + PROCESSING_RES_MULTIPLE}, or 0 for native size")
    return None


def optimize_problem(mode: str, option: str = "optimize") -> str | None:
    """Why ``mode`` is not an optimize mode (``option`` names the setting), or None."""
    if (mode or "none").strip().lower() in OPTIMIZE_MODES:
        return None
    return f"{option} {mode!r} is not a mode; use one of {', '.join(OPTIMIZE_MODES)}"


def processing_res_argument(text: str) -> int:
    """argparse ``type`` of the CLIs' ``--processing-res``: the integer, or the rule's message as a usage error."""
    try:
        value = int(text)
    except ValueError:
        value = text  # type: ignore[assignment] - reported below
    problem = processing_res_problem(value, "--processing-res")
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value
