"""Thinking traces split from the answer: whole texts, streamed pieces, tags cut anywhere, the real tokenizer's ids."""

from __future__ import annotations

import itertools

import pytest
from transformers import AutoTokenizer

from medgemma.reasoning import THINK_CLOSE, THINK_OPEN, ThinkingSplitter, split_text, tag_ids, tag_preserving_decoder

TRACE = f"{THINK_OPEN}thought\nThe opacity is in the right lower zone.{THINK_CLOSE}Right lower lobe pneumonia."


def feed_pieces(text: str, cuts: list[int]) -> tuple[str, str, ThinkingSplitter]:
    splitter = ThinkingSplitter()
    answer = thinking = ""
    bounds = [0, *cuts, len(text)]
    for a, b in itertools.pairwise(bounds):
        part = splitter.feed(text[a:b])
        answer += part.answer
        thinking += part.thinking
    part = splitter.finish()
    return answer + part.answer, thinking + part.thinking, splitter


def test_whole_text_is_split_and_the_label_dropped():
    t = split_text(TRACE)
    assert t.answer == "Right lower lobe pneumonia."
    assert t.thinking == "The opacity is in the right lower zone."
    assert t.complete


def test_text_without_thought_is_untouched():
    t = split_text("No acute findings. <b>bold</b> < 5 mm")
    assert (t.answer, t.thinking, t.complete) == ("No acute findings. <b>bold</b> < 5 mm", None, True)


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7])
def test_every_cut_gives_the_same_split(step):
    """Streamed in pieces of any size, tags and label cut anywhere, the channels are what the whole text gives."""
    answer, thinking, splitter = feed_pieces(TRACE, list(range(step, len(TRACE), step)))
    assert answer == "Right lower lobe pneumonia."
    assert thinking == "The opacity is in the right lower zone."
    assert not splitter.unclosed


def test_no_tag_text_ever_reaches_the_answer_while_streaming():
    splitter = ThinkingSplitter()
    seen = ""
    for ch in TRACE:
        seen += splitter.feed(ch).answer
        assert "<unused" not in seen and "<" not in seen  # a partial tag is held, never shown
    assert seen + splitter.finish().answer == "Right lower lobe pneumonia."


def test_unclosed_thought_is_reported():
    t = split_text(f"{THINK_OPEN}thought\nstill reasoning when tokens ran out")
    assert t.answer == ""
    assert t.thinking == "still reasoning when tokens ran out"
    assert not t.complete


def test_thought_without_label_and_stray_tags():
    t = split_text(f"{THINK_OPEN}thou{THINK_CLOSE}answer{THINK_CLOSE} tail{THINK_OPEN}")
    assert t.thinking == "thou"  # a partial label that turned out not to be one is kept
    assert t.answer == "answer tail"  # a stray closing tag is dropped
    assert not t.complete  # the last opening tag was never closed


def test_held_partial_tag_is_released_at_the_end():
    answer, thinking, _ = feed_pieces("a < b and <unus", [3, 9])
    assert (answer, thinking) == ("a < b and <unus", "")


def test_demo_tokenizer_has_the_tags_at_the_real_ids_and_not_special(tiny_vlm):
    """As in the real Gemma 3 tokenizer (ids 100/101; Google's notebook splits text decoded with
    skip_special_tokens=True on "<unused95>", so the tags survive that decode)."""
    tok = AutoTokenizer.from_pretrained(tiny_vlm)
    assert tag_ids(tok) == (100, 101)
    ids = tok.encode(TRACE, add_special_tokens=False)
    assert ids[0] == 100 and 101 in ids
    assert tok.decode(ids, skip_special_tokens=True) == TRACE
    assert tag_preserving_decoder(tok)(ids) == TRACE


def test_decoder_keeps_tags_a_tokenizer_marks_special(tiny_vlm):
    """A converted tokenizer that marks the tags special would drop them in decode: the decoder puts them back."""
    from tokenizers import AddedToken

    tok = AutoTokenizer.from_pretrained(tiny_vlm)
    tok.add_tokens([AddedToken(THINK_OPEN, special=True), AddedToken(THINK_CLOSE, special=True)], special_tokens=True)
    ids = tok.encode(TRACE, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) != TRACE  # the plain decode loses them
    assert tag_preserving_decoder(tok)(ids) == TRACE
    assert split_text(tag_preserving_decoder(tok)(ids)).answer == "Right lower lobe pneumonia."
