"""The scheduler's cost bookkeeping: a decode step's fitted cost and long prompts' credit beside decoding rows."""

from __future__ import annotations

import pytest

from medgemma.engine.costs import DecodeCost, PrefillCredit


def test_decode_cost_separates_the_fixed_and_the_per_row_part():
    cost = DecodeCost()
    assert cost.seconds(4) is None
    for rows in (1, 4, 8, 15, 2, 11):
        cost.observe(rows, 0.010 + 0.002 * rows)
    assert cost.seconds(1) == pytest.approx(0.012)
    assert cost.seconds(16) == pytest.approx(0.042)


def test_decode_cost_at_a_row_count_seen_follows_those_steps_not_the_line():
    cost = DecodeCost()
    for rows, seconds in ((1, 0.015), (16, 0.060), (4, 0.030), (1, 0.016), (16, 0.058)):
        cost.observe(rows, seconds)  # an earlier, slower stretch of the machine, at other row counts
    line_at_15 = cost.seconds(15)
    for _ in range(6):
        cost.observe(15, 0.040)  # what 15 rows take now
    assert line_at_15 is not None and line_at_15 > 0.050
    assert cost.seconds(15) == pytest.approx(0.040)
    assert cost.seconds(8) is not None and 0.030 < cost.seconds(8) < 0.050  # unseen: still the line


def test_credit_waits_until_it_pays_for_the_minimum_chunk_then_buys_what_it_holds():
    credit = PrefillCredit(0.5, max_tokens=512)
    credit.observe(0.001)  # a prompt token costs 1 ms
    credit.earn(0.040)  # a 40 ms decode step earns 20 ms: 20 tokens, below the minimum
    assert credit.tokens(0.040, minimum=64) == 0
    for _ in range(3):
        credit.earn(0.040)
    assert credit.tokens(0.040, minimum=64) == 80  # 80 ms banked over four steps buys 80 tokens at once


def test_credit_is_charged_what_the_chunk_really_took_and_learns_the_token_cost():
    credit = PrefillCredit(0.5, max_tokens=512)
    credit.observe(0.001)
    for _ in range(4):
        credit.earn(0.040)
    credit.charge(0.100, 80, measured=True)  # the 80 tokens took 100 ms beyond decoding, not the 80 estimated
    assert credit.balance == pytest.approx(0.080 - 0.100)
    assert credit.token_s is not None and 0.001 < credit.token_s < 0.00125
    assert credit.tokens(0.040, minimum=64) == 0  # the overrun is paid off before the next chunk


def test_a_step_shared_with_other_prompts_is_charged_the_estimate_and_teaches_nothing():
    credit = PrefillCredit(0.5, max_tokens=512)
    credit.observe(0.001)
    credit.earn(0.2)
    credit.charge(0.500, 64, measured=False)  # 500 ms includes other prompts' chunks
    assert credit.balance == pytest.approx(0.1 - 0.064)
    assert credit.token_s == pytest.approx(0.001)


def test_credit_never_banks_more_than_one_full_chunk():
    credit = PrefillCredit(1.0, max_tokens=128)
    credit.observe(0.001)
    for _ in range(100):
        credit.earn(0.050)
    assert credit.balance == pytest.approx(0.128)
    assert credit.tokens(0.050, minimum=64) == 128
    credit.reset()  # the long prompt is read: nothing stays banked for the next one
    assert credit.tokens(0.050, minimum=64) == 0


def test_unknown_costs_never_hold_a_long_prompt_back():
    credit = PrefillCredit(0.6, max_tokens=512)
    # nothing measured yet (and, with short prompts arriving every step, no decode-only step to measure): the
    # smallest efficient chunk, every step, so the long prompt advances and its cost gets measured
    assert credit.tokens(None, minimum=64) == 64
    assert credit.tokens(0.030, minimum=64) == 64
    credit.observe(0.001)
    assert credit.tokens(None, minimum=64) == 64
    assert credit.tokens(0.030, minimum=64) == 0  # both known: the balance decides
