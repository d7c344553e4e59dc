"""Localization boxes: pad an image to square the way Google's localization notebook does, and map the model's
``box_2d`` answers back to the original image's pixels.

MedGemma 1.5 answers "where is X" with JSON ``[{"box_2d": [y0, x0, y1, x1], "label": "..."}]``, coordinates
normalised to 0..1000 of the image *after* zero-padding it to square. A client would have to know that padding and
undo it; the service knows the image it sent, so it does it:

* ``pad_to_square`` adds black borders, split evenly (the odd pixel after), and records the offsets in the image's
  ``info`` (``padded_to_square: {"size", "left", "top"}``), so the mapping below is exact arithmetic on what was done;
* :func:`find_boxes` reads the answer's ``box_2d`` JSON (a fenced ```json block, the whole answer, or the first JSON
  value in it) and returns each box as ``x``/``y``/``width``/``height`` in the original image's pixels, clipped to
  the image. Without padding the model saw the image stretched to square, so 0..1000 maps to width and height.

Malformed box JSON never fails a request: the boxes are empty and a note says what was wrong. One bad box empties
the whole list (a partial list of findings reads as complete). Boxes are mapped only when the request had exactly
one image: a ``box_2d`` does not say which of several images it is on.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

_FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL)
_MAX_BOXES = 100


def pad_to_square(image: Image.Image) -> tuple[Image.Image, dict[str, int]]:
    """Zero-pad to a square of side max(width, height), centred; returns the image and what was done."""
    w, h = image.size
    side = max(w, h)
    left, top = (side - w) // 2, (side - h) // 2
    record = {"size": side, "left": left, "top": top}
    if w == h:
        return image, record
    square = Image.new(image.mode, (side, side), 0)
    square.paste(image, (left, top))
    return square, record


@dataclass
class Boxes:
    """Boxes in pixels (empty when the JSON was malformed) and a note saying why, if anything went wrong."""

    boxes: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None

    def fields(self) -> dict[str, Any]:
        """The response fields: ``boxes`` always, ``boxes_note`` when there is one."""
        out: dict[str, Any] = {"boxes": self.boxes}
        if self.note:
            out["boxes_note"] = self.note
        return out


def find_boxes(answer: str, images: list[dict[str, Any]]) -> Boxes | None:
    """Boxes from an answer that holds ``box_2d`` JSON; None when it holds none (the response then has no ``boxes``).

    ``images`` are the request's image ``info`` dicts (``size`` = [width, height] as sent, ``padded_to_square``)."""
    if "box_2d" not in answer:
        return None
    value = _box_json(answer)
    if value is None:
        return Boxes(note="the answer mentions box_2d but holds no readable JSON with it")
    items = value if isinstance(value, list) else [value]
    if len(items) > _MAX_BOXES:
        return Boxes(note=f"the answer holds {len(items)} boxes, above the limit of {_MAX_BOXES}")
    if len(images) != 1:
        what = "no image" if not images else f"{len(images)} images"
        return Boxes(note=f"boxes are mapped to pixels for a request with exactly one image; this one had {what}")
    info = images[0]
    try:
        width, height = (int(v) for v in info["size"])
    except (KeyError, TypeError, ValueError):
        return Boxes(note="the image size is unknown, so boxes cannot be mapped to pixels")
    boxes = []
    for n, item in enumerate(items):
        problem = _check_item(item)
        if problem:
            return Boxes(note=f"box {n}: {problem}")
        boxes.append(_to_pixels(item, width, height, info.get("padded_to_square")))
    return Boxes(boxes=boxes)


def _box_json(answer: str) -> Any:
    """The first JSON value holding "box_2d": in a fenced block, the whole answer, or starting at a bracket."""
    candidates = [m.group(1) for m in _FENCE.finditer(answer)] + [answer]
    decoder = json.JSONDecoder()
    for raw in candidates:
        text = raw.strip()
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if value is not None and "box_2d" in json.dumps(value):
            return value
        for m in re.finditer(r"[\[{]", text):
            try:
                value, _ = decoder.raw_decode(text, m.start())
            except ValueError:
                continue
            if "box_2d" in json.dumps(value):
                return value
    return None


def _check_item(item: Any) -> str | None:
    if not isinstance(item, dict):
        return "each box must be a JSON object with box_2d"
    box = item.get("box_2d")
    numbers = isinstance(box, list) and len(box) == 4
    numbers = numbers and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box)
    if not numbers:
        return "box_2d must be a list of four numbers [y0, x0, y1, x1]"
    if not all(0 <= v <= 1000 for v in box):
        return "box_2d coordinates must lie in 0..1000"
    y0, x0, y1, x1 = box
    if y1 < y0 or x1 < x0:
        return "box_2d must be [y0, x0, y1, x1] with y0 <= y1 and x0 <= x1"
    label = item.get("label")
    if label is not None and not isinstance(label, str):
        return "label must be a string"
    return None


def _to_pixels(item: dict[str, Any], width: int, height: int, padding: dict[str, int] | None) -> dict[str, Any]:
    y0, x0, y1, x1 = (float(v) for v in item["box_2d"])
    if padding:
        side, left, top = padding["size"], padding["left"], padding["top"]

        def px(v: float) -> float:
            return min(max(v / 1000 * side - left, 0.0), width)

        def py(v: float) -> float:
            return min(max(v / 1000 * side - top, 0.0), height)

    else:

        def px(v: float) -> float:
            return v / 1000 * width

        def py(v: float) -> float:
            return v / 1000 * height

    left_px, top_px, right_px, bottom_px = px(x0), py(y0), px(x1), py(y1)
    return {
        "image_index": 0,
        "label": item.get("label"),
        "x": round(left_px, 2),
        "y": round(top_px, 2),
        "width": round(right_px - left_px, 2),
        "height": round(bottom_px - top_px, 2),
        "box_2d": item["box_2d"],
    }
