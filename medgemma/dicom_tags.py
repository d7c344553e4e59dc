"""DICOM attributes read for ``info``: technical values only, each validated before it enters a response.

Split from :mod:`medgemma.dicom` (which decodes pixels): nothing here copies a patient attribute, and no value
read here is ever logged. Pure functions over a pydicom ``Dataset``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")
_CODE_RE = re.compile(r"[A-Z0-9_]{1,16}")
PHOTOMETRICS = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "PALETTE COLOR",
        "RGB",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_PARTIAL_422",
        "YBR_PARTIAL_420",
        "YBR_ICT",
        "YBR_RCT",
        "XYB",
    }
)


def technical_info(ds: Dataset, uid: UID) -> dict[str, Any]:
    modality = str(ds.get("Modality") or "").strip().upper()
    photometric = str(ds.get("PhotometricInterpretation") or "").strip().upper()
    info: dict[str, Any] = {
        "source": "dicom",
        "modality": modality if _CODE_RE.fullmatch(modality) else None,
        "photometric": photometric if photometric in PHOTOMETRICS else None,
        "bits_stored": int_value(ds, "BitsStored"),
        "transfer_syntax": str(uid) if len(uid) <= 64 and _UID_RE.fullmatch(uid) else None,
    }
    instance = int_value(ds, "InstanceNumber")
    if instance is not None:
        info["instance_number"] = instance
    return info


def position_info(ds: Dataset, index: int) -> dict[str, Any]:
    """``slice_location`` for ordering slices: position along the slice normal when the geometry is known.

    ImagePositionPatient projected onto the normal of ImageOrientationPatient (mm) is the robust order;
    SliceLocation is optional and not always consistent; the plain z of the position is the last resort.
    """
    position = vector(ds, "ImagePositionPatient", 3)
    orientation = vector(ds, "ImageOrientationPatient", 6)
    if position is None:
        item = functional_item(ds, index, "PlanePositionSequence")
        position = vector(item, "ImagePositionPatient", 3) if item is not None else None
    if orientation is None:
        item = functional_item(ds, index, "PlaneOrientationSequence")
        orientation = vector(item, "ImageOrientationPatient", 6) if item is not None else None
    if position is not None and orientation is not None:
        normal = np.cross(orientation[:3], orientation[3:])
        if np.isfinite(normal).all() and np.linalg.norm(normal) > 0:
            return {"slice_location": round(float(np.dot(position, normal)), 4)}
    location = float_value(ds, "SliceLocation")
    if location is not None:
        return {"slice_location": location}
    if position is not None:
        return {"slice_location": round(float(position[2]), 4)}
    return {}


def functional_item(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """The first item of ``keyword`` for frame ``index`` in an enhanced multi-frame file (per-frame first)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame) and per_frame[index].get(keyword):
        return per_frame[index].get(keyword)[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and shared[0].get(keyword):
        return shared[0].get(keyword)[0]
    return None


def first(value: Any) -> Any:
    """First value of a multi-valued element (WindowCenter "40\\400" -> 40)."""
    if isinstance(value, str | bytes):
        return value
    try:
        return value[0] if len(value) else None
    except TypeError:
        return value


def float_value(ds: Dataset, keyword: str) -> float | None:
    value = first(ds.get(keyword))
    try:
        result = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return result if result is not None and np.isfinite(result) else None


def int_value(ds: Dataset, keyword: str) -> int | None:
    value = first(ds.get(keyword))
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def vector(ds: Dataset, keyword: str, length: int) -> np.ndarray | None:
    value = ds.get(keyword)
    try:
        vector = np.asarray([float(v) for v in value], dtype=np.float64) if value else None
    except (TypeError, ValueError):
        return None
    if vector is None or vector.shape != (length,) or not np.isfinite(vector).all():
        return None
    return vector
