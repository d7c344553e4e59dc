"""Localization: zero padding to square, and box_2d answers mapped back to the original pixels by arithmetic."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from medgemma.boxes import find_boxes, pad_to_square


def test_pad_to_square_centres_the_image_on_black():
    img = Image.new("RGB", (300, 200), (255, 255, 255))
    square, rec = pad_to_square(img)
    assert square.size == (300, 300)
    assert rec == {"size": 300, "left": 0, "top": 50}
    assert square.getpixel((10, 10)) == (0, 0, 0)  # padding is zeros
    assert square.getpixel((10, 60)) == (255, 255, 255)  # the image starts 50 rows down
    assert square.getpixel((10, 249)) == (255, 255, 255)
    assert square.getpixel((10, 250)) == (0, 0, 0)


def test_odd_padding_puts_the_extra_pixel_after():
    _, rec = pad_to_square(Image.new("RGB", (101, 200)))
    assert rec == {"size": 200, "left": 49, "top": 0}
    same, rec = pad_to_square(Image.new("RGB", (64, 64)))
    assert rec == {"size": 64, "left": 0, "top": 0} and same.size == (64, 64)


def info(w: int, h: int, padded: bool) -> dict:
    out: dict = {"size": [w, h]}
    if padded:
        side = max(w, h)
        out["padded_to_square"] = {"size": side, "left": (side - w) // 2, "top": (side - h) // 2}
    return out


def test_padded_image_boxes_in_original_pixels():
    # 400x200 image padded to 400x400 (100 rows on top). box_2d [y0, x0, y1, x1] in 0..1000 of the square.
    answer = '```json\n[{"box_2d": [250, 100, 500, 600], "label": "nodule"}]\n```'
    got = find_boxes(answer, [info(400, 200, padded=True)])
    assert got is not None and got.note is None
    (box,) = got.boxes
    # x: 100/1000*400 - 0 = 40 .. 600/1000*400 = 240; y: 250/1000*400 - 100 = 0 .. 500/1000*400 - 100 = 100
    assert (box["x"], box["y"], box["width"], box["height"]) == (40.0, 0.0, 200.0, 100.0)
    assert box["label"] == "nodule" and box["box_2d"] == [250, 100, 500, 600] and box["image_index"] == 0


def test_box_in_the_padding_is_clipped_to_the_image():
    got = find_boxes('[{"box_2d": [0, 0, 200, 1000], "label": "top band"}]', [info(400, 200, padded=True)])
    assert got is not None
    (box,) = got.boxes
    assert (box["x"], box["y"], box["width"], box["height"]) == (0.0, 0.0, 400.0, 0.0)


def test_unpadded_image_maps_to_width_and_height():
    got = find_boxes('Here: {"box_2d": [100, 200, 300, 400], "label": "x"} done', [info(500, 1000, padded=False)])
    assert got is not None
    (box,) = got.boxes
    assert (box["x"], box["y"], box["width"], box["height"]) == (100.0, 100.0, 100.0, 200.0)


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        ('[{"box_2d": [1, 2, 3]}]', "four numbers"),
        ('[{"box_2d": [1, 2, 3, 1200]}]', "0..1000"),
        ('[{"box_2d": [500, 0, 100, 10]}]', "y0 <= y1"),
        ('[{"box_2d": [1, 2, 3, 4], "label": 7}]', "label"),
        ('[{"box_2d": ["a", 2, 3, 4]}]', "four numbers"),
        ('[{"box_2d": [1, 2, 3, 4]}, "x"]', "JSON object"),
        ("box_2d: [y0, x0, y1, x1", "no readable JSON"),
    ],
)
def test_malformed_box_json_gives_empty_boxes_and_a_note(answer, fragment):
    got = find_boxes(answer, [info(100, 100, padded=True)])
    assert got is not None
    assert got.boxes == []
    assert fragment in (got.note or "")
    assert set(got.fields()) == {"boxes", "boxes_note"}


def test_no_box_json_means_no_boxes_field():
    assert find_boxes("No focal abnormality.", [info(100, 100, padded=True)]) is None


def test_several_images_are_not_guessed():
    got = find_boxes(json.dumps([{"box_2d": [1, 2, 3, 4]}]), [info(10, 10, True), info(10, 10, True)])
    assert got is not None and got.boxes == [] and "exactly one image" in (got.note or "")
