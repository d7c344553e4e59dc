"""References for LoRA tests: an adapter merged into its base with PEFT (``merge_and_unload``), generating greedily
with transformers' own ``generate()`` from exactly the tokens the engine would feed it."""

from __future__ import annotations

from pathlib import Path

import torch

from medgemma.config import Settings
from medgemma.demo_lora import merged_model
from medgemma.engine import Engine
from medgemma.loader import LoadedModel, load_model
from medgemma.protocol import GenerationRequest


def loaded_with(base: Path, adapter: Path | None) -> LoadedModel:
    """The base checkpoint as the server loads it, with its weights replaced by ``adapter`` merged in."""
    loaded = load_model(Settings(model=str(base)))
    if adapter is not None:
        loaded.model = merged_model(base, adapter)
    return loaded


def reference_tokens(loaded: LoadedModel, req: GenerationRequest) -> list[int]:
    """Greedy tokens of ``req`` from ``generate()``, end-of-turn tokens dropped (the engine does not return them)."""
    engine = Engine(loaded)  # never started: used for its prompt preparation only
    prepared = engine.prepare(GenerationRequest(req.messages, req.params))  # no adapter: the weights carry it
    kwargs = {}
    if prepared.pixel_values is not None:
        kwargs = {"pixel_values": prepared.pixel_values, "token_type_ids": prepared.token_type_ids[None]}
    with torch.no_grad():
        out = loaded.model.generate(
            input_ids=prepared.input_ids[None],
            attention_mask=torch.ones_like(prepared.input_ids[None]),
            max_new_tokens=req.params.max_new_tokens,
            do_sample=False,
            **kwargs,
        )
    return [t for t in out[0, prepared.n_input :].tolist() if t not in engine.eos_ids]


def reference_text(loaded: LoadedModel, req: GenerationRequest) -> str:
    return loaded.tokenizer.decode(reference_tokens(loaded, req), skip_special_tokens=True)
