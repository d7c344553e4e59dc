"""Helpers for calling this service with ``bentoml.SyncHTTPClient`` / ``AsyncHTTPClient``.

BentoML 1.4's client uploads a PIL image by reading the file it was opened from (``image.fp``); an image made or
changed in memory (``Image.new``, ``.convert()``, a numpy array) has no such file and crashes inside the client.
``uploadable`` re-encodes any image into an in-memory PNG "file" the client can send:

    client.generate(text="Describe this X-ray", image=uploadable(Image.fromarray(pixels)))

DICOM files need no helper: pass their path, ``client.generate(text=..., image=pathlib.Path("scan.dcm"))``.
"""

from __future__ import annotations

import io

from PIL import Image


def uploadable(image: Image.Image, format: str = "PNG") -> Image.Image:
    """Return ``image`` re-opened from an in-memory encoded copy, so BentoML's client can upload it."""
    buf = io.BytesIO()
    image.save(buf, format=format)
    buf.seek(0)
    reopened = Image.open(buf)
    buf.seek(0)  # the client streams from the current position; Image.open has read the header
    return reopened
