"""The seed request schema: formats, parameter ranges (each boundary), unknown fields, the one error body."""

from __future__ import annotations

import pytest

from medgemma.errors import BadRequest
from medgemma.schemas import GenerateRequest, GenerationParameters, parse_model

PNG_URI = "data:image/png;base64,iVBORw0KGgo="  # the schema layer does not decode images


def parse(data):
    return parse_model(GenerateRequest, data)


def refused(data) -> BadRequest:
    with pytest.raises(BadRequest) as err:
        parse(data)
    exc = err.value
    assert exc.status_code == 400
    body = exc.body()
    assert body["status"] == "error"
    assert isinstance(body["error"], str)
    assert body["error"]
    return exc


# ------------------------------------------------------------------------------------------------ seed examples


def test_seed_simple_text_example():
    req = parse(
        {
            "text": "How do you differentiate bacterial from viral pneumonia?",
            "system": "You are a helpful medical assistant.",
            "max_new_tokens": 200,
        }
    )
    assert req.text.startswith("How do you")
    assert req.system == "You are a helpful medical assistant."
    assert req.max_new_tokens == 200
    assert req.messages is None


def test_seed_simple_image_example():
    req = parse(
        {"text": "Describe this X-ray", "image": PNG_URI, "system": "You are an expert radiologist.",
         "max_new_tokens": 300}
    )  # fmt: skip
    assert req.image == PNG_URI
    assert req.max_new_tokens == 300


def test_seed_simple_format_with_every_parameter():
    req = parse(
        {"text": "q", "system": "s", "image": PNG_URI, "max_new_tokens": 200, "temperature": 0.7, "top_p": 0.9,
         "top_k": 50, "repetition_penalty": 1.1}
    )  # fmt: skip
    assert (req.temperature, req.top_p, req.top_k, req.repetition_penalty) == (0.7, 0.9, 50, 1.1)
    assert req.do_sample is None


def test_seed_chat_example():
    req = parse(
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "You are a helpful medical assistant."}]},
                {"role": "user", "content": [{"type": "text", "text": "What are the symptoms of diabetes?"}]},
            ],
            "max_new_tokens": 200,
        }
    )
    assert [m.role for m in req.messages] == ["system", "user"]
    assert req.messages[1].content[0].text == "What are the symptoms of diabetes?"


def test_seed_chat_image_example():
    req = parse(
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe this X-ray"},
                        {"type": "image", "image": PNG_URI},
                    ],
                },
            ],
            "max_new_tokens": 300,
            "temperature": 0.7,
        }
    )
    part = req.messages[1].content[1]
    assert part.type == "image"
    assert part.image == PNG_URI


def test_chat_content_may_be_a_plain_string_and_openai_image_parts_are_accepted():
    req = parse(
        {
            "messages": [
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG_URI}}]},
            ]
        }
    )
    assert req.messages[0].content == "hello"
    assert req.messages[2].content[0].image_url.url == PNG_URI


# ------------------------------------------------------------------------------------------------ ranges

BOUNDARIES = [
    # field, accepted values, refused values
    ("max_new_tokens", [1, 2, 4096], [0, -1]),
    ("temperature", [0, 0.0, 1e-6, 1.0, 2, 2.0], [-1e-6, -1, 2.000001, 3]),
    ("top_p", [1e-6, 0.5, 1, 1.0], [0, 0.0, -0.1, 1.000001, 2]),
    ("top_k", [1, 50, 10**6], [0, -5]),
    ("repetition_penalty", [1e-6, 1.0, 1.1, 5], [0, 0.0, -1.0]),
    ("seed", [0, 2**63 - 1], [-1, 2**63]),
]


def _with_sampling(field: str, value) -> dict:
    data = {"text": "q", field: value}
    if field in ("top_p", "top_k") or (field == "temperature" and value != 0):
        data["do_sample"] = True  # temperature 0 is greedy: it contradicts do_sample true (see below)
    return data


@pytest.mark.parametrize(
    "data",
    [
        {"text": "q", "temperature": 0, "do_sample": True},
        {"text": "q", "temperature": 0, "top_p": 0.9},
        {"text": "q", "temperature": 0.0, "top_k": 5},
    ],
)
def test_greedy_temperature_with_sampling_parameters_is_refused(data):
    exc = refused(data)
    assert "temperature 0 means greedy" in exc.message


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, ok, _ in BOUNDARIES for v in ok], ids=str)
def test_values_inside_the_range_are_accepted(field, value):
    req = parse(_with_sampling(field, value))
    assert getattr(req, field) == value


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, _, bad in BOUNDARIES for v in bad], ids=str)
def test_values_outside_the_range_name_the_field(field, value):
    exc = refused(_with_sampling(field, value))
    assert exc.param == field
    assert exc.body()["param"] == field
    assert exc.message.startswith(f"{field}:")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", "abc"),
        ("max_new_tokens", 1.5),
        ("max_new_tokens", [200]),
        ("max_new_tokens", {"n": 1}),
        ("temperature", "hot"),
        ("temperature", [0.7]),
        ("top_p", "high"),
        ("top_k", 2.5),
        ("top_k", "many"),
        ("repetition_penalty", {}),
        ("do_sample", "maybe"),
        ("do_sample", [True]),
        ("text", 123),
        ("text", ["a"]),
        ("system", 1),
        ("messages", "hello"),
        ("messages", {"role": "user"}),
        ("images", "data:image/png;base64,AAAA"),
        ("stream", "often"),
    ],
    ids=str,
)
def test_wrong_types_name_the_field(field, value):
    data = {"text": "q", field: value} if field not in ("text", "messages") else {field: value}
    exc = refused(data)
    assert exc.param == field
    assert field in exc.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", True),  # JSON true is not a number: it would silently mean max_new_tokens=1
        ("top_k", True),
        ("max_new_tokens", "200"),  # a string is not an integer
        ("temperature", "0.7"),
        ("do_sample", "yes"),  # a string is not a boolean
        ("do_sample", 1),
    ],
    ids=repr,
)
def test_json_types_are_not_coerced(field, value):
    data = _with_sampling(field, value)
    if field == "do_sample":
        data = {"text": "q", "do_sample": value}
    exc = refused(data)
    assert exc.param == field


def test_cap_is_not_a_schema_rule():
    # The configured cap (MEDGEMMA_MAX_NEW_TOKENS_CAP) is checked by medgemma.inputs, not here.
    assert parse({"text": "q", "max_new_tokens": 10**6}).max_new_tokens == 10**6


# ------------------------------------------------------------------------------------------------ sampling consistency


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"temperature": 0.7}, "temperature"),
        ({"top_p": 0.9}, "top_p"),
        ({"top_k": 5}, "top_k"),
        ({"temperature": 0.7, "top_k": 5}, "temperature, top_k"),
    ],
)
def test_do_sample_false_with_sampling_parameters_is_contradictory(extra, named):
    exc = refused({"text": "q", "do_sample": False, **extra})
    assert exc.message.startswith(named)
    assert "do_sample" in exc.message


def test_do_sample_false_with_temperature_zero_is_fine():
    req = parse({"text": "q", "do_sample": False, "temperature": 0, "repetition_penalty": 1.2})
    assert req.temperature == 0


def test_sampling_parameters_without_do_sample_are_fine():
    req = parse({"text": "q", "temperature": 0.7, "top_p": 0.9, "top_k": 40})
    assert req.do_sample is None


# ------------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize(
    "data",
    [
        {"messages": [{"role": "user", "content": "a"}], "text": "b"},
        {"messages": [{"role": "user", "content": "a"}], "system": "b"},
        {"messages": [{"role": "user", "content": "a"}], "image": PNG_URI},
        {"messages": [{"role": "user", "content": "a"}], "images": [PNG_URI]},
    ],
)
def test_simple_and_chat_format_cannot_be_mixed(data):
    exc = refused(data)
    assert "either the simple format" in exc.message


@pytest.mark.parametrize("data", [{}, {"system": "s"}, {"image": PNG_URI}, {"max_new_tokens": 5}])
def test_text_or_messages_is_required(data):
    exc = refused(data)
    assert "text" in exc.message
    assert "messages" in exc.message


def test_image_and_images_together_are_refused():
    assert "not both" in refused({"text": "q", "image": PNG_URI, "images": [PNG_URI]}).message


def test_images_must_not_be_empty():
    exc = refused({"text": "q", "images": []})
    assert exc.param == "images"


def test_empty_text_is_valid_for_the_schema():
    assert parse({"text": ""}).text == ""


# ------------------------------------------------------------------------------------------------ unknown fields


@pytest.mark.parametrize("field", ["max_tokens", "prompt", "temprature", "model", "n"])
def test_unknown_top_level_fields_are_refused_by_name(field):
    exc = refused({"text": "q", field: 1})
    assert exc.param == field
    assert exc.message == f"{field}: unknown field (not part of this API)"


def test_unknown_field_in_a_message():
    exc = refused({"messages": [{"role": "user", "content": "a", "name": "bob"}]})
    assert exc.param == "messages[0].name"
    assert "unknown field" in exc.message


@pytest.mark.parametrize(
    "part",
    [
        {"type": "text", "text": "a", "extra": 1},
        {"type": "image", "image": PNG_URI, "extra": 1},
    ],
)
def test_unknown_field_in_a_content_part_names_the_real_path(part):
    exc = refused({"messages": [{"role": "user", "content": [part]}]})
    assert "unknown field" in exc.message
    # The discriminator tag ("text"/"image") is pydantic's bookkeeping, not a field the client sent.
    assert exc.param == "messages[0].content[0].extra"


def test_unknown_field_in_window():
    exc = refused({"text": "q", "window": {"center": 40, "width": 400, "level": 1}})
    assert exc.param == "window.level"


# ------------------------------------------------------------------------------------------------ roles and parts


@pytest.mark.parametrize("role", ["tool", "model", "USER", "", "function"])
def test_unknown_role_is_refused(role):
    exc = refused({"messages": [{"role": role, "content": "a"}]})
    assert exc.param == "messages[0].role"
    assert "'system', 'user' or 'assistant'" in exc.message


def test_unknown_role_in_a_later_message_is_located():
    exc = refused(
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "robot", "content": "c"}]}
    )  # fmt: skip
    assert exc.param == "messages[2].role"


def test_missing_role_or_content():
    assert refused({"messages": [{"content": "a"}]}).param == "messages[0].role"
    assert refused({"messages": [{"role": "user"}]}).param == "messages[0].content"


def test_unknown_content_part_type():
    exc = refused({"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]})
    assert exc.param == "messages[0].content[0]"
    assert "'text', 'image', 'image_url'" in exc.message


def test_text_part_without_text():
    exc = refused({"messages": [{"role": "user", "content": [{"type": "text"}]}]})
    assert exc.param == "messages[0].content[0].text"
    assert "Field required" in exc.message


def test_image_part_without_image():
    exc = refused({"messages": [{"role": "user", "content": [{"type": "image"}]}]})
    assert exc.param == "messages[0].content[0].image"


def test_message_that_is_not_an_object():
    exc = refused({"messages": ["hello"]})
    assert exc.param == "messages[0]"


# ------------------------------------------------------------------------------------------------ other fields


def test_window_and_dicom_frames():
    req = parse({"text": "q", "window": {"center": 40, "width": 400}, "dicom_frames": "all"})
    assert (req.window.center, req.window.width, req.dicom_frames) == (40, 400, "all")
    assert refused({"text": "q", "window": {"center": 40, "width": 0}}).param == "window.width"
    assert refused({"text": "q", "window": {"center": 40}}).param == "window.width"
    assert refused({"text": "q", "dicom_frames": "last"}).param == "dicom_frames"


# ------------------------------------------------------------------------------------------------ body shape


@pytest.mark.parametrize("body", [[], [{"text": "q"}], "text", 42, None, True])
def test_body_must_be_a_json_object(body):
    with pytest.raises(BadRequest) as err:
        parse(body)
    assert err.value.body() == {"status": "error", "error": "request body must be a JSON object"}


def test_error_body_is_one_object_with_status_error_and_param():
    exc = refused({"text": "q", "top_k": 0})
    assert exc.body() == {"status": "error", "error": "top_k: Input should be greater than or equal to 1",
                          "param": "top_k"}  # fmt: skip


def test_generation_parameters_alone():
    p = parse_model(GenerationParameters, {"max_new_tokens": 5, "do_sample": True, "temperature": 1.5})
    assert (p.max_new_tokens, p.do_sample, p.temperature) == (5, True, 1.5)
    with pytest.raises(BadRequest):
        parse_model(GenerationParameters, {"text": "q"})  # not a generation parameter
