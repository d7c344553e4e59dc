"""Turn what a user sends into 8-bit RGB PIL images for the Gemma 3 processor, and say what was done.

Pure functions: no model, no BentoML, no torch. Three entry points:

* :func:`parse_data_uri` — a request string (data URI or bare base64) to ``(media type, bytes)``.
* :func:`load_images` — encoded bytes (PNG, JPEG, WebP, GIF, BMP, TIFF or DICOM) to one
  :class:`PreparedImage` per image used (a multi-frame DICOM may give several).
* :func:`prepare_pil` — an image BentoML already decoded, normalised by the same rules.

Rules shared by every path (the tests check each one by hand-computed pixel values):

* **Window formula.** Every linear mapping of stored values to 8 bits here is DICOM's LINEAR_EXACT window
  (PS3.3 C.11.2.1.3.2): with ``lo = center - width / 2`` and ``hi = center + width / 2``,
  ``out = floor(clip((v - lo) * 255 / (hi - lo), 0, 255) + 0.5)``, i.e. round half up. DICOM's older
  LINEAR formula (``center - 0.5``, ``width - 1``) differs by less than one grey level at clinical widths;
  one formula everywhere keeps request windows, file windows, min-max and the CT RGB windows comparable.
* **More than 8 bits** (PNG/TIFF modes ``I;16``, ``I;16B``, ``I``, ``F``; DICOM without a window):
  min-max over the real finite pixel values, i.e. the window ``lo = min, hi = max``. A constant image
  becomes all zero. 8-bit images are display-ready and pass through unchanged.
* **Alpha** is composited on **black**: ``out = floor(c * a / 255 + 0.5)``. Medical images have black
  backgrounds (air, no signal), and the colour hidden under a transparent pixel is arbitrary, so black is
  the only choice that does not invent content.
* A request :class:`Window` applies to single-channel images only (grey PNG/TIFF, grey DICOM); colour
  images ignore it and say so in ``info["window_ignored"]``.

Errors are the project's :mod:`medgemma.errors` classes, with messages that never echo image bytes,
request strings or DICOM tag values. The pixel types and the window arithmetic live in
:mod:`medgemma.pixels`, DICOM decoding in :mod:`medgemma.dicom` (imported lazily, so that importing this
module does not import pydicom); both sit below this module and neither imports it.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import re
import urllib.parse
from typing import Any

import numpy as np
from PIL import (  # the plugin imports register exactly the formats _open_raster may use
    BmpImagePlugin,  # noqa: F401
    GifImagePlugin,  # noqa: F401
    Image,
    ImageOps,
    JpegImagePlugin,  # noqa: F401
    MpoImagePlugin,  # noqa: F401
    PngImagePlugin,  # noqa: F401
    TiffImagePlugin,  # noqa: F401
    UnidentifiedImageError,
    WebPImagePlugin,  # noqa: F401
)

from medgemma.errors import BadRequest, PayloadTooLarge, ServiceError, UnsupportedMediaType
from medgemma.pixels import (  # re-exported: callers name the image types through this module
    FRAME_SELECTIONS,
    FrameSelection,
    ImageLimits,
    PreparedImage,
    Window,
    check_pixels,
    check_window,
    grey_to_rgb,
    minmax_to_uint8,
    window_info,
    window_to_uint8,
)

__all__ = [
    "FRAME_SELECTIONS",
    "UNKNOWN_MEDIA_TYPE",
    "FrameSelection",
    "ImageLimits",
    "PreparedImage",
    "Window",
    "load_images",
    "parse_data_uri",
    "prepare_pil",
]

logger = logging.getLogger(__name__)


#: The media type returned for bare base64 or a data URI without one: the format is sniffed from the bytes.
UNKNOWN_MEDIA_TYPE = "application/octet-stream"

# Pillow format name -> our "source" name. Only these plugins are ever asked to parse user bytes.
_RASTER_FORMATS: dict[str, str] = {
    "PNG": "png",
    "JPEG": "jpeg",
    "MPO": "jpeg",  # multi-picture JPEG from phones (opened by the JPEG plugin); picture 1 is a JPEG
    "WEBP": "webp",
    "GIF": "gif",
    "BMP": "bmp",
    "DIB": "bmp",
    "TIFF": "tiff",
}
_OPEN_FORMATS = [name for name in _RASTER_FORMATS if name != "MPO"]

# Formats a client may plausibly send that we recognise only to refuse with 415 instead of 400.
_UNSUPPORTED_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"%PDF", "PDF"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (0, b"\xffO\xffQ", "JPEG 2000"),
    (0, b"\xff\n", "JPEG XL"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (0, b"<svg", "SVG"),
    (0, b"<?xml", "SVG/XML"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"8BPS", "PSD"),
    (0, b"\x1f\x8b", "gzip"),
    (0, b"PK\x03\x04", "ZIP"),
    (0, b"\x5c\x01\x3a\x01", "NIfTI"),
)
_HEIF_BRANDS: dict[bytes, str] = {
    b"heic": "HEIC",
    b"heix": "HEIC",
    b"mif1": "HEIF",
    b"msf1": "HEIF",
    b"avif": "AVIF",
    b"avis": "AVIF",
}

DEFAULT_LIMITS = ImageLimits()  # frozen: safe as a shared default

_GREY_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def _check_bytes(size: int, limits: ImageLimits, param: str) -> None:
    if size > limits.max_bytes:
        raise PayloadTooLarge(
            f"The image in '{param}' is {size:,} bytes; the limit is {limits.max_bytes:,} bytes per image",
            param=param,
        )


# --------------------------------------------------------------------------------------------------------
# Data URIs
# --------------------------------------------------------------------------------------------------------

_BASE64_RE = re.compile(r"[A-Za-z0-9+/_-]*=*")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,15}):")
_MEDIA_TYPE_RE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")
_WHITESPACE_RE = re.compile(r"\s+")


def parse_data_uri(value: str, *, param: str = "image", limits: ImageLimits | None = None) -> tuple[str, bytes]:
    """Decode ``data:<media type>[;params][;base64],<data>`` into ``(media type lowercased, bytes)``.

    Accepted:

    * base64 with or without ``=`` padding, with whitespace or line breaks anywhere, in the standard or the
      URL-safe alphabet;
    * a data URI without ``;base64`` (percent-encoded bytes, as RFC 2397 allows);
    * **bare base64** (no ``data:`` prefix): many clients send just the encoded file. Its media type is
      returned as ``application/octet-stream`` (as for a data URI without a media type) and
      :func:`load_images` sniffs the format from the bytes, which it does for every input anyway.

    Refused with :class:`BadRequest` naming ``param``: http(s)/file URLs and file paths (this service never
    fetches anything), other URI schemes, invalid base64 and empty data. With ``limits``, the size the
    payload would decode to is checked against ``limits.max_bytes`` before decoding (413).
    """
    if not isinstance(value, str):
        raise BadRequest(f"'{param}' must be a string holding a data URI or base64", param=param)
    text = value.strip()
    if not text:
        raise BadRequest(f"'{param}' is empty", param=param)

    if text[:5].lower() == "data:":
        header, sep, payload = text[5:].partition(",")
        if not sep:
            raise BadRequest(
                f"'{param}' is not a valid data URI: expected 'data:<media type>;base64,<data>'", param=param
            )
        parts = [p.strip() for p in header.split(";")]
        media_type = parts[0].lower() or UNKNOWN_MEDIA_TYPE
        if not _MEDIA_TYPE_RE.fullmatch(media_type):
            raise BadRequest(f"'{param}' has an invalid media type in its data URI", param=param)
        is_base64 = any(p.lower() == "base64" for p in parts[1:])
        if is_base64:
            data = _decode_base64(payload, param=param, limits=limits)
        else:
            if limits is not None:  # "%XX" is 3 characters per byte: a third is a lower bound
                _check_bytes(len(payload) // 3, limits, param)
            data = urllib.parse.unquote_to_bytes(payload)
    else:
        compact = _WHITESPACE_RE.sub("", text)
        if not _BASE64_RE.fullmatch(compact):
            raise BadRequest(_not_a_data_uri_message(text, param), param=param)
        media_type = UNKNOWN_MEDIA_TYPE
        data = _decode_base64(compact, param=param, limits=limits)

    if not data:
        raise BadRequest(f"The data URI in '{param}' holds no data", param=param)
    if limits is not None:
        _check_bytes(len(data), limits, param)
    return media_type, data


def _not_a_data_uri_message(text: str, param: str) -> str:
    """Say why a string is refused without echoing it (it may be anything, prompt text included)."""
    scheme = _SCHEME_RE.match(text)
    if scheme and len(scheme.group(1)) > 1:  # "C:\..." is a Windows path, not a scheme
        name = scheme.group(1).lower()
        return (
            f"'{param}' is a '{name}:' URI; only data URIs ('data:image/png;base64,...') or bare base64 "
            "are accepted: this service does not fetch URLs"
        )
    return (
        f"'{param}' is neither a data URI ('data:image/png;base64,...') nor base64; "
        "URLs and file paths are not accepted"
    )


def _decode_base64(payload: str, *, param: str, limits: ImageLimits | None) -> bytes:
    try:
        # Fast path: canonical base64 (what browsers, curl and Python produce) decodes without any clean-up pass.
        # The body limit already bounds what this allocates.
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        pass
    else:
        if limits is not None:
            _check_bytes(len(data), limits, param)
        return data
    compact = _WHITESPACE_RE.sub("", payload).rstrip("=")
    if limits is not None:
        # 4 base64 characters carry 3 bytes: refuse a too-large payload before allocating its decode.
        _check_bytes(len(compact) * 3 // 4, limits, param)
    if len(compact) % 4 == 1:
        raise BadRequest(f"'{param}' is not valid base64 (its length is impossible)", param=param)
    compact = compact.translate(str.maketrans("-_", "+/")) + "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"'{param}' is not valid base64", param=param) from None


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def load_images(
    data: bytes,
    *,
    media_type: str | None = None,
    window: Window | None = None,
    frames: FrameSelection = "middle",
    limits: ImageLimits = DEFAULT_LIMITS,
    param: str = "image",
) -> list[PreparedImage]:
    """Decode one encoded image or DICOM file into prepared images (one per DICOM frame used).

    The format is sniffed from the bytes; ``media_type`` only matters for DICOM without the ``DICM``
    preamble (``application/dicom`` makes it be read as DICOM). The order: ``DICM`` at offset 128 →
    DICOM; a PNG/JPEG/WebP/GIF/BMP/TIFF Pillow can open → raster (first frame of animations/multi-page);
    ``application/dicom`` or bytes that start like a DICOM data set (group 0002 or 0008) → DICOM read
    with ``force=True``; a known but unsupported format → 415; anything else → 400.
    ``frames`` picks the frames of a multi-frame DICOM: ``"middle"`` (default: frame ``n // 2``, the
    most representative single view of a cine or volume), ``"first"`` or ``"all"`` (at most
    ``limits.max_frames``).
    """
    if frames not in FRAME_SELECTIONS:
        raise BadRequest(f"frames must be one of {', '.join(FRAME_SELECTIONS)}", param="frames")
    check_window(window)
    if not isinstance(data, bytes | bytearray | memoryview):
        raise BadRequest(f"'{param}' must be image bytes", param=param)
    data = bytes(data)
    if not data:
        raise BadRequest(f"The image in '{param}' is empty", param=param)
    _check_bytes(len(data), limits, param)
    declared = _clean_media_type(media_type)

    from medgemma import dicom  # lazy: keeps pydicom off the import path of callers that never see DICOM

    if dicom.has_preamble(data):
        return dicom.load_dicom(data, window=window, frames=frames, limits=limits, param=param)

    img = _open_raster(data, limits=limits, param=param)
    if img is not None:
        with img:
            return [_prepare(img, _RASTER_FORMATS[img.format or ""], window=window, limits=limits, param=param)]

    if declared in dicom.DICOM_MEDIA_TYPES or dicom.looks_like_raw_dataset(data):
        return dicom.load_dicom(data, window=window, frames=frames, limits=limits, param=param)

    unsupported = _sniff_unsupported(data)
    if unsupported is not None:
        raise UnsupportedMediaType(
            f"The image in '{param}' is {unsupported}, which is not supported; "
            "send PNG, JPEG, WebP, GIF, BMP, TIFF or DICOM",
            param=param,
        )
    raise BadRequest(
        f"'{param}' is not a recognised image: expected PNG, JPEG, WebP, GIF, BMP, TIFF or DICOM"
        + (f" (declared as {declared})" if declared and declared != UNKNOWN_MEDIA_TYPE else ""),
        param=param,
    )


def prepare_pil(
    img: Image.Image,
    *,
    window: Window | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    param: str = "image",
) -> PreparedImage:
    """Normalise an image BentoML already decoded (``source: "pil"``) by :func:`load_images`' rules.

    Pillow opens lazily, so the size limit is checked before the pixels are loaded.
    """
    if not isinstance(img, Image.Image):
        raise BadRequest(f"'{param}' is not an image", param=param)
    check_window(window)
    return _prepare(img, "pil", window=window, limits=limits, param=param)


def _clean_media_type(media_type: str | None) -> str | None:
    """The media type without parameters, lowercased, or None if absent or not shaped like one."""
    if not media_type:
        return None
    base = media_type.split(";", 1)[0].strip().lower()
    return base if _MEDIA_TYPE_RE.fullmatch(base) else None


def _sniff_unsupported(data: bytes) -> str | None:
    head = data[:64]
    for offset, signature, name in _UNSUPPORTED_SIGNATURES:
        if head[offset : offset + len(signature)] == signature:
            return name
    if head[4:8] == b"ftyp":
        return _HEIF_BRANDS.get(head[8:12], "an ISO media file (HEIF/MP4)")
    return None


def _open_raster(data: bytes, *, limits: ImageLimits, param: str) -> Image.Image | None:
    """Open (lazily: header only) with the allowed Pillow plugins; None if none recognises the bytes."""
    try:
        return Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except UnidentifiedImageError:
        return None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning if made an error
        raise PayloadTooLarge(
            f"The image in '{param}' declares more pixels than the limit of {limits.max_pixels:,}",
            param=param,
        ) from None
    except Exception as exc:  # a plugin recognised its signature but the header is broken
        logger.info("image header rejected: %s", type(exc).__name__)
        raise BadRequest(f"The image in '{param}' is corrupt: its header cannot be read", param=param) from None


def _prepare(img: Image.Image, source: str, *, window: Window | None, limits: ImageLimits, param: str) -> PreparedImage:
    """Size check, decode, EXIF orientation, then mode normalisation to 8-bit RGB."""
    width, height = img.size
    check_pixels(width, height, limits, param)
    info: dict[str, Any] = {"source": source, "modality": None, "original_mode": img.mode}
    try:
        # counting frames parses every frame header (never pixels); broken headers fail here, inside the try
        n_frames = int(getattr(img, "n_frames", 1) or 1)
        if n_frames > 1:
            img.seek(0)
            info["frames"] = {"total": n_frames, "used": [0]}
        img.load()
        img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img, window=window, info=info, param=param)
    except ServiceError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # the warning if made an error
        raise PayloadTooLarge(
            f"The image in '{param}' declares more pixels than the limit of {limits.max_pixels:,}",
            param=param,
        ) from None
    except MemoryError:
        raise PayloadTooLarge(f"The image in '{param}' is too large to decode", param=param) from None
    except Exception as exc:  # truncated data, bad chunks, codec errors: all the client's file
        logger.info("image decode failed: %s", type(exc).__name__)
        raise BadRequest(
            f"The image in '{param}' could not be decoded: the file is truncated or corrupt", param=param
        ) from None
    info["size"] = [rgb.width, rgb.height]
    logger.debug("prepared %s image %dx%d", source, rgb.width, rgb.height)
    return PreparedImage(image=rgb, info=info)


def _to_rgb(img: Image.Image, *, window: Window | None, info: dict[str, Any], param: str) -> Image.Image:
    """Any Pillow mode to 8-bit RGB by the module's rules (high-depth grey, alpha, palette, colour)."""
    mode = img.mode
    if mode in _GREY_HIGH_DEPTH_MODES:
        values = np.asarray(img)
        if window is not None:
            grey = window_to_uint8(values, *window.bounds)
            info["window"] = window_info(window.center, window.width, "request")
        else:
            grey, info["window"] = minmax_to_uint8(values)
        return grey_to_rgb(grey)

    has_alpha = mode in _ALPHA_MODES or (mode in {"P", "L", "RGB"} and "transparency" in img.info)
    if has_alpha:
        img = img.convert("LA" if mode in {"LA", "La"} else "RGBA")
        info["alpha"] = "composited_on_black"
        arr = np.asarray(img).astype(np.uint32)  # 2 * 255 * 255 + 255 overflows 16 bits
        colour, alpha = arr[..., :-1], arr[..., -1:]
        # floor(c * a / 255 + 0.5) in integers: (2 c a + 255) // 510
        arr8 = ((2 * colour * alpha + 255) // 510).astype(np.uint8)
        grey_or_rgb = arr8[..., 0] if arr8.shape[-1] == 1 else arr8
        img = Image.fromarray(np.ascontiguousarray(grey_or_rgb), mode="L" if grey_or_rgb.ndim == 2 else "RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("RGB")

    if img.mode == "L":
        if window is not None:
            info["window"] = window_info(window.center, window.width, "request")
            return grey_to_rgb(window_to_uint8(np.asarray(img), *window.bounds))
        return img.convert("RGB")

    if window is not None:
        info["window_ignored"] = "colour image"
    if img.mode == "RGB":
        return img  # exif_transpose already returned a copy: the caller's image is never handed back
    try:
        return img.convert("RGB")
    except ValueError:
        raise UnsupportedMediaType(
            f"The image in '{param}' uses pixel mode {mode!r}, which cannot be converted to RGB", param=param
        ) from None
