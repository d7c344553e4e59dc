"""Dynamic input discovery: the `/schema` answer, derived from the loaded model, processor and generation config.

Nothing here is written by hand per model: the classes are read off the loaded objects, the capabilities from
whether the checkpoint has a vision tower, the optional parameters from the request schema filtered by what the
model can use, and the sizes (context, image size, tokens per image) from the configs.
"""

from __future__ import annotations

from typing import Any

from medgemma.config import Settings
from medgemma.loader import LoadedModel
from medgemma.schemas import GenerateRequest, GenerationParameters

_IMAGE_FIELDS = {"image", "images", "image_dicom", "image_previews", "window", "dicom_frames", "pad_to_square"}
_FORMAT_FIELDS = {"text", "messages"}


def public_model_name(loaded: LoadedModel | None, settings: Settings) -> str:
    """The `model` field of responses. A random-weight demo says so, so nobody mistakes its output for medicine."""
    name = settings.route_prefix
    if loaded is not None and loaded.is_demo:
        return f"{name} (random-weight demo, not a medical model)"
    return name


def describe(loaded: LoadedModel, settings: Settings) -> dict[str, Any]:
    cfg = loaded.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vision_cfg = getattr(cfg, "vision_config", None) if loaded.vision else None
    gen = loaded.generation_config

    params = list(GenerationParameters.model_fields)
    optional = [f for f in GenerateRequest.model_fields if f not in _FORMAT_FIELDS and f not in params]
    if not loaded.vision:
        optional = [f for f in optional if f not in _IMAGE_FIELDS]
    if not settings.lora_adapters:
        optional = [f for f in optional if f != "adapter"]
    capabilities = ["text-to-text", "image-text-to-text"] if loaded.vision else ["text-to-text"]

    limits: dict[str, Any] = {
        "context_length": getattr(text_cfg, "max_position_embeddings", None),
        "sliding_window": getattr(text_cfg, "sliding_window", None),
        "vocab_size": getattr(text_cfg, "vocab_size", None),
        "max_new_tokens": settings.max_new_tokens_cap,
        "max_text_chars": settings.max_text_chars,
        "max_constraint_bytes": settings.max_constraint_bytes,
    }
    if vision_cfg is not None:
        limits.update(
            {
                "image_size": getattr(vision_cfg, "image_size", None),
                "patch_size": getattr(vision_cfg, "patch_size", None),
                "tokens_per_image": getattr(cfg, "mm_tokens_per_image", None),
                "max_images": settings.max_images,
                "max_image_bytes": settings.max_image_bytes,
                "max_image_pixels": settings.max_image_pixels,
                "image_formats": ["png", "jpeg", "webp", "gif", "bmp", "tiff", "dicom", "svs", "dicom-wsi"],
                "max_slices": settings.max_slices,
                "wsi_max_patches": settings.wsi_max_patches,
                "dicomweb": bool(settings.dicomweb_urls),
            }
        )
    return {
        "model_id": public_model_name(loaded, settings),
        "model_source": loaded.model_id,
        "model_class": type(loaded.model).__name__,
        "processor_class": type(loaded.processor).__name__,
        "model_type": getattr(cfg, "model_type", None),
        "capabilities": capabilities,
        "inputs": {
            # Either format works: simple (`text`) or chat (`messages`); exactly one of them is required.
            "required": ["text | messages"],
            "required_one_of": [["text"], ["messages"]],
            "optional": [*params, *optional],
        },
        "defaults": {
            "max_new_tokens": settings.default_max_new_tokens,
            "do_sample": False,
        },
        # Constrained decoding (response_format, structured_outputs): what each kind takes.
        "structured_outputs": {
            "response_format": ["text", "json_object", "json_schema"],
            "structured_outputs": ["regex", "choice", "grammar"],
            "grammar_syntax": "llguidance Lark (https://github.com/guidance-ai/llguidance/blob/main/docs/syntax.md)",
        },
        "model_generation_config": {
            k: getattr(gen, k, None) for k in ("do_sample", "temperature", "top_p", "top_k", "eos_token_id")
        },
        "limits": limits,
        "runtime": {"device": loaded.device, "dtype": loaded.dtype, "demo": loaded.is_demo},
    }
