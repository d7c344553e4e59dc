"""Google's request format: envelope, request format marker, content parts, refusals by name."""

from __future__ import annotations

import pytest

from medgemma import google_api
from medgemma.config import Settings
from medgemma.errors import BadRequest
from medgemma.protocol import TextPart

SETTINGS = Settings(model="google/medgemma-4b-it")
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg=="


def msg(*parts: dict) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}], "max_tokens": 5}


def test_bare_and_wrapped_requests():
    req, wrapped = google_api.parse(msg({"type": "text", "text": "hi"}), SETTINGS)
    assert not wrapped and req.model is None and req.max_tokens == 5
    body = {"instances": [{"@requestFormat": "chatCompletions", **msg({"type": "text", "text": "hi"})}]}
    req, wrapped = google_api.parse(body, SETTINGS)
    assert wrapped and req.request_format == "chatCompletions"
    assert google_api.response({"choices": []}, wrapped) == {"predictions": {"choices": []}}
    assert google_api.response({"choices": []}, False) == {"choices": []}


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"instances": [msg({"type": "image_gcs", "image_gcs": {"gcs_source": "gs://b/x"}})]}, "image_gcs"),
        ({"instances": [msg({"type": "text", "text": "a"})], "parameters": {}}, "parameters"),
        ({"instances": [msg({"type": "text", "text": "a"})] * 2}, "instances"),
        ({"instances": [{"@requestFormat": "prompt", "prompt": "x"}]}, "@requestFormat"),
        ({**msg({"type": "text", "text": "a"}), "stream": True}, "stream"),
        ({**msg({"type": "text", "text": "a"}), "logit_bias": {}}, "logit_bias"),
        (msg({"type": "image_dicom", "image_dicom": {"dicom_source": "x", "patch_coordinates_list": []}}), None),
    ],
)
def test_unsupported_fields_are_400s_that_name_them(body, named):
    if named is None:  # accepted by the schema, refused when converted (see test below)
        google_api.parse(body, SETTINGS)
        return
    with pytest.raises(BadRequest) as err:
        google_api.parse(body, SETTINGS)
    assert named in err.value.message


def test_content_parts_map_to_image_values():
    req, _ = google_api.parse(
        msg(
            {"type": "text", "text": "what is it?"},
            {"type": "image_bytes", "image_bytes": {"input_bytes": PNG_B64}},
            {"type": "image", "image": "data:image/png;base64," + PNG_B64},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64}},
        ),
        SETTINGS,
    )
    items = [google_api.part_item(p, SETTINGS, f"p{i}") for i, p in enumerate(req.messages[0].content)]
    assert items[0] == (TextPart("what is it?"), "p0")
    assert items[1][0].endswith(PNG_B64) and items[1][1] == "p1.image_bytes"
    grequest = google_api.to_generation_request(req, SETTINGS, vision=True)
    assert len(grequest.images) == 3


def test_patch_coordinates_are_refused_by_name():
    body = msg({"type": "image_dicom", "image_dicom": {"dicom_source": "http://h/dw/studies/1/series/2",
                                                       "patch_coordinates_list": [{"x_origin": 0}]}})  # fmt: skip
    req, _ = google_api.parse(body, SETTINGS)
    with pytest.raises(BadRequest) as err:
        google_api.to_generation_request(req, SETTINGS, vision=True)
    assert "patch_coordinates_list" in err.value.message


def test_a_credential_is_never_in_the_parsed_requests_repr():
    body = msg({"type": "image_dicom", "image_dicom": {"dicom_source": "x", "access_credential": "SECRET-9"}})
    req, _ = google_api.parse(body, SETTINGS)
    assert "SECRET-9" not in repr(req) and "SECRET-9" not in str(req.model_dump())
