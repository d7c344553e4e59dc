"""Whole-slide images to model input, the way Google's pathology notebook prepares them for MedGemma 1.5.

The level nearest the target magnification (10x, about 1 um per pixel) is cut into non-overlapping 896 x 896
patches; a tissue mask computed on the slide's smallest level keeps the patches that are at least half tissue;
a seeded random sample of at most ``max_patches`` (125) of them goes to the model, in reading order (row by row).
Patches are read one at a time through the slide reader, so the base level, gigapixels in size, is never in memory.

Readers, all installable from PyPI without system libraries: ``tiffslide`` (Aperio SVS and pyramidal TIFF, from
the uploaded bytes) and ``wsidicom`` (DICOM WSI, from uploaded files or lazily over DICOMweb, tile by tile).
Magnification comes from the pixel spacing (``10 / mpp``); a TIFF without one but with an objective power uses
that; a slide with neither is read at its base level, and the report says so.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from medgemma.errors import BadRequest, PayloadTooLarge, ServiceError
from medgemma.pixels import ImageLimits, PreparedImage, check_pixels

logger = logging.getLogger(__name__)

PATCH_SIZE = 896  # MedGemma's input image size: the notebook's patches are exactly one model image
TISSUE_FRACTION = 0.5  # a patch is kept when at least half of its area is tissue
VL_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_MASK_MAX_PIXELS = 16_000_000  # the mask level is read whole: refuse slides whose smallest level is larger


@dataclass(frozen=True)
class Level:
    width: int
    height: int
    mpp: float | None  # micrometres per pixel
    magnification: float | None


class Slide:
    """A slide reader: its levels (largest first) and ``read(level, x, y, w, h)`` in that level's pixels."""

    format: str = "slide"
    thread_safe: bool = False
    levels: list[Level]

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:  # RGB uint8
        raise NotImplementedError

    def close(self) -> None:
        """Release the reader's files and connections."""


class TiffSlide(Slide):
    """Aperio SVS or pyramidal TIFF through ``tiffslide``, from bytes in memory."""

    def __init__(self, data: bytes) -> None:
        import tiffslide

        self._slide = tiffslide.TiffSlide(io.BytesIO(data))
        props = self._slide.properties
        self.format = "svs" if props.get("tiffslide.vendor") == "aperio" else "tiff"
        base_mpp = props.get("tiffslide.mpp-x") or _tiff_resolution_mpp(self._slide)
        power = props.get("tiffslide.objective-power")
        self.levels = []
        for (w, h), down in zip(self._slide.level_dimensions, self._slide.level_downsamples, strict=True):
            mpp = float(base_mpp) * down if base_mpp else None
            mag = 10.0 / mpp if mpp else (float(power) / down if power else None)
            self.levels.append(Level(int(w), int(h), mpp, mag))
        self._downsamples = list(self._slide.level_downsamples)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        down = self._downsamples[level]
        location = (round(x * down), round(y * down))  # tiffslide takes the origin in base-level pixels
        arr = self._slide.read_region(location, level, (width, height), as_array=True)
        return _rgb(np.asarray(arr))

    def close(self) -> None:
        self._slide.close()


class DicomSlide(Slide):
    """DICOM WSI through ``wsidicom``: uploaded files, or a series read tile by tile over DICOMweb."""

    format = "dicom"
    thread_safe = True

    def __init__(self, wsi: Any, cleanup: Callable[[], None] | None = None) -> None:
        self._wsi = wsi
        self._cleanup = cleanup
        self._pyramid_levels = [lvl.level for lvl in wsi.levels]
        self.levels = []
        for lvl in wsi.levels:
            mpp = float(lvl.mpp.width) if lvl.mpp is not None and lvl.mpp.width else None
            self.levels.append(Level(int(lvl.size.width), int(lvl.size.height), mpp, 10.0 / mpp if mpp else None))

    @classmethod
    def from_bytes(cls, data: bytes) -> DicomSlide:
        from wsidicom import WsiDicom

        # wsidicom opens paths, not buffers: the upload goes to a private temporary file for the request's duration
        fd, path = tempfile.mkstemp(suffix=".dcm", prefix="medgemma-wsi-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            wsi = WsiDicom.open([path])
        except Exception:
            os.unlink(path)
            raise
        return cls(wsi, cleanup=lambda: os.unlink(path))

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        region = self._wsi.read_region((x, y), self._pyramid_levels[level], (width, height))
        return _rgb(np.asarray(region.convert("RGB")))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._wsi.close()
        if self._cleanup is not None:
            with contextlib.suppress(OSError):
                self._cleanup()


def is_tiff_slide(data: bytes) -> bool:
    """A tiled TIFF with a resolution pyramid (or an Aperio SVS): a slide, not a picture."""
    if data[:4] not in _TIFF_MAGIC:
        return False
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            first = tif.pages.first
            return bool(first.is_tiled and (tif.is_svs or len(tif.series[0].levels) > 1))
    except Exception:  # not a TIFF tifffile can read: let the raster path explain
        return False


def choose_level(levels: list[Level], magnification: float) -> tuple[int, str]:
    """The level nearest ``magnification`` (in log scale), and how it was chosen."""
    known = [(i, lvl.magnification) for i, lvl in enumerate(levels) if lvl.magnification]
    if not known:
        return 0, "base level: the slide declares no pixel spacing or objective power"
    best = min(known, key=lambda item: abs(math.log(item[1] / magnification)))
    return best[0], "nearest magnification"


def tissue_mask(slide: Slide, limits: ImageLimits) -> tuple[np.ndarray, int]:
    """Boolean tissue mask on the smallest level: coloured (stained) or dark pixels, not white glass or black."""
    index = len(slide.levels) - 1
    level = slide.levels[index]
    if level.width * level.height > _MASK_MAX_PIXELS:
        raise PayloadTooLarge(
            f"The slide's smallest level is {level.width}x{level.height} pixels; a slide needs a level of at most "
            f"{_MASK_MAX_PIXELS:,} pixels to find its tissue",
        )
    arr = slide.read(index, 0, 0, level.width, level.height).astype(np.int16)
    saturation = arr.max(axis=-1) - arr.min(axis=-1)
    brightness = arr.max(axis=-1)
    mask = ((saturation >= 20) | (brightness < 200)) & (brightness > 30)
    return mask, index


def patch_grid(slide: Slide, level: int, mask: np.ndarray, mask_level: int) -> list[tuple[int, int]]:
    """Origins (x, y) at ``level`` of the full patches that are at least half tissue, row by row."""
    lvl, ref = slide.levels[level], slide.levels[mask_level]
    sx, sy = ref.width / lvl.width, ref.height / lvl.height
    origins = []
    for row in range(lvl.height // PATCH_SIZE):
        for col in range(lvl.width // PATCH_SIZE):
            x, y = col * PATCH_SIZE, row * PATCH_SIZE
            x0, x1 = math.floor(x * sx), max(math.ceil((x + PATCH_SIZE) * sx), math.floor(x * sx) + 1)
            y0, y1 = math.floor(y * sy), max(math.ceil((y + PATCH_SIZE) * sy), math.floor(y * sy) + 1)
            window = mask[y0:y1, x0:x1]
            if window.size and float(window.mean()) >= TISSUE_FRACTION:
                origins.append((x, y))
    return origins


def sample(origins: list[tuple[int, int]], max_patches: int, seed: int) -> list[tuple[int, int]]:
    """A seeded random sample of at most ``max_patches`` origins, kept in reading order."""
    if len(origins) <= max_patches:
        return list(origins)
    rng = np.random.default_rng(seed)
    picked = sorted(int(i) for i in rng.choice(len(origins), size=max_patches, replace=False))
    return [origins[i] for i in picked]


def patches(
    slide: Slide,
    *,
    magnification: float,
    max_patches: int,
    seed: int,
    limits: ImageLimits,
    param: str,
    concurrency: int = 4,
) -> tuple[list[PreparedImage], dict[str, Any]]:
    """The tissue patches given to the model, and the report of how they were chosen."""
    if not slide.levels:
        raise BadRequest(f"The slide in '{param}' has no image levels", param=param)
    level, how = choose_level(slide.levels, magnification)
    lvl = slide.levels[level]
    check_pixels(PATCH_SIZE, PATCH_SIZE, limits, param, what="A slide patch")
    mask, mask_level = tissue_mask(slide, limits)
    tissue = patch_grid(slide, level, mask, mask_level)
    if not tissue:
        raise BadRequest(
            f"The slide in '{param}' has no {PATCH_SIZE}x{PATCH_SIZE} patch that is mostly tissue at its "
            f"{_magnification_text(lvl)} level ({lvl.width}x{lvl.height} pixels)",
            param=param,
        )
    chosen = sample(tissue, max_patches, seed)

    def read(origin: tuple[int, int]) -> PreparedImage:
        x, y = origin
        arr = slide.read(level, x, y, PATCH_SIZE, PATCH_SIZE)
        info = {
            "source": "wsi",
            "format": slide.format,
            "modality": "SM",
            "patch": {"level": level, "x": x, "y": y, "size": PATCH_SIZE},
            "size": [PATCH_SIZE, PATCH_SIZE],
        }
        return PreparedImage(image=Image.fromarray(arr, mode="RGB"), info=info)

    workers = max(1, concurrency) if slide.thread_safe else 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medgemma-patches") as pool:
        prepared = list(pool.map(read, chosen))
    report = {
        "format": slide.format,
        "wsi_level": level,
        "wsi_levels": len(slide.levels),
        "level_size": [lvl.width, lvl.height],
        "mpp": None if lvl.mpp is None else round(lvl.mpp, 4),
        "magnification": None if lvl.magnification is None else round(lvl.magnification, 2),
        "level_choice": how,
        "patch_size": PATCH_SIZE,
        "tissue_patches": len(tissue),
        "patch_count": len(prepared),
        "seed": seed,
    }
    return prepared, report


@contextlib.contextmanager
def opened(
    factory: Callable[[], Slide],
    param: str,
    translate: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
) -> Iterator[Slide]:
    """Open a slide, use it, close it. A reader's own exception, while opening or reading, becomes a 400 naming
    ``param`` (its text may quote file contents), or whatever ``translate`` makes of it (a PACS's 502/504)."""
    guard = translate or (lambda: _as_bad_request(param))
    with guard():
        slide = factory()
    try:
        with guard():
            yield slide
    finally:
        slide.close()


@contextlib.contextmanager
def _as_bad_request(param: str) -> Iterator[None]:
    try:
        yield
    except ServiceError:
        raise
    except Exception as exc:
        logger.info("slide rejected: %s", type(exc).__name__)
        raise BadRequest(
            f"The slide in '{param}' cannot be read: it is not a valid pyramidal image, or it is truncated",
            param=param,
        ) from None


def _rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _tiff_resolution_mpp(slide: Any) -> float | None:
    """Pixel spacing from a generic TIFF's XResolution and ResolutionUnit (tiffslide reads only vendor formats')."""
    try:
        page = slide.ts_tifffile.pages.first
        unit = int(page.tags["ResolutionUnit"].value)
        num, den = page.tags["XResolution"].value
        per_unit = num / den
    except Exception:
        return None
    micrometres = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre
    return micrometres / per_unit if micrometres and per_unit > 0 else None


def _magnification_text(level: Level) -> str:
    return f"{level.magnification:.1f}x" if level.magnification else "base"
