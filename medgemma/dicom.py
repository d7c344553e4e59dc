"""DICOM files to 8-bit RGB images, following Google's MedGemma preprocessing.

Pipeline per frame: decode (pydicom, with pylibjpeg/Pillow plugins for compressed transfer syntaxes) →
Modality LUT (RescaleSlope/RescaleIntercept, from the functional groups for enhanced multi-frame files,
or a Modality LUT Sequence) → a VOI step chosen by modality → MONOCHROME1 inversion → RGB:

* **CT**: three LINEAR_EXACT windows stacked as R = -1024..1024 HU, G = -135..215 HU, B = 0..80 HU, the
  encoding MedGemma 1.5 was trained on; a request :class:`~medgemma.pixels.Window` replaces them with one
  window in all three channels.
* **Radiographs** (CR, DX, MG, RF, XA, IO, PX) and unknown grey modalities: the request window, else the
  file's VOI LUT Sequence, else its WindowCenter/WindowWidth (first value; LINEAR/LINEAR_EXACT or SIGMOID
  per VOILUTFunction), else min-max.
* **MR, PT, NM**: the request window, else min-max per image (their stored windows are viewer presets,
  not a calibrated scale; Google passes MRI through).
* **Colour** (RGB, YBR_*, PALETTE COLOR): converted to RGB, never windowed.

MONOCHROME1 (white = low values) is inverted after windowing so that every output shows high values bright;
CT's RGB windows are defined on HU and are never inverted.

Nothing here copies a tag into ``info`` except the technical ones read by :mod:`medgemma.dicom_tags` (see
:mod:`medgemma.imaging`, each validated to its expected shape, and no error message or log line contains a
tag value: pydicom's own exception texts are never forwarded.
"""

from __future__ import annotations

import io
import logging
import re
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, convert_color_space
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medgemma.dicom_tags import float_value, functional_item, int_value, position_info, technical_info
from medgemma.errors import BadRequest, PayloadTooLarge, ServiceError, UnsupportedMediaType
from medgemma.pixels import (
    FrameSelection,
    ImageLimits,
    PreparedImage,
    Window,
    check_pixels,
    grey_to_rgb,
    minmax_to_uint8,
    sigmoid_to_uint8,
    window_info,
    window_to_uint8,
)

logger = logging.getLogger(__name__)

DICOM_MEDIA_TYPES = frozenset({"application/dicom", "application/dicom+octet-stream", "image/dicom"})
CODECS_INSTALL = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg"

#: (lo, hi) in HU for the R, G and B channels of a CT slice.
CT_WINDOWS: tuple[tuple[float, float], ...] = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))
RADIOGRAPHY = frozenset({"CR", "DX", "MG", "RF", "XA", "IO", "PX"})
CROSS_SECTIONAL = frozenset({"MR", "PT", "NM"})

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_REQUIRED = ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation")
_RGB_LIKE = frozenset({"RGB", "YBR_ICT", "YBR_RCT"})  # J2K decoders undo ICT/RCT: the samples are RGB
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian: encapsulated pixel data starts with it


def has_preamble(data: bytes) -> bool:
    """True for a DICOM Part 10 file: 128-byte preamble then ``DICM``."""
    return data[128:132] == b"DICM"


def looks_like_raw_dataset(data: bytes) -> bool:
    """True if the bytes start like a DICOM data set without preamble (first tag in group 0002 or 0008).

    Reading arbitrary bytes with ``force=True`` "succeeds" on almost anything, so only plausible input is
    tried; every real data set starts with file meta (0002) or identifying attributes (0008).
    """
    if len(data) < 8:
        return False
    return int.from_bytes(data[:2], "little") in (0x0002, 0x0008) or data[:2] == b"\x00\x08"


def load_dicom(
    data: bytes, *, window: Window | None, frames: FrameSelection, limits: ImageLimits, param: str
) -> list[PreparedImage]:
    """Decode a DICOM file into one prepared image per selected frame.

    Every failure leaves as a :class:`~medgemma.errors.ServiceError`; unexpected exceptions from pydicom or
    numpy (malformed values are often only noticed when a tag is first read) become a generic 400.
    """
    return _guarded(lambda: _load(data, window=window, frames=frames, limits=limits, param=param), param)


def load_dataset(
    ds: Dataset,
    *,
    window: Window | None,
    frames: FrameSelection,
    limits: ImageLimits,
    param: str,
    no_pixels: type[ServiceError] = BadRequest,
) -> list[PreparedImage]:
    """:func:`load_dicom` for a data set already parsed (a DICOMweb retrieval); same rules, same errors.

    ``no_pixels`` is the error for an object without an image: 400 for an upload, 415 for a fetched object.
    """
    return _guarded(
        lambda: _load_dataset(ds, window=window, frames=frames, limits=limits, param=param, no_pixels=no_pixels), param
    )


def decode_values(
    ds: Dataset, *, frames: FrameSelection, limits: ImageLimits, param: str, no_pixels: type[ServiceError] = BadRequest
) -> tuple[np.ndarray, bool, dict[str, Any]]:
    """One grey frame in modality units (HU for CT) as float32, for callers that window a whole volume at once.

    Returns ``(values, monochrome1, info)``; ``info`` is the technical description (no window yet). Colour
    images are refused: a volume is grey by definition.
    """

    def run() -> tuple[np.ndarray, bool, dict[str, Any]]:
        total, decoder = _check_image(ds, limits, param, no_pixels)
        index = _select_frames(total, "first" if frames == "all" else frames, limits, param)[0]
        arr, photometric = _decode_frame(decoder, ds, index, total, param)
        if arr.ndim != 2 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise UnsupportedMediaType(
                f"The DICOM object in '{param}' is a colour image; a CT or MR series must be greyscale", param=param
            )
        info = dict(technical_info(ds, decoder.UID), frames={"total": total, "used": [index]})
        values = _modality_lut(arr, ds, index, info).astype(np.float32)
        info.update(position_info(ds, index))
        info["size"] = [int(arr.shape[1]), int(arr.shape[0])]
        return values, photometric == "MONOCHROME1", info

    return _guarded(run, param)


def ct_windows_rgb(values: np.ndarray, info: dict[str, Any]) -> Image.Image:
    """HU to RGB with the three CT windows (R, G, B), as MedGemma 1.5 was trained; records them in ``info``."""
    channels = [window_to_uint8(values, lo, hi) for lo, hi in CT_WINDOWS]
    info["window"] = window_info(None, None, "ct_rgb")
    info["ct_windows"] = [[lo, hi] for lo, hi in CT_WINDOWS]
    info["inverted"] = False
    return Image.fromarray(np.ascontiguousarray(np.stack(channels, axis=-1)), mode="RGB")


def _guarded(run: Any, param: str) -> Any:
    """Run a decoding step; anything but a ServiceError becomes a 400 that names ``param`` and no tag value."""
    try:
        return run()
    except ServiceError:
        raise
    except MemoryError:
        raise PayloadTooLarge(f"The DICOM file in '{param}' is too large to decode", param=param) from None
    except Exception as exc:
        logger.info("DICOM rejected: %s", type(exc).__name__)
        raise BadRequest(
            f"The DICOM file in '{param}' is malformed: its image attributes or pixel data cannot be read",
            param=param,
        ) from None


def _load(
    data: bytes, *, window: Window | None, frames: FrameSelection, limits: ImageLimits, param: str
) -> list[PreparedImage]:
    return _load_dataset(
        _read(data, param), window=window, frames=frames, limits=limits, param=param, no_pixels=BadRequest
    )


def _check_image(ds: Dataset, limits: ImageLimits, param: str, no_pixels: type[ServiceError]) -> tuple[int, Decoder]:
    """Refuse objects without an image or its attributes, and frames over the pixel limit; the decoder to use."""
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise no_pixels(
            f"The DICOM file in '{param}' contains no image (no pixel data); "
            "reports, presentation states and DICOMDIRs cannot be shown to the model",
            param=param,
        )
    missing = [keyword for keyword in _REQUIRED if ds.get(keyword) in (None, "")]
    if missing:
        raise BadRequest(
            f"The DICOM file in '{param}' lacks attributes needed to decode its image: {', '.join(missing)}",
            param=param,
        )
    rows, columns = int(ds.Rows), int(ds.Columns)
    check_pixels(columns, rows, limits, param, what="A frame of the DICOM file")
    total = _number_of_frames(ds, param)
    return total, _decoder(ds, param)


def _load_dataset(
    ds: Dataset,
    *,
    window: Window | None,
    frames: FrameSelection,
    limits: ImageLimits,
    param: str,
    no_pixels: type[ServiceError],
) -> list[PreparedImage]:
    total, decoder = _check_image(ds, limits, param, no_pixels)
    indices = _select_frames(total, frames, limits, param)

    base = technical_info(ds, decoder.UID)
    prepared = []
    for index in indices:
        arr, photometric = _decode_frame(decoder, ds, index, total, param)
        info = dict(base, frames={"total": total, "used": list(indices)})
        if total > 1:
            info["frame"] = index
        image = _to_rgb(arr, photometric, ds, index, window=window, info=info, param=param)
        info.update(position_info(ds, index))
        info["size"] = [image.width, image.height]
        prepared.append(PreparedImage(image=image, info=info))
    logger.debug("prepared %d DICOM frame(s) of %d", len(prepared), total)
    return prepared


def read_dataset(data: bytes, param: str, *, pixels: bool = True) -> Dataset:
    """Parse DICOM bytes (with or without preamble); ``pixels=False`` stops before the pixel data (headers only)."""
    return _read(data, param, pixels=pixels)


def _read(data: bytes, param: str, *, pixels: bool = True) -> Dataset:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=not pixels)
    except Exception as exc:  # InvalidDicomError, EOFError, struct.error, ValueError, ...
        logger.info("DICOM parse failed: %s", type(exc).__name__)
        raise BadRequest(
            f"The DICOM file in '{param}' cannot be read: it is truncated or malformed", param=param
        ) from None
    if len(ds) == 0:
        raise BadRequest(f"The DICOM file in '{param}' is truncated or empty: it holds no data set", param=param)
    return ds


def _number_of_frames(ds: Dataset, param: str) -> int:
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        total = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"The DICOM file in '{param}' has an invalid NumberOfFrames", param=param) from None
    if total < 1:
        raise BadRequest(f"The DICOM file in '{param}' has no frames", param=param)
    return total


def _select_frames(total: int, frames: FrameSelection, limits: ImageLimits, param: str) -> list[int]:
    if frames == "first" or total == 1:
        return [0]
    if frames == "middle":
        return [total // 2]
    if total > limits.max_frames:
        raise BadRequest(
            f"The DICOM file in '{param}' has {total} frames; at most {limits.max_frames} can be used. "
            "Ask for the 'middle' or 'first' frame, or send fewer frames",
            param=param,
        )
    return list(range(total))


# --------------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------------


def _transfer_syntax(ds: Dataset, param: str) -> UID:
    """The file's transfer syntax; for a data set without file meta, the encoding pydicom read it with."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        return UID(str(uid))
    pixels = ds.get("PixelData")
    if isinstance(pixels, bytes) and pixels[:4] == _ITEM_TAG:
        raise BadRequest(
            f"The DICOM file in '{param}' has compressed pixel data but no transfer syntax saying how",
            param=param,
        )
    implicit, little = ds.original_encoding
    uid = ExplicitVRBigEndian if little is False else ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    return uid


def _syntax_label(uid: UID) -> str:
    """``1.2.840.10008.1.2.4.50 (JPEG Baseline (Process 1))`` - only for UIDs shaped like UIDs."""
    if not (len(uid) <= 64 and _UID_RE.fullmatch(uid)):
        return "an invalid transfer syntax UID"
    name = uid.name
    return f"{uid} ({name})" if name and name != str(uid) else str(uid)


def _decoder(ds: Dataset, param: str) -> Decoder:
    uid = _transfer_syntax(ds, param)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise UnsupportedMediaType(
            f"The DICOM file in '{param}' uses transfer syntax {_syntax_label(uid)}, which this service "
            "cannot decode; export it uncompressed, or as JPEG, JPEG 2000 or RLE",
            param=param,
        ) from None
    if not decoder.is_available:
        raise UnsupportedMediaType(
            f"The DICOM file in '{param}' uses transfer syntax {_syntax_label(uid)}, and no decoder for it "
            f"is installed; install the DICOM codecs with: {CODECS_INSTALL}",
            param=param,
        )
    return decoder


def _decode_frame(decoder: Decoder, ds: Dataset, index: int, total: int, param: str) -> tuple[np.ndarray, str]:
    """One frame as an array (rows, columns[, samples]) and its photometric interpretation after decoding.

    ``raw=False`` lets pydicom convert YBR_FULL/YBR_FULL_422 to RGB, and the returned metadata says so
    (a JPEG plugin may already have converted), which is why the decoder is called directly.
    """
    try:
        arr, meta = decoder.as_array(ds, index=index if total > 1 else None)
    except Exception as exc:
        logger.info("DICOM pixel decode failed: %s", type(exc).__name__)
        hint = ""
        if decoder.is_encapsulated and any(d.startswith("pylibjpeg") for d in decoder.missing_dependencies):
            hint = f", or needs a decoder from the DICOM codecs ({CODECS_INSTALL})"
        raise BadRequest(
            f"The pixel data of the DICOM file in '{param}' ({_syntax_label(decoder.UID)}) could not be "
            f"decoded: it is truncated or corrupt{hint}",
            param=param,
        ) from None
    photometric = str(meta.get("photometric_interpretation") or ds.PhotometricInterpretation).strip().upper()
    return arr, photometric


# --------------------------------------------------------------------------------------------------------
# Pixel values to RGB
# --------------------------------------------------------------------------------------------------------


def _to_rgb(
    arr: np.ndarray,
    photometric: str,
    ds: Dataset,
    index: int,
    *,
    window: Window | None,
    info: dict[str, Any],
    param: str,
) -> Image.Image:
    samples = 1 if arr.ndim == 2 else arr.shape[-1]
    if samples == 1 and photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        info["palette"] = True
        return Image.fromarray(_rgb_to_uint8(rgb, 16 if rgb.dtype.itemsize > 1 else 8), mode="RGB")
    if samples == 1:
        return _grey_to_rgb(arr, photometric, ds, index, window=window, info=info)
    if samples == 3:
        if window is not None:
            info["window_ignored"] = "colour image"
        if photometric in ("YBR_FULL", "YBR_FULL_422"):
            arr = convert_color_space(arr, photometric, "RGB")
        elif photometric not in _RGB_LIKE:
            raise UnsupportedMediaType(
                f"The DICOM file in '{param}' uses a colour encoding this service cannot convert to RGB",
                param=param,
            )
        return Image.fromarray(_rgb_to_uint8(arr, int_value(ds, "BitsStored") or 8 * arr.dtype.itemsize), mode="RGB")
    raise UnsupportedMediaType(
        f"The DICOM file in '{param}' has {samples} samples per pixel; only 1 (grey) or 3 (colour) work",
        param=param,
    )


def _rgb_to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    """Colour samples of ``bits`` bits to 8 bits (linear, round half up); 8-bit data passes through."""
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    return np.ascontiguousarray(window_to_uint8(arr, 0.0, float(2**bits - 1)))


def _grey_to_rgb(
    arr: np.ndarray,
    photometric: str,
    ds: Dataset,
    index: int,
    *,
    window: Window | None,
    info: dict[str, Any],
) -> Image.Image:
    values = _modality_lut(arr, ds, index, info)
    modality = info.get("modality")
    if modality == "CT" and window is None:
        return ct_windows_rgb(values, info)

    if window is not None:
        grey = window_to_uint8(values, *window.bounds)
        info["window"] = window_info(window.center, window.width, "request")
    elif modality in CROSS_SECTIONAL:
        grey, info["window"] = minmax_to_uint8(values)
    else:
        grey = _file_voi(values, ds, index, info)
    inverted = photometric == "MONOCHROME1"
    if inverted:
        grey = 255 - grey
    info["inverted"] = inverted
    return grey_to_rgb(grey)


def _modality_lut(arr: np.ndarray, ds: Dataset, index: int, info: dict[str, Any]) -> np.ndarray:
    """Stored values to modality units (HU for CT) as float64."""
    if ds.get("ModalityLUTSequence"):
        info["modality_lut"] = True
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    source = ds if "RescaleSlope" in ds or "RescaleIntercept" in ds else None
    source = source or functional_item(ds, index, "PixelValueTransformationSequence")
    values = arr.astype(np.float64)
    if source is None:
        return values
    slope = float_value(source, "RescaleSlope")
    intercept = float_value(source, "RescaleIntercept")
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    info["rescale"] = {"slope": slope, "intercept": intercept}
    if slope != 1.0:
        values *= slope
    if intercept != 0.0:
        values += intercept
    return values


def _file_voi(values: np.ndarray, ds: Dataset, index: int, info: dict[str, Any]) -> np.ndarray:
    """The file's own VOI: LUT sequence, else window (LINEAR/LINEAR_EXACT or SIGMOID), else min-max."""
    lut = ds.get("VOILUTSequence")
    if lut:
        return _apply_voi_lut(values, lut[0], ds, info)
    source = ds if "WindowWidth" in ds else functional_item(ds, index, "FrameVOILUTSequence")
    if source is not None:
        center, width = float_value(source, "WindowCenter"), float_value(source, "WindowWidth")
        if center is not None and width is not None and width > 0:
            function = str(source.get("VOILUTFunction") or "LINEAR").strip().upper()
            if function == "SIGMOID":
                info["window"] = window_info(center, width, "dicom", "sigmoid")
                return sigmoid_to_uint8(values, center, width)
            info["window"] = window_info(center, width, "dicom")
            return window_to_uint8(values, center - width / 2, center + width / 2)
    grey, info["window"] = minmax_to_uint8(values)
    return grey


def _apply_voi_lut(values: np.ndarray, item: Dataset, ds: Dataset, info: dict[str, Any]) -> np.ndarray:
    """Apply a VOI LUT Sequence item; its output range (min..max of LUT Data) maps to 0..255.

    Implemented here rather than with pydicom's ``apply_voi`` because that indexes with an unsigned array
    (negative or rescaled float inputs wrap around). Normalising over the LUT's actual entries rather than
    ``2**bits - 1`` keeps LUTs whose descriptor overstates their bit depth (common: 16 declared, 12 used)
    from rendering nearly black.
    """
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    raw = item.LUTData
    if isinstance(raw, bytes | bytearray):
        little = ds.original_encoding[1] is not False
        dtype = np.dtype("u1") if len(raw) == entries else np.dtype("<u2" if little else ">u2")
        table = np.frombuffer(raw, dtype=dtype)[:entries].astype(np.float64)
    else:
        table = np.asarray([raw] if isinstance(raw, int) else list(raw), dtype=np.float64)[:entries]
    if table.size == 0:
        raise ValueError("empty VOI LUT")
    indices = np.clip(np.rint(np.nan_to_num(values)) - first, 0, table.size - 1).astype(np.intp)
    info["window"] = window_info(None, None, "voi_lut", "lut")
    info["voi_lut"] = {"entries": entries, "first_mapped": first, "bits": bits}
    return window_to_uint8(table[indices], float(table.min()), float(table.max()))
