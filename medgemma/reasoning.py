"""Thinking traces kept apart from the answer: MedGemma's ``<unused94>thought ... <unused95>`` blocks.

MedGemma 27B (asked with "SYSTEM INSTRUCTION: think silently if needed.") and MedGemma 1.5 may open an answer with a
thought: ``<unused94>thought\\n`` + the reasoning + ``<unused95>`` + the answer. Google's notebooks cut it off by hand
(``split("<unused95>", 1)``, then drop ``"<unused94>thought\\n"``). Here the thought goes to its own channel
(``thinking`` / ``reasoning_content``) and neither tag ever reaches the answer.

Facts this relies on, and how it stays right when they do not hold:

* In the real Gemma 3 tokenizer both tags are added tokens that are **not** special: Google's quick-start notebook
  decodes with ``skip_special_tokens=True`` and then splits on ``"<unused95>"``, which only works because the tag
  survives that decode. The demo tokenizer registers them the same way, at the real ids (100 and 101).
  :func:`tag_preserving_decoder` still renders them should a converted tokenizer mark them special, so the split
  never depends on that flag.
* A tag may arrive as one token or spelled in pieces ("<", "unused", "9", "5", ">"), and streamed text is cut
  anywhere: :class:`ThinkingSplitter` works on text and holds back any tail that could be the start of a tag.
* Only what the tags delimit is thinking. A stray closing tag with no open thought, or a second opening tag inside
  a thought, is dropped: tags are never part of either channel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

THINK_OPEN = "<unused94>"
THINK_CLOSE = "<unused95>"
THOUGHT_LABEL = "thought\n"  # what the model writes right after the opening tag (Google's notebooks remove it)
_TAGS = (THINK_OPEN, THINK_CLOSE)


@dataclass
class Split:
    """Text for each channel, from one piece of input."""

    answer: str = ""
    thinking: str = ""

    def __iadd__(self, other: Split) -> Split:
        self.answer += other.answer
        self.thinking += other.thinking
        return self


class ThinkingSplitter:
    """Routes a request's text, fed in pieces as it is generated, to the answer or the thinking channel."""

    def __init__(self) -> None:
        self.in_thought = False
        self.saw_thought = False
        self._held = ""  # tail that may be the start of a tag
        self._label = ""  # start of a thought, held until it is known whether it is the "thought\n" label
        self._label_pending = False

    @property
    def unclosed(self) -> bool:
        """A thought was opened and never closed (generation stopped inside it, e.g. at max tokens)."""
        return self.in_thought

    def feed(self, text: str) -> Split:
        out = Split()
        buf = self._held + text
        self._held = ""
        while buf:
            hits = [(at, tag) for tag in _TAGS if (at := buf.find(tag)) != -1]
            if not hits:
                keep = _partial_tag_suffix(buf)
                out += self._route(buf[: len(buf) - keep])
                self._held = buf[len(buf) - keep :]
                break
            at, tag = min(hits)
            out += self._route(buf[:at])
            buf = buf[at + len(tag) :]
            if tag == THINK_OPEN and not self.in_thought:
                self.in_thought = self.saw_thought = True
                self._label_pending, self._label = True, ""
            elif tag == THINK_CLOSE and self.in_thought:
                out += self._flush_label()
                self.in_thought = False
        return out

    def finish(self) -> Split:
        """The end of the text: release whatever was held back (it did not turn out to be a tag)."""
        held, self._held = self._held, ""
        out = self._route(held)
        out += self._flush_label()
        return out

    def _route(self, text: str) -> Split:
        if not text:
            return Split()
        if not self.in_thought:
            return Split(answer=text)
        if self._label_pending:
            label = self._label + text
            if THOUGHT_LABEL.startswith(label):  # maybe still arriving: hold
                self._label = label
                return Split()
            self._label_pending, self._label = False, ""
            return Split(thinking=label.removeprefix(THOUGHT_LABEL))
        return Split(thinking=text)

    def _flush_label(self) -> Split:
        label, self._label = self._label, ""
        pending, self._label_pending = self._label_pending, False
        return Split(thinking=label) if pending and label and label != THOUGHT_LABEL else Split()


@dataclass
class Thought:
    """A whole response, split: the answer, the thinking (None when the model wrote none), and whether it closed."""

    answer: str
    thinking: str | None
    complete: bool


def split_text(text: str) -> Thought:
    splitter = ThinkingSplitter()
    parts = splitter.feed(text)
    parts += splitter.finish()
    return Thought(parts.answer, parts.thinking if splitter.saw_thought else None, not splitter.unclosed)


def _partial_tag_suffix(text: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a tag."""
    best = 0
    for tag in _TAGS:
        for n in range(min(len(tag) - 1, len(text)), 0, -1):
            if text.endswith(tag[:n]):
                best = max(best, n)
                break
    return best


def tag_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """Token ids of the opening and closing tags; None for a tag the vocabulary lacks."""
    out: list[int | None] = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for tag in _TAGS:
        tid = tokenizer.convert_tokens_to_ids(tag)
        out.append(int(tid) if isinstance(tid, int) and tid != unk else None)
    return out[0], out[1]


def tag_preserving_decoder(tokenizer: Any) -> Callable[[Sequence[int]], str]:
    """``decode(ids, skip_special_tokens=True)`` that never loses a thinking tag.

    With the real Gemma 3 tokenizer (tags not special) this is the plain decode. With a tokenizer that marks a tag
    special, the ids are decoded around the tag tokens and the tag text put back in between."""
    hidden: dict[int, str] = {}
    for tag, tid in zip(_TAGS, tag_ids(tokenizer), strict=True):
        if tid is not None and tokenizer.decode([tid], skip_special_tokens=True) != tag:
            hidden[tid] = tag

    def plain(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    if not hidden:
        return plain

    def decode(ids: Sequence[int]) -> str:
        parts: list[str] = []
        start = 0
        for k, t in enumerate(ids):
            if t in hidden:
                parts.extend((plain(ids[start:k]), hidden[t]))
                start = k + 1
        parts.append(plain(ids[start:]))
        return "".join(parts)

    return decode
