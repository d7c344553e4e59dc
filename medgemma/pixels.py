"""Pixel types and arithmetic shared by every image decoder: limits, windows, and the mapping to 8-bit RGB.

The bottom layer of the image modules: :mod:`medgemma.dicom` and :mod:`medgemma.imaging` both build on it and it
imports neither, so the decoders sit on layers that only look down (pixels <- dicom <- imaging <- inputs).
Pure functions and plain data: no pydicom, no web framework.

The window formula everywhere is DICOM's LINEAR_EXACT (PS3.3 C.11.2.1.3.2), round half up; see
:mod:`medgemma.imaging` for the rules built on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image

from medgemma.errors import BadRequest, PayloadTooLarge

FrameSelection = Literal["middle", "first", "all"]
FRAME_SELECTIONS: tuple[str, ...] = get_args(FrameSelection)


@dataclass(frozen=True)
class ImageLimits:
    """Per-image limits, checked before anything large is allocated."""

    max_bytes: int = 32 * 1024 * 1024  # encoded bytes of one image/DICOM file -> PayloadTooLarge
    max_pixels: int = 40_000_000  # width*height of one frame, from the header, before decoding -> 413
    max_frames: int = 128  # frames taken from one multi-frame DICOM -> BadRequest


@dataclass(frozen=True)
class Window:
    """A request's window override, in the stored value's units after rescale (HU for CT)."""

    center: float
    width: float

    @property
    def bounds(self) -> tuple[float, float]:
        """``(lo, hi)`` of the LINEAR_EXACT window."""
        return self.center - self.width / 2, self.center + self.width / 2


@dataclass
class PreparedImage:
    """An 8-bit RGB image ready for the processor, and a JSON-safe description without patient data."""

    image: Image.Image
    info: dict[str, Any]


def window_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo..hi`` linearly onto 0..255 (LINEAR_EXACT, clipped, round half up); NaN becomes 0.

    ``(v - lo) * 255 / (hi - lo)`` rather than ``(v - lo) / (hi - lo) * 255``: for integer inputs the
    product is exact, so a true half (127.5) stays a half and rounds up predictably.
    """
    if not hi > lo:
        return np.zeros(values.shape, dtype=np.uint8)
    scaled = (np.asarray(values, dtype=np.float64) - lo) * 255.0 / (hi - lo)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.floor(scaled + 0.5).astype(np.uint8)


def sigmoid_to_uint8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM's SIGMOID VOI function: ``255 / (1 + exp(-4 (v - center) / width))``, round half up."""
    with np.errstate(over="ignore"):
        scaled = 255.0 / (1.0 + np.exp(-4.0 * (np.asarray(values, dtype=np.float64) - center) / width))
    scaled = np.nan_to_num(scaled, nan=0.0)
    return np.floor(np.clip(scaled, 0.0, 255.0) + 0.5).astype(np.uint8)


def minmax_to_uint8(values: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Stretch the real finite min..max of ``values`` to 0..255; constant (or empty) images become 0."""
    values = np.asarray(values)
    finite = values[np.isfinite(values)] if np.issubdtype(values.dtype, np.floating) else values
    if finite.size == 0:
        return np.zeros(values.shape, dtype=np.uint8), window_info(0.0, 0.0, "minmax")
    lo, hi = float(finite.min()), float(finite.max())
    return window_to_uint8(values, lo, hi), window_info((lo + hi) / 2, hi - lo, "minmax")


def window_info(center: float | None, width: float | None, source: str, function: str = "linear") -> dict:
    """The ``info["window"]`` entry: plain floats (JSON-safe) and where the window came from."""
    return {
        "center": None if center is None else float(center),
        "width": None if width is None else float(width),
        "source": source,
        "function": function,
    }


def grey_to_rgb(grey: np.ndarray) -> Image.Image:
    """An ``uint8`` 2-D array as an RGB image with the grey replicated in R, G and B."""
    return Image.fromarray(np.ascontiguousarray(grey, dtype=np.uint8), mode="L").convert("RGB")


def check_window(window: Window | None) -> None:
    """Reject a window the formula cannot use (non-finite, or width not positive)."""
    if window is None:
        return
    if not (math.isfinite(window.center) and math.isfinite(window.width)) or window.width <= 0:
        raise BadRequest("The window needs a finite center and a width greater than 0", param="window")


def check_pixels(width: int, height: int, limits: ImageLimits, param: str, what: str = "The image") -> None:
    """Refuse an image from its header dimensions, before its pixels are decoded (decompression bombs)."""
    if width <= 0 or height <= 0:
        raise BadRequest(f"{what} in '{param}' has no pixels ({width}x{height})", param=param)
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(
            f"{what} in '{param}' is {width}x{height} pixels ({width * height:,}); "
            f"the limit is {limits.max_pixels:,} pixels per image",
            param=param,
        )
