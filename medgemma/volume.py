"""CT and MR series to model input, the way Google's MedGemma notebooks and serving container prepare them.

A series (fetched from DICOMweb or uploaded slice by slice) goes through four steps:

1. **Select** one acquisition, as Google's container does: DERIVED images (reformats, localizers, MIPs) are left
   out, then the acquisition number with the most instances is kept, then repeated instance numbers are dropped
   (the first by SOP Instance UID is kept, so the choice never depends on the order a PACS lists them).
2. **Order** along the slice normal: ImagePositionPatient projected on the normal of ImageOrientationPatient,
   the order a radiologist scrolls through. The direction follows the instance numbers (so a clean series comes
   out in exactly the InstanceNumber order of Google's CT notebook, which MedGemma was trained with); without
   consistent geometry the instance numbers order the slices; without those, the order they were given in.
3. **Sample** evenly down to at most ``max_slices`` (85): index ``round(i * (n - 1) / k)`` for ``i = 1..k``, the
   notebook's formula, so the model sees the series as it was evaluated on.
4. **Window**: CT as three HU windows in R, G and B (:func:`medgemma.dicom.ct_windows_rgb`); MR min-max over the
   whole sampled volume (one scale for every slice, so intensities compare across slices); a request window
   replaces either. Each slice is then followed by the text ``SLICE n``.

Memory: only the sampled slices are ever fetched or decoded, a few at a time. A CT slice is windowed to 8-bit RGB
as soon as it is decoded and its data set dropped; an MR slice is kept as float32 until the volume's range is
known. Nothing here logs or reports a UID or a patient attribute.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from medgemma import dicom
from medgemma.errors import BadRequest, NotFound, UnsupportedMediaType
from medgemma.pixels import FrameSelection, ImageLimits, PreparedImage, Window, grey_to_rgb, window_to_uint8

VOLUME_MODALITIES = frozenset({"CT", "MR"})
_ORIENTATION_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SliceMeta:
    """What ordering and selection need to know about one instance, read from its header or a QIDO answer."""

    key: Any  # how the caller finds the instance again: an upload's index, a DICOMweb instance UID
    modality: str | None = None
    instance_number: int | None = None
    acquisition_number: int | None = None
    derived: bool = False
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, float, float, float, float, float] | None = None
    rows: int | None = None
    columns: int | None = None
    frames: int = 1
    has_pixels: bool = True
    sop_class: str = ""
    tie: str = ""  # the SOP Instance UID: only to break ties deterministically, never reported


def slice_meta(ds: Dataset, key: Any, *, has_pixels: bool | None = None) -> SliceMeta:
    """Read a :class:`SliceMeta` from a parsed header or a QIDO result (``Dataset.from_json``).

    Without ``has_pixels``, an instance counts as an image when it has Rows and Columns (QIDO answers never
    carry pixel data, and non-image objects such as reports have no Rows).
    """
    image_type = [str(v).strip().upper() for v in _values(ds.get("ImageType"))]
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    return SliceMeta(
        key=key,
        modality=(str(ds.get("Modality") or "").strip().upper() or None),
        instance_number=_int(ds, "InstanceNumber"),
        acquisition_number=_int(ds, "AcquisitionNumber"),
        derived=bool(image_type) and image_type[0] == "DERIVED",
        position=_vector(ds, "ImagePositionPatient", 3),  # type: ignore[arg-type]
        orientation=_vector(ds, "ImageOrientationPatient", 6),  # type: ignore[arg-type]
        rows=rows,
        columns=columns,
        frames=max(_int(ds, "NumberOfFrames") or 1, 1),
        has_pixels=(rows is not None and columns is not None) if has_pixels is None else has_pixels,
        sop_class=str(ds.get("SOPClassUID") or ""),
        tie=str(ds.get("SOPInstanceUID") or ""),
    )


@dataclass
class VolumePlan:
    """Which slices go to the model, in which order, and why; ``report()`` is the JSON-safe account of it."""

    slices: list[SliceMeta]
    instances_found: int
    instances_used: int
    order_key: str  # "slice_normal", "instance_number" or "request"
    positions: list[float | None]
    dropped: dict[str, int] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {
            "instances_found": self.instances_found,
            "instances_used": self.instances_used,
            "slices_sampled": len(self.slices),
            "dropped": {k: v for k, v in self.dropped.items() if v},
            "order_key": self.order_key,
            "slice_positions": self.positions,
            "instance_numbers": [s.instance_number for s in self.slices],
        }


def is_volume(slices: Sequence[SliceMeta]) -> bool:
    """A series is treated as a volume when it holds several single-frame CT or MR images."""
    modalities = {s.modality for s in slices}
    return len(slices) > 1 and len(modalities) == 1 and modalities <= VOLUME_MODALITIES


def plan(slices: Sequence[SliceMeta], max_slices: int, *, keep_order: bool = False) -> VolumePlan:
    """Select, order and sample. ``keep_order`` (an explicit list of instances) skips selection and reordering."""
    found = len(slices)
    if keep_order:
        kept, dropped = list(slices), {}
        ordered, order_key = kept, "request"
    else:
        kept, dropped = select(slices)
        ordered, order_key = order(kept)
    picked = [ordered[i] for i in sample_indices(len(ordered), max_slices)]
    return VolumePlan(
        slices=picked,
        instances_found=found,
        instances_used=len(kept),
        order_key=order_key,
        positions=[_projection(s) for s in picked],
        dropped=dropped,
    )


def select(slices: Sequence[SliceMeta]) -> tuple[list[SliceMeta], dict[str, int]]:
    """Google's reduction to one acquisition: no DERIVED images, the largest acquisition, no repeated numbers."""
    original = [s for s in slices if not s.derived]
    if not original:  # a series of reformats only: keep them rather than refuse the series
        original = list(slices)
    derived = len(slices) - len(original)
    counts = Counter(s.acquisition_number for s in original)
    # most instances first; ties go to the lowest acquisition number (None, "no number", sorts last)
    best = min(counts, key=lambda a: (-counts[a], a is None, a or 0))
    same = [s for s in original if s.acquisition_number == best]
    kept: list[SliceMeta] = []
    seen: set[int] = set()
    for s in sorted(same, key=lambda s: s.tie):
        if s.instance_number is not None and s.instance_number in seen:
            continue
        if s.instance_number is not None:
            seen.add(s.instance_number)
        kept.append(s)
    given = {id(s): i for i, s in enumerate(same)}
    kept.sort(key=lambda s: given[id(s)])  # back to the order given, for the "request" fallback
    return kept, {
        "derived": derived,
        "other_acquisitions": len(original) - len(same),
        "duplicate_instance_numbers": len(same) - len(kept),
    }


def order(slices: Sequence[SliceMeta]) -> tuple[list[SliceMeta], str]:
    """Slices in anatomical order, and the key used (see the module docstring)."""
    items = list(slices)
    if len(items) > 1 and _consistent_geometry(items):
        ordered = sorted(items, key=lambda s: (_projection(s), s.instance_number or 0))
        numbers = [s.instance_number for s in ordered]
        if all(n is not None for n in numbers):
            steps = [b - a for a, b in itertools.pairwise(numbers)]  # type: ignore[operator]
            if sum(1 for d in steps if d < 0) > sum(1 for d in steps if d > 0):
                ordered.reverse()
        return ordered, "slice_normal"
    if items and all(s.instance_number is not None for s in items):
        return sorted(items, key=lambda s: s.instance_number or 0), "instance_number"
    return items, "request"


def sample_indices(n: int, k: int) -> list[int]:
    """Google's CT notebook: all slices when ``n <= k``, else ``round(i * (n - 1) / k)`` for ``i = 1..k``."""
    if n <= k:
        return list(range(n))
    # floor(x + 0.5), not round(): Python's round-half-to-even could map two neighbours onto one index
    return [math.floor(i * (n - 1) / k + 0.5) for i in range(1, k + 1)]


# --------------------------------------------------------------------------------------------------------------------
# Windowing the sampled slices
# --------------------------------------------------------------------------------------------------------------------


def render(
    volume: VolumePlan,
    fetch: Callable[[SliceMeta], Dataset],
    *,
    window: Window | None,
    frames: FrameSelection,
    limits: ImageLimits,
    param: str,
    concurrency: int = 4,
) -> tuple[list[PreparedImage], dict[str, Any]]:
    """Fetch (``concurrency`` at a time), decode and window the planned slices; images in plan order, labelled.

    Returns the prepared images (``info["label"]`` is their ``SLICE n``) and the ``windows`` entry of the report.
    """
    modality = volume.slices[0].modality if volume.slices else None
    ct = modality == "CT" and window is None

    def one(meta: SliceMeta) -> tuple[Any, bool, dict[str, Any]]:
        ds = fetch(meta)
        values, monochrome1, info = dicom.decode_values(
            ds, frames=frames, limits=limits, param=param, no_pixels=UnsupportedMediaType
        )
        del ds  # the data set (encoded pixels included) is dropped here, not kept for the whole series
        if info.get("modality") != modality:
            raise BadRequest(f"'{param}' mixes modalities within one series", param=param)
        if ct:
            return dicom.ct_windows_rgb(values, info), False, info
        if window is not None:
            return _grey(window_to_uint8(values, *window.bounds), monochrome1), False, info
        return values, monochrome1, info  # MR: windowed once the whole volume's range is known

    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="medgemma-slices") as pool:
        futures = [pool.submit(one, meta) for meta in volume.slices]
        try:
            results = [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    if ct:
        windows: dict[str, Any] = {"kind": "ct_rgb", "hu": [list(w) for w in dicom.CT_WINDOWS]}
    elif window is not None:
        windows = {"kind": "request", "center": window.center, "width": window.width}
    else:
        lo = min(float(np.nanmin(v)) for v, _, _ in results)
        hi = max(float(np.nanmax(v)) for v, _, _ in results)
        windows = {"kind": "minmax_volume", "lo": lo, "hi": hi}
        results = [(_grey(window_to_uint8(v, lo, hi), inv), False, info) for v, inv, info in results]

    prepared = []
    for n, ((image, _, info), meta) in enumerate(zip(results, volume.slices, strict=True), start=1):
        if not ct:
            info["window"] = {"center": None, "width": None, "source": windows["kind"], "function": "linear"}
            if window is not None:
                info["window"].update(center=window.center, width=window.width)
        position = _projection(meta)
        if position is not None:
            info["slice_location"] = position
        info["label"] = f"SLICE {n}"
        prepared.append(PreparedImage(image=image, info=info))
    return prepared, windows


def _grey(grey: np.ndarray, monochrome1: bool) -> Any:
    return grey_to_rgb(255 - grey if monochrome1 else grey)


# --------------------------------------------------------------------------------------------------------------------
# Geometry and tags
# --------------------------------------------------------------------------------------------------------------------


def _normal(orientation: Sequence[float]) -> np.ndarray | None:
    normal = np.cross(np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:], dtype=np.float64))
    norm = float(np.linalg.norm(normal))
    return normal / norm if np.isfinite(normal).all() and norm > 0 else None


def _projection(meta: SliceMeta) -> float | None:
    """Position along the slice normal in mm, or None without geometry."""
    if meta.position is None or meta.orientation is None:
        return None
    normal = _normal(meta.orientation)
    if normal is None:
        return None
    return round(float(np.dot(np.asarray(meta.position, dtype=np.float64), normal)), 4)


def _consistent_geometry(slices: Sequence[SliceMeta]) -> bool:
    """Every slice has a position and the same orientation: only then is "along the normal" one axis."""
    first = slices[0].orientation
    if first is None or _normal(first) is None:
        return False
    for s in slices:
        if s.position is None or s.orientation is None:
            return False
        if max(abs(a - b) for a, b in zip(s.orientation, first, strict=True)) > _ORIENTATION_TOLERANCE:
            return False
    return True


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, str | bytes | int | float):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _int(ds: Dataset, keyword: str) -> int | None:
    values = _values(ds.get(keyword))
    try:
        return int(values[0]) if values and values[0] not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _vector(ds: Dataset, keyword: str, length: int) -> tuple[float, ...] | None:
    try:
        vector = tuple(float(v) for v in _values(ds.get(keyword)))
    except (TypeError, ValueError):
        return None
    if len(vector) != length or not all(math.isfinite(v) for v in vector):
        return None
    return vector


def refuse_empty(slices: Sequence[SliceMeta], param: str, what: str) -> list[SliceMeta]:
    """The image instances of ``slices``; a 404/415 when there are none, so a client learns why."""
    if not slices:
        raise NotFound(f"'{param}': {what} holds no instances", param=param)
    images = [s for s in slices if s.has_pixels]
    if not images:
        raise UnsupportedMediaType(
            f"'{param}': {what} holds no image (its objects are reports or other non-image DICOM objects)",
            param=param,
        )
    return images
