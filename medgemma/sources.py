"""Where a request's images come from, and what was done to them: DICOMweb sources, series, slides.

Three kinds of source become several model images at once, each with one entry in the request's image report
(``ImageOptions.sources``, returned as ``image_sources``):

* a **DICOMweb** ``image_dicom`` part: a series, one instance or an ordered list of instances on an allow-listed
  PACS (:mod:`medgemma.dicomweb`);
* an **uploaded series**: several CT or MR DICOM files in one message;
* a **slide**: an uploaded SVS/pyramidal TIFF or DICOM WSI file, or a DICOM WSI series on a PACS.

A CT/MR series is selected, ordered, sampled and windowed by :mod:`medgemma.volume`, each slice followed by
``SLICE n``; a slide is cut into tissue patches by :mod:`medgemma.wsi`; anything else is decoded image by image by
:mod:`medgemma.dicom`. Every count is checked against the per-request image limit *after* sampling and before
anything is fetched. The report says what was done (counts, order, positions, windows, level, patches), never who:
no patient attribute and no UID.
"""

from __future__ import annotations

import ipaddress
import logging
import urllib.parse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from medgemma import dicom, dicomweb, volume, wsi
from medgemma.config import Settings
from medgemma.errors import BadRequest, NotFound, PayloadTooLarge, UnsupportedMediaType
from medgemma.pixels import FrameSelection, ImageLimits, PreparedImage, Window, check_pixels
from medgemma.protocol import ImagePart, Part, TextPart

logger = logging.getLogger(__name__)


@dataclass
class ImageOptions:
    """How to decode the images of one request, how many it may still add, and the report of its sources."""

    window: Window | None
    frames: FrameSelection
    limits: ImageLimits
    max_images: int
    decoded: int = 0
    settings: Settings = field(default_factory=Settings)
    seed: int = 0  # the request's seed: which slide patches are sampled
    sources: list[dict[str, Any]] = field(default_factory=list)
    pad_to_square: bool = False  # zero-pad decoded images to square (localization answers map back through it)
    _budget: dicomweb.ByteBudget | None = None

    def count(self, n: int, param: str) -> None:
        # Checked as images are added (a multi-frame DICOM counts each frame; a series its sampled slices), not
        # after all of them are in memory.
        self.decoded += n
        if self.decoded > self.max_images:
            raise PayloadTooLarge(
                f"more than {self.max_images} images in this request (DICOM frames, sampled slices and slide "
                f"patches count one each), above the limit of {self.max_images} per request",
                param=param,
            )

    @property
    def budget(self) -> dicomweb.ByteBudget:
        if self._budget is None:
            self._budget = dicomweb.ByteBudget(self.settings.dicomweb_max_bytes, self.limits.max_bytes)
        return self._budget

    def report(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry = {"index": len(self.sources), **entry}
        self.sources.append(entry)
        return entry


@dataclass(frozen=True)
class Upload:
    """Encoded bytes of one image value of a request (a data URI's payload or an uploaded file)."""

    data: bytes
    media_type: str | None = None


def image_parts(prepared: Sequence[PreparedImage], source: int | None = None) -> list[Part]:
    """Prepared images as message parts; a slice labelled ``SLICE n`` is followed by that text."""
    parts: list[Part] = []
    for p in prepared:
        info = dict(p.info) if source is None else {**p.info, "source_index": source}
        parts.append(ImagePart(image=p.image, info=info))
        if "label" in info:
            parts.append(TextPart(info["label"]))
    return parts


# --------------------------------------------------------------------------------------------------------------------
# Uploads: a series of DICOM files, or a slide
# --------------------------------------------------------------------------------------------------------------------


def uploaded_series(uploads: Sequence[Upload], options: ImageOptions, param: str) -> list[Part] | None:
    """Several CT (or MR) DICOM files of one message as a volume; None when they are not one (decode singly)."""
    if len(uploads) < 2:
        return None
    metas = []
    for i, up in enumerate(uploads):
        if not (dicom.has_preamble(up.data) or dicom.looks_like_raw_dataset(up.data)):
            return None
        try:
            header = dicom.read_dataset(up.data, param, pixels=False)
        except Exception:  # not readable as a series member: the single-image path reports the real error
            return None
        meta = volume.slice_meta(header, i)
        if meta.frames != 1:
            return None
        metas.append(meta)
    if not volume.is_volume(metas):
        return None
    plan = volume.plan(metas, options.settings.max_slices)
    options.count(len(plan.slices), param)

    def fetch(meta: volume.SliceMeta) -> Any:
        return dicom.read_dataset(uploads[meta.key].data, param)

    prepared, windows = volume.render(
        plan, fetch, window=options.window, frames=options.frames, limits=options.limits, param=param, concurrency=1
    )
    entry = options.report(
        {"param": param, "kind": "uploaded_series", "type": "volume", "modality": metas[0].modality}
        | plan.report()
        | {"windows": windows}
    )
    return image_parts(prepared, entry["index"])


def uploaded_slide(upload: Upload, options: ImageOptions, param: str) -> list[Part] | None:
    """An SVS/pyramidal TIFF or a DICOM WSI file as tissue patches; None for anything else."""
    data = upload.data
    if wsi.is_tiff_slide(data):

        def factory() -> wsi.Slide:
            return wsi.TiffSlide(data)

    elif dicom.has_preamble(data) and _is_wsi_file(data, param):

        def factory() -> wsi.Slide:
            return wsi.DicomSlide.from_bytes(data)

    else:
        return None
    with wsi.opened(factory, param) as slide:
        parts, report = _slide_patches(slide, options, param)
    entry = options.report(
        {"param": param, "kind": "uploaded_slide", "type": "slide", "instances_found": 1, "instances_used": 1}
        | {"slices_sampled": 0}
        | report
    )
    return [ImagePart(p.image, {**p.info, "source_index": entry["index"]}) for p in parts]


def _is_wsi_file(data: bytes, param: str) -> bool:
    try:
        header = dicom.read_dataset(data, param, pixels=False)
    except Exception:
        return False
    return str(header.get("SOPClassUID") or "") == wsi.VL_WSI_SOP_CLASS


def _slide_patches(slide: wsi.Slide, options: ImageOptions, param: str) -> tuple[list[PreparedImage], dict[str, Any]]:
    settings = options.settings
    remaining = options.max_images - options.decoded
    if remaining <= 0:
        options.count(1, param)  # raises the 413
    prepared, report = wsi.patches(
        slide,
        magnification=settings.wsi_magnification,
        max_patches=settings.wsi_max_patches,
        seed=options.seed,
        limits=options.limits,
        param=param,
        concurrency=settings.dicomweb_concurrency,
    )
    options.count(len(prepared), param)
    return prepared, report


# --------------------------------------------------------------------------------------------------------------------
# DICOMweb
# --------------------------------------------------------------------------------------------------------------------


def from_dicomweb(source: str | list[str], credential: str | None, options: ImageOptions, param: str) -> list[Part]:
    """An ``image_dicom`` part: fetch, select, order, sample, window; parts in model order plus one report entry."""
    settings = options.settings
    explicit_list = isinstance(source, list)
    urls = source if isinstance(source, list) else [source]
    if not urls:
        raise BadRequest(f"'{param}.dicom_source' must not be an empty list", param=param)
    refs = [dicomweb.parse_source(u, settings.dicomweb_urls, f"{param}.dicom_source") for u in urls]
    if explicit_list and any(r.instance is None for r in refs):
        raise BadRequest(f"'{param}.dicom_source': a list must name instances (…/instances/<UID>)", param=param)
    connections: dict[str, dicomweb.Connection] = {}

    def connect(root: str) -> dicomweb.Connection:
        if root not in connections:
            connections[root] = dicomweb.Connection(
                root,
                credential=credential,
                budget=options.budget,
                connect_timeout=settings.dicomweb_connect_timeout_s,
                read_timeout=settings.dicomweb_read_timeout_s,
                concurrency=settings.dicomweb_concurrency,
                param=param,
            )
        return connections[root]

    used_before = options.budget.used
    try:
        metas: list[volume.SliceMeta] = []
        for ref in refs:
            found = connect(ref.root).search_instances(ref)
            if ref.instance is not None and not found:
                raise NotFound(f"'{param}': the DICOMweb server has no such instance", param=param)
            metas.extend(volume.slice_meta(ds, (ref, str(ds.get("SOPInstanceUID") or ""))) for ds in found)
        kind = (
            "dicomweb_instances" if explicit_list else ("dicomweb_instance" if refs[0].instance else "dicomweb_series")
        )
        what = "the series" if kind == "dicomweb_series" else "the instance"
        images = volume.refuse_empty(metas, param, what)
        base = {"param": param, "kind": kind, "modality": images[0].modality}
        non_image = len(metas) - len(images)

        if any(m.sop_class == wsi.VL_WSI_SOP_CLASS for m in images):
            ref = refs[0]
            conn = connect(ref.root)
            with wsi.opened(
                lambda: wsi.DicomSlide(conn.open_slide(ref)), param, lambda: conn.errors("reading the slide")
            ) as slide:
                prepared, report = _slide_patches(slide, options, param)
            levels = sum(1 for m in images if m.sop_class == wsi.VL_WSI_SOP_CLASS)
            entry = options.report(
                base
                | {"type": "slide", "instances_found": len(metas), "instances_used": levels, "slices_sampled": 0}
                | report
                | {"bytes_fetched": options.budget.used - used_before}
            )
            return [ImagePart(p.image, {**p.info, "source_index": entry["index"]}) for p in prepared]

        def fetch(meta: volume.SliceMeta) -> Any:
            ref, uid = meta.key
            return connect(ref.root).retrieve(ref, uid)

        if volume.is_volume(images):
            plan = volume.plan(images, settings.max_slices, keep_order=explicit_list)
            options.count(len(plan.slices), param)
            for m in plan.slices:
                if m.rows and m.columns:
                    check_pixels(m.columns, m.rows, options.limits, param, what="A slice of the series")
            prepared, windows = volume.render(
                plan,
                fetch,
                window=options.window,
                frames=options.frames,
                limits=options.limits,
                param=param,
                concurrency=settings.dicomweb_concurrency,
            )
            plan.dropped["non_image"] = non_image
            entry = options.report(
                base
                | {"type": "volume"}
                | plan.report()
                | {"windows": windows, "bytes_fetched": options.budget.used - used_before}
            )
            return image_parts(prepared, entry["index"])

        order_key = "request"
        if not explicit_list:
            images, order_key = volume.order(images)
        prepared = _fetch_images(images, fetch, options, param, settings.dicomweb_concurrency)
        entry = options.report(
            base
            | {
                "type": "images",
                "instances_found": len(metas),
                "instances_used": len(images),
                "slices_sampled": len(prepared),
                "dropped": {"non_image": non_image} if non_image else {},
                "order_key": order_key,
                "bytes_fetched": options.budget.used - used_before,
            }
        )
        return image_parts(prepared, entry["index"])
    finally:
        for conn in connections.values():
            conn.close()


def _fetch_images(
    images: list[volume.SliceMeta], fetch: Any, options: ImageOptions, param: str, concurrency: int
) -> list[PreparedImage]:
    """Instances that are not a volume (radiographs, a prior and a current): each decoded by its own rules."""
    options.count(len(images), param)
    for m in images:
        if m.rows and m.columns:
            check_pixels(m.columns, m.rows, options.limits, param)

    def one(meta: volume.SliceMeta) -> list[PreparedImage]:
        ds = fetch(meta)
        return dicom.load_dataset(
            ds,
            window=options.window,
            frames=options.frames,
            limits=options.limits,
            param=param,
            no_pixels=UnsupportedMediaType,
        )

    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="medgemma-dicomweb") as pool:
        results = list(pool.map(one, images))
    prepared = [p for group in results for p in group]
    options.count(len(prepared) - len(images), param)  # multi-frame instances with dicom_frames "all"
    return prepared


def preview(image: Any, max_side: int = 256) -> str:
    """A small JPEG data URI of an image the model was given, for a person to check it (the playground)."""
    import base64
    import io

    thumb = image.copy()
    thumb.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    thumb.convert("RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# --- image URLs: one policy for every API ----------------------------------------------------------------------------


def image_url_value(url: str, settings: Settings, param: str, credential: str | None = None) -> str | Upload:
    """What an image URL in any request (seed, OpenAI, Google's format) stands for: a data URI is returned as it is
    (decoded later like any image value); an http(s) URL is fetched only from an allow-listed domain
    (``MEDGEMMA_IMAGE_URL_DOMAINS``, empty by default, so by default nothing is fetched)."""
    if url.startswith(("http://", "https://")):
        return fetch_image(url, settings, param, credential)
    return url


def fetch_image(url: str, settings: Settings, param: str, credential: str | None = None) -> Upload:
    """Fetch an http(s) image only from an allow-listed domain, with a size cap and a short timeout."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    allowed = [d.lower().lstrip(".") for d in settings.image_url_domains]
    if not host or not any(host == d or host.endswith("." + d) for d in allowed):
        raise BadRequest(
            f"{param}: image URLs are not fetched unless their domain is allow-listed "
            "(MEDGEMMA_IMAGE_URL_DOMAINS); send the image as a data URI",
            param=param,
        )
    try:
        ipaddress.ip_address(host)
        raise BadRequest(f"{param}: image URLs must name a domain, not an IP address", param=param)
    except ValueError:
        pass
    import httpx

    limit = settings.max_image_bytes
    try:
        headers = {"Authorization": f"Bearer {credential}"} if credential else None
        with httpx.stream("GET", url, timeout=10.0, follow_redirects=False, headers=headers) as resp:
            if resp.status_code != 200:
                raise BadRequest(f"{param}: fetching the image URL answered HTTP {resp.status_code}", param=param)
            data = bytearray()
            for chunk in resp.iter_bytes():
                data.extend(chunk)
                if len(data) > limit:
                    raise PayloadTooLarge(f"{param}: the image at the URL is above {limit} bytes", param=param)
            return Upload(bytes(data), resp.headers.get("content-type"))
    except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as exc:
        raise BadRequest(f"{param}: the image URL could not be fetched ({type(exc).__name__})", param=param) from None
