"""Raster images and data URIs to 8-bit RGB; every expected pixel value is worked out by hand.

Formulas under test: window (LINEAR_EXACT, round half up) out = floor(clip((v - lo) * 255 / (hi - lo), 0, 255)
+ 0.5); min-max is that window with lo = min, hi = max; alpha over black out = floor(c * a / 255 + 0.5).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from medgemma.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from medgemma.imaging import (
    ImageLimits,
    PreparedImage,
    Window,
    load_images,
    parse_data_uri,
    prepare_pil,
)


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def load_one(data: bytes, **kwargs: object) -> PreparedImage:
    [prepared] = load_images(data, **kwargs)
    assert prepared.image.mode == "RGB"
    json.dumps(prepared.info)  # always JSON-safe
    return prepared


def rgb(prepared: PreparedImage) -> list:
    return np.asarray(prepared.image).tolist()


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR says ``width x height`` (CRC recomputed): a decompression bomb's header."""
    data = bytearray(encode(Image.new("1", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


RED_BLUE = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]], [[0, 255, 0], [7, 8, 9]]], dtype=np.uint8))


# ----------------------------------------------------------------------------------------- data URIs

PNG_BYTES = encode(RED_BLUE, "PNG")
PNG_B64 = base64.b64encode(PNG_BYTES).decode()


@pytest.mark.parametrize(
    ("value", "media_type"),
    [
        (f"data:image/png;base64,{PNG_B64}", "image/png"),
        (f"DATA:IMAGE/PNG;BASE64,{PNG_B64}", "image/png"),
        (f"data:image/png;base64,{PNG_B64.rstrip('=')}", "image/png"),
        (
            "data:image/png;base64," + "\n".join(PNG_B64[i : i + 76] for i in range(0, len(PNG_B64), 76)),
            "image/png",
        ),
        (f"  data:image/png;name=scan.png;base64,{PNG_B64}  ", "image/png"),
        (f"data:image/png;base64,{base64.urlsafe_b64encode(PNG_BYTES).decode()}", "image/png"),
        (f"data:;base64,{PNG_B64}", "application/octet-stream"),
        (PNG_B64, "application/octet-stream"),  # bare base64: the format is sniffed from the bytes
        (PNG_B64.rstrip("=") + "\n", "application/octet-stream"),
    ],
)
def test_parse_data_uri_accepts(value, media_type):
    assert parse_data_uri(value) == (media_type, PNG_BYTES)


def test_parse_data_uri_percent_encoded():
    assert parse_data_uri("data:application/octet-stream,%89PNG%0D%0A") == (
        "application/octet-stream",
        b"\x89PNG\r\n",
    )


@pytest.mark.parametrize(
    "value",
    [
        "https://example.org/secret-scan.png",
        "http://example.org/secret-scan.png",
        "file:///etc/secret-scan.png",
        "/etc/secret-scan.png",
        "./secret-scan.png",
        "C:\\images\\secret-scan.png",
        "data:image/png;base64",  # no comma
        "data:image/png;base64,@@secret@@",
        "data:image/png;base64,QUJDRA=E",  # padding in the middle
        "data:image/png;base64,QUJDR",  # 5 characters cannot be base64
        "data:image/png;base64,",
        "data:image/png,",
        "",
        "   ",
    ],
)
def test_parse_data_uri_refuses(value):
    with pytest.raises(BadRequest) as err:
        parse_data_uri(value, param="messages[1].content[0].image_url")
    assert err.value.param == "messages[1].content[0].image_url"
    assert "secret" not in err.value.message  # the request string is never echoed


def test_parse_data_uri_names_the_url_scheme():
    with pytest.raises(BadRequest, match=r"'https:' URI.*does not fetch URLs"):
        parse_data_uri("https://example.org/x.png")


def test_parse_data_uri_refuses_non_strings():
    with pytest.raises(BadRequest):
        parse_data_uri(PNG_BYTES)  # type: ignore[arg-type]


def test_parse_data_uri_checks_size_before_decoding():
    limits = ImageLimits(max_bytes=1000)
    # 4000 characters would decode to 3000 bytes: refused as too large, before the (invalid) base64 is decoded
    with pytest.raises(PayloadTooLarge):
        parse_data_uri("data:image/png;base64," + "!" * 4000, limits=limits)
    with pytest.raises(PayloadTooLarge):
        parse_data_uri("A" * 4000, limits=limits)
    assert parse_data_uri(f"data:image/png;base64,{PNG_B64}", limits=ImageLimits(max_bytes=len(PNG_BYTES)))


# ----------------------------------------------------------------------------------------- raster formats


@pytest.mark.parametrize(
    ("fmt", "source", "kwargs"),
    [
        ("PNG", "png", {}),
        ("WEBP", "webp", {"lossless": True}),
        ("BMP", "bmp", {}),
        ("TIFF", "tiff", {}),
    ],
)
def test_lossless_formats_pass_through(fmt, source, kwargs):
    prepared = load_one(encode(RED_BLUE, fmt, **kwargs))
    assert rgb(prepared) == [[[255, 0, 0], [0, 0, 255]], [[0, 255, 0], [7, 8, 9]]]
    assert prepared.info["source"] == source
    assert prepared.info["size"] == [2, 2]
    assert prepared.info["modality"] is None


def test_jpeg_and_cmyk_jpeg():
    flat = Image.new("RGB", (16, 16), (200, 40, 40))
    prepared = load_one(encode(flat, "JPEG", quality=95))
    assert prepared.info["source"] == "jpeg"
    assert np.abs(np.asarray(prepared.image).astype(int) - [200, 40, 40]).max() <= 3
    cmyk = load_one(encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG", quality=95))
    assert cmyk.info["original_mode"] == "CMYK"
    assert np.asarray(cmyk.image).min() >= 250  # no ink is white


def test_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    prepared = load_one(data)
    assert rgb(prepared)[0][0] == [255, 0, 0]
    assert prepared.info["frames"] == {"total": 2, "used": [0]}
    assert prepared.info["source"] == "gif"


def test_rgba_is_composited_on_black():
    rgba = np.array(
        [[[255, 0, 0, 128], [200, 100, 50, 51], [10, 20, 30, 0], [255, 255, 255, 255], [100, 3, 0, 1]]],
        dtype=np.uint8,
    )
    prepared = load_one(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    # c * a / 255: 255*128/255 = 128; 200*51/255 = 40, 100*51/255 = 20, 50*51/255 = 10; a = 0 -> black;
    # a = 255 -> unchanged; 100*1/255 = 0.39 -> 0, 3*1/255 -> 0
    assert rgb(prepared) == [[[128, 0, 0], [40, 20, 10], [0, 0, 0], [255, 255, 255], [0, 0, 0]]]
    assert prepared.info["alpha"] == "composited_on_black"
    assert prepared.info["original_mode"] == "RGBA"


def test_la_is_composited_on_black():
    la = np.array([[[200, 51], [90, 255], [90, 0]]], dtype=np.uint8)
    prepared = load_one(encode(Image.fromarray(la, "LA"), "PNG"))
    # 200*51/255 = 40; 90*255/255 = 90; a = 0 -> 0
    assert rgb(prepared) == [[[40, 40, 40], [90, 90, 90], [0, 0, 0]]]


def test_palette_with_and_without_transparency():
    img = Image.new("P", (3, 1))
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    img.putdata([1, 2, 0])
    assert rgb(load_one(encode(img, "PNG"))) == [[[255, 0, 0], [0, 255, 0], [0, 0, 0]]]
    transparent = load_one(encode(img, "PNG", transparency=1))  # palette index 1 (red) is transparent
    assert rgb(transparent) == [[[0, 0, 0], [0, 255, 0], [0, 0, 0]]]
    assert transparent.info["alpha"] == "composited_on_black"


def test_one_bit_image():
    img = Image.new("1", (2, 1))
    img.putpixel((1, 0), 1)
    assert rgb(load_one(encode(img, "PNG"))) == [[[0, 0, 0], [255, 255, 255]]]


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored row 0 is the displayed right column, stored column 0 the displayed top
    img = Image.new("RGB", (2, 1))
    img.putpixel((0, 0), (255, 0, 0))
    img.putpixel((1, 0), (0, 0, 255))
    prepared = load_one(encode(img, "PNG", exif=exif))
    assert prepared.info["size"] == [1, 2]
    assert rgb(prepared) == [[[255, 0, 0]], [[0, 0, 255]]]


# ----------------------------------------------------------------------------------------- high bit depth


def test_16_bit_png_is_min_max_normalised():
    values = np.array([[1000, 2000, 3000, 1500]], dtype=np.uint16)
    prepared = load_one(encode(Image.fromarray(values), "PNG"))
    # lo = 1000, hi = 3000: 1000 -> 0; 2000 -> 1000*255/2000 = 127.5 -> 128; 3000 -> 255;
    # 1500 -> 500*255/2000 = 63.75 -> 64
    assert [p[0] for p in rgb(prepared)[0]] == [0, 128, 255, 64]
    assert prepared.info["original_mode"] == "I;16"
    assert prepared.info["window"] == {
        "center": 2000.0,
        "width": 2000.0,
        "source": "minmax",
        "function": "linear",
    }


def test_16_bit_png_with_request_window():
    values = np.array([[1000, 1500, 2000, 3000]], dtype=np.uint16)
    prepared = load_one(encode(Image.fromarray(values), "PNG"), window=Window(center=1500, width=1000))
    # lo = 1000, hi = 2000: 1000 -> 0; 1500 -> 127.5 -> 128; 2000 -> 255; 3000 -> clip 255
    assert [p[0] for p in rgb(prepared)[0]] == [0, 128, 255, 255]
    assert prepared.info["window"]["source"] == "request"


def test_constant_16_bit_image_is_black():
    prepared = load_one(encode(Image.fromarray(np.full((3, 3), 4321, dtype=np.uint16)), "PNG"))
    assert not np.asarray(prepared.image).any()


def test_big_endian_16_bit_tiff():
    values = np.array([[1000, 2000, 3000]], dtype=">u2")
    prepared = load_one(encode(Image.fromarray(values), "TIFF"))
    assert prepared.info["original_mode"] == "I;16B"
    assert [p[0] for p in rgb(prepared)[0]] == [0, 128, 255]


def test_signed_32_bit_and_float_images():
    signed = prepare_pil(Image.fromarray(np.array([[-100, 0, 100]], dtype=np.int32)))
    # lo = -100, hi = 100: -100 -> 0; 0 -> 127.5 -> 128; 100 -> 255
    assert [p[0] for p in rgb(signed)[0]] == [0, 128, 255]
    floats = prepare_pil(Image.fromarray(np.array([[0.0, 0.25, 1.0, np.nan]], dtype=np.float32)))
    # finite min 0, max 1: 0.25 -> 63.75 -> 64; NaN -> 0
    assert [p[0] for p in rgb(floats)[0]] == [0, 64, 255, 0]
    assert floats.info["original_mode"] == "F"


def test_8_bit_grey_passes_through_unless_windowed():
    grey = Image.fromarray(np.array([[10, 128, 250]], dtype=np.uint8))
    assert [p[0] for p in rgb(load_one(encode(grey, "PNG")))[0]] == [10, 128, 250]
    windowed = load_one(encode(grey, "PNG"), window=Window(center=128, width=100))
    # lo = 78, hi = 178: 10 -> 0; 128 -> 50*255/100 = 127.5 -> 128; 250 -> 255
    assert [p[0] for p in rgb(windowed)[0]] == [0, 128, 255]


def test_colour_image_ignores_the_window():
    prepared = load_one(PNG_BYTES, window=Window(center=0, width=1))
    assert rgb(prepared)[0][0] == [255, 0, 0]
    assert prepared.info["window_ignored"] == "colour image"


# ----------------------------------------------------------------------------------------- limits and errors


def test_bomb_header_is_refused_before_decoding():
    # 20000 x 20000 = 400 M pixels: Pillow's own DecompressionBombError (over 2 x MAX_IMAGE_PIXELS) -> 413
    with pytest.raises(PayloadTooLarge):
        load_images(png_claiming_size(20000, 20000))
    # the same even if our limit is raised above Pillow's
    with pytest.raises(PayloadTooLarge):
        load_images(png_claiming_size(20000, 20000), limits=ImageLimits(max_pixels=10**9))
    # 8000 x 6000 = 48 M pixels: under Pillow's limit, over ours (40 M) -> 413 from the header alone
    with pytest.raises(PayloadTooLarge, match="8000x6000") as err:
        load_images(png_claiming_size(8000, 6000), param="img")
    assert err.value.param == "img"


def test_pixel_limit_is_configurable():
    with pytest.raises(PayloadTooLarge):
        load_images(PNG_BYTES, limits=ImageLimits(max_pixels=3))
    assert load_images(PNG_BYTES, limits=ImageLimits(max_pixels=4))


def test_byte_limit():
    with pytest.raises(PayloadTooLarge):
        load_images(PNG_BYTES, limits=ImageLimits(max_bytes=len(PNG_BYTES) - 1))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"just some text, not an image",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,  # PNG signature, broken header
        bytes(range(256)),
    ],
)
def test_not_an_image_is_a_bad_request(data):
    with pytest.raises(BadRequest) as err:
        load_images(data, param="images[2]")
    assert err.value.param == "images[2]"
    assert err.value.status_code == 400


def test_truncated_png_is_a_bad_request():
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "PNG")
    with pytest.raises(BadRequest, match="truncated or corrupt"):
        load_images(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"%PDF-1.7\n" + b"\x00" * 64, "PDF"),
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64, "HEIC"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "SVG"),
    ],
)
def test_known_unsupported_formats_are_415(data, name):
    with pytest.raises(UnsupportedMediaType, match=name) as err:
        load_images(data)
    assert err.value.status_code == 415


def test_bad_frames_and_window_arguments():
    with pytest.raises(BadRequest) as err:
        load_images(PNG_BYTES, frames="last")  # type: ignore[arg-type]
    assert err.value.param == "frames"
    for window in (
        Window(center=0, width=0),
        Window(center=0, width=-5),
        Window(center=float("nan"), width=1),
    ):
        with pytest.raises(BadRequest) as err:
            load_images(PNG_BYTES, window=window)
        assert err.value.param == "window"


# ----------------------------------------------------------------------------------------- prepare_pil


def test_prepare_pil_same_rules():
    rgba = Image.fromarray(np.array([[[200, 100, 50, 51]]], dtype=np.uint8), "RGBA")
    prepared = prepare_pil(rgba)
    assert rgb(prepared) == [[[40, 20, 10]]]
    assert prepared.info["source"] == "pil"
    sixteen = prepare_pil(Image.fromarray(np.array([[1000, 2000, 3000]], dtype=np.uint16)))
    assert [p[0] for p in rgb(sixteen)[0]] == [0, 128, 255]


def test_prepare_pil_checks_size_before_loading():
    lazy = Image.open(io.BytesIO(png_claiming_size(8000, 6000)))  # header only: pixels never decoded
    with pytest.raises(PayloadTooLarge):
        prepare_pil(lazy)


def test_prepare_pil_returns_a_new_image():
    original = RED_BLUE.copy()
    prepared = prepare_pil(original)
    assert prepared.image is not original
    assert rgb(prepared) == np.asarray(original).tolist()


def test_prepare_pil_refuses_non_images():
    with pytest.raises(BadRequest):
        prepare_pil(b"not an image")  # type: ignore[arg-type]
