"""Checkpoints this project did not build: other sizes, no demo marker, no chat template, no generation_config.

They are made here directly with transformers' Gemma 3 classes (the way a user converting or training one would),
then served through ``MedGemmaCore`` — the code path every route uses — for every seed example and ``/schema``.
"""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from medgemma.config import Settings
from medgemma.core import MedGemmaCore
from medgemma.errors import BadRequest
from medgemma.lifecycle import ModelManager, ModelState


def _tokenizer():
    from medgemma.demo import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = None  # a conversion that lost its template: the service falls back to Gemma 3's format
    return tok


@pytest.fixture(scope="module")
def foreign_vlm(tmp_path_factory):
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tok = _tokenizer()
    ids = tok.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
    text = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=4096,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    vision = SiglipVisionConfig(
        image_size=28, patch_size=7, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=ids[0],
        eoi_token_index=ids[1],
        image_token_index=ids[2],
    )
    torch.manual_seed(7)
    model = Gemma3ForConditionalGeneration(config)
    path = tmp_path_factory.mktemp("foreign") / "someone-elses-vlm"
    model.save_pretrained(path)
    Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 28, "width": 28}), tokenizer=tok, image_seq_length=4
    ).save_pretrained(path)
    (path / "generation_config.json").unlink(missing_ok=True)
    return path


@pytest.fixture(scope="module")
def foreign_text(tmp_path_factory):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = _tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=40,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=20,
        sliding_window=8,
        max_position_embeddings=2048,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")],
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(8)
    path = tmp_path_factory.mktemp("foreign") / "someone-elses-text-model"
    Gemma3ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def png_uri() -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (50, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


SEED_EXAMPLES = {
    "simple": {"text": "How do you differentiate bacterial from viral pneumonia?", "system": "Be helpful."},
    "simple+image": {"text": "Describe this X-ray", "image": "IMAGE", "system": "You are an expert radiologist."},
    "chat": {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You are a helpful medical assistant."}]},
            {"role": "user", "content": [{"type": "text", "text": "What are the symptoms of diabetes?"}]},
        ]
    },
    "chat+image": {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "You are an expert radiologist."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Describe this X-ray"}, {"type": "image", "image": "IMAGE"}],
            },
        ]
    },
}


def serve(path) -> MedGemmaCore:
    # A bare ModelManager (no metric hooks): Prometheus metrics made in this process before the service tier sets
    # PROMETHEUS_MULTIPROC_DIR would not reach its in-process /metrics.
    settings = Settings(model=str(path))
    core = MedGemmaCore(settings, manager=ModelManager(settings))
    core.manager.start_loading()
    while core.manager.state is ModelState.LOADING:
        asyncio.run(asyncio.sleep(0.05))
    assert core.manager.state is ModelState.READY, core.manager.error
    return core


def with_image(obj):
    """The example with every "IMAGE" placeholder replaced by a PNG data URI."""
    if obj == "IMAGE":
        return png_uri()
    if isinstance(obj, dict):
        return {k: with_image(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [with_image(v) for v in obj]
    return obj


def test_foreign_image_text_checkpoint(foreign_vlm):
    core = serve(foreign_vlm)
    try:
        schema = core.schema()
        assert schema["model_class"] == "Gemma3ForConditionalGeneration"
        assert schema["processor_class"] == "Gemma3Processor"
        assert schema["capabilities"] == ["text-to-text", "image-text-to-text"]
        assert schema["limits"]["image_size"] == 28 and schema["limits"]["tokens_per_image"] == 4
        assert schema["model_id"] == "someone-elses-vlm"  # no demo marker: no demo label
        for name, example in SEED_EXAMPLES.items():
            body = asyncio.run(core.generate({**with_image(example), "max_new_tokens": 6}))
            assert body["status"] == "success", name
            assert body["compute_metrics"]["output_tokens"] >= 1
            assert set(body["parameters"]) == {
                "max_new_tokens",
                "do_sample",
                "temperature",
                "top_p",
                "top_k",
                "repetition_penalty",
            }
            if "image" in name:
                assert body["images"][0]["size"] == [40, 50]
    finally:
        core.shutdown()


def test_foreign_text_only_checkpoint(foreign_text):
    core = serve(foreign_text)
    try:
        schema = core.schema()
        assert schema["model_class"] == "Gemma3ForCausalLM"
        assert "Tokenizer" in schema["processor_class"]
        assert schema["capabilities"] == ["text-to-text"]
        assert "image" not in schema["inputs"]["optional"]
        for name in ("simple", "chat"):
            body = asyncio.run(core.generate({**SEED_EXAMPLES[name], "max_new_tokens": 6}))
            assert body["status"] == "success"
        with pytest.raises(BadRequest, match="text-only"):
            asyncio.run(core.generate({**with_image(SEED_EXAMPLES["simple+image"]), "max_new_tokens": 3}))
    finally:
        core.shutdown()
