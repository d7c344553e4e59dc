"""`/schema` from the loaded model: classes, capabilities, optional inputs and limits read off real checkpoints.

Expected values come from the checkpoints' own config files on disk, read independently of transformers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from medgemma.config import Settings
from medgemma.discovery import describe, public_model_name
from medgemma.loader import LoadedModel, load_model
from medgemma.schemas import GenerationParameters

PARAMETERS = list(GenerationParameters.model_fields)
IMAGE_FIELDS = {"image", "images", "window", "dicom_frames"}


@pytest.fixture(scope="module")
def vlm(tiny_vlm: Path) -> LoadedModel:
    return load_model(Settings(model=str(tiny_vlm)))


@pytest.fixture(scope="module")
def text(tiny_text: Path) -> LoadedModel:
    return load_model(Settings(model=str(tiny_text)))


def config_json(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_image_text_model(vlm: LoadedModel, tiny_vlm: Path):
    settings = Settings(model=str(tiny_vlm), max_images=7, max_new_tokens_cap=99)
    schema = describe(vlm, settings)
    on_disk = config_json(tiny_vlm)
    assert schema["model_class"] == on_disk["architectures"][0] == "Gemma3ForConditionalGeneration"
    assert schema["processor_class"] == "Gemma3Processor"
    assert schema["model_type"] == on_disk["model_type"]
    assert schema["capabilities"] == ["text-to-text", "image-text-to-text"]
    optional = schema["inputs"]["optional"]
    assert optional[: len(PARAMETERS)] == PARAMETERS  # every generation parameter, in schema order
    assert set(optional) >= IMAGE_FIELDS and "stream" in optional and "system" in optional
    assert not {"text", "messages"} & set(optional)
    assert schema["inputs"]["required_one_of"] == [["text"], ["messages"]]
    limits = schema["limits"]
    assert limits["context_length"] == on_disk["text_config"]["max_position_embeddings"]
    assert limits["sliding_window"] == on_disk["text_config"]["sliding_window"]
    assert limits["image_size"] == on_disk["vision_config"]["image_size"]
    assert limits["patch_size"] == on_disk["vision_config"]["patch_size"]
    assert limits["tokens_per_image"] == on_disk["mm_tokens_per_image"]
    assert limits["max_images"] == 7 and limits["max_new_tokens"] == 99
    assert "dicom" in limits["image_formats"]
    gen = json.loads((tiny_vlm / "generation_config.json").read_text())
    assert schema["model_generation_config"]["eos_token_id"] == gen["eos_token_id"]
    assert schema["defaults"] == {"max_new_tokens": settings.default_max_new_tokens, "do_sample": False}
    assert (
        schema["runtime"] == {"device": "cpu", "dtype": "float32", "demo": True} or schema["runtime"]["device"] != "cpu"
    )
    json.dumps(schema)  # a JSON answer, nothing else in it


def test_text_only_model_has_no_image_inputs(text: LoadedModel, tiny_text: Path):
    schema = describe(text, Settings(model=str(tiny_text)))
    assert schema["model_class"] == "Gemma3ForCausalLM"
    assert "Tokenizer" in schema["processor_class"]
    assert schema["capabilities"] == ["text-to-text"]
    assert not IMAGE_FIELDS & set(schema["inputs"]["optional"])
    assert "image_size" not in schema["limits"] and "max_images" not in schema["limits"]
    assert schema["limits"]["context_length"] == config_json(tiny_text)["max_position_embeddings"]


def test_public_model_name_marks_demos(vlm: LoadedModel):
    settings = Settings(model="google/medgemma-4b-it")
    assert public_model_name(vlm, settings) == "medgemma-4b-it (random-weight demo, not a medical model)"
    real = dataclasses.replace(vlm, is_demo=False)
    assert public_model_name(real, settings) == "medgemma-4b-it"
    assert public_model_name(None, Settings(model="google/medgemma-4b-it", app_name="radiology")) == "radiology"
    assert describe(real, settings)["model_id"] == "medgemma-4b-it"
