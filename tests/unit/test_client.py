"""medgemma.client.uploadable: an in-memory image that BentoML's client can upload, pixel for pixel.

BentoML's own upload code (``ClientFileManager.get_file``, used by ``SyncHTTPClient``) is called on the image, so a
change in how BentoML reads images shows up here. The end-to-end upload runs in tests/e2e/test_seed_e2e.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from _bentoml_impl.client.base import ClientFileManager
from PIL import Image

from medgemma.client import uploadable


def pixels() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))  # made in memory: no file behind it


def test_bentoml_cannot_upload_an_image_made_in_memory():
    with pytest.raises(AttributeError):
        ClientFileManager().get_file(pixels())


def test_uploadable_png_is_sent_losslessly():
    image = pixels()
    name, fp, media_type = ClientFileManager().get_file(uploadable(image))
    assert (name, media_type) == ("upload-image.png", "image/png")
    sent = fp.read()
    assert sent.startswith(b"\x89PNG\r\n\x1a\n")  # the whole file, from its first byte
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(sent))), np.asarray(image))


def test_uploadable_keeps_the_requested_format_and_mode():
    grey = Image.new("L", (8, 8), 77)
    _, fp, media_type = ClientFileManager().get_file(uploadable(grey, format="JPEG"))
    assert media_type == "image/jpeg"
    decoded = Image.open(io.BytesIO(fp.read()))
    assert decoded.format == "JPEG" and decoded.mode == "L" and decoded.size == (8, 8)
    sixteen = Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    _, fp, _ = ClientFileManager().get_file(uploadable(sixteen))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(fp.read()))), np.asarray(sixteen))  # 16-bit survives
