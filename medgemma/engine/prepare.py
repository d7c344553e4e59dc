"""Prompt preparation: chat template + processor → token ids, image tensors and image spans. Caller's thread.

Runs outside the engine thread (in the request's worker thread), so the engine loop only ever sees tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from medgemma import structured
from medgemma.chat_template import CHAT_TEMPLATE
from medgemma.errors import BadRequest
from medgemma.loader import LoadedModel
from medgemma.protocol import GenerationRequest, ImagePart, Message, SamplingParams, TextPart


@dataclass
class PreparedRequest:
    """Tensors for one request, made by ``Preparer.prepare`` outside the engine thread."""

    request_id: str
    input_ids: torch.Tensor  # (L,)
    token_type_ids: torch.Tensor | None  # (L,) 1 where image soft tokens are
    pixel_values: torch.Tensor | None  # (n_images, 3, H, W)
    params: SamplingParams
    adapter_index: int = -1  # the LoRA adapter's slot (medgemma.lora), -1 = the base model
    constraint: structured.RowConstraint | None = None  # compiled here, off the engine thread (medgemma.structured)

    @property
    def n_input(self) -> int:
        return int(self.input_ids.shape[0])

    def image_spans(self) -> list[tuple[int, int]]:
        """[start, end) token ranges of each image's soft tokens, in order (one per row of ``pixel_values``)."""
        if self.token_type_ids is None:
            return []
        is_img = self.token_type_ids.to(torch.int8)
        edges = torch.diff(is_img, prepend=is_img.new_zeros(1), append=is_img.new_zeros(1))
        starts = (edges == 1).nonzero().flatten().tolist()
        ends = (edges == -1).nonzero().flatten().tolist()
        return list(zip(starts, ends, strict=True))


class Preparer:
    """Turns a ``GenerationRequest`` into a ``PreparedRequest`` for one loaded model."""

    def __init__(
        self, loaded: LoadedModel, *, context_length: int | None, grammars: structured.GrammarCompiler | None = None
    ) -> None:
        self.loaded = loaded
        self.processor = loaded.processor
        self.tokenizer = loaded.tokenizer
        self.context_length = context_length
        # A checkpoint without a chat template (some conversions drop it) gets Gemma 3's turn format.
        has_template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        self.chat_template: str | None = None if has_template else CHAT_TEMPLATE
        self.reserved_tokens = reserved_tokens(self.processor, self.tokenizer)
        self.grammars = grammars

    def prepare(self, req: GenerationRequest) -> PreparedRequest:
        """Raises BadRequest for prompts the model cannot take."""
        images = [p.image for p in req.images]
        self._check_reserved_tokens(req)
        chat = to_chat(req.messages, vision=self.loaded.vision)
        try:
            prompt = self.processor.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=True, chat_template=self.chat_template
            )
        except Exception as exc:  # the template raises for conversations it cannot render
            raise BadRequest(f"the model's chat template rejected the conversation: {public(exc)}") from None
        try:
            if images:
                enc = self.processor(text=prompt, images=images, return_tensors="pt", add_special_tokens=False)
            else:
                enc = (self.tokenizer if not self.loaded.vision else self.processor)(
                    text=prompt, return_tensors="pt", add_special_tokens=False
                )
        except ValueError as exc:  # the processor refuses prompts whose image markers do not match the images
            raise BadRequest(f"the prompt could not be prepared: {public(exc)}", param="messages") from None
        input_ids = enc["input_ids"][0]
        n_input = int(input_ids.shape[0])
        total = n_input + req.params.max_new_tokens
        if self.context_length and n_input >= self.context_length:
            raise BadRequest(
                f"the prompt is {n_input} tokens, which does not fit the model's context of {self.context_length} "
                "tokens; shorten the text or send fewer images",
                param="messages",
            )
        if self.context_length and total > self.context_length:
            raise BadRequest(
                f"the prompt is {n_input} tokens and max_new_tokens is {req.params.max_new_tokens}: together "
                f"{total}, above the model's context of {self.context_length} tokens",
                param="max_new_tokens",
            )
        tti = enc.get("token_type_ids")
        return PreparedRequest(
            request_id=req.request_id,
            input_ids=input_ids,
            token_type_ids=tti[0] if tti is not None and images else None,
            pixel_values=enc.get("pixel_values") if images else None,
            params=req.params,
            constraint=self.grammars.compile(req.constraint)
            if self.grammars is not None and req.constraint is not None
            else None,
        )

    def _check_reserved_tokens(self, req: GenerationRequest) -> None:
        """Text may not contain the model's control tokens (turn and image markers): typed into a prompt they would
        forge turns or image slots, and image markers make the processor or the vision merge fail."""
        for i, m in enumerate(req.messages):
            for part in m.parts:
                if isinstance(part, TextPart) and "<" in part.text:
                    found = next((t for t in self.reserved_tokens if t in part.text), None)
                    if found is not None:
                        raise BadRequest(
                            f"messages[{i}]: the text contains the reserved token {found!r}; remove it",
                            param=f"messages[{i}]",
                        )


def to_chat(messages: list[Message], *, vision: bool) -> list[dict[str, Any]]:
    """Internal messages → the chat-template format. Images become bare `{"type": "image"}` placeholders: the pixels
    go to the processor separately, so no user string ever reaches the template as a path or URL."""
    chat: list[dict[str, Any]] = []
    for m in messages:
        if vision:
            parts: list[dict[str, Any]] = []
            for p in m.parts:
                if isinstance(p, ImagePart):
                    parts.append({"type": "image"})
                elif isinstance(p, TextPart):
                    parts.append({"type": "text", "text": p.text})
            chat.append({"role": m.role, "content": parts})
        else:
            chat.append({"role": m.role, "content": m.text})
    return chat


def reserved_tokens(processor: Any, tokenizer: Any) -> tuple[str, ...]:
    """Control tokens a user's text must not contain: turn markers, BOS/EOS/PAD, image markers."""
    names = {"<start_of_turn>", "<end_of_turn>", *(str(t) for t in getattr(tokenizer, "all_special_tokens", []))}
    for owner in (processor, tokenizer):
        for attr in ("boi_token", "eoi_token", "image_token"):
            value = getattr(owner, attr, None)
            if isinstance(value, str) and value.strip():
                names.add(value.strip())
    return tuple(sorted(n for n in names if n.startswith("<") and len(n) > 2))


def public(exc: BaseException) -> str:
    """First line of an exception, short: what a client may be told about a template or processor refusal."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return msg[:300]


# --- what the engine reads off the loaded model ---------------------------------------------------------------------


def as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in x] if isinstance(x, list | tuple) else [int(x)]


def eos_ids(loaded: LoadedModel) -> list[int]:
    ids = as_list(getattr(loaded.generation_config, "eos_token_id", None))
    if not ids:
        text = loaded.config.get_text_config() if hasattr(loaded.config, "get_text_config") else loaded.config
        ids = as_list(getattr(text, "eos_token_id", None))
    if loaded.tokenizer.eos_token_id is not None:
        ids.append(int(loaded.tokenizer.eos_token_id))
    return ids


def vocab_size(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def context_length(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)
