"""Seed request → internal request: messages, role rules, images as data URIs, limits, CT series labelling."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from medgemma.config import Settings
from medgemma.errors import BadRequest, ServiceError
from medgemma.inputs import UploadedImage, decode_image, from_seed, image_options
from medgemma.protocol import GenerationRequest, ImagePart, TextPart
from medgemma.schemas import GenerateRequest, parse_model

SETTINGS = Settings()


# ------------------------------------------------------------------------------------------------ helpers


def png_bytes(size: tuple[int, int] = (12, 8), colour=(200, 30, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 240)).save(buf, format="JPEG")
    return buf.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


PNG = data_uri(png_bytes())


def build(data: dict, *, vision: bool = True, settings: Settings = SETTINGS) -> GenerationRequest:
    return from_seed(parse_model(GenerateRequest, data), settings, vision=vision)


def refused(data: dict, *, vision: bool = True, settings: Settings = SETTINGS, status: int = 400) -> ServiceError:
    with pytest.raises(ServiceError) as err:
        build(data, vision=vision, settings=settings)
    exc = err.value
    assert exc.status_code == status, exc.body()
    body = exc.body()
    assert body["status"] == "error"
    assert isinstance(body["error"], str)
    assert body["error"]
    return exc


def shape(req: GenerationRequest) -> list[tuple[str, list[str]]]:
    """Messages as (role, ["text:..." | "image"]) for compact assertions."""
    return [(m.role, [f"text:{p.text}" if isinstance(p, TextPart) else "image" for p in m.parts]) for m in req.messages]


def chat(*turns: tuple[str, object]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


# ------------------------------------------------------------------------------------------------ simple format


def test_simple_text():
    req = build({"text": "How do you differentiate bacterial from viral pneumonia?"})
    assert shape(req) == [("user", ["text:How do you differentiate bacterial from viral pneumonia?"])]
    assert req.images == []
    assert req.request_id


def test_simple_text_with_system():
    req = build({"text": "q", "system": "You are a helpful medical assistant."})
    assert shape(req) == [("system", ["text:You are a helpful medical assistant."]), ("user", ["text:q"])]


def test_simple_image_becomes_a_user_image_part_after_the_text():
    req = build({"text": "Describe this X-ray", "image": PNG, "system": "You are an expert radiologist."})
    assert shape(req) == [
        ("system", ["text:You are an expert radiologist."]),
        ("user", ["text:Describe this X-ray", "image"]),
    ]
    [part] = req.images
    assert isinstance(part, ImagePart)
    assert part.image.mode == "RGB"
    assert part.image.size == (12, 8)
    assert np.asarray(part.image)[0, 0].tolist() == [200, 30, 30]
    assert part.info["source"] == "png"


def test_several_images_keep_their_order():
    red, green = data_uri(png_bytes(colour=(255, 0, 0))), data_uri(png_bytes(colour=(0, 255, 0)))
    req = build({"text": "compare", "images": [red, green]})
    assert shape(req) == [("user", ["text:compare", "image", "image"])]
    assert [np.asarray(p.image)[0, 0].tolist() for p in req.images] == [[255, 0, 0], [0, 255, 0]]


@pytest.mark.parametrize(
    "value",
    [
        data_uri(jpeg_bytes(), "image/jpeg"),
        base64.b64encode(png_bytes()).decode(),  # bare base64
        data_uri(png_bytes(), "application/octet-stream"),
        data_uri(png_bytes(mode="L", colour=128)),
        data_uri(png_bytes(mode="RGBA", colour=(10, 20, 30, 255))),
        "data:image/png;base64," + base64.b64encode(png_bytes()).decode().rstrip("="),  # unpadded
    ],
    ids=["jpeg", "bare-base64", "octet-stream", "grey", "rgba", "unpadded"],
)
def test_image_encodings_are_decoded_to_rgb(value):
    [part] = build({"text": "q", "image": value}).images
    assert part.image.mode == "RGB"


# ------------------------------------------------------------------------------------------------ chat format


def test_seed_chat_example():
    req = build(
        chat(
            ("system", [{"type": "text", "text": "You are a helpful medical assistant."}]),
            ("user", [{"type": "text", "text": "What are the symptoms of diabetes?"}]),
        )
    )
    assert shape(req) == [
        ("system", ["text:You are a helpful medical assistant."]),
        ("user", ["text:What are the symptoms of diabetes?"]),
    ]


def test_seed_chat_image_example():
    req = build(
        chat(
            ("system", [{"type": "text", "text": "You are an expert radiologist."}]),
            ("user", [{"type": "text", "text": "Describe this X-ray"}, {"type": "image", "image": PNG}]),
        )
    )
    assert shape(req) == [
        ("system", ["text:You are an expert radiologist."]),
        ("user", ["text:Describe this X-ray", "image"]),
    ]
    assert req.images[0].image.size == (12, 8)


def test_multi_turn_conversation_with_string_content():
    req = build(chat(("user", "a"), ("assistant", "b"), ("user", "c")))
    assert shape(req) == [("user", ["text:a"]), ("assistant", ["text:b"]), ("user", ["text:c"])]


def test_openai_style_image_url_part_with_a_data_uri():
    req = build(chat(("user", [{"type": "image_url", "image_url": {"url": PNG}}, {"type": "text", "text": "?"}])))
    assert shape(req) == [("user", ["image", "text:?"])]
    req = build(chat(("user", [{"type": "image_url", "image_url": PNG}])))
    assert len(req.images) == 1


@pytest.mark.parametrize("url", ["https://example.org/x.png", "http://10.0.0.1/x.png"])
def test_image_urls_are_not_fetched_unless_allow_listed(url):
    # One policy (sources.image_url_value) for every API and field: the default allow-list is empty.
    exc = refused(chat(("user", [{"type": "image_url", "image_url": {"url": url}}])))
    assert exc.param == "messages[0].content[0]"
    assert "not fetched unless" in exc.message and "MEDGEMMA_IMAGE_URL_DOMAINS" in exc.message
    exc = refused({"text": "q", "image": url})
    assert exc.param == "image"
    assert "not fetched unless" in exc.message


# ------------------------------------------------------------------------------------------------ role rules


def test_empty_message_list():
    exc = refused({"messages": []})
    assert exc.param == "messages"
    assert "at least one message" in exc.message


@pytest.mark.parametrize(
    ("turns", "needle"),
    [
        ((("user", "a"), ("user", "b")), "message 1 is 'user' where 'assistant' was expected"),
        ((("assistant", "a"), ("user", "b")), "message 0 is 'assistant' where 'user' was expected"),
        ((("system", "s"), ("assistant", "a")), "message 1 is 'assistant' where 'user' was expected"),
        ((("user", "a"), ("assistant", "b"), ("assistant", "c"), ("user", "d")), "message 2 is 'assistant'"),
    ],
)
def test_roles_must_alternate_starting_with_user(turns, needle):
    exc = refused(chat(*turns))
    assert exc.param == "messages"
    assert "alternate" in exc.message
    assert needle in exc.message


def test_last_message_must_be_the_users():
    exc = refused(chat(("user", "a"), ("assistant", "b")))
    assert "last message must come from the user" in exc.message


def test_system_only_first():
    exc = refused(chat(("user", "a"), ("system", "b"), ("user", "c")))
    assert exc.param == "messages[1]"
    assert "system message is only allowed first" in exc.message


def test_system_alone_is_not_a_conversation():
    exc = refused(chat(("system", "s")))
    assert "at least one user message" in exc.message


@pytest.mark.parametrize("content", ["", "   ", [], [{"type": "text", "text": " "}]], ids=repr)
def test_empty_user_content(content):
    exc = refused(chat(("user", content)))
    assert exc.param == "messages[0]"
    assert "must not be empty" in exc.message


def test_empty_simple_text():
    exc = refused({"text": "  "})
    assert "must not be empty" in exc.message


def test_empty_assistant_turn_is_allowed():
    req = build(chat(("user", "a"), ("assistant", ""), ("user", "b")))
    assert [m.role for m in req.messages] == ["user", "assistant", "user"]


@pytest.mark.parametrize("role", ["assistant", "system"])
def test_images_only_in_user_messages(role):
    turns = (
        [("user", "a"), ("assistant", "b"), ("user", "c")] if role == "assistant" else [("system", "s"), ("user", "c")]
    )
    index = 1 if role == "assistant" else 0
    data = chat(*turns)
    data["messages"][index]["content"] = [{"type": "text", "text": "x"}, {"type": "image", "image": PNG}]
    exc = refused(data)
    assert exc.param == f"messages[{index}]"
    assert "only allowed in user messages" in exc.message


# ------------------------------------------------------------------------------------------------ text-only models


def test_text_only_model_accepts_text():
    req = build({"text": "q", "system": "s"}, vision=False)
    assert shape(req) == [("system", ["text:s"]), ("user", ["text:q"])]


@pytest.mark.parametrize(
    "data",
    [
        {"text": "Describe this X-ray", "image": PNG},
        {"text": "q", "images": [PNG]},
        chat(("user", [{"type": "text", "text": "q"}, {"type": "image", "image": PNG}])),
        chat(("user", [{"type": "image_url", "image_url": {"url": PNG}}])),
    ],
    ids=["simple", "images", "chat", "image_url"],
)
def test_text_only_model_refuses_images_readably(data):
    exc = refused(data, vision=False)
    assert "text-only" in exc.message
    assert "does not accept images" in exc.message


# ------------------------------------------------------------------------------------------------ bad images


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("data:image/png;base64," + base64.b64encode(b"hello, not an image").decode(), "not a recognised image"),
        ("data:image/png;base64,!!!not-base64!!!", "not valid base64"),
        ("data:image/png;base64,", "holds no data"),
        ("data:image/png;base64,A", "not valid base64"),
        ("data:image/png,%89PNG%0D%0A", "not a recognised image"),  # truncated PNG, percent-encoded
        ("data:;base64," + base64.b64encode(png_bytes()[:40]).decode(), "image"),  # truncated PNG
        ("not a data URI, just text.", "neither a data URI"),
        ("file:///etc/passwd", "does not fetch"),
        ("/images/chest-xray.png", "file paths are not accepted"),
        ("", "is empty"),
    ],
    ids=["garbage", "bad-base64", "empty-data", "impossible-length", "percent", "truncated", "text", "file-uri",
         "path", "empty"],
)  # fmt: skip
def test_undecodable_image_is_a_readable_400_naming_the_field(value, needle):
    exc = refused({"text": "q", "image": value})
    assert exc.param == "image"
    assert needle in exc.message
    assert "Traceback" not in exc.message


def test_undecodable_image_in_images_and_chat_is_located():
    bad = "data:image/png;base64," + base64.b64encode(b"garbage").decode()
    assert refused({"text": "q", "images": [PNG, bad]}).param == "images[1]"
    exc = refused(chat(("user", [{"type": "text", "text": "q"}, {"type": "image", "image": bad}])))
    assert exc.param == "messages[0].content[1]"


@pytest.mark.parametrize("value", [42, 4.5, True, {"url": "x"}, ["data:image/png;base64,AAAA"]], ids=repr)
def test_image_of_the_wrong_type(value):
    exc = refused({"text": "q", "image": value})
    assert exc.param == "image"
    assert "data URI" in exc.message


def test_unsupported_but_known_format_is_415():
    exc = refused({"text": "q", "image": data_uri(b"%PDF-1.7\n" + b"0" * 64, "application/pdf")}, status=415)
    assert exc.param == "image"


def test_messages_do_not_echo_the_sent_value():
    secret = "PATIENT-SECRET-123"
    exc = refused({"text": "q", "image": secret})
    assert secret not in exc.message


# ------------------------------------------------------------------------------------------------ limits


def test_max_new_tokens_cap_boundary():
    settings = Settings(max_new_tokens_cap=64, default_max_new_tokens=32)
    assert build({"text": "q", "max_new_tokens": 64}, settings=settings).params.max_new_tokens == 64
    exc = refused({"text": "q", "max_new_tokens": 65}, settings=settings)
    assert exc.param == "max_new_tokens"
    assert "64" in exc.message
    assert build({"text": "q"}, settings=settings).params.max_new_tokens == 32


def test_default_cap_is_4096():
    assert build({"text": "q", "max_new_tokens": 4096}).params.max_new_tokens == 4096
    assert refused({"text": "q", "max_new_tokens": 4097}).param == "max_new_tokens"


def test_too_many_images_is_413():
    settings = Settings(max_images=2)
    assert len(build({"text": "q", "images": [PNG, PNG]}, settings=settings).images) == 2
    exc = refused({"text": "q", "images": [PNG, PNG, PNG]}, settings=settings, status=413)
    assert "limit of 2" in exc.message


def test_too_long_text_is_413():
    settings = Settings(max_text_chars=10)
    build({"text": "x" * 10}, settings=settings)
    exc = refused({"text": "x" * 11}, settings=settings, status=413)
    assert exc.param == "messages[0]"
    exc = refused({"text": "q", "system": "s" * 11}, settings=settings, status=413)
    assert exc.param == "messages[0]"


def test_too_large_image_is_413():
    settings = Settings(max_image_bytes=100)
    big = data_uri(png_bytes(size=(64, 64)) + b"\0" * 200)
    exc = refused({"text": "q", "image": big}, settings=settings, status=413)
    assert exc.param == "image"


def test_too_many_pixels_is_413():
    settings = Settings(max_image_pixels=100)
    exc = refused({"text": "q", "image": data_uri(png_bytes(size=(20, 20)))}, settings=settings, status=413)
    assert exc.param == "image"


# ------------------------------------------------------------------------------------------------ sampling


def test_parameters_object_has_all_six_with_nulls():
    req = build({"text": "q", "max_new_tokens": 200})
    assert req.params.seed_parameters() == {
        "max_new_tokens": 200,
        "do_sample": False,
        "temperature": None,
        "top_p": None,
        "top_k": None,
        "repetition_penalty": None,
    }


def test_default_max_new_tokens_is_the_seeds_200():
    assert build({"text": "q"}).params.max_new_tokens == 200


@pytest.mark.parametrize(
    ("given", "do_sample"),
    [
        ({}, False),
        ({"temperature": 0.7}, True),
        ({"temperature": 0}, False),
        ({"top_p": 0.9}, True),
        ({"top_k": 40}, True),
        ({"repetition_penalty": 1.1}, False),
        ({"do_sample": True}, True),
        ({"do_sample": False, "repetition_penalty": 1.3}, False),
    ],
)
def test_do_sample_resolution(given, do_sample):
    params = build({"text": "q", **given}).params
    assert params.do_sample is do_sample
    for k, v in given.items():
        if k != "do_sample":
            assert getattr(params, k) == v


def test_sampling_params_directly():
    req = parse_model(GenerateRequest, {"text": "q", "max_new_tokens": 7, "top_k": 3, "seed": 11})
    params = req.sampling_params(SETTINGS, max_new_tokens=req.max_new_tokens, stop=("END",))
    assert (params.max_new_tokens, params.top_k, params.seed) == (7, 3, 11)
    assert params.stop == ("END",)
    assert params.do_sample is True


# ------------------------------------------------------------------------------------------------ decode_image


def test_decode_image_accepts_uploads_pil_and_bytes():
    options = image_options(SETTINGS)
    [a] = decode_image(UploadedImage(png_bytes(), "image/png", "x.png"), options, param="image")
    [b] = decode_image(Image.open(io.BytesIO(png_bytes())), options, param="image")
    [c] = decode_image(png_bytes(), options, param="image")
    assert a.image.size == b.image.size == c.image.size == (12, 8)
    assert b.info["source"] == "pil"
    with pytest.raises(BadRequest) as err:
        decode_image(UploadedImage(b"nope"), options, param="image")
    assert err.value.param == "image"


# ------------------------------------------------------------------------------------------------ CT series


def ct_slice(instance: int | None, z: float, *, modality: str = "CT", value: int = 0) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    if instance is not None:
        ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    # HU = value: the R channel (window -1024..1024) tells the slices apart after ordering
    ds.PixelData = np.full((8, 8), 1024 + value, dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dicom_uri(data: bytes) -> str:
    return data_uri(data, "application/dicom")


def red(part: ImagePart) -> int:
    return int(np.asarray(part.image)[0, 0, 0])


SERIES = [(3, 7.5, 600), (1, 2.5, -600), (2, 5.0, 0)]  # (instance, z, HU), sent out of order


def test_ct_series_in_simple_format_is_ordered_and_labelled():
    images = [dicom_uri(ct_slice(i, z, value=v)) for i, z, v in SERIES]
    req = build({"text": "Describe this CT", "images": images})
    assert shape(req) == [("user", ["text:Describe this CT", "image", "text:SLICE 1", "image", "text:SLICE 2",
                                    "image", "text:SLICE 3"])]  # fmt: skip
    assert [p.info["instance_number"] for p in req.images] == [1, 2, 3]
    reds = [red(p) for p in req.images]
    assert reds == sorted(reds)
    assert all(p.info["modality"] == "CT" and p.info["source"] == "dicom" for p in req.images)


def test_ct_series_in_chat_format_puts_text_first_then_labelled_slices():
    content = [{"type": "image", "image": dicom_uri(ct_slice(i, z, value=v))} for i, z, v in SERIES]
    content.insert(1, {"type": "text", "text": "Describe this CT"})
    req = build(chat(("user", content)))
    assert shape(req) == [("user", ["text:Describe this CT", "image", "text:SLICE 1", "image", "text:SLICE 2",
                                    "image", "text:SLICE 3"])]  # fmt: skip
    assert [p.info["instance_number"] for p in req.images] == [1, 2, 3]


def test_ct_series_already_labelled_by_the_client_is_left_alone():
    content = []
    for n, (i, z, v) in enumerate(SERIES, start=1):
        content += [
            {"type": "image", "image": dicom_uri(ct_slice(i, z, value=v))},
            {"type": "text", "text": f"SLICE {n}"},
        ]
    req = build(chat(("user", content)))
    assert [p.info["instance_number"] for p in req.images] == [3, 1, 2]
    assert shape(req)[0][1].count("text:SLICE 1") == 1


def test_ct_series_without_instance_numbers_uses_slice_position():
    images = [dicom_uri(ct_slice(None, z, value=v)) for _, z, v in SERIES]
    req = build({"text": "q", "images": images})
    assert [p.info["slice_location"] for p in req.images] == [2.5, 5.0, 7.5]
    assert "text:SLICE 3" in shape(req)[0][1]


def test_single_ct_slice_is_not_labelled():
    req = build({"text": "q", "image": dicom_uri(ct_slice(5, 1.0))})
    assert shape(req) == [("user", ["text:q", "image"])]


def test_mixed_or_non_volume_images_are_not_labelled():
    req = build({"text": "q", "images": [dicom_uri(ct_slice(2, 1.0)), PNG]})
    assert shape(req) == [("user", ["text:q", "image", "image"])]
    req = build({"text": "q", "images": [dicom_uri(ct_slice(2, 1.0, modality="CR")),
                                          dicom_uri(ct_slice(1, 0.0, modality="CR"))]})  # fmt: skip
    assert shape(req) == [("user", ["text:q", "image", "image"])]
    assert [p.info["instance_number"] for p in req.images] == [2, 1]
    assert req.image_sources == []


def test_mr_series_is_a_volume_with_one_minmax_over_all_slices():
    # two MR slices of different brightness: one min-max over the volume keeps the darker one darker
    images = [dicom_uri(ct_slice(2, 1.0, modality="MR", value=500)), dicom_uri(ct_slice(1, 0.0, modality="MR"))]
    req = build({"text": "q", "images": images})
    assert shape(req) == [("user", ["text:q", "image", "text:SLICE 1", "image", "text:SLICE 2"])]
    assert [p.info["instance_number"] for p in req.images] == [1, 2]
    assert [red(p) for p in req.images] == [0, 255]  # stored 1024 -> 1024 + 500 over the whole volume
    (report,) = req.image_sources
    assert report["kind"] == "uploaded_series" and report["windows"]["kind"] == "minmax_volume"
    assert report["instances_found"] == report["instances_used"] == report["slices_sampled"] == 2
    assert report["order_key"] == "slice_normal" and report["slice_positions"] == [0.0, 1.0]


def test_ct_slices_count_against_max_images():
    images = [dicom_uri(ct_slice(i, z)) for i, z, _ in SERIES]
    refused({"text": "q", "images": images}, settings=Settings(max_images=2), status=413)
