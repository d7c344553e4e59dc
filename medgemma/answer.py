"""What a response says besides the generated text: the answer apart from any thought, and boxes in pixels.

The engine returns the text as generated (thinking tags included). Every API shapes it here, the same way:
``answer_of`` for a whole response, ``AnswerStream`` for a stream, so that the streamed pieces of each channel add
up to exactly what the whole response holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from medgemma import boxes, reasoning
from medgemma.protocol import GenerationRequest, GenerationResult


@dataclass
class Answer:
    text: str  # the answer: never a thinking tag, never the thought
    thinking: str | None  # the thought; None when the model wrote none or the request dropped it
    thinking_complete: bool  # False when the thought never closed (generation ended inside it)
    boxes: boxes.Boxes | None  # None when the answer holds no box_2d JSON

    def seed_fields(self) -> dict[str, Any]:
        """Fields of the seed response besides ``response``."""
        out: dict[str, Any] = {}
        if self.thinking is not None:
            out |= {"thinking": self.thinking, "thinking_complete": self.thinking_complete}
        if self.boxes is not None:
            out |= self.boxes.fields()
        return out

    def openai_message_fields(self) -> dict[str, Any]:
        """Fields of the OpenAI message besides ``role`` and ``content`` (``reasoning_content`` as vLLM names it)."""
        out: dict[str, Any] = {}
        if self.thinking is not None:
            out |= {"reasoning_content": self.thinking, "reasoning_complete": self.thinking_complete}
        if self.boxes is not None:
            out |= self.boxes.fields()
        return out


def answer_of(req: GenerationRequest, result: GenerationResult) -> Answer:
    split = reasoning.split_text(result.text)
    found = boxes.find_boxes(split.answer, [im.info for im in req.images])
    thinking = split.thinking if req.include_thinking else None
    return Answer(split.answer, thinking, split.complete, found)


class AnswerStream:
    """One streaming request: generated text pieces in, answer and thinking pieces out (thinking empty when dropped)."""

    def __init__(self, req: GenerationRequest) -> None:
        self._splitter = reasoning.ThinkingSplitter()
        self._keep_thinking = req.include_thinking

    def feed(self, text: str) -> reasoning.Split:
        return self._drop(self._splitter.feed(text))

    def finish(self) -> reasoning.Split:
        return self._drop(self._splitter.finish())

    def _drop(self, part: reasoning.Split) -> reasoning.Split:
        if not self._keep_thinking:
            part.thinking = ""
        return part
