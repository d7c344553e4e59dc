"""Gemma 3 model sizes, and the transformers config built from one: the one definition of both.

:class:`SizeSpec` holds the dimensions of a model; :data:`DEMO_SIZES` are the demo checkpoints' (``tiny``,
``small``: :mod:`medgemma.demo` writes them), :data:`MEDGEMMA_SIZES` are the real medgemma-4b-it and
medgemma-27b-it ones (``scripts/gpu_check.py`` builds those, with random weights, on a GPU).
:func:`model_config` turns a spec and a tokenizer into the ``Gemma3Config`` / ``Gemma3TextConfig`` that
both build their models from. Only the standard library is imported at module level; transformers when
:func:`model_config` runs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Kind = Literal["vlm", "text"]
Size = Literal["tiny", "small"]

END_OF_TURN = "<end_of_turn>"
"""Gemma 3's end-of-turn token (id 106 in the real vocabulary and in the demo one): the second EOS id."""


@dataclass(frozen=True)
class SizeSpec:
    """Dimensions of one model (shared/notes/gemma3-offline.md lists the ones that must agree)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    sliding_window: int
    sliding_window_pattern: int  # every Nth layer is global, the others local (Gemma 3: 6, i.e. 5:1)
    max_position_embeddings: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_hidden_layers: int
    vision_num_attention_heads: int
    image_size: int
    patch_size: int
    mm_tokens_per_image: int
    initializer_range: float = 0.02  # transformers' default; the demo sizes' are measured, see above DEMO_SIZES
    vocab_size: int | None = None  # None: the tokenizer's length
    query_pre_attn_scalar: int | None = None  # None: head_dim (as in the 4B model; the 27B uses 168)

    def layer_types(self) -> list[str]:
        """Explicit ``layer_types``, what transformers 5.x reads instead of ``sliding_window_pattern``."""
        return [
            "full_attention" if (i + 1) % self.sliding_window_pattern == 0 else "sliding_attention"
            for i in range(self.num_hidden_layers)
        ]

    def check(self) -> None:
        """Fail early and readably on mismatches that Gemma 3 would only hit in its first forward pass."""
        side = round(self.mm_tokens_per_image**0.5)
        if side * side != self.mm_tokens_per_image:
            raise ValueError(f"mm_tokens_per_image={self.mm_tokens_per_image} must be a perfect square")
        if self.image_size % self.patch_size or (self.image_size // self.patch_size) % side:
            raise ValueError(
                f"image_size / patch_size = {self.image_size} / {self.patch_size} must be a whole number "
                f"of patches, divisible by sqrt(mm_tokens_per_image) = {side}"
            )
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("hidden_size must divide by the heads, and the heads by the KV heads")
        if self.vision_hidden_size % self.vision_num_attention_heads:
            raise ValueError("vision_hidden_size must divide by vision_num_attention_heads")


# initializer_range. Gemma 3's sandwich norms (q/k norms, post-attention and post-MLP norms) make each
# layer's contribution to the residual stream about unit RMS whatever the weight scale, so what the range
# really sets is the RMS of the scaled token embedding, range * sqrt(hidden), against those contributions;
# with tied embeddings the same number is the logits' standard deviation. Measured on 8 chat prompts x 16
# greedy steps, fp32 (gap = top-1 minus top-2 logit; noise = batched-vs-single logit difference):
#   tiny  0.02 (the default): gap median 0.027, 5th percentile 0.0023, min 2.1e-4; noise 1.5e-7
#   tiny  0.1:                gap median 0.37, p5 0.029, min 4.2e-3; noise 7e-7; 8/8 distinct outputs
#   tiny  0.2:                gap median 0.94, p5 0.068, min 4.3e-3; 7/8 distinct, fewer distinct tokens
#   tiny  0.5, small 0.05:    gaps of 2.7 to 6 (min 1.3 to 4.9), but the embedding swamps the residual
#                             stream and the model repeats one token whatever the prompt (1 distinct
#                             output of 8): useless for tests that check each request gets its own answer
#   small 0.02 (the default): gap median 0.40, p5 0.078, min 0.025; noise 1.2e-6; 7/8 distinct outputs
# Hence range * sqrt(hidden) of about 0.4 to 0.6: tiny 0.1, small 0.02. Logits stay finite (|logit| < 3).
DEMO_SIZES: dict[Size, SizeSpec] = {
    # The notes' known-working set; builds in well under a second, 0.4 MB on disk.
    "tiny": SizeSpec(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=64,  # short, so that test prompts plus generation cross it
        sliding_window_pattern=2,  # [sliding, full]
        max_position_embeddings=32_768,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_num_hidden_layers=1,
        vision_num_attention_heads=2,
        image_size=32,
        patch_size=8,
        mm_tokens_per_image=4,
        initializer_range=0.1,
    ),
    # ~31M parameters (vlm; 23M text): big enough that a CPU benchmark measures tensor work.
    "small": SizeSpec(
        hidden_size=384,
        intermediate_size=3072,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        sliding_window=512,
        sliding_window_pattern=6,  # 5 local : 1 global, as in Gemma 3
        max_position_embeddings=32_768,
        vision_hidden_size=384,
        vision_intermediate_size=1536,
        vision_num_hidden_layers=4,
        vision_num_attention_heads=6,
        image_size=224,
        patch_size=14,
        mm_tokens_per_image=64,
        initializer_range=0.02,
    ),
}

# The real dimensions, from shared/notes/gemma3-offline.md and Google's config.json for google/medgemma-4b-it
# and google/medgemma-27b-it (the intermediate sizes are only in the latter). Both have the SigLIP so400m vision
# tower (1152 hidden, 27 layers, 16 heads, 896 px, patch 14) pooled to 256 tokens per image. The real vocabulary
# has 262,208 ids; built with the demo tokenizer (1024), the ids above 1023 are simply never used.
_SIGLIP_SO400M: dict[str, Any] = {
    "vision_hidden_size": 1152,
    "vision_intermediate_size": 4304,
    "vision_num_hidden_layers": 27,
    "vision_num_attention_heads": 16,
    "image_size": 896,
    "patch_size": 14,
    "mm_tokens_per_image": 256,
}
MEDGEMMA_SIZES: dict[str, SizeSpec] = {
    "4b": SizeSpec(
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        vocab_size=262_208,
        sliding_window=1024,
        sliding_window_pattern=6,
        max_position_embeddings=131_072,
        **_SIGLIP_SO400M,
    ),
    "27b": SizeSpec(
        hidden_size=5376,
        intermediate_size=21504,
        num_hidden_layers=62,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        query_pre_attn_scalar=168,
        vocab_size=262_208,
        sliding_window=1024,
        sliding_window_pattern=6,
        max_position_embeddings=131_072,
        **_SIGLIP_SO400M,
    ),
}


def model_config(
    kind: Kind,
    spec: SizeSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    extra: Mapping[str, Any] | None = None,
    dtype: str = "float32",
) -> Any:
    """Gemma3TextConfig (text), or Gemma3Config with a SigLIP vision config (vlm), for ``spec``.

    Token ids come from ``tokenizer`` (a Gemma 3 one, real or demo: its pad, bos and eos tokens, its named
    ``boi_token``, ``eoi_token`` and ``image_token``, and <end_of_turn>). ``extra`` keys are written at the
    top level and, for the vlm, in ``text_config`` too (transformers keeps, saves and reloads them as
    attributes); ``dtype`` is the one the config records.
    """
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    def extras() -> dict[str, Any]:  # a copy for each config, so that no two share a mutable value
        return copy.deepcopy(dict(extra or {}))

    tid = tokenizer.convert_tokens_to_ids
    text_config = Gemma3TextConfig(
        vocab_size=spec.vocab_size if spec.vocab_size is not None else len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        query_pre_attn_scalar=spec.query_pre_attn_scalar or spec.head_dim,
        sliding_window=spec.sliding_window,
        layer_types=spec.layer_types(),
        # Legacy field: without it the saved config says "_sliding_window_pattern": 6, whatever layer_types.
        sliding_window_pattern=spec.sliding_window_pattern,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        # Without <end_of_turn>, generation never stops at the end of a turn.
        eos_token_id=[tokenizer.eos_token_id, tid(END_OF_TURN)],
        tie_word_embeddings=True,
        dtype=dtype,
        **extras(),
    )
    if kind == "text":
        text_config.architectures = ["Gemma3ForCausalLM"]
        return text_config
    vision_config = SiglipVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_num_hidden_layers,
        num_attention_heads=spec.vision_num_attention_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        vision_use_head=False,  # Gemma 3 pools the patch embeddings itself
        layer_norm_eps=1e-6,
    )
    # The demo tokenizer's image-token ids stand in for the real 255999 / 256000 / 262144 (same roles).
    config = Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=spec.mm_tokens_per_image,
        boi_token_index=tid(tokenizer.boi_token),
        eoi_token_index=tid(tokenizer.eoi_token),
        image_token_index=tid(tokenizer.image_token),
        initializer_range=spec.initializer_range,
        tie_word_embeddings=True,
        dtype=dtype,
        **extras(),
    )
    config.architectures = ["Gemma3ForConditionalGeneration"]
    return config
