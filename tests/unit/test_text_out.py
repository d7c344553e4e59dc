"""TextOut: streamed deltas always add up to the final text, with the demo tokenizer's real byte-fallback tokens."""

from __future__ import annotations

import itertools

import pytest

from medgemma import demo
from medgemma.engine.text import TextOut


@pytest.fixture(scope="module")
def tokenizer():
    return demo.build_tokenizer()


def run(tokenizer, ids: list[int], *, streamed: bool, stops: tuple[str, ...] = ()) -> tuple[list[str], str, bool]:
    deltas: list[str] = []
    out = TextOut(lambda x: tokenizer.decode(x, skip_special_tokens=True), deltas.append, stops)
    generated: list[int] = []
    for tok in ids:
        generated.append(tok)
        if streamed or stops:
            out.feed(generated)
            if out.stopped:
                break
    return deltas, out.finish(generated, streamed=streamed, cancelled=False), out.stopped


def byte_ids(tokenizer, *hexes: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(f"<0x{h}>") for h in hexes]


def test_invalid_utf8_streams_exactly_the_final_text(tokenizer):
    """Byte tokens that are not valid UTF-8 decode differently in a window than in the whole sequence (here the
    stream shows 'A' and a backspace where a whole decode shows replacement characters): the final text must be what
    was streamed, not a fresh decode that contradicts it."""
    word, the = tokenizer.encode("enhancement the", add_special_tokens=False)
    ids = [
        *byte_ids(tokenizer, "41", "AC"),
        word,
        *byte_ids(tokenizer, "A9"),
        word,
        the,
        *byte_ids(tokenizer, "08", "9F"),
    ]
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    deltas, final, _ = run(tokenizer, ids, streamed=True)
    assert "".join(deltas) == final
    assert final != whole  # the case that matters: a re-decode would have contradicted the stream
    euro = [*ids, word, *byte_ids(tokenizer, "E2", "82", "AC")]
    deltas, final, _ = run(tokenizer, euro, streamed=True)
    assert "".join(deltas) == final and final.endswith("€")


def test_unstreamed_text_is_one_decode_of_every_token(tokenizer):
    ids = tokenizer.encode("fever and cough", add_special_tokens=False) + byte_ids(tokenizer, "E2", "82", "AC")
    deltas, final, _ = run(tokenizer, ids, streamed=False)
    assert final == tokenizer.decode(ids, skip_special_tokens=True) == "".join(deltas)


@pytest.mark.parametrize("streamed", [True, False])
def test_stop_string_cuts_the_text_and_holds_back_partial_matches(tokenizer, streamed):
    ids = tokenizer.encode("the patient has a cough and fever", add_special_tokens=False)
    deltas, final, stopped = run(tokenizer, ids, streamed=streamed, stops=("cough",))
    assert stopped
    assert final == "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True).split("cough")[0]
    # every delta boundary is outside the stop string: "cou" was never sent before "gh" arrived
    sent = list(itertools.accumulate(deltas))
    assert all("cou" not in s.removeprefix(final) for s in sent)


def test_a_stop_string_that_never_completes_is_ordinary_text(tokenizer):
    ids = tokenizer.encode("the patient has a cou", add_special_tokens=False)
    deltas, final, stopped = run(tokenizer, ids, streamed=True, stops=("cough",))
    assert not stopped
    assert final == "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
